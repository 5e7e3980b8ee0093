"""The platform's side of policy training, in process on PostgreSQL: runs checked up front, policies as rows, the
model worker, claims, cancels and the reconciler. (A real worker process runs them in tests/test_loop_worker.py.)"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from django.core.management import CommandError, call_command
from django.utils import timezone
from rest_framework.test import APIClient

from annotation.models import (
    ComparisonTask,
    PolicyVersion,
    Response,
    Role,
    RunKind,
    RunStatus,
    TaskStatus,
    TrainingRun,
)
from annotation.services.assignment import assignment_claim_next
from annotation.services.dialogues import prompt_create
from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord, comparisons_store
from annotation.services.policies import policy_register
from annotation.services.runs import REWARD_BATCH_DEFAULTS, RUN_PARAMS, run_cancel, run_create, runs_reconcile
from annotation.tests.factories import BatchFactory, annotator
from training import run_control
from training.model_worker import ResponderSettings, fill_awaiting
from training.run_control import PLATFORM_KEYS, run_claim
from training.runs import execute_run

pytestmark = pytest.mark.django_db


@pytest.fixture
def stories(shared_data, settings, tmp_path):
    """The shared stories260K (a real trained model, a base model: plain prompts) registered as the current policy."""
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    return policy_register(name="stories", checkpoint=str(shared_data / "stories260k/meta"), prompt_format="plain",
                           current=True)  # fmt: skip


def _api(role: str = Role.RESEARCHER) -> APIClient:
    client = APIClient()
    client.force_authenticate(annotator(f"u-{role}", role=role))
    return client


def _pairs(batch, n: int, policy: str = "stories") -> None:
    comparisons_store(batch=batch, records=[
        ComparisonRecord(turns=(("user", f"Once upon a time {i}"),),
                         response_a=ResponseRecord(f"there was a happy cat called Tom {i}.", policy),
                         response_b=ResponseRecord("no", policy), domain="helpfulness",
                         votes=(VoteRecord("ext:1", "a", "better"),))
        for i in range(n)
    ])  # fmt: skip


# ------------------------------------------------------------------------------------------- the parameters


def test_every_run_parameter_is_a_field_of_its_stages_config_or_a_platform_reference():
    """The web process declares the parameters (it cannot import the trainers); they must stay the configs' names."""
    from rewards.train import RewardTrainConfig
    from training.distill import DistillConfig
    from training.evaluate import EvaluateConfig
    from training.ppo import PPOConfig
    from training.rejection_sampling import RejectionSamplingConfig
    from training.sft import SFTConfig

    configs = {"reward_model": RewardTrainConfig, "sft": SFTConfig, "rejection_sampling": RejectionSamplingConfig,
               "ppo": PPOConfig, "distillation": DistillConfig, "evaluation": EvaluateConfig}  # fmt: skip
    for kind, config in configs.items():
        fields = {f.name for f in dataclasses.fields(config)}
        stray = set(RUN_PARAMS[kind]) - fields - PLATFORM_KEYS
        assert not stray, f"{kind}: {stray} are neither {config.__name__} fields nor platform keys"


def test_the_web_sides_reward_batch_sizes_are_the_recipes():
    from rewards.configs import FROM_SCRATCH_CONFIGS
    from rewards.trainer import _FINETUNE_DEFAULTS

    assert REWARD_BATCH_DEFAULTS["init"] == (_FINETUNE_DEFAULTS["global_batch_size"], _FINETUNE_DEFAULTS["micro_batch_size"])
    for name, recipe in FROM_SCRATCH_CONFIGS.items():
        t = recipe.training
        assert REWARD_BATCH_DEFAULTS[name] == (t["global_batch_size"], t["micro_batch_size"]), name


