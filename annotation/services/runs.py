"""Training runs as the platform starts them: validated parameters, a row, a Celery message by name.

The web process never imports torch or the trainers, so the parameters a run takes are declared here, once, as
plain specs (the trainers' config dataclasses hold the same names; a test keeps the two in step). A run is
created in one transaction and its message is sent after commit; a lost message or a dead worker is the
reconciler's business (`runs_reconcile`, on beat), and the worker's claim (`training.runs`) makes a second
message for the same run harmless.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from annotation.models import (
    Annotation,
    Batch,
    PolicyVersion,
    RewardModelKind,
    RewardModelVersion,
    RunKind,
    RunStatus,
    TrainingRun,
)
from annotation.validation import check_json_object

from .errors import Conflict, InvalidInput, NotFound

EXECUTE_TASK = "training.execute_run"  # training/tasks.py; routed to the gpu queue by name
FILL_TASK = "training.fill_responses"
TERMINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Param:
    """One parameter a run kind takes: its type, bounds and, for references, what it names."""

    kind: str  # int | float | bool | str | choice | names | ref
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    ref: str = ""  # policy | reward_model:helpfulness | reward_model:safety | batch | run
    help: str = ""


def _i(low: float = 1, high: float = 1_000_000, **kw: Any) -> Param:
    return Param("int", low, high, **kw)


def _f(low: float = 0.0, high: float = 1e6, **kw: Any) -> Param:
    return Param("float", low, high, **kw)


_SAMPLING = {"max_new_tokens": _i(1, 4096), "top_p": _f(0.0, 1.0), "prompt_format": Param("choice", choices=("chat", "plain")),
             "batch_size": _i(1, 4096)}  # fmt: skip
_FINETUNE = {"epochs": _i(1, 1_000_000), "max_steps": _i(1), "max_minutes": _f(0.01), "learning_rate": _f(0.0, 1.0),
             "global_batch_rows": _i(1, 65536), "micro_batch_rows": _i(1, 4096), "seq_len": _i(8, 131072),
             "checkpoint_every": _i(0), "seed": _i(0, 2**31),
             "sharding": Param("choice", choices=("ddp", "fsdp"), help="with world_size > 1")}  # fmt: skip
_POLICY_IN = {"policy": Param("ref", ref="policy", help="policy version (default: the current one)"),
              "prompts": Param("str", help="a prompts file on the shared volume"),
              "batches": Param("names", ref="batch", help="prompts of these batches (default: all closed ones)"),
              "name": Param("str", help="name of the new policy version (default: derived from the run)"),
              "world_size": _i(1, 64, help="processes under torchrun (GPUs on a GPU node)")}  # fmt: skip
_REWARDS = {"reward_model": Param("ref", ref="reward_model:helpfulness", help="default: the newest"),
            "safety_reward_model": Param("ref", ref="reward_model:safety", help="default: the newest"),
            "uncertainty_coef": _f(0.0, 100.0)}  # fmt: skip

RUN_PARAMS: dict[str, dict[str, Param]] = {
    RunKind.REWARD_MODEL: {
        "kind": Param("choice", choices=tuple(RewardModelKind.values)),
        "batches": Param("names", ref="batch"),
        "name": Param("str"),
        "init": Param("str", help="a policy version's name or a checkpoint directory"),
        "config": Param("choice", choices=("tiny", "tiny-ensemble", "small")),
        "tokenizer": Param("str"),
        "max_steps": _i(1), "max_minutes": _f(0.01), "epochs": _i(1, 1_000_000), "learning_rate": _f(0.0, 1.0),
        "global_batch_size": _i(1, 65536), "micro_batch_size": _i(1, 4096), "margin": Param("choice", choices=("none", "small", "large")),
        "ensemble": _i(1, 16), "checkpoint_every": _i(0), "seed": _i(0, 2**31), "world_size": _i(1, 64),
    },  # fmt: skip
    RunKind.SFT: {**_POLICY_IN, **_FINETUNE, "prompt_format": _SAMPLING["prompt_format"]},
    RunKind.REJECTION_SAMPLING: {**_POLICY_IN, **_REWARDS, **_SAMPLING, **_FINETUNE, "samples": _i(1, 1024),
                                 "temperature": _f(0.0, 5.0), "pool": Param("names", ref="run")},  # fmt: skip
    RunKind.PPO: {
        **_POLICY_IN, **_REWARDS, "iterations": _i(1), "batch_size": _i(1, 65536), "minibatch_size": _i(1, 65536),
        "max_new_tokens": _i(1, 4096), "temperature": _f(0.01, 5.0), "kl_coef": _f(0.0, 100.0),
        "learning_rate": _f(0.0, 1.0), "max_minutes": _f(0.01), "eval_every": _i(0), "checkpoint_every": _i(0),
        "checkpoint_minutes": _f(0.0), "missing_eos_penalty": _f(0.0, 1000.0), "seed": _i(0, 2**31), "prompt_format": _SAMPLING["prompt_format"],
        "sharding": _FINETUNE["sharding"],
    },  # fmt: skip
    RunKind.DISTILLATION: {**_POLICY_IN, **_SAMPLING, **_FINETUNE,
                           "safety_reward_model": _REWARDS["safety_reward_model"], "temperature": _f(0.0, 5.0),
                           "preprompt": Param("choice", choices=("generic", "risk-category"))},  # fmt: skip
    RunKind.GENERATION: {
        "policy": Param("ref", ref="policy", help="response A's policy (default: the current one)"),
        "policy_b": Param("ref", ref="policy", help="response B's policy (default: the same)"),
        "temperatures": Param("floats", 0.0, 5.0, help="[A, B]: two temperatures (default [0.6, 1.0])"),
        "pending": Param("bool", help="fill every comparison awaiting responses"),
        "campaign": Param("str", help="sample the responses of an evaluation campaign's items"),
        "prompts": Param("str", help="a prompts file: its prompts open a new batch"),
        "batch": Param("str", help="the new batch's name (with prompts)"),
        "overlap": _i(1, 20), "test_size": _i(0), **_SAMPLING, "seed": _i(0, 2**31),
    },  # fmt: skip
    RunKind.EVALUATION: {
        "policy": Param("ref", ref="policy"), "baseline": Param("ref", ref="policy", help="default: its parent"),
        "prompts": Param("str"), "batches": Param("names", ref="batch"),
        "reward_model": _REWARDS["reward_model"], "safety_reward_model": _REWARDS["safety_reward_model"], **_SAMPLING,
        "temperature": _f(0.0, 5.0), "seed": _i(0, 2**31), "make_current": Param("bool"),
    },  # fmt: skip
    RunKind.ROUND: {
        "batches": Param("names", ref="batch", help="this round's batches (closed by the round)"),
        "reward_model": Param("dict", help="settings of both reward-model runs"),
        "rejection_sampling": Param("dict"), "ppo": Param("dict", help="give settings to run PPO after rejection sampling"),
        "evaluation": Param("dict"), "generation": Param("dict", help="{prompts, batch}: the next batch"),
        "name": Param("str", help="the round's policy version name (default RLHF-V<n>)"),
    },  # fmt: skip
}


def _number(spec: Param, value: Any) -> int | float:
    what = "an integer" if spec.kind == "int" else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be {what}, got {value!r}"[:300])
    try:
        if spec.kind == "int" and not float(value).is_integer():
            raise ValueError(f"must be {what}, got {value!r}"[:300])
        number = int(value) if spec.kind == "int" else float(value)
    except OverflowError:
        number = math.inf
    if not (spec.low <= number <= spec.high):  # type: ignore[operator]
        raise ValueError(f"must be between {spec.low:g} and {spec.high:g}" + (f", got {number}" if math.isfinite(number) else ""))
    return number


def _two_numbers(spec: Param, value: Any) -> list[float]:
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError("must be a list of two numbers")
    return [_number(Param("float", spec.low, spec.high), v) for v in value]


def _of_type(kind: type, what: str) -> Any:
    def check(spec: Param, value: Any) -> Any:
        if not isinstance(value, kind):
            raise ValueError(f"must be {what}, got {value!r}"[:300])
        return value
    return check


def _names(spec: Param, value: Any) -> list:
    if not isinstance(value, list) or not value or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        raise ValueError("must be a non-empty list of names")
    return value


def _text(spec: Param, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 500:
        raise ValueError(f"must be a non-empty string of at most 500 characters, got {value!r}"[:300])
    if spec.kind == "choice" and value not in spec.choices:
        raise ValueError(f"must be one of {list(spec.choices)}, got {value!r}")
    return value.strip()


# How each kind of Param is checked and normalised (a ValueError says what is wrong).
_CHECKS = {"int": _number, "float": _number, "floats": _two_numbers, "bool": _of_type(bool, "true or false"),
           "dict": _of_type(dict, "an object"), "names": _names, "str": _text, "choice": _text, "ref": _text}  # fmt: skip


def _check_value(name: str, spec: Param, value: Any) -> Any:
    """The value, checked and normalised as its spec says, or InvalidInput naming params.<name>."""
    try:
        return _CHECKS[spec.kind](spec, value)
    except ValueError as exc:
        raise InvalidInput(f"params.{name}: {exc}", field=f"params.{name}") from None


PATH_PARAMS = ("prompts", "tokenizer", "init")  # "init" may also name a policy version


def check_input_path(path: str, field: str) -> None:
    """Refuse a server path outside RUN_INPUT_ROOTS (and ARTIFACTS_DIR) when roots are configured."""
    if not settings.RUN_INPUT_ROOTS:
        return
    from pathlib import Path

    resolved = Path(path).resolve()
    roots = [Path(r).resolve() for r in (*settings.RUN_INPUT_ROOTS, settings.ARTIFACTS_DIR)]
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise InvalidInput(f"{field}: {path} is outside the folders runs may read (RUN_INPUT_ROOTS)", field=field)


def _check_paths(params: dict[str, Any], prefix: str = "params") -> None:
    for name in PATH_PARAMS:
        value = params.get(name)
        if isinstance(value, str) and not (name == "init" and PolicyVersion.objects.filter(name=value).exists()):
            check_input_path(value, f"{prefix}.{name}")
    for key in ("reward_model", "rejection_sampling", "ppo", "evaluation", "generation"):
        if isinstance(params.get(key), dict):
            _check_paths(params[key], f"{prefix}.{key}")


def _resolve_refs(kind: str, params: dict[str, Any]) -> None:
    """Names must exist; a missing policy or reward model means the current policy or the newest model."""
    specs = RUN_PARAMS[kind]
    for name, spec in specs.items():
        if spec.ref == "policy":
            if name in params:
                if not PolicyVersion.objects.filter(name=params[name]).exists():
                    raise InvalidInput(f"params.{name}: no policy version named {params[name]!r}", field=f"params.{name}")
            elif name == "policy" and kind != RunKind.ROUND and "campaign" not in params:  # a campaign names its own
                current = PolicyVersion.objects.filter(is_current=True).first()
                if current is None:
                    raise InvalidInput("params.policy: no policy is current; name one (register_policy)", field="params.policy")
                params["policy"] = current.name
        elif spec.ref.startswith("reward_model:"):
            rm_kind = spec.ref.split(":")[1]
            if name in params:
                if not RewardModelVersion.objects.filter(name=params[name], kind=rm_kind).exists():
                    raise InvalidInput(f"params.{name}: no {rm_kind} reward model named {params[name]!r}", field=f"params.{name}")
        elif spec.ref == "batch" and name in params:
            names = [str(n) for n in params[name]]
            known = set(Batch.objects.filter(name__in=names).values_list("name", flat=True))
            if missing := [n for n in names if n not in known]:
                raise InvalidInput(f"params.{name}: unknown batch(es) {missing}", field=f"params.{name}")
            params[name] = names
        elif spec.ref == "run" and name in params:
            ids = [int(i) for i in params[name] if str(i).isdigit()]
            found = set(TrainingRun.objects.filter(pk__in=ids, kind=RunKind.REJECTION_SAMPLING, status=RunStatus.SUCCEEDED)
                        .values_list("pk", flat=True))  # fmt: skip
            if len(ids) != len(params[name]) or set(ids) - found:
                raise InvalidInput(f"params.{name}: give ids of succeeded rejection-sampling runs", field=f"params.{name}")
            params[name] = ids


# Pairs a step (global, micro) of rewards' recipes (rewards.trainer, rewards.configs; a test keeps them equal):
# a run on fewer pairs than one global batch would train no step, so the batch is fitted to the data up front.
REWARD_BATCH_DEFAULTS = {"init": (64, 4), "tiny": (32, 32), "tiny-ensemble": (32, 32), "small": (64, 32)}


def training_pairs(batches: list[str], domain: str | None = None) -> int:
    """Annotations of the batches outside the held-out split: how many pairs a reward model trains on."""
    q = Annotation.objects.filter(task__batch__name__in=batches).exclude(task__split="test")
    return q.filter(task__domain=domain).count() if domain else q.count()


def _fit_reward_model(params: dict[str, Any]) -> None:
    """Refuse a run with no data, and shrink the batch to the data (the recipe's 32 a step needs 32 pairs)."""
    for required in ("kind", "batches", "name"):
        if required not in params:
            raise InvalidInput(f"params.{required} is required for a reward-model run", field=f"params.{required}")
    if ("init" in params) == ("config" in params):
        raise InvalidInput("give params.init (a policy version or checkpoint) or params.config, not both", field="params.init")
    if "config" in params and "tokenizer" not in params:
        raise InvalidInput("params.config needs params.tokenizer", field="params.tokenizer")
    if RewardModelVersion.objects.filter(name=params["name"]).exists():
        raise InvalidInput(f"params.name: a reward model named {params['name']!r} already exists", field="params.name")
    pairs = training_pairs(params["batches"])
    if pairs < settings.RUN_MIN_PAIRS:
        raise InvalidInput(f"batches {params['batches']} hold {pairs} training pairs; a reward model needs at least "
                           f"{settings.RUN_MIN_PAIRS}", field="params.batches")  # fmt: skip
    default_global, default_micro = REWARD_BATCH_DEFAULTS["init" if "init" in params else params["config"]]
    batch = params.get("global_batch_size", default_global)
    if pairs < batch:
        fitted = 1 << (pairs.bit_length() - 1)  # the largest power of two that fits
        params["global_batch_size"] = fitted
        params["micro_batch_size"] = min(params.get("micro_batch_size", default_micro), fitted)
        params["adjusted"] = f"global_batch_size {batch} -> {fitted}: the batches hold {pairs} training pairs"


def _check_name(kind: str, params: dict[str, Any]) -> None:
    name = params.get("name")
    if name is None:
        return
    if not NAME_RE.match(name):
        raise InvalidInput("params.name: letters, digits, '.', '_' and '-' only, at most 100", field="params.name")
    if kind != RunKind.REWARD_MODEL and PolicyVersion.objects.filter(name=name).exists():
        raise InvalidInput(f"params.name: a policy version named {name!r} exists", field="params.name")
    if TrainingRun.objects.filter(kind=kind, params__name=name, status__in=(RunStatus.QUEUED, RunStatus.RUNNING)).exists():
        raise InvalidInput(f"params.name: a {kind} run making {name!r} is queued or running", field="params.name")


def _default_prompts(params: dict[str, Any]) -> None:
    """A stage reads a prompts file or the batches' prompts; neither named: every closed batch."""
    if "prompts" in params and "batches" in params:
        raise InvalidInput("give params.prompts or params.batches, not both", field="params.prompts")
    if "prompts" not in params and "batches" not in params:
        closed = list(Batch.objects.filter(status="closed").values_list("name", flat=True))
        if not closed:
            raise InvalidInput("no prompts: give params.prompts or params.batches (no batch is closed yet)",
                               field="params.batches")  # fmt: skip
        params["batches"] = closed


def _check_ppo_batch(params: dict[str, Any]) -> None:
    batch, mini = params.get("batch_size", 512), params.get("minibatch_size", 64)
    if batch % mini:
        raise InvalidInput(f"params.batch_size {batch} is not a multiple of params.minibatch_size {mini}",
                           field="params.minibatch_size")  # fmt: skip


def _check_generation(params: dict[str, Any]) -> None:
    """Exactly one of: the waiting comparisons, a prompts file opening a new batch, a campaign's items."""
    from annotation.models import Campaign

    if bool(params.get("pending")) + ("prompts" in params) + ("campaign" in params) != 1:
        raise InvalidInput("give params.pending true, params.prompts and params.batch, or params.campaign",
                           field="params.prompts")  # fmt: skip
    if "prompts" in params and "batch" not in params:
        raise InvalidInput("params.batch (the new batch's name) is required with params.prompts", field="params.batch")
    if "prompts" in params and Batch.objects.filter(name=params["batch"]).exists():
        raise InvalidInput(f"params.batch: a batch named {params['batch']!r} exists", field="params.batch")
    if "campaign" in params and not Campaign.objects.filter(name=params["campaign"]).exists():
        raise InvalidInput(f"params.campaign: no campaign named {params['campaign']!r}", field="params.campaign")


# What a round sets in its stages itself; a round's settings for a stage may give the rest of its parameters.
_ROUND_STAGES = {"reward_model": RunKind.REWARD_MODEL, "rejection_sampling": RunKind.REJECTION_SAMPLING,
                 "ppo": RunKind.PPO, "evaluation": RunKind.EVALUATION, "generation": RunKind.GENERATION}  # fmt: skip
_ROUND_SETS = {"policy", "batches", "name", "kind", "baseline", "make_current", "pool", "reward_model",
               "safety_reward_model", "pending", "campaign", "policy_b"}  # fmt: skip


def _check_round_stages(params: dict[str, Any]) -> None:
    """A round's settings for each stage, checked before it starts (it closes batches before its first stage)."""
    for key, stage_kind in _ROUND_STAGES.items():
        settings_ = params.get(key)
        if settings_ is None:
            continue
        specs = RUN_PARAMS[stage_kind]
        allowed = set(specs) - _ROUND_SETS
        if unknown := sorted(set(settings_) - allowed):
            raise InvalidInput(f"params.{key}: {unknown} cannot be set for the round's {key} stage; it takes "
                               f"{sorted(allowed)}", field=f"params.{key}")  # fmt: skip
        for name, value in settings_.items():
            _check_value(f"{key}.{name}", specs[name], value)
    if "generation" in params and not {"prompts", "batch"} <= set(params["generation"]):
        raise InvalidInput("params.generation needs prompts and batch (the next batch)", field="params.generation")


# What each kind's parameters must fit besides their own specs (the data, the rows they name, each other).
_SHAPE_CHECKS: dict[str, tuple[Callable[[dict[str, Any]], None], ...]] = {
    RunKind.REWARD_MODEL: (_fit_reward_model,),
    RunKind.SFT: (_default_prompts,),
    RunKind.REJECTION_SAMPLING: (_default_prompts,),
    RunKind.PPO: (_default_prompts, _check_ppo_batch),
    RunKind.DISTILLATION: (_default_prompts,),
    RunKind.EVALUATION: (_default_prompts,),
    RunKind.GENERATION: (_check_generation,),
    RunKind.ROUND: (_check_round_stages,),
}


def _check_shape(kind: str, params: dict[str, Any]) -> None:
    _check_name(kind, params)
    for check in _SHAPE_CHECKS.get(kind, ()):
        check(params)


def run_params_check(kind: str, params: Any) -> dict[str, Any]:
    """The parameters of a run of `kind`, checked and completed (references resolved), or InvalidInput."""
    if kind not in RUN_PARAMS:
        raise InvalidInput(f"kind must be one of {list(RUN_PARAMS)}, got {kind!r}", field="kind")
    check_json_object(params, field="params")  # storable text at any depth, bounded size
    specs = RUN_PARAMS[kind]
    if unknown := sorted(set(params) - set(specs)):
        raise InvalidInput(f"params: unknown for a {kind} run: {unknown}; known: {sorted(specs)}", field="params")
    checked = {name: _check_value(name, specs[name], value) for name, value in params.items() if value is not None}
    _resolve_refs(kind, checked)
    _check_paths(checked)
    _check_shape(kind, checked)
    return checked


def run_send(run: TrainingRun) -> None:
    """Send the run's message after the surrounding transaction commits (queued_at says when)."""
    from config.celery import app

    TrainingRun.objects.filter(pk=run.pk).update(queued_at=timezone.now())
    transaction.on_commit(lambda: app.send_task(EXECUTE_TASK, args=[run.pk]))


@transaction.atomic
def run_create(*, kind: str, params: Any, user=None, parent: TrainingRun | None = None, send: bool = True,
               checked: bool = False) -> TrainingRun:
    """A queued run of `kind`; its message goes to a worker after commit unless `send` is False (a command that
    runs it in its own process, or a round whose stages its own task runs)."""
    params = params if checked else run_params_check(kind, params)
    run = TrainingRun.objects.create(kind=kind, params=params, created_by=user, parent=parent)
    if send:
        run_send(run)
    return run


@transaction.atomic
def run_cancel(*, run_id: int) -> TrainingRun:
    """A queued run is cancelled at once; a running one stops at its next step (its worker sees the status).
    A round's unfinished stages are cancelled with it."""
    run = TrainingRun.objects.select_for_update().filter(pk=run_id).first()
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    if run.status in TERMINAL:
        raise Conflict(f"run {run_id} is {run.status}; only a queued or running run can be cancelled")
    now = timezone.now()
    was_queued = run.status == RunStatus.QUEUED
    run.status = RunStatus.CANCELLED
    run.error = "cancelled" + (" before it started" if was_queued else "; its worker stops at the next step")
    fields = ["status", "error"]
    if was_queued:
        run.finished_at = now
        fields.append("finished_at")
    run.save(update_fields=fields)
    TrainingRun.objects.filter(parent=run, status=RunStatus.QUEUED).update(
        status=RunStatus.CANCELLED, error="its round was cancelled", finished_at=now
    )
    TrainingRun.objects.filter(parent=run, status=RunStatus.RUNNING).update(status=RunStatus.CANCELLED,
                                                                            error="its round was cancelled")
    return run


def runs_reconcile(now=None) -> list[int]:
    """Re-queue runs whose worker died (running, heartbeat older than RUN_STALE_SECONDS) and resend runs whose
    message may be lost (queued, sent longer than RUN_RESEND_SECONDS ago). A round's stages run inside the
    round's task, so only top-level runs are sent; a stage of a re-queued round resumes with it."""
    now = now or timezone.now()
    stale = now - timedelta(seconds=settings.RUN_STALE_SECONDS)
    resend = now - timedelta(seconds=settings.RUN_RESEND_SECONDS)
    requeued = []
    with transaction.atomic():
        runs = (TrainingRun.objects.select_for_update(skip_locked=True)
                .filter(parent__isnull=True)
                .filter(Q(status=RunStatus.RUNNING, heartbeat_at__lt=stale)
                        | Q(status=RunStatus.RUNNING, heartbeat_at__isnull=True, started_at__lt=stale)
                        | Q(status=RunStatus.QUEUED, queued_at__lt=resend)
                        | Q(status=RunStatus.QUEUED, queued_at__isnull=True, created_at__lt=resend)))  # fmt: skip
        for run in runs:
            if run.status == RunStatus.RUNNING:
                run.error = f"re-queued: the heartbeat of {run.worker or 'its worker'} stopped at {run.heartbeat_at}"
                run.status = RunStatus.QUEUED
                run.save(update_fields=["status", "error"])
            run_send(run)
            requeued.append(run.pk)
    return requeued


def fill_responses_requested() -> None:
    """Ask a model worker for the responses of comparisons awaiting them (after commit; stale asks expire)."""
    if not settings.MODEL_WORKER_ON_DEMAND:
        return
    from config.celery import app

    transaction.on_commit(lambda: app.send_task(FILL_TASK, expires=settings.MODEL_WORKER_ASK_EXPIRES))
