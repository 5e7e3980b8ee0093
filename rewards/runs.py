"""A reward-model training run as the platform runs it: the TrainingRun row in, a RewardModelVersion out.

The same function runs from `python manage.py train_reward_model` and from the Celery task; the model
maths stay in `rewards.train`, which knows nothing of Django.
"""

from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from annotation.models import Batch, RewardModelVersion, RunStatus, TrainingRun


class RunCancelled(Exception):
    """The run's row was marked cancelled while it trained."""


def reward_run_create(*, kind: str, batches: list[str], name: str, params: dict, user=None) -> TrainingRun:
    """Queue a reward-model run over closed or open batches; `params` are RewardTrainConfig fields."""
    missing = set(batches) - set(Batch.objects.filter(name__in=batches).values_list("name", flat=True))
    if missing:
        raise ValueError(f"unknown batch(es): {sorted(missing)}")
    if RewardModelVersion.objects.filter(name=name).exists():
        raise ValueError(f"a reward model named {name!r} already exists")
    return TrainingRun.objects.create(
        kind="reward_model",
        params={"kind": kind, "batches": batches, "name": name, **params},
        created_by=user,
    )


def reward_run_execute(run_id: int) -> RewardModelVersion:
    """Train, evaluate on the batches' held-out split and register the version; marks the run's status."""
    from rewards.selectors import write_training_snapshot
    from rewards.train import RewardTrainConfig, TrainProgress, train_reward_model

    with transaction.atomic():
        run = TrainingRun.objects.select_for_update().get(pk=run_id)
        if run.status != RunStatus.QUEUED:
            raise ValueError(f"run {run_id} is {run.status}; only a queued run can start")  # idempotent re-delivery
        run.status, run.started_at = RunStatus.RUNNING, timezone.now()
        run.save(update_fields=["status", "started_at"])

    params = dict(run.params)
    kind, batches, name = params.pop("kind"), params.pop("batches"), params.pop("name")
    run_dir = Path(settings.ARTIFACTS_DIR) / "reward-models" / name
    data = run_dir / "training-data.native.jsonl"
    try:
        if write_training_snapshot(data, batches=batches) == 0:
            raise ValueError(f"batches {batches} hold no annotations")
        config = RewardTrainConfig(kind=kind, data=[str(data)], format="native", out_dir=str(run_dir), **params)
        history: list[dict] = []

        def on_progress(p: TrainProgress) -> None:
            point = {"step": p.step, "loss": round(p.loss, 5), "accuracy": round(p.accuracy, 4),
                     "validation_accuracy": p.validation_accuracy}  # fmt: skip
            if p.parts > 1:
                point["part"] = p.part  # an ensemble member's or soup ingredient's steps count from 1 again
            history.append(point)
            # Every step's point is kept; the row is written every few steps (and read by the dashboard).
            if p.step % 5 == 0 or p.step == p.total_steps:
                TrainingRun.objects.filter(pk=run_id).update(progress=min(1.0, p.fraction), metrics=history)
                if TrainingRun.objects.filter(pk=run_id, status=RunStatus.CANCELLED).exists():
                    raise RunCancelled(f"run {run_id} was cancelled at step {p.step}")

        result = train_reward_model(config, progress=on_progress)
        with transaction.atomic():
            version = RewardModelVersion.objects.create(
                name=name,
                kind=kind,
                checkpoint_uri=str(Path(result.out_dir).resolve()),
                metrics={**(result.test_report or {}), "stopped": result.stopped, "steps": result.steps},
            )
            version.batches.set(Batch.objects.filter(name__in=batches))
            TrainingRun.objects.filter(pk=run_id).update(
                status=RunStatus.SUCCEEDED, progress=1.0, metrics=history, finished_at=timezone.now(),
                reward_model_version=version,
            )  # fmt: skip
        return version
    except RunCancelled:
        TrainingRun.objects.filter(pk=run_id).update(finished_at=timezone.now())
        raise
    except Exception as exc:
        TrainingRun.objects.filter(pk=run_id).update(
            status=RunStatus.FAILED, error=f"{type(exc).__name__}: {exc}", finished_at=timezone.now()
        )
        raise
