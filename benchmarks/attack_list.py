"""The attack list of issue 15 against gunicorn on PostgreSQL under the production settings: one row per case
with the status seen, the status expected and whether it passed.

    .venv/bin/python benchmarks/attack_list.py

A fresh database `rlhf_attack` on $BENCH_PG (default postgres://postgres@127.0.0.1:5432), the cache (shared by
gunicorn's workers, as in production) on $ATTACK_CACHE_URL (default redis://127.0.0.1:6379/12, flushed
first), gunicorn on a free port of 127.0.0.1 only. Every case sends a bounded number of requests (at most 160);
the script stops gunicorn and exits 1 when any row fails.
"""

import gzip
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.platform_env import ROOT, bench_env, fresh_database, gunicorn  # noqa: E402

CACHE_URL = os.environ.get("ATTACK_CACHE_URL", "redis://127.0.0.1:6379/12")
PASSWORD = "attack-list-password-123"
ROWS: list[tuple[str, str, str, bool]] = []


def row(case: str, status, expected: str, passed: bool) -> None:
    ROWS.append((case, str(status), expected, passed))


def expect(case: str, status: int, *expected: int) -> None:
    row(case, status, " or ".join(map(str, expected)), status in expected)


class Http:
    """One keep-alive connection to gunicorn, with an optional token or session."""

    def __init__(self, port: int, token: str | None = None):
        self.port, self.token, self.cookies = port, token, {}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def request(self, method: str, path: str, body=None, *, form: bool = False, headers=None):
        head = dict(headers or {})
        if self.token:
            head["Authorization"] = f"Token {self.token}"
        if self.cookies:
            head["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if isinstance(body, dict | list):
            body = urlencode(body) if form else json.dumps(body)
            head["Content-Type"] = "application/x-www-form-urlencoded" if form else "application/json"
        if body is not None and form and "csrftoken" in self.cookies:
            head["Referer"] = f"http://127.0.0.1:{self.port}/login/"
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=body, headers=head)
                response = self.conn.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                if attempt == 2:
                    raise
        for value in response.headers.get_all("Set-Cookie") or []:
            name, _, rest = value.partition("=")
            self.cookies[name] = rest.split(";")[0]
        return response.status, data

    def close(self):
        self.conn.close()


