"""Export speed: N annotations to JSONL through the API (gunicorn, PostgreSQL), side by side with
PostgreSQL's own COPY (SELECT ...) TO STDOUT of the same rows, in the same run.

    .venv/bin/python benchmarks/export_stream.py [--annotations 200000] [--formats native trl]

Prints JSON: rows/s, time to first byte and the server's peak memory growth for the API, and rows/s for
COPY, twice: of the joined columns, and of the same JSON documents the API sends (rendered by PostgreSQL);
memory is measured at two sizes (a quarter and all of the rows) to show it stays flat.
"""

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.platform_env import fresh_database, gunicorn  # noqa: E402

# The same joined columns the API renders, copied out raw: PostgreSQL's own speed on these rows.
COPY_COLUMNS = """
  a.id, a.choice, a.strength, a.safety_label, a.note, a.time_on_task_ms, a.too_fast, a.created_at,
  a.annotator_id, t.id, b.name, t.split, t.domain, p.risk_category, t.is_gold, t.context_length,
  t.annotation_count, ra.id, ra.text, pa.name, ra.sampling, rb.id, rb.text, pb.name, rb.sampling,
  (SELECT json_agg(json_build_object('role', u.role, 'content', u.text) ORDER BY u.position)
     FROM annotation_turn u WHERE u.dialogue_id = t.dialogue_id AND u.position < t.context_length)
"""


def populate(n_annotations: int) -> None:
    """Tasks with 3 annotations each, two-turn dialogues, realistic reply lengths."""
    from annotation.models import Batch, PolicyVersion
    from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord, comparisons_store

    PolicyVersion.objects.get_or_create(name="SFT")
    PolicyVersion.objects.get_or_create(name="RLHF-V1")
    batch = Batch.objects.create(name="export-bench", overlap=3)
    strengths = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    n_tasks = n_annotations // 3
    for start in range(0, n_tasks, 3000):
        records = [
            ComparisonRecord(
                turns=(("user", f"Question {i}: how do I do thing {i}?"), ("assistant", "Could you say more?"),
                       ("user", f"I mean thing {i} at home, safely.")),
                response_a=ResponseRecord(f"Here is how to do thing {i}. " * 12, "RLHF-V1", {"temperature": 0.6}),
                response_b=ResponseRecord(f"Thing {i} is hard; try something else. " * 8, "SFT", {"temperature": 1.0}),
                domain="helpfulness",
                votes=tuple(
                    VoteRecord(f"bench:{(i + j) % 50}", "a" if (i + j) % 4 else "b", strengths[(i + j) % 4],
                               time_on_task_ms=20000 + j)
                    for j in range(3)
                ),
            )  # fmt: skip
            for i in range(start, min(start + 3000, n_tasks))
        ]
        comparisons_store(batch=batch, records=records, create_external_policies=True)


def copy_json_sql() -> str:
    """COPY of the very JSON documents the API sends (native format), rendered by PostgreSQL."""
    from django.conf import settings

    from annotation.services.exports import ExportFilters
    from annotation.services.exports_sql import _FROM, _RENDER, _where

    where, _ = _where(ExportFilters())
    salt = settings.ANNOTATOR_PSEUDONYM_SALT.replace("'", "''")
    render = _RENDER["native"].replace("%(salt)s", f"'{salt}'")
    return f"COPY (SELECT ({render})::text {_FROM.format(source='annotation_annotation')} WHERE {where.replace('%(after)s', '0')} ORDER BY a.id) TO STDOUT"


def copy_rows(limit_id: int | None, sql: str | None = None) -> dict:
    from django.db import connection

    extra = f"AND a.id <= {int(limit_id)}" if limit_id else ""
    t0 = time.perf_counter()
    rows = nbytes = 0
    first = None
    with connection.cursor() as cur:
        from annotation.services.exports_sql import _FROM

        columns = f"COPY (SELECT {COPY_COLUMNS} {_FROM.format(source='annotation_annotation')} WHERE NOT t.is_gold {extra} ORDER BY a.id) TO STDOUT"
        with cur.connection.cursor().copy(sql or columns) as copy:
            for chunk in copy:
                if first is None:
                    first = time.perf_counter() - t0
                nbytes += len(chunk)
                rows += bytes(chunk).count(b"\n")
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds), "mb": round(nbytes / 2**20, 1),
            "first_byte_s": round(first or 0, 3)}  # fmt: skip


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        return 0
    return 0


def worker_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


def api_rows(port: int, token: str, master: int, query: str) -> dict:
    pids = worker_pids(master)
    base = {p: rss_kib(p) for p in pids}
    peak = dict(base)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for p in pids:
                peak[p] = max(peak[p], rss_kib(p))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("GET", f"/api/v1/export/comparisons.jsonl?{query}", headers={"Authorization": f"Token {token}"})
    response = conn.getresponse()
    first = None
    rows = nbytes = 0
    while chunk := response.read1(1 << 16):
        if first is None:
            first = time.perf_counter() - t0
        nbytes += len(chunk)
        rows += chunk.count(b"\n")
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    growth = max(peak[p] - base[p] for p in pids) if pids else 0
    return {"status": response.status, "rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "mb": round(nbytes / 2**20, 1), "first_byte_s": round(first or 0, 3),
            "server_rss_growth_mib": round(growth / 1024, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=200_000)
    parser.add_argument("--formats", nargs="+", default=["native", "trl"])
    args = parser.parse_args()
    env = fresh_database("rlhf_bench_export")
    t0 = time.perf_counter()
    populate(args.annotations)
    from django.contrib.auth import get_user_model
    from django.db import connection
    from rest_framework.authtoken.models import Token

    from annotation.models import Annotation, AnnotatorProfile

    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    user = get_user_model().objects.create(username="exporter")
    AnnotatorProfile.objects.create(user=user, role="researcher")
    token = Token.objects.create(user=user).key
    ids = list(Annotation.objects.order_by("id").values_list("id", flat=True))
    quarter_id = ids[len(ids) // 4 - 1]
    quarter_date = Annotation.objects.get(pk=quarter_id).created_at
    out = {"annotations": len(ids), "populate_s": round(time.perf_counter() - t0, 1), "copy": {}, "api": {}}
    # One worker, so that the server memory measured is the one process that streams every export.
    with gunicorn(env, workers=1, threads=4) as (port, master):
        api_rows(port, token, master, "format=trl&batch=warm-up")  # load the app in the workers first
        out["copy"]["all"] = copy_rows(None)
        out["copy"]["quarter"] = copy_rows(quarter_id)
        out["copy"]["native_json"] = copy_rows(None, copy_json_sql())
        out["api"]["native_quarter"] = api_rows(
            port, token, master, f"format=native&created_before={(quarter_date).isoformat().replace('+00:00', 'Z')}"
        )
        for fmt in args.formats:
            out["api"][fmt] = api_rows(port, token, master, f"format={fmt}")
        out["api"]["native_majority"] = api_rows(port, token, master, "format=native&aggregate=true")
    out["native_vs_copy_columns"] = round(out["api"]["native"]["rows_per_s"] / out["copy"]["all"]["rows_per_s"], 2)
    out["native_vs_copy_same_json"] = round(
        out["api"]["native"]["rows_per_s"] / out["copy"]["native_json"]["rows_per_s"], 2
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