def test_starting_a_run_through_the_api_checks_kind_and_params_up_front(stories):
    api = _api()
    bad = [
        ({"kind": "ppo", "params": {"iterations": 0}}, "params.iterations"),
        ({"kind": "ppo", "params": {"iterations": "ten"}}, "params.iterations"),
        ({"kind": "ppo", "params": {"learning_rat": 1e-5}}, "unknown for a ppo run"),
        ({"kind": "ppo", "params": {"policy": "nope"}}, "no policy version named"),
        ({"kind": "ppo", "params": {"batches": ["nope"]}}, "unknown batch"),
        ({"kind": "ppo", "params": {"prompts": "p.jsonl", "batch_size": 10, "minibatch_size": 4}}, "multiple"),
        ({"kind": "teleport", "params": {}}, "kind"),
        ({"kind": "sft", "params": {"prompts": "p.jsonl", "world_size": 65}}, "params.world_size"),
        ({"kind": "sft", "params": {"prompts": "p.jsonl", "max_steps": 10**400}}, "params.max_steps"),
        ({"kind": "reward_model", "params": {"kind": "helpfulness", "batches": ["wk"], "name": "/tmp/../etc/x",
                                             "init": "stories"}}, "params.name"),
        ({"kind": "round", "params": {"batches": ["wk"], "ppo": {"bogus": 1}}}, "params.ppo"),
        ({"kind": "round", "params": {"batches": ["wk"], "ppo": {"policy": "stories"}}}, "params.ppo"),
        ({"kind": "round", "params": {"batches": ["wk"], "rejection_sampling": {"samples": 0}}}, "rejection_sampling.samples"),
        ({"kind": "round", "params": {"batches": ["wk"], "generation": {"max_new_tokens": 8}}}, "params.generation"),
        ({"kind": "generation", "params": {"campaign": "nope"}}, "params.campaign"),
        ({"kind": "sft", "params": {"prompts": "p\u0000.jsonl"}}, "params"),
        ({"kind": "reward_model", "params": {"kind": "helpfulness", "batches": ["wk"], "name": "RM", "init": "stories"}},
         "training pairs"),
        ({"kind": "generation", "params": {}}, "params.pending"),
        ({"kind": "sft", "params": {"prompts": "p.jsonl", "name": "bad name!"}}, "params.name"),
    ]  # fmt: skip
    BatchFactory(name="wk")
    for body, expected in bad:
        response = api.post("/api/v1/training-runs/", body, format="json")
        assert response.status_code == 400, (body, response.content)
        assert expected in json.dumps(response.json()), (body, response.json())
    assert not TrainingRun.objects.exists()
    assert _api(Role.REVIEWER).post("/api/v1/training-runs/", {"kind": "sft", "params": {}}, format="json").status_code == 403

    response = api.post("/api/v1/training-runs/", {"kind": "sft", "params": {"prompts": "p.jsonl", "max_steps": 2}},
                        format="json")  # fmt: skip
    assert response.status_code == 201, response.content
    run = TrainingRun.objects.get()
    assert run.params == {"prompts": "p.jsonl", "max_steps": 2, "policy": "stories"}  # the current policy filled in
    assert run.status == RunStatus.QUEUED
    assert run.queued_at is not None


def test_a_reward_model_run_on_fewer_pairs_than_a_batch_is_fitted_to_them(stories):
    batch = BatchFactory(name="small", test_size=0)
    _pairs(batch, 30)
    run = run_create(kind="reward_model", params={"kind": "helpfulness", "batches": ["small"], "name": "RM-h",
                                                  "init": "stories"}, send=False)  # fmt: skip
    assert run.params["global_batch_size"] == 16  # 64 does not fit 30 pairs; the largest power of two that does
    assert run.params["micro_batch_size"] == 4
    assert "30 training pairs" in run.params["adjusted"]


# ----------------------------------------------------------------------------------------------- policies


