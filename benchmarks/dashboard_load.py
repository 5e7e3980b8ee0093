"""Research dashboard load time on a large batch: the page with the batch open (stats counted afresh) and
closed (stats from the cache), and the batch statistics alone, in process on PostgreSQL.

    .venv/bin/python benchmarks/dashboard_load.py [--annotations 200000] [--loads 5]

Prints JSON: median milliseconds per page load and per `batch_stats` call. No peer: Label Studio and Argilla
have no such dashboard to time.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.export_stream import populate  # noqa: E402
from benchmarks.platform_env import ROOT, fresh_database  # noqa: E402


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", type=int, default=200_000)
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()

    env = fresh_database("rlhf_bench_dashboard")
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--no-input", "-v0"], cwd=ROOT, env=env, check=True)
    populate(args.annotations)
    from django.contrib.auth import get_user_model
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # the planner's statistics, as autovacuum keeps them after a bulk load
    from django.test import Client

    from annotation.models import AnnotatorProfile, Batch, Role
    from annotation.selectors import batch_agreement, batch_stats
    from annotation.services.batches import batch_close

    lead = get_user_model().objects.create(username="bench-lead")
    AnnotatorProfile.objects.create(user=lead, role=Role.RESEARCHER)
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(lead)
    batch = Batch.objects.get()

    def page() -> None:
        assert client.get("/dashboard/").status_code == 200

    page()  # warm-up: templates, connections
    out = {
        "annotations": batch.tasks.count() * 3,
        "batch_stats_ms": median_ms(lambda: batch_stats(batch), args.loads),
        "agreement_ms": median_ms(lambda: batch_agreement(batch), args.loads),
        "page_open_batch_ms": median_ms(page, args.loads),
    }
    batch_close(batch_id=batch.id)
    t0 = time.perf_counter()
    page()
    out["page_closed_batch_first_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    out["page_closed_batch_cached_ms"] = median_ms(page, args.loads)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
