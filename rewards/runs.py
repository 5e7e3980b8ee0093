"""A reward-model training run as the platform runs it: the TrainingRun row in, a RewardModelVersion out.

The same function runs from `python manage.py train_reward_model` and from the Celery task; the model
maths stay in `rewards.train`, which knows nothing of Django.
"""

from pathlib import Path

from django.db import transaction

from annotation.models import Batch, PolicyVersion, RewardModelVersion, TrainingRun
from training.run_control import RunControl, config_fields, run_dir

DEFAULT_CHECKPOINT_EVERY = 10  # steps: a run re-queued after its worker died loses at most this many


def reward_run_create(*, kind: str, batches: list[str], name: str, params: dict, user=None) -> TrainingRun:
    """A queued reward-model run (annotation.services.runs checks it); the caller runs or sends it."""
    from annotation.services.errors import AnnotationError
    from annotation.services.runs import run_create

    try:
        return run_create(kind="reward_model", params={"kind": kind, "batches": batches, "name": name, **params},
                          user=user, send=False)  # fmt: skip
    except AnnotationError as exc:
        raise ValueError(exc.message) from None


def reward_run_train(run: TrainingRun, control: RunControl) -> dict:
    """Train, evaluate on the batches' held-out split and register the version: the run's fields to store.

    The run's directory keeps the training data snapshot and the trainer's checkpoints, so a run started again
    after its worker died resumes (the snapshot of the first attempt is kept: the same data)."""
    from rewards.selectors import write_training_snapshot
    from rewards.train import RewardTrainConfig
    from training.launch import run_stage

    kind, batches, name = run.params["kind"], run.params["batches"], run.params["name"]
    params = config_fields(run.params, RewardTrainConfig)
    init = params.get("init")
    if init is not None:
        policy = PolicyVersion.objects.filter(name=init).first()
        if policy is not None:  # a policy version's name: its checkpoint, and its tokenizer where it names one
            params["init"] = policy.checkpoint_uri
            if policy.tokenizer_uri:
                params.setdefault("tokenizer", policy.tokenizer_uri)
    params.setdefault("checkpoint_every", DEFAULT_CHECKPOINT_EVERY)
    out = run_dir(run)  # the run's own directory: its data snapshot and checkpoints are this run's alone
    data = out / "training-data.native.jsonl"
    if not data.is_file() and write_training_snapshot(data, batches=batches) == 0:
        raise ValueError(f"batches {batches} hold no annotations")
    config = RewardTrainConfig(**{**params, "data": [str(data)], "format": "native", "out_dir": str(out)})
    result = run_stage("reward_model", config, control.report, world_size=run.params.get("world_size", 1),
                       directory=out / "launch")
    with transaction.atomic():
        version, _ = RewardModelVersion.objects.get_or_create(
            name=name,
            defaults={"kind": kind, "checkpoint_uri": str(Path(result["out_dir"]).resolve()),
                      "metrics": {**(result["test_report"] or {}), "stopped": result["stopped"], "steps": result["steps"]}},
        )  # fmt: skip
        version.batches.set(Batch.objects.filter(name__in=batches))
    return {"reward_model_version": version}