def test_register_policy_command_takes_meta_and_hf_checkpoints_and_refuses_others(stories, tiny_policy_hf,
                                                                                  stories_tokenizer, tmp_path):
    call_command("register_policy", name="hf-tiny", checkpoint=str(tiny_policy_hf), tokenizer=str(stories_tokenizer))
    version = PolicyVersion.objects.get(name="hf-tiny")
    assert version.metrics["layout"] == "hf"
    assert not version.is_current
    assert version.tokenizer_uri == str(stories_tokenizer.resolve())
    assert PolicyVersion.objects.get(name="stories").metrics["layout"] == "meta"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CommandError, match="neither a Meta"):
        call_command("register_policy", name="x", checkpoint=str(tmp_path / "empty"))
    with pytest.raises(CommandError, match="no tokenizer.model"):
        call_command("register_policy", name="x", checkpoint=str(tiny_policy_hf))
    call_command("register_policy", name="hf-tiny2", checkpoint=str(tiny_policy_hf), tokenizer=str(stories_tokenizer),
                 current=True)  # fmt: skip
    assert list(PolicyVersion.objects.filter(is_current=True).values_list("name", flat=True)) == ["hf-tiny2"]


def test_a_stage_output_becomes_current_only_after_its_evaluation(stories):
    child = PolicyVersion.objects.create(name="child", kind="sft", parent=stories, checkpoint_uri=stories.checkpoint_uri)
    response = _api().post(f"/api/v1/policies/{child.pk}/current/")
    assert response.status_code == 409
    assert "evaluated" in response.json()["detail"]
    child.metrics = {"evaluation": {"win_rate": 0.6}}
    child.save()
    assert _api().post(f"/api/v1/policies/{child.pk}/current/").status_code == 200
    assert PolicyVersion.objects.get(is_current=True) == child


# ------------------------------------------------------------------------------------------- model worker


def test_a_written_prompt_gets_two_responses_from_the_current_policy_and_is_then_served(stories):
    batch = BatchFactory(name="wk", overlap=1)
    task = prompt_create(author=annotator("writer"), text="Once upon a time, Lily", domain="helpfulness", batch=batch)
    assert task.status == TaskStatus.AWAITING_RESPONSES
    assert assignment_claim_next(user=annotator("rater")) is None  # nothing to compare yet

    summary = fill_awaiting(settings=ResponderSettings(max_new_tokens=24, seed=11))
    assert summary["filled"] == 1, summary
    task.refresh_from_db()
    assert task.status == TaskStatus.OPEN
    a, b = task.response_a, task.response_b
    assert a.text
    assert b.text
    assert a.text != b.text
    assert {a.policy_version.name, b.policy_version.name} == {"stories"}
    assert {a.sampling["temperature"], b.sampling["temperature"]} == {0.6, 1.0}
    assert {a.sampling["variant"], b.sampling["variant"]} == {"a", "b"}
    assert a.sampling["prompt_format"] == "plain"
    assert a.sampling["seed"] in (11, 12)
    assignment = assignment_claim_next(user=annotator("rater2"))
    assert assignment is not None
    assert assignment.task_id == task.pk
    # Nothing waits any more, and a second fill does nothing (no response written twice).
    assert fill_awaiting()["waiting"] == 0
    assert Response.objects.count() == 2


def test_without_a_current_policy_the_worker_says_why_and_writes_nothing(settings):
    batch = BatchFactory(name="wk")
    prompt_create(author=annotator("writer"), text="Hi", domain="helpfulness", batch=batch)
    summary = fill_awaiting()
    assert summary == {"waiting": 1, "filled": 0, "skipped": 0, "reason": "no current policy with a checkpoint"}