def set_up_data() -> dict:
    """Users of every role with tokens, one open batch of helpfulness and safety comparisons, gold included."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from annotation.models import AnnotatorProfile, Batch, PolicyVersion, Role
    from annotation.services.imports import ComparisonRecord, ResponseRecord, comparisons_store

    users = {}
    for name, role, safety in (("ann", Role.ANNOTATOR, False), ("ann2", Role.ANNOTATOR, True),
                               ("hasty", Role.ANNOTATOR, False), ("rev", Role.REVIEWER, True),
                               ("res", Role.RESEARCHER, True), ("guessed", Role.ANNOTATOR, False),
                               ("paged", Role.ANNOTATOR, False), ("sprayed", Role.ANNOTATOR, False)):  # fmt: skip
        user = get_user_model().objects.create_user(name, password=PASSWORD)
        AnnotatorProfile.objects.create(user=user, role=role, skill_safety=safety)
        users[name] = Token.objects.create(user=user).key
    PolicyVersion.objects.get_or_create(name="SFT")
    batch = Batch.objects.create(name="attack", overlap=3, gold_rate=0.1)
    records = [
        ComparisonRecord(
            turns=(("user", f"{domain} prompt {i}"),),
            response_a=ResponseRecord(f"answer A{i}", "SFT", {"temperature": 0.7}),
            response_b=ResponseRecord(f"answer B{i}", "SFT", {"temperature": 1.0}),
            domain=domain,
            risk_category="illicit_criminal" if domain == "safety" else "",
            gold_choice="a" if i % 10 == 0 else "",
        )
        for domain in ("helpfulness", "safety")
        for i in range(40)
    ]
    comparisons_store(batch=batch, records=records)
    return {"tokens": users, "batch_id": batch.id}


def blindness_and_access(port: int, data: dict) -> None:
    tokens, batch_id = data["tokens"], data["batch_id"]
    ann, rev = Http(port, tokens["ann"]), Http(port, tokens["rev"])
    expect("annotator: GET batch stats", ann.request("GET", f"/api/v1/batches/{batch_id}/stats/")[0], 403)
    expect("annotator: GET annotators/quality", ann.request("GET", "/api/v1/annotators/quality/")[0], 403)
    expect("annotator: GET policies", ann.request("GET", "/api/v1/policies/")[0], 403)
    expect("annotator: GET batches", ann.request("GET", "/api/v1/batches/")[0], 403)
    status, body = ann.request("GET", "/api/v1/annotators/me/")
    expect("annotator: GET own counts (annotators/me)", status, 200)
    row("annotator: own counts name nothing else", sorted(json.loads(body)) if status == 200 else status,
        "username, role, domains, counts", status == 200 and "gold" not in body.decode())  # fmt: skip
    expect("reviewer: GET batch stats", rev.request("GET", f"/api/v1/batches/{batch_id}/stats/")[0], 200)
    anonymous = Http(port)
    expect("anonymous: GET /api/schema/", anonymous.request("GET", "/api/schema/")[0], 401, 403)
    expect("anonymous: GET /api/schema/ui/", anonymous.request("GET", "/api/schema/ui/")[0], 401, 403)
    status, html = ann.request("GET", "/api/schema/ui/")
    expect("signed in: GET /api/schema/ui/", status, 200)
    assets = re.findall(r"""(?:src|href)=["'](/static/[^"']+)["']""", html.decode())
    cdn = re.search(r"https?://(cdn\.jsdelivr\.net|unpkg\.com|cdnjs)", html.decode())
    asset_codes = sorted({anonymous.request("GET", a)[0] for a in assets}) if assets else ["none"]
    row("schema UI: assets from the project, no CDN", f"{len(assets)} assets {asset_codes}, cdn={bool(cdn)}",
        "all 200, cdn=False", bool(assets) and asset_codes == [200] and not cdn)  # fmt: skip
    for client in (ann, rev, anonymous):
        client.close()


def log_in_limits(port: int) -> None:
    client = Http(port)
    codes = [client.request("POST", "/api/v1/auth/token/", {"username": "guessed", "password": f"guess-{i}"})[0]
             for i in range(11)]  # fmt: skip
    row("token: 10 wrong passwords, then an 11th", f"{codes[:10].count(400)}x400, then {codes[10]}", "10x400, then 429",
        codes[:10] == [400] * 10 and codes[10] == 429)  # fmt: skip
    expect("token: right password during the window", client.request(
        "POST", "/api/v1/auth/token/", {"username": "guessed", "password": PASSWORD})[0], 429)  # fmt: skip

    page = Http(port)
    page.request("GET", "/login/")
    codes = []
    for i in range(11):
        fields = {"username": "paged", "password": f"guess-{i}", "csrfmiddlewaretoken": page.cookies.get("csrftoken", "")}
        codes.append(page.request("POST", "/login/", fields, form=True)[0])
    row("log-in page: 10 wrong passwords, then an 11th", f"{codes[:10].count(200)}x200, then {codes[10]}",
        "10x200 (form again), then 429", codes[:10] == [200] * 10 and codes[10] == 429)  # fmt: skip
    fields = {"username": "paged", "password": PASSWORD, "csrfmiddlewaretoken": page.cookies.get("csrftoken", "")}
    expect("log-in page: right password during the window", page.request("POST", "/login/", fields, form=True)[0], 429)

    # 24 attempts counted against this address so far (refused ones count too); 26 more reach its limit of 50.
    codes = [client.request("POST", "/api/v1/auth/token/", {"username": f"nobody-{i}", "password": "x"})[0]
             for i in range(26)]  # fmt: skip
    status = client.request("POST", "/api/v1/auth/token/", {"username": "sprayed", "password": PASSWORD})[0]
    row("address: 50 failures over many names, then a right password", f"{codes.count(400)}x400, then {status}",
        "26x400, then 429", codes == [400] * 26 and status == 429)  # fmt: skip
    spoofed = client.request("POST", "/api/v1/auth/token/", {"username": "sprayed", "password": PASSWORD},
                             headers={"X-Forwarded-For": "10.9.8.7"})[0]  # fmt: skip
    expect("address: a forged X-Forwarded-For does not reset it", spoofed, 429)
    client.close()
    page.close()


def claim_throttle(port: int, token: str) -> None:
    # One window of the 120/min limit: start the burst well inside a minute.
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)
    codes: list[int] = []
    lock = threading.Lock()

    def claims() -> None:
        client = Http(port, token)
        for _ in range(20):
            status = client.request("POST", "/api/v1/tasks/next/")[0]
            with lock:
                codes.append(status)
        client.close()

    threads = [threading.Thread(target=claims) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    allowed = sum(c in (200, 204) for c in codes)
    row("claim: 8 threads x 20 claims at 120/min", f"{allowed} allowed, {codes.count(429)}x429", "120 allowed",
        allowed == 120 and allowed + codes.count(429) == 160)  # fmt: skip


def production_defaults(env: dict) -> None:
    def manage(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    for case, key in (("SECRET_KEY=x", "x"), ("the development key", "dev-only-insecure-key-do-not-deploy")):
        result = manage("check", SECRET_KEY=key)
        row(f"production start with {case}", f"exit {result.returncode}", "exit != 0 (refused)",
            result.returncode != 0 and "SECRET_KEY" in result.stderr)  # fmt: skip
    result = manage("load_demo")
    row("load_demo under production", f"exit {result.returncode}", "exit != 0 (refused)",
        result.returncode != 0 and "refused" in result.stderr)  # fmt: skip


def no_500(port: int, data: dict) -> None:
    """Part B's rows (validation, upload limit, imports)."""
    tokens, batch_id = data["tokens"], data["batch_id"]
    res = Http(port, tokens["res"])
    # The annotation page's JSON submit, signed in with a session.
    page = Http(port)
    page.request("GET", "/login/")
    page.request("POST", "/login/", {"username": "ann2", "password": PASSWORD,
                                     "csrfmiddlewaretoken": page.cookies.get("csrftoken", "")}, form=True)  # fmt: skip
    csrf = {"X-CSRFToken": page.cookies.get("csrftoken", ""), "Referer": f"http://127.0.0.1:{port}/annotate/"}
    status, body = page.request("POST", "/annotate/next/", {}, headers=csrf)
    task = json.loads(body).get("task") if status == 200 else None
    good = {"choice": "a", "strength": "better", "time_on_task_ms": 9000}
    if task and task["domain"] == "safety":
        good["safety_label"] = "both_safe"
    for case, extra in (("note NUL", {"note": "x\u0000y"}), ("note lone surrogate", {"note": "\udc80"}),
                        ("continue_with NUL", {"continue_with": "x\u0000y"}),
                        ("continue_with lone surrogate", {"continue_with": "\udc80"}),
                        ("time_on_task_ms 10^12", {"time_on_task_ms": 10**12})):  # fmt: skip
        if task is None:
            row(f"page submit: {case}", f"no task ({status})", "400", False)
            continue
        expect(f"page submit: {case}", page.request(
            "POST", f"/annotate/{task['task_id']}/submit/", {**good, **extra}, headers=csrf)[0], 400)  # fmt: skip
    ann = Http(port, tokens["ann"])
    status, body = ann.request("POST", "/api/v1/tasks/next/")
    api_task = json.loads(body)["task_id"] if status == 200 else None
    for case, extra in (("note: 123", {"note": 123}), ("safety_label on a helpfulness task",
                                                        {"safety_label": "both_safe"})):  # fmt: skip
        expect(f"API submit: {case}", ann.request("POST", f"/api/v1/tasks/{api_task}/submit/",
                                                  {**good, **extra})[0] if api_task else 0, 400)  # fmt: skip
    for case, metrics in (("key NUL", {"a\u0000": 1}), ("value NUL", {"a": "x\u0000"}),
                          ("key lone surrogate", {"\udc80": 1}), ("value lone surrogate", {"a": "\udc80"})):  # fmt: skip
        expect(f"POST policies: metrics {case}",
               res.request("POST", "/api/v1/policies/", {"name": f"p-{case}", "kind": "sft", "metrics": metrics})[0], 400)
    item = {"prompt": "hello", "domain": "helpfulness", "responses": [
        {"text": "one", "policy_version": "SFT", "sampling": {"t\u0000": 1}},
        {"text": "two", "policy_version": "SFT"}]}  # fmt: skip
    expect("POST import: sampling key NUL", res.request(
        "POST", "/api/v1/comparisons/import/", {"batch": "attack", "items": [item]})[0], 400)  # fmt: skip
    same = {**item, "responses": [{"text": "same", "policy_version": "SFT"}, {"text": "same", "policy_version": "SFT"}]}
    expect("POST import: two identical responses", res.request(
        "POST", "/api/v1/comparisons/import/", {"batch": "attack", "items": [same]})[0], 400)  # fmt: skip
    big = json.dumps({"name": "big", "kind": "sft", "metrics": {"pad": "x" * 3_000_000}})
    status, body = res.request("POST", "/api/v1/policies/", big, headers={"Content-Type": "application/json"})
    row("API: body over the upload limit", f"{status} {body[:40]!r}", "413 JSON",
        status == 413 and body.lstrip().startswith(b"{"))  # fmt: skip
    expect("API: next request on the same connection", res.request("GET", f"/api/v1/batches/{batch_id}/")[0], 200)
    for client in (res, page, ann):
        client.close()


