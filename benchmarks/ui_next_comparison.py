"""Annotator UI speed: time from pressing Enter (submit) to the next comparison on screen, and page weight.

Drives the real page with Playwright and Debian's Chromium against gunicorn on loopback (production settings,
PostgreSQL). The clock runs in the page: from the Enter keydown to the moment the workbench shows the next
task id (a MutationObserver on `data-task-id`), so it includes the submit, the next claim, JSON parsing and
the DOM update, but not Playwright's own round trips.

    .venv/bin/python benchmarks/ui_next_comparison.py [--submits 50]

Prints one JSON object.
"""

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.platform_env import ROOT, fresh_database, gunicorn, percentile  # noqa: E402

PASSWORD = "bench-password-123"
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]  # fmt: skip

# Runs before the page's own scripts: stamps Enter, and the moment the next task id is rendered.
INSTRUMENT = """
window.__latencies = [];
document.addEventListener("keydown", function (e) { if (e.key === "Enter") window.__t0 = performance.now(); }, true);
document.addEventListener("DOMContentLoaded", function () {
  var bench = document.getElementById("workbench");
  if (!bench) return;
  new MutationObserver(function () {
    if (window.__t0 !== undefined && bench.dataset.taskId) {
      window.__latencies.push(performance.now() - window.__t0); window.__t0 = undefined;
    }
  }).observe(bench, { attributes: true, attributeFilter: ["data-task-id"] });
});
"""


def make_data(n_tasks: int) -> None:
    """One annotator and an open batch of `n_tasks` single-turn comparisons."""
    from django.contrib.auth import get_user_model

    from annotation.models import AnnotatorProfile, Batch, PolicyVersion
    from annotation.services.imports import comparisons_store

    user = get_user_model().objects.create_user("bench-annotator", password=PASSWORD)
    AnnotatorProfile.objects.create(user=user)
    PolicyVersion.objects.get_or_create(name="SFT")
    batch = Batch.objects.create(name="ui-bench", overlap=1)
    # Realistic lengths: a few sentences of prompt, replies of ~150 words.
    for start in range(0, n_tasks, 5000):
        comparisons_store(batch=batch, records=[record(i) for i in range(start, min(start + 5000, n_tasks))])


def record(i: int):
    from annotation.services.imports import ComparisonRecord, ResponseRecord

    return ComparisonRecord(
        turns=(("user", f"Prompt {i}: how should I plan a week of vegetarian dinners on a budget?"),),
        response_a=ResponseRecord(f"Reply A{i}. " + "Plan around beans, lentils and seasonal vegetables. " * 20,
                                  "SFT", {"temperature": 0.7}),
        response_b=ResponseRecord(f"Reply B{i}. " + "Cook grains in bulk and reuse them across meals. " * 20,
                                  "SFT", {"temperature": 1.0}),
        domain="helpfulness",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--submits", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=20_000, help="comparisons in the open batch")
    args = parser.parse_args()

    env = fresh_database("rlhf_bench_ui")
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--no-input", "-v0"], cwd=ROOT, env=env, check=True)
    make_data(max(args.tasks, args.submits + 5))

    from playwright.sync_api import sync_playwright

    with gunicorn(env) as (port, _pid), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        # localhost, not 127.0.0.1: Chromium keeps the production settings' Secure cookies on http://localhost.
        context = browser.new_context(base_url=f"http://localhost:{port}", viewport={"width": 1280, "height": 900})
        context.add_init_script(INSTRUMENT)
        page = context.new_page()
        page.goto("/login/")
        page.get_by_label("Username").fill("bench-annotator")
        page.get_by_label("Password").fill(PASSWORD)
        page.keyboard.press("Enter")
        page.wait_for_url("**/annotate/")

        bodies: dict[str, bytes] = {}
        page.on("response", lambda r: bodies.__setitem__(r.url, r.body()) if r.request.resource_type in (
            "script", "stylesheet") else None)  # fmt: skip
        page.reload()
        page.locator("#workbench[data-state=ready]").wait_for()
        inline = page.evaluate("[...document.scripts].filter(s => !s.src).reduce((s, e) => s + e.text.length, 0)")

        for i in range(args.submits):
            page.keyboard.press("1" if i % 2 else "2")
            page.keyboard.press("s")
            page.keyboard.press("Enter")
            page.wait_for_function(f"window.__latencies.length >= {i + 1}")
        latencies = page.evaluate("window.__latencies")
        browser.close()

    from annotation.models import Annotation

    stored = Annotation.objects.filter(annotator__username="bench-annotator").count()
    print(json.dumps({
        "submits": len(latencies),
        "annotations_stored": stored,
        "submit_to_next_ms": {"p50": round(percentile(latencies, 50), 1), "p95": round(percentile(latencies, 95), 1),
                              "max": round(max(latencies), 1), "mean": round(sum(latencies) / len(latencies), 1)},
        "page_weight_bytes": {"js_css": sum(map(len, bodies.values())),
                              "js_css_gzip": sum(len(gzip.compress(b)) for b in bodies.values()),
                              "files": sorted(u.rsplit("/", 1)[-1] for u in bodies), "inline_js": inline},
        "tasks_in_batch": max(args.tasks, args.submits + 5),
        "server": "gunicorn 2 workers x 8 threads, production settings, PostgreSQL, loopback",
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