def test_generate_batch_opens_a_batch_whose_comparisons_hold_the_policys_responses(stories, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Once upon a time, {name}"}) + "\n"
                               for name in ("Tom", "Lily", "Ben", "Sue")))  # fmt: skip
    call_command("generate_batch", prompts=str(prompts), batch="week-2", max_new_tokens=16, seed=5)
    tasks = ComparisonTask.objects.filter(batch__name="week-2")
    assert tasks.count() == 4
    assert set(tasks.values_list("status", flat=True)) == {TaskStatus.OPEN}
    run = TrainingRun.objects.get(kind="generation")
    assert run.status == RunStatus.SUCCEEDED
    assert run.metrics[-1]["generation"]["filled"] == 4
    with pytest.raises(CommandError, match="exists"):
        call_command("generate_batch", prompts=str(prompts), batch="week-2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(CommandError, match="bad.jsonl:2"):
        call_command("generate_batch", prompts=str(bad), batch="week-3")
    assert not ComparisonTask.objects.filter(batch__name="week-3").exists()


# --------------------------------------------------------------------------------------- durable runs


def test_a_claimed_run_is_not_claimed_again_until_its_heartbeat_stops(stories, settings):
    run = run_create(kind="sft", params={"prompts": "p.jsonl"}, send=False)
    assert run_claim(run.pk, "t1") is not None
    assert run_claim(run.pk, "t2") is None  # held: a re-delivered message does nothing
    TrainingRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=settings.RUN_STALE_SECONDS + 1))
    taken = run_claim(run.pk, "t3")
    assert taken is not None
    assert taken.attempts == 2
    assert taken.celery_task_id == "t3"
    TrainingRun.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED)
    assert run_claim(run.pk, "t4") is None


@pytest.mark.parametrize("alive", [True, False])
def test_a_round_waits_for_a_stage_another_worker_holds_and_resumes_one_whose_worker_died(db, settings, monkeypatch,
                                                                                         alive):
    from training import rounds

    settings.RUN_HEARTBEAT_SECONDS, settings.RUN_STALE_SECONDS = 5.0, 90.0
    round_run = TrainingRun.objects.create(kind=RunKind.ROUND, status=RunStatus.RUNNING, worker=run_control.WORKER_ID,
                                           heartbeat_at=timezone.now())
    beat = timezone.now() - timedelta(seconds=0 if alive else 91)
    stage = TrainingRun.objects.create(kind=RunKind.EVALUATION, status=RunStatus.RUNNING, parent=round_run,
                                       params={"stage": "evaluation"}, worker="other-host:1", heartbeat_at=beat)
    waited, executed = [], []

    def sleep(seconds):  # the other worker finishes the stage while the round waits
        waited.append(seconds)
        TrainingRun.objects.filter(pk=stage.pk).update(status=RunStatus.SUCCEEDED)

    def execute(run_id):  # this worker runs the stage itself
        executed.append(TrainingRun.objects.get(pk=run_id).status)
        TrainingRun.objects.filter(pk=run_id).update(status=RunStatus.SUCCEEDED)

    monkeypatch.setattr(rounds.time, "sleep", sleep)
    control = run_control.RunControl(round_run.pk)
    done = rounds.Round(round_run, control, execute).stage("evaluation", RunKind.EVALUATION, {}, total=1)
    assert done.pk == stage.pk
    assert done.status == RunStatus.SUCCEEDED
    if alive:  # held elsewhere: waited for it, took its success, ran nothing
        assert (waited, executed) == ([5.0], [])
    else:  # its worker is gone: requeued and run here, at once
        assert (waited, executed) == ([], [RunStatus.QUEUED])


