"""The training engine every trainer shares: the reward-model trainer, SFT, rejection sampling, PPO, distillation.

What lives here is what does not depend on the loss: `torchrun` set-up (`Distributed`), AdamW with the report's
settings and a warm-up + cosine or constant schedule (`OptimizerSettings`), gradient accumulation over
micro-batches and clipping, an atomic checkpoint of model, optimizer, scheduler, RNG and the trainer's own state
with exact resume, the wall-clock budget, DDP or FSDP (`Engine`). A trainer is then its own data and loss, read top to bottom:

    engine = Engine(model, settings, total_steps=..., dist=dist, state_path=out / "train_state.pt")
    extra = engine.resume(signature={...})          # None on a fresh start
    while engine.step < engine.total_steps:
        for i, micro in enumerate(micro_batches):
            with engine.accumulating(last=i == len(micro_batches) - 1):
                engine.backward(engine.scale_for_global(loss_sum_of(engine.module, micro), global_count))
        engine.optimizer_step()
        if engine.decide("max_minutes" if engine.out_of_time() else None, ("max_minutes",)):
            engine.save(extra, signature={...})
            break

The ground floor beside `training.llama`: nothing of Django, `rewards` or the policy trainers is imported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import pickle
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

SCHEDULES = ("cosine", "constant")
SHARDINGS = ("ddp", "fsdp")

# --------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Distributed:
    """This process's place in a `torchrun` job (world_size 1 without one) and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def _comm_device(self) -> str | torch.device:
        return self.device if self.device.type == "cuda" else "cpu"

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of `values` over all processes (float64)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's `value` on every process."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], device=self._comm_device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(device_name: str | None = None) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on GPU); pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device_name is None:
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank=rank, world_size=world_size, device=device)


def run_main(main: Callable[[], int]) -> NoReturn:
    """A trainer CLI's `__main__`: run `main()` and exit with its code.

    Under torchrun the processes leave the process group together (a barrier, then destroy; a failed one at
    once) and exit without the interpreter's teardown: with gloo, a process tearing down while its peer is still closing the group's
    connections aborted now and then ("terminate called without an active exception", SIGABRT, 4 runs in 30 of
    training.sft under load), failing a run that had finished and written its results.
    """
    code = main()
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
            dist.destroy_process_group()
        # a failed process leaves at once (its peers may be waiting in a collective it will never join): torchrun
        # sees its exit code and stops them
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def split_for_rank(global_batch: Sequence[int], dist_: Distributed) -> list[int]:
    """This process's contiguous share of a global batch of indices (its length must divide evenly)."""
    if len(global_batch) % dist_.world_size:
        raise ValueError(f"a global batch of {len(global_batch)} does not divide over {dist_.world_size} processes")
    local = len(global_batch) // dist_.world_size
    return list(global_batch[dist_.rank * local:(dist_.rank + 1) * local])


# ------------------------------------------------------------------------------------------ optimisation


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and its schedule. The defaults are the report's (section 3.2.2, A.2.2): betas (0.9, 0.95),
    eps 1e-5, weight decay 0.1, clipping 1.0, cosine to 10% of the peak after a 3% warm-up (at least 5 steps).
    PPO uses the `constant` schedule."""

    learning_rate: float
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-5
    grad_clip: float = 1.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    min_warmup_steps: int = 5

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")

    @classmethod
    def of(cls, config: Any) -> OptimizerSettings:
        """The settings of a trainer config that carries these fields under the same names (None: the default)."""
        values = {}
        for name in cls.__dataclass_fields__:
            value = getattr(config, name, None)
            if value is not None:
                values[name] = value
        return cls(**values)


def cosine_schedule(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_ratio: float, min_warmup_steps: int) -> int:
    """3% of the steps, at least min_warmup_steps (but never more than the run)."""
    return max(1, min(total_steps, max(min_warmup_steps, math.ceil(warmup_ratio * total_steps))))


def build_optimizer(model: nn.Module, settings: OptimizerSettings, *, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices and embeddings, none on norm gains.

    The fused kernel where it applies (plain float tensors on CPU or CUDA: not FSDP's sharded ones): the
    default implementation updates one tensor at a time, which cost a tiny PPO step more than its forward pass
    (an 8.6M-parameter AdamW step 80 ms against 9 ms fused, benchmarks/ppo_iteration.py's profile).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fusable = fused and bool(params) and all(
        type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    ) and len({p.device for p in params}) == 1
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.learning_rate, betas=(settings.adam_beta1, settings.adam_beta2), eps=settings.adam_eps,
        fused=fusable or None,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimizerSettings,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The settings' schedule over total_steps optimizer steps."""
    if settings.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    warmup = warmup_steps_for(total_steps, settings.warmup_ratio, settings.min_warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_schedule(s, total_steps=total_steps, warmup_steps=warmup,
                                             min_lr_ratio=settings.min_lr_ratio),
    )


