"""Every kind of TrainingRun as a worker executes it: claim, one plain stage function, a registered version.

`execute_run(run_id)` is what the Celery task `training.execute_run` and the management commands call. It claims
the run (training.run_control), runs the stage of the run's kind in the run's own directory (so a run started again
after its worker died resumes from its checkpoints), registers what it produced (a PolicyVersion with its parent,
kind and report, a RewardModelVersion, a batch of comparisons) and marks the run. A round (`training.rounds`) runs
its stages through the same function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.db import transaction

from annotation.models import (
    ComparisonTask,
    PolicyKind,
    PolicyVersion,
    RewardModelKind,
    RewardModelVersion,
    RunKind,
    Split,
    TrainingRun,
)
from annotation.selectors import task_context
from annotation.services.policies import policy_make_current, policy_register
from training.run_control import (
    RunCancelled,
    RunControl,
    RunTakenOver,
    config_fields,
    run_claim,
    run_dir,
    run_failed,
    run_stopped_by_cancel,
    run_succeeded,
)

log = logging.getLogger(__name__)

POLICY_KINDS = {RunKind.SFT: PolicyKind.SFT, RunKind.REJECTION_SAMPLING: PolicyKind.REJECTION_SAMPLING,
                RunKind.PPO: PolicyKind.PPO, RunKind.DISTILLATION: PolicyKind.DISTILLATION}  # fmt: skip


def execute_run(run_id: int, task_id: str = "") -> str:
    """Run the run if this worker can claim it; its final status (or 'skipped' where another holds it or it is
    done). Errors are stored on the row; a cancel stops it within a step."""
    run = run_claim(run_id, task_id)
    if run is None:
        return "skipped"
    with RunControl(run.pk) as control:
        try:
            fields = EXECUTORS[run.kind](run, control)
        except RunCancelled:
            run_stopped_by_cancel(run.pk, control)
            return "cancelled"
        except RunTakenOver:
            return "taken over"
        except Exception as exc:
            log.exception("run %s failed", run.pk)
            run_failed(run.pk, exc)
            return "failed"
        except BaseException as exc:  # Ctrl-C of a command running it here: not for the reconciler to re-queue
            run_failed(run.pk, RuntimeError(f"interrupted ({type(exc).__name__}) in the process that ran it"))
            raise
        if not run_succeeded(run.pk, control, **fields):
            run_stopped_by_cancel(run.pk, control)  # cancelled during its last step: the row says cancelled
            return "cancelled"
    return "succeeded"


def policy_version(name: str) -> PolicyVersion:
    return PolicyVersion.objects.get(name=name)


def reward_models(params: dict[str, Any], *, need: str = "any") -> tuple[str | None, str | None]:
    """The helpfulness and safety reward models' directories: those named, else the newest of each kind."""
    def newest(kind: str, name: str | None) -> str | None:
        rows = RewardModelVersion.objects.filter(kind=kind)
        row = rows.filter(name=name).first() if name else rows.order_by("-created_at", "-id").first()
        return row.checkpoint_uri if row else None

    helpful = None if need == "safety" else newest(RewardModelKind.HELPFULNESS, params.get("reward_model"))
    safety = newest(RewardModelKind.SAFETY, params.get("safety_reward_model"))
    if helpful is None and safety is None:
        raise ValueError("no reward model is registered: train one first (a reward_model run)")
    if need == "safety" and safety is None:
        raise ValueError("no safety reward model is registered: train one first")
    return helpful, safety


def batch_prompts(batches: list[str], *, split: str) -> list[dict[str, Any]]:
    """The distinct dialogue contexts of the batches' comparisons (gold tasks left out), as prompts-file rows;
    `split` "test" takes the held-out split, "train" the rest."""
    tasks = ComparisonTask.objects.filter(batch__name__in=batches, is_gold=False).select_related("dialogue__prompt")
    tasks = tasks.filter(split=Split.TEST) if split == "test" else tasks.exclude(split=Split.TEST)
    seen, rows = set(), []
    for task in tasks.order_by("id"):
        dialogue = [{"role": m["role"], "content": m["content"]} for m in task_context(task)]
        key = repr(dialogue)
        if key in seen:
            continue
        seen.add(key)
        prompt = task.dialogue.prompt
        row: dict[str, Any] = {"dialogue": dialogue, "domain": task.domain}
        if prompt.risk_category:
            row["risk_category"] = prompt.risk_category
        rows.append(row)
    return rows


