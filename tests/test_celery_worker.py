"""End to end through a real Celery worker process on the configured broker (Redis in CI)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from annotation.tasks import export_batch
from annotation.tests.factories import BatchFactory, make_tasks

ROOT = Path(__file__).resolve().parent.parent


def database_url() -> str:
    s = connection.settings_dict
    if connection.vendor == "postgresql":
        return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    return f"sqlite:///{s['NAME']}"


@pytest.fixture
def worker(tmp_path):
    env = {**os.environ, "DATABASE_URL": database_url(), "ARTIFACTS_DIR": str(tmp_path / "artifacts")}
    log = (tmp_path / "worker.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", "default,gpu", "--pool", "solo",
         "--loglevel", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    yield tmp_path / "artifacts"
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.django_db(transaction=True)
def test_export_task_runs_in_a_real_worker(worker):
    if os.environ.get("CI"):
        assert settings.CELERY_BROKER_URL.startswith("redis://"), "CI runs the worker on Redis"
    batch = BatchFactory(name="celery-e2e")
    from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord, comparisons_store

    records = [
        ComparisonRecord(
            turns=(("user", f"q{i}"),),
            response_a=ResponseRecord(f"a{i}", "SFT"),
            response_b=ResponseRecord(f"b{i}", "SFT"),
            domain="helpfulness",
            votes=(VoteRecord("ext:1", "a", "better"), VoteRecord("ext:2", "b", "slightly_better")),
        )
        for i in range(5)
    ]
    make_tasks(batch, 0)  # registers the SFT policy
    comparisons_store(batch=batch, records=records)
    started = time.monotonic()
    result = export_batch.delay(batch.id, "trl")
    path = Path(result.get(timeout=90))
    assert path.parent == worker / "exports"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 10
    assert {r["margin"] for r in rows} == {2 / 3, 1 / 3}
    assert time.monotonic() - started < 90


@pytest.mark.django_db(transaction=True)
def test_reward_model_run_trains_in_a_real_worker_on_the_gpu_queue(worker, shared_data):
    """The Celery path of a training run: queued row -> worker -> registered version (CPU here)."""
    from annotation.models import RewardModelVersion, TrainingRun
    from annotation.services.batches import batch_close
    from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord, comparisons_store
    from rewards.runs import reward_run_create
    from rewards.tasks import train_reward_model_task

    assert train_reward_model_task.name == "rewards.train_reward_model"
    batch = BatchFactory(name="celery-rm", test_size=4)
    make_tasks(batch, 0)
    comparisons_store(
        batch=batch,
        records=[
            ComparisonRecord(
                turns=(("user", f"story {i}"),),
                response_a=ResponseRecord(f"a long and kind story number {i}", "SFT"),
                response_b=ResponseRecord("no", "SFT"),
                domain="helpfulness",
                votes=(VoteRecord("ext:1", "a", "better"),),
            )
            for i in range(48)
        ],
    )
    batch_close(batch_id=batch.id)
    run = reward_run_create(
        kind="helpfulness", batches=["celery-rm"], name="RM-celery",
        params={"config": "tiny", "tokenizer": str(shared_data / "stories260k/tokenizer.model"), "max_steps": 2},
    )  # fmt: skip
    train_reward_model_task.delay(run.id).get(timeout=240)
    run.refresh_from_db()
    assert run.status == "succeeded", run.error
    version = RewardModelVersion.objects.get(name="RM-celery")
    assert version.checkpoint_uri.startswith(str(worker))
    assert TrainingRun.objects.get(pk=run.id).reward_model_version == version


def test_every_task_is_routed_to_its_queue_by_celerys_own_router():
    """Reward-model and policy training go to the `gpu` queue (the route once named the module, not the task,
    and sent reward-model training to the CPU worker); the rest stays on `default`."""
    from config.celery import app

    app.loader.import_default_modules()
    tasks = sorted(name for name in app.tasks if name.split(".")[0] in ("annotation", "rewards", "training"))
    assert "rewards.train_reward_model" in tasks
    for name in tasks:
        route = app.amqp.router.route({}, name)
        expected = "gpu" if name.split(".")[0] in ("rewards", "training") else "default"
        assert route["queue"].name == expected, name


def test_the_model_worker_can_have_a_queue_of_its_own():
    """MODEL_WORKER_QUEUE sends the fill (and only it) elsewhere, so written prompts need not wait for training."""
    code = ("from config.celery import app; app.loader.import_default_modules(); r = app.amqp.router.route; "
            "print(r({}, 'training.fill_responses')['queue'].name, r({}, 'training.execute_run')['queue'].name, "
            "r({}, 'annotation.reconcile_runs')['queue'].name)")  # fmt: skip
    env = {**os.environ, "MODEL_WORKER_QUEUE": "generation", "DJANGO_SETTINGS_MODULE": "config.settings"}
    out = subprocess.run([sys.executable, "-c", "import django; django.setup(); " + code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["generation", "gpu", "default"]