# ------------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    """Every generator a trainer may draw from: Python's, NumPy's, torch's (and CUDA's)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


@functools.cache
def _allow_numpy_arrays() -> None:
    """Add what unpickling NumPy's RNG state (a uint32 array) takes to weights_only's allowlist, once a process
    (the list is process-wide; a `safe_globals` block around each load would change it for every thread)."""
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1
        from numpy.core.multiarray import _reconstruct
    torch.serialization.add_safe_globals([_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))])


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A trainer's checkpoint, loaded without running code from it (`weights_only`): tensors, plain Python values
    and NumPy's RNG state array. A run's directory may be on a volume others write; a pickle there must not be
    able to run code in the worker that resumes it."""
    _allow_numpy_arrays()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        cause = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
        raise ValueError(f"{path} holds more than tensors and plain values, so it was not loaded (it could run "
                         f"code): {cause[:300]}") from exc


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """The same seed on every process: identical initial weights, which DDP also enforces by broadcast."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write to a temporary file beside the target and rename it: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -------------------------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class StepProgress:
    """What a policy trainer's progress callback receives after every optimizer step (rank 0 only)."""

    step: int
    total_steps: int
    loss: float
    learning_rate: float
    elapsed_s: float
    items_per_s: float = 0.0  # tokens, samples or pairs a second, as the trainer counts
    metrics: Mapping[str, float] | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / max(1, self.total_steps))


class cli_progress_bar:  # noqa: N801  (used like a function: bar = cli_progress_bar("sft"); bar(progress))
    """A tqdm bar on stderr that a trainer's progress callback drives; `close()` when done."""

    def __init__(self, desc: str):
        self.desc = desc
        self._bar: Any = None

    def __call__(self, p: StepProgress) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=p.total_steps, initial=p.step - 1, unit="step", desc=self.desc, file=sys.stderr)
        postfix = {"loss": f"{p.loss:.3f}", "lr": f"{p.learning_rate:.1e}"}
        postfix.update({k: f"{v:.3g}" for k, v in (p.metrics or {}).items()})
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_command(work: Callable[[Any], Any], *, bar: Any, device: str | None,
                summary: Callable[[Any], Mapping[str, Any]]) -> int:
    """A trainer command's body: `work(bar)` with its progress bar (None: --quiet), closed however it ends; exit 2
    with the message on a ValueError or a missing file; else `summary(result)` printed as JSON on rank 0, 0."""
    try:
        result = work(bar)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    if setup_distributed(device).is_main:
        print(json.dumps(summary(result), indent=2))
    return 0


def without_history(result: Any) -> dict[str, Any]:
    """A trainer result's dict without its per-step history (what commands print)."""
    return {k: v for k, v in result.to_dict().items() if k != "history"}


# ------------------------------------------------------------------------------------------------ engine