def prompts_file(run: TrainingRun, out: Path, *, split: str = "train") -> str:
    """The run's prompts: the file named, or the batches' prompts frozen into the run's directory on the first
    attempt (a resumed run reads the same prompts)."""
    from training.stages import write_jsonl_atomic

    if "prompts" in run.params:
        return str(run.params["prompts"])
    path = out / f"prompts.{split}.jsonl"
    if not path.is_file():
        rows = batch_prompts(run.params["batches"], split=split)
        if not rows and split == "test":
            rows = batch_prompts(run.params["batches"], split="train")  # an open batch has no test split yet
        if not rows:
            raise ValueError(f"batches {run.params['batches']} hold no prompts")
        write_jsonl_atomic(path, rows)
    return str(path)


def register_output(run: TrainingRun, checkpoint: Path, report: dict[str, Any],
                    control: RunControl) -> dict[str, Any]:
    """The stage's policy as a new version, child of the run's policy (once, also when the run is re-executed);
    not when the run was cancelled or taken over meanwhile."""
    control.report(1.0, force=True)  # raises where the run is no longer this worker's
    parent = policy_version(run.params["policy"])
    name = run.params.get("name") or f"{parent.name}-{run.kind.replace('_', '-')}-r{run.pk}"
    metrics = {"run": run.pk, **{k: v for k, v in report.items() if k not in ("history", "config")}}
    version = policy_register(name=name, checkpoint=str(checkpoint), kind=POLICY_KINDS[run.kind], parent=parent,
                              metrics=metrics, prompt_format=parent.metrics.get("prompt_format", "chat"))  # fmt: skip
    evaluate_new_version(run, version)
    return {"policy_version": version}


def evaluate_new_version(run: TrainingRun, version: PolicyVersion) -> None:
    """Queue the model-based evaluation of a version a stage made on its own (a round evaluates its own): reward-model
    win rate against its parent on the run's held-out prompts (the report's Figure 11), once reward models exist."""
    from annotation.services.runs import run_create

    if run.parent_id is not None or not RewardModelVersion.objects.exists():
        return
    if TrainingRun.objects.filter(kind=RunKind.EVALUATION, params__policy=version.name).exists():
        return  # a re-executed run queued it already
    source = {k: run.params[k] for k in ("prompts", "batches") if k in run.params}
    try:
        run_create(kind=RunKind.EVALUATION, params={"policy": version.name, **source}, user=run.created_by)
    except Exception:  # the evaluation is a follow-up: never fail the stage that made the version over it
        log.exception("could not queue the evaluation of %s", version.name)


def _policy_inputs(run: TrainingRun) -> tuple[PolicyVersion, dict[str, Any]]:
    parent = policy_version(run.params["policy"])
    values = {"policy": parent.checkpoint_uri, "tokenizer": parent.tokenizer_uri or None,
              "prompt_format": run.params.get("prompt_format", parent.metrics.get("prompt_format", "chat"))}  # fmt: skip
    return parent, values


def _stage(run: TrainingRun, control: RunControl, kind: str, config: Any) -> dict[str, Any]:
    """The stage, here or under torchrun with the run's `world_size` processes; its result as a dict."""
    from training.launch import run_stage

    return run_stage(kind, config, control.report, world_size=run.params.get("world_size", 1),
                     directory=run_dir(run) / "launch")


# ---------------------------------------------------------------------------------------------------- kinds


def run_reward_model(run: TrainingRun, control: RunControl) -> dict[str, Any]:
    from rewards.runs import reward_run_train

    return reward_run_train(run, control)


