"""Annotation loop throughput and latency: simulated annotators (each its own user) claim, then submit,
against gunicorn on PostgreSQL. Closed loop at K = 1, 8, 32 and an open loop at a fixed arrival rate.

    .venv/bin/python benchmarks/annotation_loop.py [--sizes 2000 20000] [--seconds 15] [--rate 50]

Prints one JSON object. The peer (Label Studio 1.23, gunicorn 2 x 8 threads on PostgreSQL, measured on this
machine kind and given in issue 2) is quoted for the ratio; it is not re-run here.
"""

import argparse
import http.client
import json
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.platform_env import fresh_database, gunicorn, percentile  # noqa: E402

LABEL_STUDIO = {"K=1": 6.5, "K=8": 11.0, "next_task_p99_ms_K8": 590, "next_task_p99_ms_K32": 2900}
SUBMIT = json.dumps({"choice": "a", "strength": "better", "time_on_task_ms": 12000}).encode()


def make_users(n: int) -> list[str]:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from annotation.models import AnnotatorProfile

    users = get_user_model().objects.bulk_create([get_user_model()(username=f"bench-{i}") for i in range(n)])
    AnnotatorProfile.objects.bulk_create([AnnotatorProfile(user=u) for u in users])
    return [Token.objects.create(user=u).key for u in users]


def make_batch(name: str, n_tasks: int, overlap: int = 1) -> None:
    from annotation.models import Batch, BatchStatus, PolicyVersion
    from annotation.services.imports import ComparisonRecord, ResponseRecord, comparisons_store

    Batch.objects.filter(status=BatchStatus.OPEN).update(status=BatchStatus.CLOSED, closed_at="2026-01-01T00:00Z")
    PolicyVersion.objects.get_or_create(name="SFT")
    batch = Batch.objects.create(name=name, overlap=overlap)
    for start in range(0, n_tasks, 5000):
        records = [
            ComparisonRecord(
                turns=(("user", f"Prompt {i}: explain something in a few sentences."),),
                response_a=ResponseRecord(f"Answer A to prompt {i}. " * 8, "SFT", {"temperature": 0.7}),
                response_b=ResponseRecord(f"Answer B to prompt {i}. " * 8, "SFT", {"temperature": 1.0}),
                domain="helpfulness",
            )
            for i in range(start, min(start + 5000, n_tasks))
        ]
        comparisons_store(batch=batch, records=records)


class Client:
    """One keep-alive connection per simulated annotator."""

    def __init__(self, port: int, token: str):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def post(self, path: str, body: bytes = b"") -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        try:
            self.conn.request("POST", path, body=body, headers=self.headers)
            response = self.conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):
            # gunicorn closes idle keep-alive connections (2 s): reconnect, as a browser would.
            self.conn.close()
            t0 = time.perf_counter()
            self.conn.request("POST", path, body=body, headers=self.headers)
            response = self.conn.getresponse()
        data = response.read()
        return response.status, data, (time.perf_counter() - t0) * 1000

    def loop(self, lat_next: list, lat_submit: list) -> bool:
        status, data, ms = self.post("/api/v1/tasks/next/")
        lat_next.append(ms)
        if status == 204:
            return False
        if status != 200:
            raise RuntimeError(f"claim: HTTP {status} {data[:200]!r}")
        task_id = json.loads(data)["task_id"]
        status, data, ms = self.post(f"/api/v1/tasks/{task_id}/submit/", SUBMIT)
        lat_submit.append(ms)
        if status != 201:
            raise RuntimeError(f"submit: HTTP {status} {data[:200]!r}")
        return True


def summarise(lat_next, lat_submit, loops, seconds) -> dict:
    both = lat_next + lat_submit
    return {
        "loops_per_s": round(loops / seconds, 1),
        "loops": loops,
        "next_ms": {p: round(percentile(lat_next, q), 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "submit_ms": {p: round(percentile(lat_submit, q), 1) for p, q in (("p50", 50), ("p95", 95), ("p99", 99))},
        "request_p99_ms": round(percentile(both, 99), 1),
    }


def closed_loop(port: int, tokens: list[str], k: int, seconds: float) -> dict:
    lat_next: list[float] = []
    lat_submit: list[float] = []
    loops = [0] * k
    errors: list[str] = []
    stop = time.monotonic() + seconds

    def run(i: int):
        client = Client(port, tokens[i])
        try:
            while time.monotonic() < stop:
                if not client.loop(lat_next, lat_submit):
                    errors.append("pool ran dry")
                    return
                loops[i] += 1
        except Exception as e:  # reported in the JSON
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = summarise(lat_next, lat_submit, sum(loops), time.monotonic() - t0)
    if errors:
        out["errors"] = sorted(set(errors))[:5]
    return out


def open_loop(port: int, tokens: list[str], rate: float, seconds: float) -> dict:
    """Loops start on a fixed schedule (rate per second) whatever the server does; idle users take them."""
    lat_next: list[float] = []
    lat_submit: list[float] = []
    free: queue.Queue = queue.Queue()
    for token in tokens:
        free.put(Client(port, token))
    done = [0]
    late: list[float] = []
    errors: list[str] = []
    threads = []

    def one(client: Client, due: float):
        late.append((time.monotonic() - due) * 1000)
        try:
            if client.loop(lat_next, lat_submit):
                done[0] += 1
        except Exception as e:
            errors.append(repr(e))
        free.put(client)

    n = int(rate * seconds)
    t0 = time.monotonic()
    for i in range(n):
        due = t0 + i / rate
        time.sleep(max(0.0, due - time.monotonic()))
        t = threading.Thread(target=one, args=(free.get(), due))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    out = summarise(lat_next, lat_submit, done[0], time.monotonic() - t0)
    out.update(offered_rate=rate, start_lateness_p99_ms=round(percentile(late, 99), 1))
    if errors:
        out["errors"] = sorted(set(errors))[:5]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rate", type=float, default=50)
    args = parser.parse_args()

    env = fresh_database("rlhf_bench_loop")
    tokens = make_users(200)
    results: dict = {"peer_label_studio_1_23": LABEL_STUDIO, "runs": {}}
    with gunicorn(env) as (port, _pid):
        for size in args.sizes:
            run: dict = {}
            for k in args.ks:
                make_batch(f"closed-{size}-{k}", size)
                run[f"closed_K{k}"] = closed_loop(port, tokens[:k], k, args.seconds)
            make_batch(f"open-{size}", size)
            run["open"] = open_loop(port, tokens[:100], args.rate, args.seconds)
            results["runs"][str(size)] = run
    for run in results["runs"].values():
        for k in args.ks:
            peer = LABEL_STUDIO.get(f"K={k}")
            if peer:
                run[f"closed_K{k}"]["vs_label_studio"] = round(run[f"closed_K{k}"]["loops_per_s"] / peer, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
