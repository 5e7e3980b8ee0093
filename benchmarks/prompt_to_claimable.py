"""A written prompt to a claimable comparison on the embedded default: SQLite, kombu's filesystem broker, one
worker with beat, the demo policy (what `make run` starts).

    .venv/bin/python benchmarks/prompt_to_claimable.py [--prompts 5]

In a fresh VAR_DIR: migrate, load_demo, demo_policy (a tiny policy trained from scratch), a worker as bin/run-dev
starts it; then `annotator1` writes `--prompts` prompts one after another (annotation.services.dialogues, as the
page and the API do) and each is timed until its comparison is open with two responses and `annotator2` can claim
it. The first includes the worker's loading of the policy. Prints JSON. Goal (issue 14): under 5 s. No peer.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["How do I keep basil alive on a windowsill?", "Write a haiku about rain.", "What is a good first pet?",
           "How do I boil an egg?", "Explain why the sky is blue."]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5)
    args = parser.parse_args()
    var_dir = Path(tempfile.mkdtemp(prefix="rlhf-embedded-"))
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND",
                                                           "DJANGO_SETTINGS_MODULE", "CI")}  # fmt: skip
    env.update(VAR_DIR=str(var_dir), DJANGO_SETTINGS_MODULE="config.settings")
    t0 = time.monotonic()
    for command in (["migrate", "-v0"], ["load_demo"], ["demo_policy"]):
        subprocess.run([sys.executable, "manage.py", *command], cwd=ROOT, env=env, check=True, capture_output=True)
    setup_s = time.monotonic() - t0
    log = (var_dir / "worker.log").open("w")
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "config", "worker", "-B", "-Q", "default,gpu",
                               "--concurrency", "1", "--loglevel", "INFO"], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "ready." not in (var_dir / "worker.log").read_text():
            if time.monotonic() > deadline or worker.poll() is not None:
                raise SystemExit(f"the worker did not start:\n{(var_dir / 'worker.log').read_text()[-3000:]}")
            time.sleep(0.2)
        os.environ.update(VAR_DIR=str(var_dir), DJANGO_SETTINGS_MODULE="config.settings")
        for key in ("DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            os.environ.pop(key, None)
        import django

        django.setup()
        from django.contrib.auth import get_user_model
        from django.db import transaction

        from annotation.models import ComparisonTask, TaskStatus
        from annotation.services.assignment import assignment_claim_next, assignment_give_back
        from annotation.services.dialogues import prompt_create

        users = get_user_model().objects
        writer, rater = users.get(username="annotator1"), users.get(username="annotator2")
        times = []
        for i in range(args.prompts):
            start = time.monotonic()
            with transaction.atomic():
                task = prompt_create(author=writer, text=PROMPTS[i % len(PROMPTS)], domain="helpfulness")
            while ComparisonTask.objects.filter(pk=task.pk, status=TaskStatus.OPEN).count() == 0:
                if time.monotonic() - start > 60:
                    raise SystemExit(f"prompt {i} was not answered within 60 s")
                time.sleep(0.02)
            times.append(time.monotonic() - start)
            lease = assignment_claim_next(user=rater)
            assert lease is not None  # claimable (the rater may get an earlier open comparison first)
            assignment_give_back(user=rater, task_id=lease.task_id, skip=True)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    print(json.dumps({"benchmark": "prompt_to_claimable", "setup_s": round(setup_s, 1),
                      "first_s": round(times[0], 2), "then_median_s": round(statistics.median(times[1:] or times), 2),
                      "max_s": round(max(times), 2), "n": len(times), "goal_s": 5.0}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