def _register_policy(run: TrainingRun, control: RunControl, report: dict[str, Any], *, nothing: str) -> dict[str, Any]:
    """Register the policy a stage's report names (`policy_dir`); `nothing` is the error where it names none."""
    if not report.get("policy_dir"):
        raise ValueError(nothing)
    return register_output(run, Path(report["policy_dir"]), report, control)


def run_sft(run: TrainingRun, control: RunControl) -> dict[str, Any]:
    from rewards.selectors import write_training_snapshot
    from training.sft import POLICY_DIR, SFTConfig

    out = run_dir(run)
    _, inputs = _policy_inputs(run)
    if "prompts" in run.params:
        data, fmt = run.params["prompts"], "prompts"
    else:  # the chosen replies of the batches' comparisons (train split)
        data, fmt = str(out / "sft-data.native.jsonl"), "native"
        if not Path(data).is_file() and write_training_snapshot(Path(data), batches=run.params["batches"]) == 0:
            raise ValueError(f"batches {run.params['batches']} hold no annotations")
    config = SFTConfig(init=inputs["policy"], tokenizer=inputs["tokenizer"], prompt_format=inputs["prompt_format"],
                       data=[data], format=fmt, split="train" if fmt == "native" else "all", out_dir=str(out),
                       fit_batch=True, **config_fields(run.params, SFTConfig))  # fmt: skip
    return register_output(run, out / POLICY_DIR, _stage(run, control, "sft", config), control)


def run_rejection_sampling(run: TrainingRun, control: RunControl) -> dict[str, Any]:
    from training.rejection_sampling import RejectionSamplingConfig

    out = run_dir(run)
    _, inputs = _policy_inputs(run)
    helpful, safety = reward_models(run.params)
    pool = [str(run_dir(TrainingRun.objects.get(pk=i))) for i in run.params.get("pool", [])]
    config = RejectionSamplingConfig(**inputs, prompts=prompts_file(run, out), out_dir=str(out), reward_model=helpful,
                                     safety_reward_model=safety, pool=pool, fit_batch=True,
                                     **config_fields(run.params, RejectionSamplingConfig))  # fmt: skip
    return _register_policy(run, control, _stage(run, control, "rejection_sampling", config),
                            nothing="rejection sampling kept no answer to fine-tune on")


def run_distillation(run: TrainingRun, control: RunControl) -> dict[str, Any]:
    from training.distill import DistillConfig

    out = run_dir(run)
    _, inputs = _policy_inputs(run)
    _, safety = reward_models(run.params, need="safety")
    config = DistillConfig(**inputs, prompts=prompts_file(run, out), out_dir=str(out), safety_reward_model=safety,
                           fit_batch=True, **config_fields(run.params, DistillConfig))  # fmt: skip
    return _register_policy(run, control, _stage(run, control, "distillation", config),
                            nothing="context distillation kept no answer: the preprompt improved no safety score")


def run_ppo(run: TrainingRun, control: RunControl) -> dict[str, Any]:
    from training.ppo import PPOConfig

    out = run_dir(run)
    _, inputs = _policy_inputs(run)
    helpful, safety = reward_models(run.params)
    config = PPOConfig(**inputs, prompts=prompts_file(run, out), out_dir=str(out), reward_model=helpful,
                       safety_reward_model=safety, **config_fields(run.params, PPOConfig))  # fmt: skip
    return _register_policy(run, control, _stage(run, control, "ppo", config), nothing="PPO saved no policy")


