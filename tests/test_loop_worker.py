"""The loop through real Celery worker processes on the configured broker (Redis in CI) and PostgreSQL:
a written prompt answered by the model worker, a whole round started from the API, and the faults a GPU worker
meets (kill -9 in the middle of a run, a broker restarted with a run queued, a cancel)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from django.db import connection
from rest_framework.test import APIClient

from annotation.models import (
    Batch,
    ComparisonTask,
    PolicyVersion,
    Response,
    RewardModelVersion,
    Role,
    RunStatus,
    TaskStatus,
    TrainingRun,
)
from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord, comparisons_store
from annotation.services.policies import policy_register
from annotation.services.runs import run_create, runs_reconcile
from annotation.tests.factories import BatchFactory, annotator

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("one_torch_thread")]


def database_url() -> str:
    s = connection.settings_dict
    if connection.vendor == "postgresql":
        return f"postgres://{s['USER']}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"
    return f"sqlite:///{s['NAME']}"


class Workers:
    """Start Celery worker processes on the test database (solo pool: the task runs in the worker process itself,
    so kill -9 of that process is the GPU node dying in the middle of a run)."""

    def __init__(self, tmp_path: Path, broker: str | None = None):
        self.tmp_path, self.broker, self.procs = tmp_path, broker, []
        self.artifacts = tmp_path / "artifacts"

    def start(self, *, beat: bool = False) -> subprocess.Popen:
        env = {**os.environ, "DATABASE_URL": database_url(), "ARTIFACTS_DIR": str(self.artifacts),
               "RUN_HEARTBEAT_SECONDS": "0.5", "RUN_STALE_SECONDS": "3", "RUN_RECONCILE_SECONDS": "1",
               "RUN_RESEND_SECONDS": "5", "MODEL_WORKER_POLL_SECONDS": "2", "OMP_NUM_THREADS": "1",
               "VAR_DIR": str(self.tmp_path / f"var-{len(self.procs)}")}  # fmt: skip
        if self.broker:
            env["CELERY_BROKER_URL"] = self.broker
        log = (self.tmp_path / f"worker-{len(self.procs)}.log").open("w")
        command = [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", "default,gpu", "--pool", "solo",
                   "--loglevel", "INFO", "--without-heartbeat", "--without-gossip", "--without-mingle",
                   "-n", f"w{len(self.procs)}@%h"]  # fmt: skip
        if beat:
            command.append("-B")
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.tmp_path.glob("worker-*.log")))


@pytest.fixture
def workers(tmp_path, settings):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    w = Workers(tmp_path)
    yield w
    w.stop()


def wait_for(predicate, timeout: float, what: str, workers: Workers | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n{workers.logs() if workers else ''}")


@pytest.fixture
def stories(shared_data):
    return policy_register(name="stories", checkpoint=str(shared_data / "stories260k/meta"), prompt_format="plain",
                           current=True)  # fmt: skip


def _store_pairs(batch: Batch, n: int) -> None:
    comparisons_store(batch=batch, records=[
        ComparisonRecord(turns=(("user", f"Once upon a time {i}"),),
                         response_a=ResponseRecord(f"there was a happy little cat called Tom {i}. He liked to play.", "stories"),
                         response_b=ResponseRecord("no.", "stories"), domain="helpfulness",
                         votes=(VoteRecord("ext:1", "a", "better"),))
        for i in range(n)
    ])  # fmt: skip


def test_a_written_prompt_is_answered_by_the_worker_and_then_served(workers, stories):
    workers.start()
    BatchFactory(name="wk", overlap=1)
    writer = APIClient()
    writer.force_authenticate(annotator("writer"))
    time.sleep(2)  # the worker is up
    started = time.monotonic()
    response = writer.post("/api/v1/prompts/", {"text": "Once upon a time, Lily", "domain": "helpfulness"}, format="json")
    assert response.status_code == 201, response.content
    task = wait_for(lambda: ComparisonTask.objects.filter(status=TaskStatus.OPEN).first(), 60, "responses", workers)
    elapsed = time.monotonic() - started
    assert Response.objects.filter(policy_version__name="stories").count() == 2
    rater = APIClient()
    rater.force_authenticate(annotator("rater"))
    claimed = rater.post("/api/v1/tasks/next/", format="json")
    assert claimed.status_code == 200
    assert claimed.json()["task_id"] == task.pk
    print(json.dumps({"prompt_to_claimable_s": round(elapsed, 2)}))


def test_a_round_started_from_the_api_registers_models_and_policy_and_writes_the_next_batch(workers, stories, tmp_path):
    """Import, annotate, a round, the next batch answered by the new version, claimed and submitted."""
    researcher = APIClient()
    researcher.force_authenticate(annotator("lead", role=Role.RESEARCHER))
    assert researcher.post("/api/v1/batches/", {"name": "week-1", "overlap": 1, "test_size": 8}, format="json").status_code == 201
    items = [{"prompt": f"Once upon a time {i}", "domain": "helpfulness",
              "responses": [{"text": f"there was a happy little cat called Tom {i}. He liked to play.", "policy_version": "stories"},
                            {"text": "no.", "policy_version": "stories"}]} for i in range(40)]  # fmt: skip
    response = researcher.post("/api/v1/comparisons/import/", {"batch": "week-1", "items": items}, format="json")
    assert response.status_code in (200, 201), response.content
    raters = [APIClient() for _ in range(2)]
    for i, client in enumerate(raters):
        client.force_authenticate(annotator(f"rater{i}"))
    for n in range(40):  # annotators submit through the API: the longer answer is better
        client = raters[n % 2]
        task = client.post("/api/v1/tasks/next/", format="json").json()
        choice = "a" if len(task["response_a"]["text"]) > len(task["response_b"]["text"]) else "b"
        answer = client.post(f"/api/v1/tasks/{task['task_id']}/submit/",
                             {"choice": choice, "strength": "better", "time_on_task_ms": 9000}, format="json")  # fmt: skip
        assert answer.status_code in (200, 201), answer.content
    prompts = tmp_path / "next.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Once upon a time, {n}"}) + "\n" for n in ("Ben", "Sue", "Max")))
    small = {"max_new_tokens": 8, "batch_size": 8}
    response = researcher.post("/api/v1/training-runs/", {"kind": "round", "params": {
        "batches": ["week-1"], "name": "RLHF-V1",
        "reward_model": {"config": "tiny", "max_steps": 3},
        "rejection_sampling": {"samples": 2, "max_steps": 2, "global_batch_rows": 2, "micro_batch_rows": 2, **small},
        "evaluation": small, "generation": {"prompts": str(prompts), "batch": "week-2", "max_new_tokens": 8},
    }}, format="json")  # fmt: skip
    assert response.status_code == 201, response.content
    workers.start()
    run_id = response.json()["id"]
    wait_for(lambda: TrainingRun.objects.get(pk=run_id).status not in (RunStatus.QUEUED, RunStatus.RUNNING), 300,
             "the round", workers)  # fmt: skip
    run = TrainingRun.objects.get(pk=run_id)
    assert run.status == RunStatus.SUCCEEDED, (run.error, workers.logs())
    stages = {s.params["stage"]: s for s in run.stages.all()}
    assert set(stages) == {"reward_model:helpfulness", "rejection_sampling", "evaluation", "generation"}
    assert all(s.status == RunStatus.SUCCEEDED for s in stages.values())
    rm = RewardModelVersion.objects.get(name="RLHF-V1-helpfulness")
    assert "accuracy" in rm.metrics
    assert list(rm.batches.values_list("name", flat=True)) == ["week-1"]
    assert Batch.objects.get(name="week-1").status == "closed"
    v1 = PolicyVersion.objects.get(name="RLHF-V1")
    assert v1.parent.name == "stories"
    assert v1.kind == "rejection_sampling"
    assert v1.is_current
    assert v1.metrics["evaluation"]["baseline"] == "stories"
    assert "win_rate" in v1.metrics["evaluation"]
    assert run.policy_version == v1
    next_tasks = ComparisonTask.objects.filter(batch__name="week-2")
    assert next_tasks.count() == 3
    assert set(next_tasks.values_list("status", flat=True)) == {TaskStatus.OPEN}
    assert set(Response.objects.filter(dialogue__tasks__batch__name="week-2").values_list("policy_version__name", flat=True)) == {"RLHF-V1"}
    task = raters[0].post("/api/v1/tasks/next/", format="json").json()
    assert ComparisonTask.objects.get(pk=task["task_id"]).batch.name == "week-2"
    answer = raters[0].post(f"/api/v1/tasks/{task['task_id']}/submit/",
                            {"choice": "a", "strength": "slightly_better", "time_on_task_ms": 9000}, format="json")  # fmt: skip
    assert answer.status_code in (200, 201), answer.content


def _kill_when(path_glob: Path, proc: subprocess.Popen, workers: Workers, timeout: float = 120) -> None:
    wait_for(lambda: list(path_glob.parent.glob(path_glob.name)), timeout, f"a checkpoint {path_glob}", workers)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def test_kill_9_in_the_middle_of_a_reward_model_and_a_ppo_run_then_a_new_worker_finishes_them_exactly(
        workers, stories, stories_tokenizer, settings):
    """Each run: kill -9 of its worker after a checkpoint, a new worker with beat (the reconciler re-queues the
    run when its heartbeat stops), and the final weights equal those of an uninterrupted run of the same params."""
    from rewards.model import load_reward_model
    from training.llama.checkpoint import load_checkpoint
    from training.runs import execute_run

    batch = BatchFactory(name="wk", test_size=8)
    _store_pairs(batch, 48)
    rm_params = {"kind": "helpfulness", "batches": ["wk"], "config": "tiny", "tokenizer": str(stories_tokenizer),
                 "max_steps": 400, "epochs": 400, "checkpoint_every": 20}  # fmt: skip
    run = run_create(kind="reward_model", params={**rm_params, "name": "RM-killed"})
    first = workers.start()
    _kill_when(workers.artifacts / "runs" / f"{run.pk}-reward_model" / "train_state.pt", first, workers)
    assert TrainingRun.objects.get(pk=run.pk).status == RunStatus.RUNNING  # as the dead worker left it
    workers.start(beat=True)
    wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED, 240, "the resumed run", workers)
    killed = TrainingRun.objects.get(pk=run.pk)
    assert killed.attempts == 2
    assert RewardModelVersion.objects.filter(name="RM-killed").count() == 1
    whole = run_create(kind="reward_model", params={**rm_params, "name": "RM-whole"}, send=False)
    assert execute_run(whole.pk) == "succeeded"
    a = load_reward_model(RewardModelVersion.objects.get(name="RM-killed").checkpoint_uri)[0].state_dict()
    b = load_reward_model(RewardModelVersion.objects.get(name="RM-whole").checkpoint_uri)[0].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    prompts = Path(settings.ARTIFACTS_DIR) / "ppo-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Once upon a time {i}"}) + "\n" for i in range(8)))
    ppo_params = {"policy": "stories", "prompts": str(prompts), "reward_model": "RM-whole", "iterations": 30,
                  "batch_size": 4, "minibatch_size": 2, "max_new_tokens": 8, "learning_rate": 1e-4, "eval_every": 0,
                  "checkpoint_every": 1}  # fmt: skip
    ppo = run_create(kind="ppo", params={**ppo_params, "name": "ppo-killed"})
    third = workers.procs[-1]
    _kill_when(workers.artifacts / "runs" / f"{ppo.pk}-ppo" / "train_state.pt", third, workers)
    workers.start(beat=True)
    wait_for(lambda: TrainingRun.objects.get(pk=ppo.pk).status == RunStatus.SUCCEEDED, 300, "the resumed PPO run", workers)
    assert TrainingRun.objects.get(pk=ppo.pk).attempts == 2
    whole = run_create(kind="ppo", params={**ppo_params, "name": "ppo-whole"}, send=False)
    assert execute_run(whole.pk) == "succeeded"
    a = load_checkpoint(PolicyVersion.objects.get(name="ppo-killed").checkpoint_uri, device="cpu")[0].state_dict()
    b = load_checkpoint(PolicyVersion.objects.get(name="ppo-whole").checkpoint_uri, device="cpu")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert PolicyVersion.objects.filter(name="ppo-killed").count() == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to run a private broker")
def test_a_run_queued_while_the_broker_restarts_still_completes(tmp_path, settings, stories, sft_answers):
    """A private Redis (no persistence) holds the run's message; it restarts empty; the reconciler resends."""
    port = _free_port()
    start_redis = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--daemonize", "no"]  # fmt: skip
    redis = subprocess.Popen(start_redis, stdout=subprocess.DEVNULL)
    broker = f"redis://127.0.0.1:{port}/0"
    settings.CELERY_BROKER_URL = broker
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    from config.celery import app

    def use_broker(url: str) -> None:  # Celery reads CELERY_BROKER_URL from the environment first
        os.environ["CELERY_BROKER_URL"] = url
        app.conf.broker_url = url
        app._pool = None  # new connections on the next send (the old ones are left to the garbage collector)
        app.amqp._producer_pool = None

    shared_broker = app.conf.broker_url
    use_broker(broker)
    workers = Workers(tmp_path, broker=broker)
    try:
        time.sleep(0.5)
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=20)
        run = run_create(kind="sft", params={"prompts": str(sft_answers), "max_steps": 2, "global_batch_rows": 2,
                                             "micro_batch_rows": 2, "seq_len": 32})  # fmt: skip
        redis.terminate()
        redis.wait(timeout=10)
        redis = subprocess.Popen(start_redis, stdout=subprocess.DEVNULL)  # empty: the message is gone
        time.sleep(0.5)
        workers.start()
        time.sleep(3)
        assert TrainingRun.objects.get(pk=run.pk).status == RunStatus.QUEUED  # nothing came
        settings.RUN_RESEND_SECONDS = 0
        assert runs_reconcile() == [run.pk]  # what beat does every RUN_RECONCILE_SECONDS
        wait_for(lambda: TrainingRun.objects.get(pk=run.pk).status == RunStatus.SUCCEEDED, 120, "the run", workers)
        assert PolicyVersion.objects.filter(parent__name="stories", kind="sft").count() == 1
    finally:
        workers.stop()
        redis.terminate()
        use_broker(shared_broker)