def imports(env: dict) -> None:
    """Part B's rows: `import_preferences` ends in a one-line error, never a traceback, and stores nothing."""
    line = json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"})
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        whole = gzip.compress((line + "\n").encode() * 50)
        files["truncated .gz"] = ("t.jsonl.gz", whole[: len(whole) // 2], ())
        files["not gzip, named .gz"] = ("n.jsonl.gz", (line + "\n").encode(), ())
        files["a 0xff byte"] = ("f.jsonl", (line + "\n").encode() + b"\xff\n", ())
        files["a lone surrogate"] = ("s.jsonl", (line.replace("hello", "\\udc80") + "\n").encode(), ())
        files["a NUL in a text"] = ("z.jsonl", (line.replace("hello", "hel\\u0000lo") + "\n").encode(), ())
        files["--overlap 0"] = ("o.jsonl", (line + "\n").encode(), ("--overlap", "0"))
        files["--overlap -3"] = ("m.jsonl", (line + "\n").encode(), ("--overlap", "-3"))
        for i, (case, (name, content, extra)) in enumerate(files.items()):
            path = Path(tmp) / name
            path.write_bytes(content)
            result = subprocess.run(
                [sys.executable, "manage.py", "import_preferences", "--format", "hh-rlhf", "--domain", "safety",
                 "--batch", f"import-attack-{i}", str(path), *extra],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            traceback = "Traceback" in result.stderr
            from annotation.models import Batch

            left = Batch.objects.filter(name=f"import-attack-{i}").exists()
            row(f"import_preferences: {case}", f"exit {result.returncode}, traceback={traceback}, batch={left}",
                "exit 1, traceback=False, batch=False", result.returncode == 1 and not traceback and not left)  # fmt: skip


def main() -> int:
    import redis

    redis.Redis.from_url(CACHE_URL).flushdb()
    fresh_database("rlhf_attack")
    env = {**bench_env("rlhf_attack"), "THROTTLE_CLAIM": "120/min", "THROTTLE_SUBMIT": "120/min",
           "CACHE_URL": CACHE_URL, "SECRET_KEY": "attack-list-only-" + "k3Y9" * 12}  # fmt: skip
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--no-input", "-v0"], cwd=ROOT, env=env, check=True)
    data = set_up_data()
    with gunicorn(env) as (port, _pid):
        blindness_and_access(port, data)
        no_500(port, data)
        claim_throttle(port, data["tokens"]["hasty"])
        log_in_limits(port)  # last: it locks this address out of log-ins for the window
    production_defaults(env)
    imports(env)

    width = max(len(r[0]) for r in ROWS)
    status_width = max(len(r[1]) for r in ROWS)
    print(f"{'case':<{width}}  {'status':<{status_width}}  {'expected':<30}  pass")
    for case, status, expected, passed in ROWS:
        print(f"{case:<{width}}  {status:<{status_width}}  {expected:<30}  {'yes' if passed else 'NO'}")
    failed = sum(not r[3] for r in ROWS)
    print(f"{len(ROWS) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