class Engine:
    """One model's optimisation under a step plan: optimizer, schedule, accumulation, clipping, DDP, budget,
    checkpoint and exact resume.

    `module` is what the trainer calls forward on (the DDP wrapper under torchrun); `model` the bare module
    whose state is saved. Gradients of one optimizer step are accumulated over the micro-batches inside
    `accumulating`, which lets DDP synchronise only on the last. A loss handed to `backward` should already be
    scaled so that the sum over this process's micro-batches, averaged over processes by DDP, is the global
    batch's mean (`scale_for_global`).

    `sharding="fsdp"` shards the model over the processes instead (PyTorch's FSDP2, `fully_shard`, each
    `TransformerBlock` a unit, then the root): each process holds a slice of the weights, gradients and optimizer
    state, the rest is gathered block by block when needed. Checkpoints hold the full, unsharded state either
    way (gathered by every process, written by rank 0), and `full_model_state` gives it for saving the model.
    """

    def __init__(self, model: nn.Module, settings: OptimizerSettings, *, total_steps: int, dist: Distributed,
                 state_path: str | os.PathLike[str] | None = None, max_minutes: float | None = None,
                 started_at: float | None = None, sharding: str = "ddp"):
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        if sharding not in SHARDINGS:
            raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
        self.sharded = sharding == "fsdp" and dist.world_size > 1
        if self.sharded:
            shard_model(model)  # before the optimizer: it must see the sharded parameters
        self.model = model
        self.settings = settings
        self.total_steps = total_steps
        self.dist = dist
        self.state_path = Path(state_path) if state_path is not None else None
        self.max_minutes = max_minutes
        self.optimizer = build_optimizer(model, settings)
        self.scheduler = build_scheduler(self.optimizer, settings, total_steps)
        self.step = 0
        self._elapsed_before = 0.0
        self._start = time.monotonic() if started_at is None else started_at  # the budget's clock
        self._last_save = time.monotonic()
        self.module: nn.Module = model
        if dist.world_size > 1 and not self.sharded:
            device_ids = [dist.device.index] if dist.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=device_ids)

    # -- time

    def elapsed(self) -> float:
        """Seconds of training, counting those of earlier runs this one resumed."""
        return self._elapsed_before + time.monotonic() - self._start

    def out_of_time(self) -> bool:
        """Whether the wall-clock budget is spent (rank 0's clock; pass it through `decide`)."""
        return self.max_minutes is not None and self.dist.is_main and self.elapsed() >= 60 * self.max_minutes

    def checkpoint_due(self, done: int, *, every: int, minutes: float | None) -> bool:
        """Whether to checkpoint after `done` steps (or iterations): on every `every`-th (0: never by count), or
        once `minutes` have passed since the last checkpoint (rank 0's clock; every process gets its answer).

        A checkpoint holds AdamW's two moments beside the float32 weights, 12 bytes a trained parameter: written
        every iteration it costs about half as much as the iteration (1.4-2.2 s against 2.7-3.4 s for a PPO
        iteration of a 24M-parameter policy and value model on one CPU thread, `benchmarks/ppo_iteration.py --shape
        llama2-24m`; about 170 GB for a 7B policy and value model), hence a schedule by time. `minutes` None or 0:
        by count only.
        """
        due = bool(every) and done % every == 0
        if not due and minutes:
            due = bool(self.dist.broadcast_int(int(time.monotonic() - self._last_save >= 60 * minutes)))
        return due

    def decide(self, reason: str | None, reasons: Sequence[str]) -> str | None:
        """Rank 0's stop reason (None or one of `reasons`) on every process: all leave the loop at the same step."""
        code = 0 if not reason else 1 + list(reasons).index(reason)
        code = self.dist.broadcast_int(code)
        return None if code == 0 else reasons[code - 1]

    # -- one optimizer step

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    @contextlib.contextmanager
    def accumulating(self, *, last: bool) -> Iterator[None]:
        """Around one micro-batch's forward and backward: DDP all-reduces the gradients only on the last one."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
            yield
        elif self.dist.world_size == 1 or last:
            yield
        else:
            with self.module.no_sync():  # type: ignore[operator]
                yield

    def scale_for_global(self, loss_sum: torch.Tensor, global_count: float) -> torch.Tensor:
        """A micro-batch's summed loss as its share of the global batch's mean, under DDP's averaging."""
        return loss_sum * self.dist.world_size / global_count

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the schedule, clear the gradients; returns the gradient norm before clipping."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if hasattr(total, "full_tensor"):  # FSDP: a DTensor of per-shard parts; every process gets the same whole
            total = total.full_tensor()
        grad_norm = float(total)
        # clip_grad_norm_ multiplies every gradient by min(1, clip / (norm + 1e-6)) even when that is 1, a pass
        # over all of them (a sixth of a 24M-parameter PPO step's time on a CPU); the norm is read anyway. A NaN
        # norm still multiplies them (by NaN), as clip_grad_norm_ does.
        if not grad_norm + 1e-6 <= self.settings.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.settings.grad_clip, total)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm

    # -- checkpoints

    def save(self, extra: Mapping[str, Any] | None = None, *, signature: Mapping[str, Any] | None = None) -> None:
        """Atomically write model, optimizer, scheduler, RNG, step, elapsed time and the trainer's `extra` entries
        beside them (rank 0 only)."""
        if self.state_path is None:
            return
        self._last_save = time.monotonic()
        model_state, optimizer_state = self._full_states()  # every process takes part when sharded
        if not self.dist.is_main:
            return
        extra = dict(extra or {})
        clash = sorted(set(extra) & set(_ENGINE_KEYS))
        if clash:
            raise ValueError(f"checkpoint entries {clash} are the engine's own")
        atomic_torch_save({
            "model": model_state, "optimizer": optimizer_state, "sharded": self.sharded,
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "step": self.step,
            "total_steps": self.total_steps, "elapsed_s": self.elapsed(), "signature": self._signature(signature),
            **extra,
        }, self.state_path)

    def has_checkpoint(self) -> bool:
        return self.state_path is not None and self.state_path.is_file()

    def resume(self, signature: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Load the checkpoint at state_path if there is one (on every process) and return the trainer's entries.

        `signature` describes the run (data size, plan); a checkpoint written by a different run is a
        ValueError rather than a silent mix of two runs.
        """
        if not self.has_checkpoint():
            return None
        assert self.state_path is not None
        state = load_train_state(self.state_path)
        if bool(state.get("sharded", False)) != self.sharded:
            raise ValueError(f"{self.state_path} was written by a {'sharded' if state.get('sharded') else 'DDP'} run; "
                             f"resume it the same way")
        expected = {"total_steps": self.total_steps, **self._signature(signature)}
        # checkpoints written before the engine kept a signature (rewards.train until 2026-12-05) hold its keys
        # at the top level
        stored = state.get("signature", {k: state[k] for k in expected if k in state})
        found = {"total_steps": state.get("total_steps"), **stored}
        legacy = "signature" not in state  # compared on what it holds
        if any((k in found or not legacy) and found.get(k) != v for k, v in expected.items()):
            raise ValueError(
                f"{self.state_path} belongs to a different run ({found}; now {expected}): use another output "
                "directory or remove it"
            )
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self._elapsed_before = float(state["elapsed_s"])
        return {k: v for k, v in state.items() if k not in _ENGINE_KEYS}


    def _signature(self, signature: Mapping[str, Any] | None) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed: the trainer's plan and the optimizer's settings (a resume
        with another learning rate would silently keep the stored one)."""
        return {**dict(signature or {}), "optimizer_settings": dataclasses.asdict(self.settings)}

    def _full_states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's and the optimizer's full state dicts (sharded: gathered, on rank 0 only)."""
        if not self.sharded:
            return self.model.state_dict(), self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(self.model, self.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """The model's whole state dict for saving it (call on every process; sharded, rank 0 gets it)."""
        if not self.sharded:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


_ENGINE_KEYS = ("model", "optimizer", "sharded", "scheduler", "rng", "step", "total_steps", "elapsed_s", "signature")


def shard_model(model: nn.Module) -> None:
    """FSDP2 over a model holding Llama blocks: each TransformerBlock its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    from training.llama.model import TransformerBlock

    blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
    if not blocks:
        raise ValueError("FSDP sharding needs a model with Llama TransformerBlocks")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)


def read_elapsed_minutes(state_path: str | os.PathLike[str]) -> float:
    """The training time stored in a checkpoint (0 when there is none): what a resumed run has already spent."""
    path = Path(state_path)
    if not path.is_file():
        return 0.0
    return float(load_train_state(path).get("elapsed_s", 0.0)) / 60