def test_cancel_from_the_api_stops_a_running_run_and_says_so(workers, stories, sft_answers):
    researcher = APIClient()
    researcher.force_authenticate(annotator("lead", role=Role.RESEARCHER))
    response = researcher.post("/api/v1/training-runs/", {"kind": "sft", "params": {
        "prompts": str(sft_answers), "max_steps": 100000, "epochs": 100000, "global_batch_rows": 2,
        "micro_batch_rows": 2, "seq_len": 32, "checkpoint_every": 0}}, format="json")  # fmt: skip
    run_id = response.json()["id"]
    workers.start()
    wait_for(lambda: TrainingRun.objects.get(pk=run_id).metrics, 120, "the run's first steps", workers)
    steps_before = len(TrainingRun.objects.get(pk=run_id).metrics)
    assert researcher.post(f"/api/v1/training-runs/{run_id}/cancel/").status_code == 200
    run = wait_for(lambda: TrainingRun.objects.filter(pk=run_id, finished_at__isnull=False).first(), 30, "the stop", workers)
    assert run.status == RunStatus.CANCELLED
    assert "cancelled" in run.error
    assert steps_before <= len(run.metrics) < 100000
    assert not PolicyVersion.objects.filter(kind="sft").exists()
    assert researcher.post(f"/api/v1/training-runs/{run_id}/cancel/").status_code == 409


@pytest.fixture
def sft_answers(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Once upon a time {i}", "response": "there was a cat."}) + "\n"
                            for i in range(6)))  # fmt: skip
    return path