def test_the_reconciler_requeues_dead_runs_and_resends_lost_messages_only(stories, settings, django_capture_on_commit_callbacks):
    now = timezone.now()
    make = lambda **f: TrainingRun.objects.create(kind="sft", params={"prompts": "p"}, **f)  # noqa: E731
    dead = make(status=RunStatus.RUNNING, heartbeat_at=now - timedelta(seconds=settings.RUN_STALE_SECONDS + 5))
    alive = make(status=RunStatus.RUNNING, heartbeat_at=now)
    lost = make(status=RunStatus.QUEUED, queued_at=now - timedelta(seconds=settings.RUN_RESEND_SECONDS + 5))
    waiting = make(status=RunStatus.QUEUED, queued_at=now)
    done = make(status=RunStatus.SUCCEEDED, heartbeat_at=now - timedelta(days=1))
    sent = []
    from config.celery import app

    original = app.send_task
    app.send_task = lambda name, args=None, **kw: sent.append((name, args))
    try:
        with django_capture_on_commit_callbacks(execute=True):
            requeued = runs_reconcile()
    finally:
        app.send_task = original
    assert sorted(requeued) == sorted([dead.pk, lost.pk])
    assert sorted(sent) == sorted([("training.execute_run", [dead.pk]), ("training.execute_run", [lost.pk])])
    dead.refresh_from_db()
    assert dead.status == RunStatus.QUEUED
    assert "heartbeat" in dead.error
    for run in (alive, waiting, done):
        assert TrainingRun.objects.get(pk=run.pk).status == run.status


def test_a_cancel_stops_a_running_run_at_its_next_step(stories, tiny_policy, stories_tokenizer, sft_prompts_file, monkeypatch):
    policy_register(name="tiny", checkpoint=str(tiny_policy), tokenizer=str(stories_tokenizer), current=True)
    run = run_create(kind="sft", params={"prompts": str(sft_prompts_file), "max_steps": 50, "epochs": 50,
                                         "global_batch_rows": 2, "micro_batch_rows": 2}, send=False)  # fmt: skip
    report = run_control.RunControl.report

    def cancel_at_step_3(self, fraction=None, point=None, *, force=False):
        if point and point.get("step") == 3:
            run_cancel(run_id=self.run_id)  # what POST .../cancel/ does, arriving at step 3
        return report(self, fraction, point, force=force)

    monkeypatch.setattr(run_control.RunControl, "report", cancel_at_step_3)
    assert execute_run(run.pk) == "cancelled"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert run.finished_at is not None
    assert [m["step"] for m in run.metrics] == [1, 2, 3]
    assert "cancelled" in run.error
    assert not PolicyVersion.objects.filter(parent__name="tiny").exists()
    # a second cancel of a finished run is refused:
    with pytest.raises(Exception, match="only a queued or running run"):
        run_cancel(run_id=run.pk)


def test_an_sft_run_registers_a_child_version_that_the_worker_can_sample(stories, tiny_policy, stories_tokenizer,
                                                                          sft_prompts_file, tmp_path):
    policy_register(name="tiny", checkpoint=str(tiny_policy), tokenizer=str(stories_tokenizer), prompt_format="plain")
    call_command("start_run", "sft", param=["policy=tiny", f"prompts={sft_prompts_file}", "max_steps=2",
                                            "global_batch_rows=2", "micro_batch_rows=2", "name=tiny-sft"])  # fmt: skip
    version = PolicyVersion.objects.get(name="tiny-sft")
    assert version.parent.name == "tiny"
    assert version.kind == "sft"
    assert version.metrics["run"] == TrainingRun.objects.get(kind="sft").pk
    assert version.metrics["prompt_format"] == "plain"
    assert Path(version.checkpoint_uri, "params.json").is_file()
    batch = BatchFactory(name="wk")
    prompt_create(author=annotator("w"), text="Once", domain="helpfulness", batch=batch)
    assert fill_awaiting(policy="tiny-sft", settings=ResponderSettings(max_new_tokens=8, seed=1))["filled"] == 1


@pytest.mark.django_db(transaction=True)
def settings_artifacts() -> str:
    from django.conf import settings

    return str(settings.ARTIFACTS_DIR)