def run_evaluation(run: TrainingRun, control: RunControl) -> dict[str, Any]:
    """Reward-model win rate of a version against its parent (or a named baseline) on held-out prompts (the
    report's Figure 11); stored on the version as metrics["evaluation"], which lets it become current."""
    from training.evaluate import EvaluateConfig, evaluate_policy
    from training.reward_sources import reward_source

    out = run_dir(run)
    version = policy_version(run.params["policy"])
    baseline = policy_version(run.params["baseline"]) if run.params.get("baseline") else version.parent
    helpful, safety = reward_models(run.params)
    prompts = prompts_file(run, out, split="test")
    config = EvaluateConfig(policy=version.checkpoint_uri, tokenizer=version.tokenizer_uri or None, prompts=prompts,
                            baseline=baseline.checkpoint_uri if baseline else None,
                            prompt_format=version.metrics.get("prompt_format", "chat"),
                            **config_fields(run.params, EvaluateConfig))  # fmt: skip
    source = reward_source(reward_model=helpful, safety_reward_model=safety)
    report = evaluate_policy(config, source, progress=lambda done, total: control.report(done / max(total, 1)))
    evaluation = {**report, "baseline": baseline.name if baseline else None, "run": run.pk}
    control.report(1.0, force=True)  # not cancelled meanwhile
    with transaction.atomic():
        version = PolicyVersion.objects.select_for_update().get(pk=version.pk)
        version.metrics = {**version.metrics, "evaluation": evaluation}
        version.save(update_fields=["metrics"])
        if run.params.get("make_current"):
            policy_make_current(version=version)
    control.report(1.0, {"evaluation": {k: v for k, v in evaluation.items() if isinstance(v, int | float)}}, force=True)
    return {"policy_version": version}


def run_generation(run: TrainingRun, control: RunControl) -> dict[str, Any]:
    """The model worker as a run: fill every waiting comparison, or open a batch from a prompts file and fill it."""
    from annotation.services.dialogues import batch_open_with_prompts
    from training.model_worker import ResponderSettings, fill_awaiting, fill_campaign
    from training.prompts import read_prompts

    p = run.params
    settings = ResponderSettings.from_settings(
        temperatures=p.get("temperatures"), max_new_tokens=p.get("max_new_tokens"), top_p=p.get("top_p"),
        prompt_format=p.get("prompt_format"), batch_size=p.get("batch_size"), seed=p.get("seed"),
    )  # fmt: skip
    report = lambda done, total: control.report(done / max(total, 1))  # noqa: E731
    if "campaign" in p:
        summary = fill_campaign(p["campaign"], settings=settings, progress=report)
        control.report(1.0, {"generation": summary}, force=True)
        return {}
    task_ids = None
    if "prompts" in p:
        from annotation.models import Batch

        batch = Batch.objects.filter(name=p["batch"]).first()
        if batch is None:  # a re-executed run finds the batch it opened
            records = read_prompts(p["prompts"])
            rows = [{"dialogue": [dict(m) for m in r.dialogue], "domain": r.domain, "risk_category": r.risk_category}
                    for r in records]  # fmt: skip
            batch, _ = batch_open_with_prompts(name=p["batch"], prompts=rows, overlap=p.get("overlap", 1),
                                               test_size=p.get("test_size", 1000))  # fmt: skip
        task_ids = list(batch.tasks.values_list("pk", flat=True))
    summary = fill_awaiting(task_ids=task_ids, policy=p.get("policy"), policy_b=p.get("policy_b"), settings=settings,
                            limit=100_000, progress=report)  # fmt: skip
    control.report(1.0, {"generation": summary}, force=True)
    if summary.get("reason"):
        raise ValueError(summary["reason"])
    return {}


def run_round(run: TrainingRun, control: RunControl) -> dict[str, Any]:
    from training.rounds import execute_round

    return execute_round(run, control, execute_run)


EXECUTORS: dict[str, Callable[[TrainingRun, RunControl], dict[str, Any]]] = {
    RunKind.REWARD_MODEL: run_reward_model,
    RunKind.SFT: run_sft,
    RunKind.REJECTION_SAMPLING: run_rejection_sampling,
    RunKind.PPO: run_ppo,
    RunKind.DISTILLATION: run_distillation,
    RunKind.EVALUATION: run_evaluation,
    RunKind.GENERATION: run_generation,
    RunKind.ROUND: run_round,
}