def test_a_run_with_world_size_2_is_launched_under_torchrun_and_matches_one_process(
        stories, tiny_policy, stories_tokenizer, sft_prompts_file):
    """The worker launches torchrun for the run; rank 0's progress reaches the row; the weights match one process
    with the same global batch (DDP: the same gradient up to the order of a sum)."""
    from training.llama.checkpoint import load_checkpoint

    policy_register(name="tiny", checkpoint=str(tiny_policy), tokenizer=str(stories_tokenizer), prompt_format="plain")
    common = {"policy": "tiny", "prompts": str(sft_prompts_file), "seq_len": 32, "global_batch_rows": 2,
              "micro_batch_rows": 1, "learning_rate": 1e-2, "max_steps": 3}  # fmt: skip
    two = run_create(kind="sft", params={**common, "world_size": 2, "name": "tiny-ddp"}, send=False)
    one = run_create(kind="sft", params={**common, "name": "tiny-one"}, send=False)
    assert execute_run(two.pk) == "succeeded", TrainingRun.objects.get(pk=two.pk).error
    assert execute_run(one.pk) == "succeeded"
    two.refresh_from_db()
    assert [m["step"] for m in two.metrics] == [1, 2, 3]
    launch = Path(settings_artifacts()) / "runs" / f"{two.pk}-sft" / "launch"
    assert (launch / "torchrun.log").is_file()
    assert json.loads((launch / "result.json").read_text())["steps"] == 3
    weights = {v: load_checkpoint(PolicyVersion.objects.get(name=v).checkpoint_uri, device="cpu")[0].state_dict()
               for v in ("tiny-ddp", "tiny-one")}  # fmt: skip
    start = load_checkpoint(str(tiny_policy), device="cpu")[0].state_dict()
    for name, tensor in weights["tiny-one"].items():
        assert not torch.equal(tensor, start[name]), name
        torch.testing.assert_close(weights["tiny-ddp"][name], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.django_db(transaction=True)
def test_a_cancel_kills_a_launched_runs_processes(stories, tiny_policy, stories_tokenizer, sft_prompts_file, monkeypatch):
    policy_register(name="tiny", checkpoint=str(tiny_policy), tokenizer=str(stories_tokenizer), prompt_format="plain")
    run = run_create(kind="sft", params={"policy": "tiny", "prompts": str(sft_prompts_file), "seq_len": 32,
                                         "global_batch_rows": 2, "micro_batch_rows": 1, "max_steps": 100000,
                                         "epochs": 100000, "world_size": 2}, send=False)  # fmt: skip
    report = run_control.RunControl.report

    def cancel_at_step_2(self, fraction=None, point=None, *, force=False):
        if point and point.get("step") == 2:
            run_cancel(run_id=self.run_id)
        return report(self, fraction, point, force=force)

    monkeypatch.setattr(run_control.RunControl, "report", cancel_at_step_2)
    assert execute_run(run.pk) == "cancelled"
    run.refresh_from_db()
    assert run.status == RunStatus.CANCELLED
    assert run.metrics[-1]["step"] < 1000
    launched = Path(settings_artifacts()) / "runs" / f"{run.pk}-sft" / "launch"
    alive = subprocess.run(["pgrep", "-f", str(launched)], capture_output=True, text=True).stdout.split()
    assert not alive, "the run's torchrun and ranks outlived the cancel"


def test_the_model_worker_samples_a_pairwise_campaigns_responses_from_both_versions(stories, tiny_policy,
                                                                                     stories_tokenizer):
    from annotation.models import EvaluationItem
    from annotation.services.campaigns import campaign_create

    policy_register(name="tiny", checkpoint=str(tiny_policy), tokenizer=str(stories_tokenizer), prompt_format="plain")
    campaign_create(name="stories-vs-tiny", kind="pairwise", policy="stories", baseline="tiny", overlap=1,
                    prompts=[{"dialogue": [{"role": "user", "content": f"Once upon a time, {n}"}]} for n in ("Tom", "Sue", "Max")],
                    generation={"max_new_tokens": 12, "seed": 4})  # fmt: skip
    run = TrainingRun.objects.get(kind="generation")
    assert execute_run(run.pk) == "succeeded", TrainingRun.objects.get(pk=run.pk).error
    items = list(EvaluationItem.objects.select_related("response__policy_version", "baseline_response__policy_version"))
    assert [i.status for i in items] == ["open"] * 3
    for item in items:
        assert item.response.policy_version.name == "stories"
        assert item.baseline_response.policy_version.name == "tiny"
        assert item.response.sampling["temperature"] == item.baseline_response.sampling["temperature"] == 0.6
        assert item.response.text != item.baseline_response.text


def test_a_version_made_by_a_stage_is_evaluated_against_its_parent_by_a_queued_run(
        stories, stories_tokenizer, sft_prompts_file, django_capture_on_commit_callbacks):
    batch = BatchFactory(name="rm-data", test_size=0)
    _pairs(batch, 40)
    rm = run_create(kind="reward_model", params={"kind": "helpfulness", "batches": ["rm-data"], "name": "RM",
                                                 "config": "tiny", "tokenizer": str(stories_tokenizer), "max_steps": 2},
                    send=False)  # fmt: skip
    assert execute_run(rm.pk) == "succeeded"
    sft = run_create(kind="sft", params={"prompts": str(sft_prompts_file), "max_steps": 1, "global_batch_rows": 2,
                                         "micro_batch_rows": 2, "seq_len": 32, "name": "stories-sft"}, send=False)  # fmt: skip
    with django_capture_on_commit_callbacks():
        assert execute_run(sft.pk) == "succeeded"
    evaluation = TrainingRun.objects.get(kind="evaluation")
    assert evaluation.params == {"policy": "stories-sft", "prompts": str(sft_prompts_file)}
    TrainingRun.objects.filter(pk=evaluation.pk).update(params={**evaluation.params, "max_new_tokens": 8})
    assert execute_run(evaluation.pk) == "succeeded", TrainingRun.objects.get(pk=evaluation.pk).error
    version = PolicyVersion.objects.get(name="stories-sft")
    assert version.metrics["evaluation"]["baseline"] == "stories"
    assert 0 <= version.metrics["evaluation"]["win_rate"] <= 1
    assert not version.is_current  # evaluated, not promoted: that is a round's (or a researcher's) decision


def test_with_input_roots_set_runs_and_registrations_read_only_under_them(stories, settings, tmp_path, tiny_policy_hf,
                                                                          stories_tokenizer):
    settings.RUN_INPUT_ROOTS = [str(tmp_path / "data")]
    (tmp_path / "data").mkdir()
    inside, outside = tmp_path / "data" / "p.jsonl", tmp_path / "p.jsonl"
    api = _api()
    refused = api.post("/api/v1/training-runs/", {"kind": "sft", "params": {"prompts": str(outside)}}, format="json")
    assert refused.status_code == 400
    assert "outside the folders runs may read" in refused.json()["detail"]
    sneaky = api.post("/api/v1/training-runs/", {"kind": "sft", "params": {"prompts": f"{tmp_path}/data/../p.jsonl"}},
                      format="json")  # fmt: skip
    assert sneaky.status_code == 400
    round_ = api.post("/api/v1/training-runs/", {"kind": "round", "params": {
        "batches": [BatchFactory(name="wk").name], "generation": {"prompts": str(outside), "batch": "next"}}}, format="json")  # fmt: skip
    assert round_.status_code == 400
    assert api.post("/api/v1/training-runs/", {"kind": "sft", "params": {"prompts": str(inside)}},
                    format="json").status_code == 201  # fmt: skip
    assert api.post("/api/v1/training-runs/", {"kind": "sft", "params": {"prompts": str(tmp_path / "artifacts" / "x")}},
                    format="json").status_code == 201  # ARTIFACTS_DIR is always readable  # fmt: skip
    with pytest.raises(CommandError, match="outside the folders"):
        call_command("register_policy", name="hf", checkpoint=str(tiny_policy_hf), tokenizer=str(stories_tokenizer))
