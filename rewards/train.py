"""Reward-model training: pairwise ranking loss, AdamW + cosine schedule, DDP, atomic checkpoints, exact resume.

python -m rewards.train --kind helpfulness|safety --data PATH... --format native|trl|hh-rlhf \
    (--init CHECKPOINT | --config tiny|tiny-ensemble|small --tokenizer PATH) [--ensemble N] [--max-minutes M] --out DIR
Several processes: torchrun --nproc-per-node N -m rewards.train ... (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rewards.configs import CONFIG_NAMES, from_scratch_config
from rewards.data import (
    FORMATS,
    PreferencePair,
    TokenizedPair,
    assign_splits,
    collate_pairs,
    hold_out,
    length_bucketed_batches,
    mix_for_kind,
    read_pairs,
    tokenize_pairs,
)
from rewards.evaluate import evaluate_items, score_pairs
from rewards.losses import MARGIN_SCHEMES, pairwise_ranking_loss
from rewards.model import KINDS, RewardModel, save_reward_model

TRAIN_STATE_FILE = "train_state.pt"
REPORT_FILE = "eval_report.json"

# What a named from-scratch config may set; anything else must be given explicitly.
_RECIPE_FIELDS = (
    "max_seq_len", "global_batch_size", "micro_batch_size", "learning_rate", "epochs",
    "validation_fraction", "eval_every", "early_stopping_patience", "token_dropout", "weight_decay",
    "ema_decay", "min_token_count", "lm_pretrain_epochs", "soup_size", "context_turns", "ensemble",
)
# The report's recipe for a model initialised from a chat checkpoint (section 3.2.2), but 64 pairs a step
# rather than 512 so that a few hundred pairs still train: pass --global-batch-size 512 for the report's setting.
_FINETUNE_DEFAULTS: dict[str, Any] = dict(
    max_seq_len=1024, global_batch_size=64, micro_batch_size=4, learning_rate=1e-5, epochs=1,
    validation_fraction=0.0, eval_every=0, early_stopping_patience=None, token_dropout=0.0, weight_decay=0.1,
    ema_decay=0.0, min_token_count=0, lm_pretrain_epochs=0, soup_size=1, context_turns=0, ensemble=1,
)


@dataclass
class RewardTrainConfig:
    """Everything one reward-model training run needs; None fields take the recipe's default."""

    kind: str = "helpfulness"
    data: list[str] = field(default_factory=list)
    format: str = "native"
    out_dir: str = "var/reward-model"
    init: str | None = None  # a chat/policy checkpoint directory (Meta or Hugging Face)
    config: str | None = None  # a named from-scratch config ("tiny", "tiny-ensemble", "small")
    tokenizer: str | None = None  # tokenizer.model; default: the one inside --init
    data_domain: str | None = None  # domain of pairs whose file format carries none (hh-rlhf)
    test_fraction: float = 0.2  # the fixed held-out split of pairs that have no split of their own
    mix: bool = True  # apply the report's mixing recipe for `kind`
    other_ratio: float = 1.0  # helpfulness RM: other data drawn per helpfulness pair
    helpfulness_fraction: float = 0.1  # safety RM: share of helpfulness data in the mix
    margin: str = "none"  # Table 27 margin scheme: none | small | large
    label_smoothing: float = 0.0  # weight of the reversed label in the ranking loss (0: the report's loss)
    max_seq_len: int | None = None
    global_batch_size: int | None = None  # pairs per optimizer step, over all processes
    micro_batch_size: int | None = None  # pairs per forward pass on one process
    learning_rate: float | None = None
    min_lr_ratio: float = 0.1  # cosine decay to 10% of the peak
    warmup_ratio: float = 0.03
    min_warmup_steps: int = 5
    weight_decay: float | None = None  # 0.1 in the report
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-5
    grad_clip: float = 1.0
    epochs: int | None = None
    max_steps: int | None = None  # cap on the planned number of optimizer steps
    stop_after_steps: int | None = None  # stop (checkpointed) after this many steps, the schedule unchanged
    max_minutes: float | None = None  # wall-clock budget; the run stops, checkpointed, when it is spent
    validation_fraction: float | None = None  # carved from the train split for model selection
    eval_every: int | None = None  # steps between validation passes (0: only at the end)
    early_stopping_patience: int | None = None  # validation passes without improvement before stopping
    checkpoint_every: int = 0  # steps between checkpoints (0: only when the run stops)
    resume: bool = True  # continue from out_dir/train_state.pt when it exists
    seed: int = 0
    init_seed: int | None = None  # seed of the initial weights (default: seed); the other draws use seed
    bucket_batches: int = 8
    token_dropout: float | None = None  # drop this share of the training tokens (not BOS, not the last token)
    ema_decay: float | None = None  # keep an exponential moving average of the weights; evaluate and save it
    min_token_count: int | None = None  # tokens seen fewer times in the training pairs share one embedding
    lm_pretrain_epochs: int | None = None  # next-token epochs on the training conversations before ranking
    soup_size: int | None = None  # train this many runs from one initialisation and average their weights
    context_turns: int | None = None  # read only the newest turns of the context (odd; 0: all), saved with the model
    ensemble: int | None = None  # train this many runs from their own initialisations; score with their mean
    device: str | None = None
    bf16: bool = True  # autocast to bfloat16 on GPU
    num_threads: int | None = None

    def resolved(self, *, has_pairs: bool = False) -> RewardTrainConfig:
        """A copy with the recipe's defaults filled in and the settings checked."""
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if (self.init is None) == (self.config is None):
            raise ValueError("give exactly one of init (a checkpoint) and config (a from-scratch config name)")
        if self.config is not None and self.tokenizer is None:
            raise ValueError("a from-scratch config needs a tokenizer path")
        if self.margin not in MARGIN_SCHEMES:
            raise ValueError(f"margin must be one of {sorted(MARGIN_SCHEMES)}, got {self.margin!r}")
        if not self.data and not has_pairs:
            raise ValueError("no data files given")
        recipe = from_scratch_config(self.config).training if self.config else _FINETUNE_DEFAULTS
        updates = {k: recipe.get(k, _FINETUNE_DEFAULTS[k]) for k in _RECIPE_FIELDS if getattr(self, k) is None}
        out = dataclasses.replace(self, **updates)
        if out.global_batch_size is None or out.micro_batch_size is None or out.global_batch_size < 1 or out.micro_batch_size < 1:
            raise ValueError("global_batch_size and micro_batch_size must be positive")
        if out.soup_size is None or out.soup_size < 1:
            raise ValueError(f"soup_size must be positive, got {out.soup_size}")
        if out.ensemble is None or out.ensemble < 1:
            raise ValueError(f"ensemble must be positive, got {out.ensemble}")
        return out


@dataclass(frozen=True)
class TrainProgress:
    """What the progress callback receives after every optimizer step (rank 0 only)."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    accuracy: float
    learning_rate: float
    elapsed_s: float
    pairs_per_s: float
    validation_accuracy: float | None = None
    # Runs trained in turn as one (an ensemble's members, a soup's ingredients): which one this is, of how many.
    part: int = 0
    parts: int = 1

    @property
    def fraction(self) -> float:
        """How much of the whole training is done, 0-1, across the parts: what a progress bar shows."""
        return (self.part + min(1.0, self.step / max(1, self.total_steps))) / self.parts


@dataclass
class RewardTrainResult:
    """The outcome of a run: where the model is, why it stopped, and its test report."""

    out_dir: str
    steps: int
    total_steps: int
    stopped: str  # completed | max_minutes | early_stopping | stop_after_steps
    elapsed_s: float
    pairs_per_s: float
    final_loss: float | None
    best_validation_accuracy: float | None
    best_step: int | None
    n_train_pairs: int
    n_validation_pairs: int
    n_test_pairs: int
    test_report: dict[str, Any] | None
    history: list[dict[str, Any]]
    lm_pretrain_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _setup_distributed(device_name: str | None) -> _Dist:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
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
    return _Dist(rank=rank, world_size=world_size, device=device)


def _all_sum(values: list[float], ctx: _Dist) -> list[float]:
    if ctx.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


_STOP_REASONS: tuple[str | None, ...] = (None, "max_minutes", "stop_after_steps", "early_stopping")


def _broadcast_code(code: int, ctx: _Dist) -> int:
    if ctx.world_size == 1:
        return code
    t = torch.tensor([code], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return int(t.item())


# ------------------------------------------------------------------------------------------------ data


@dataclass
class _Data:
    train: list[TokenizedPair]
    validation: list[TokenizedPair]
    test: list[TokenizedPair]
    tokenizer_path: str
    vocab_size: int
    rare_ids: list[int] = field(default_factory=list)  # ids read as RARE_TOKEN_ID (min_token_count)
    rare_target: int = 0


def load_pairs(
    config: RewardTrainConfig, pairs: Sequence[PreferencePair] | None = None
) -> tuple[list[PreferencePair], list[PreferencePair], list[PreferencePair]]:
    """(train, validation, test) pairs of a run: the files (or the given pairs), their fixed split, the kind's
    mix, the validation cut."""
    if pairs is None:
        pairs = [p for path in config.data for p in read_pairs(path, config.format, domain=config.data_domain)]
    pairs = assign_splits(pairs, config.test_fraction)
    train = [p for p in pairs if p.split == "train"]
    test = [p for p in pairs if p.split == "test"]
    if config.mix:
        train = mix_for_kind(train, config.kind, other_ratio=config.other_ratio,
                             helpfulness_fraction=config.helpfulness_fraction, seed=config.seed)
    validation: list[PreferencePair] = []
    if config.validation_fraction:
        train, validation = hold_out(train, config.validation_fraction)
    return train, validation, test


def _load_data(config: RewardTrainConfig, pairs: Sequence[PreferencePair] | None) -> _Data:
    from training.llama.tokenizer import Tokenizer

    tokenizer_path = config.tokenizer
    if tokenizer_path is None:
        assert config.init is not None  # resolved() guarantees init or tokenizer
        tokenizer_path = _find_tokenizer(Path(config.init))
    tokenizer = Tokenizer(tokenizer_path)
    train, validation, test = load_pairs(config, pairs)
    if not train:
        raise ValueError("the data has no training pairs")
    assert config.max_seq_len is not None
    tok = lambda ps: tokenize_pairs(tokenizer, ps, max_seq_len=config.max_seq_len, margin_scheme=config.margin,  # noqa: E731
                                    context_turns=config.context_turns or None)
    data = _Data(tok(train), tok(validation), tok(test), str(tokenizer_path), tokenizer.n_words)
    if config.min_token_count:
        data.rare_target = tokenizer.eos_id + 1 if tokenizer.eos_id + 1 < tokenizer.n_words else 0
        data = share_rare_tokens(data, config.min_token_count, keep={tokenizer.bos_id, tokenizer.eos_id})
    return data


def share_rare_tokens(data: _Data, min_count: int, *, keep: set[int]) -> _Data:
    """Read every token seen fewer than min_count times in the training pairs as one shared token.

    With a 32,000-piece vocabulary and a few thousand pairs, most pieces are seen once or twice and a model
    trained from scratch memorises pairs through them. Mapping them to one id during training, and giving their
    embedding rows that id's row when the model is saved (see `tie_rare_embeddings`), is the same model for any
    input: the saved checkpoint needs no mapping.
    """
    counts = Counter(t for p in data.train for ids in (p.chosen_ids, p.rejected_ids) for t in ids)
    rare = sorted(t for t in range(data.vocab_size) if counts.get(t, 0) < min_count and t not in keep and t != data.rare_target)
    table = list(range(data.vocab_size))
    for t in rare:
        table[t] = data.rare_target

    def remap(items: list[TokenizedPair]) -> list[TokenizedPair]:
        return [
            dataclasses.replace(
                p, chosen_ids=tuple(table[t] for t in p.chosen_ids), rejected_ids=tuple(table[t] for t in p.rejected_ids)
            )
            for p in items
        ]

    return dataclasses.replace(
        data, train=remap(data.train), validation=remap(data.validation), test=remap(data.test), rare_ids=rare
    )


@torch.no_grad()
def tie_rare_embeddings(model: RewardModel, rare_ids: Sequence[int], target: int) -> None:
    """Give the rare tokens' embedding rows the shared token's row (see share_rare_tokens)."""
    if rare_ids:
        weight = model.transformer.tok_embeddings.weight
        index = torch.tensor(list(rare_ids), device=weight.device)
        weight[index] = weight[target].clone().expand(len(rare_ids), -1)  # a copy: a view of weight overlaps it


def _find_tokenizer(init: Path) -> str:
    for candidate in (init / "tokenizer.model", init.parent / "tokenizer.model"):
        if candidate.is_file():
            return str(candidate)
    raise ValueError(f"no tokenizer.model in or beside {init}; pass --tokenizer")


def drop_tokens(item: TokenizedPair, rate: float, *, seed: str) -> TokenizedPair:
    """A copy of a training pair with each token but the first and the last dropped with probability rate.

    A regulariser for models trained from scratch on little data. The draw depends only on the seed string
    (run seed, epoch, pair index), so it is the same on any number of processes and after a resume.
    """
    rng = random.Random(seed)

    def keep(ids: tuple[int, ...]) -> tuple[int, ...]:
        middle = [t for t in ids[1:-1] if rng.random() >= rate]
        return (ids[0], *middle, ids[-1]) if len(ids) > 1 else ids

    return dataclasses.replace(item, chosen_ids=keep(item.chosen_ids), rejected_ids=keep(item.rejected_ids))


# ----------------------------------------------------------------------------------------- optimisation


def cosine_schedule(step: int, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to min_lr_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_ratio: float, min_warmup_steps: int) -> int:
    """3% of the steps, at least min_warmup_steps (but never more than the run)."""
    return max(1, min(total_steps, max(min_warmup_steps, math.ceil(warmup_ratio * total_steps))))


def pretrain_language_model(
    model: RewardModel, items: Sequence[TokenizedPair], *, epochs: int, learning_rate: float, batch_size: int,
    seed: int, device: torch.device,
) -> list[float]:
    """Next-token training on the training conversations themselves, before the ranking loss.

    A from-scratch model has no language knowledge; a few epochs of language modelling on the text it is about to
    rank (no other data) give its embeddings some structure. Deterministic for a seed, so every process of a
    distributed run gets the same weights without communicating. Returns the mean loss of each epoch.
    """
    sequences = sorted({ids for p in items for ids in (p.chosen_ids, p.rejected_ids)})
    output = model.transformer.output
    output.requires_grad_(True)
    params = [p for p in model.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    losses = []
    for epoch in range(epochs):
        batches = length_bucketed_batches([len(s) for s in sequences], batch_size, seed=seed, epoch=-1 - epoch, drop_last=False)
        total, count = 0.0, 0
        for batch in batches:
            seqs = [sequences[i] for i in batch]
            seqlen = max(map(len, seqs))
            tokens = torch.zeros((len(seqs), seqlen), dtype=torch.long)
            targets = torch.full((len(seqs), seqlen), -100, dtype=torch.long)  # -100: no loss (padding, last token)
            for row, ids in enumerate(seqs):
                tokens[row, : len(ids)] = torch.tensor(ids)
                targets[row, : len(ids) - 1] = torch.tensor(ids[1:])
            logits = model.transformer(tokens.to(device))  # (bsz, seqlen, vocab)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.to(device).flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total, count = total + float(loss.detach()) * len(seqs), count + len(seqs)
        losses.append(total / max(1, count))
    output.requires_grad_(False)
    return losses


def build_optimizer(model: RewardModel, config: RewardTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
    )


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary file beside the target and rename it: a crash never leaves half a checkpoint."""
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


# ------------------------------------------------------------------------------------------------ train


def train_reward_model(
    config: RewardTrainConfig,
    *,
    pairs: Sequence[PreferencePair] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> RewardTrainResult:
    """Train a reward model as configured; resumable, and the same function under torchrun.

    `pairs` (e.g. from the platform's database selector) replace config.data; pairs with a split keep it, the
    others get the fixed test_fraction split. `progress` is called on rank 0 after every optimizer step.
    """
    config = config.resolved(has_pairs=pairs is not None)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if config.ensemble and config.ensemble > 1:  # members may be soups themselves
        from rewards.ensemble import train_reward_ensemble

        return train_reward_ensemble(config, pairs=pairs, progress=progress)
    if config.soup_size and config.soup_size > 1:
        from rewards.soup import train_reward_soup

        return train_reward_soup(config, pairs=pairs, progress=progress)
    ctx = _setup_distributed(config.device)
    assert config.global_batch_size is not None
    assert config.micro_batch_size is not None
    if config.global_batch_size % ctx.world_size:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by {ctx.world_size} processes")
    local_batch = config.global_batch_size // ctx.world_size
    out_dir = Path(config.out_dir)
    start_time = time.monotonic()

    data = _load_data(config, pairs)
    lengths = [p.length for p in data.train]
    steps_per_epoch = len(data.train) // config.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data.train)} training pairs are fewer than one global batch of {config.global_batch_size}")
    assert config.epochs is not None
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    warmup = warmup_steps_for(total_steps, config.warmup_ratio, config.min_warmup_steps)

    # The same seed on every process: identical initial weights, which DDP also enforces by broadcast.
    torch.manual_seed(config.seed if config.init_seed is None else config.init_seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if config.init is not None:
        model = RewardModel.from_pretrained(config.init, device=ctx.device)
    else:
        assert config.config is not None
        model = RewardModel.from_args(from_scratch_config(config.config).model_args(data.vocab_size), device=ctx.device)
    if config.max_seq_len is not None and config.max_seq_len > model.args.max_seq_len:
        raise ValueError(f"max_seq_len {config.max_seq_len} exceeds the model's context {model.args.max_seq_len}")
    resuming = config.resume and (out_dir / TRAIN_STATE_FILE).is_file()  # continue where train_state.pt stopped
    lm_losses: list[float] = []
    if config.lm_pretrain_epochs and not resuming:  # a resumed run loads weights that already had it
        lm_losses = pretrain_language_model(
            model, data.train, epochs=config.lm_pretrain_epochs, learning_rate=config.learning_rate or 1e-3,
            batch_size=config.micro_batch_size, seed=config.seed, device=ctx.device,
        )
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_schedule(s, total_steps=total_steps, warmup_steps=warmup, min_lr_ratio=config.min_lr_ratio)
    )

    # The moving average of the trained weights (a cheap ensemble of the last few hundred steps).
    ema: dict[str, torch.Tensor] = (
        {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if config.ema_decay else {}
    )
    step, history = 0, []
    best: dict[str, Any] = {"accuracy": None, "loss": None, "step": None, "state": None, "bad_evals": 0}
    elapsed_before = 0.0
    state_path = out_dir / TRAIN_STATE_FILE
    if resuming:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["total_steps"] != total_steps or state["n_train"] != len(data.train):
            raise ValueError(
                f"{state_path} belongs to a different run ({state['n_train']} pairs, {state['total_steps']} steps; "
                f"now {len(data.train)} pairs, {total_steps} steps): use another --out or remove it"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, history, best, elapsed_before = state["step"], state["history"], state["best"], state["elapsed_s"]
        if ema:
            ema = {n: t.to(ctx.device) for n, t in state["ema"].items()}

    ddp_model: torch.nn.Module = model
    if ctx.world_size > 1:
        ddp_model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" and config.bf16 else nullcontext()

    def checkpoint() -> None:
        if ctx.is_main:
            _atomic_torch_save(
                {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(), "step": step, "epoch": step // steps_per_epoch,
                    "step_in_epoch": step % steps_per_epoch, "total_steps": total_steps, "n_train": len(data.train),
                    "history": history, "best": best, "elapsed_s": elapsed(), "config": dataclasses.asdict(config),
                    "ema": ema,
                },
                state_path,
            )

    def elapsed() -> float:
        return elapsed_before + time.monotonic() - start_time

    def evaluated_state() -> dict[str, torch.Tensor]:
        """The weights that are validated and saved: the moving average where there is one."""
        return {k: ema.get(k, v).detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def validate() -> tuple[float, float]:
        live = None
        if ema:
            live = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(evaluated_state())
        chosen, rejected = score_pairs(model, data.validation, batch_size=config.micro_batch_size or 16)
        if live is not None:
            model.load_state_dict(live)
        diff = chosen - rejected
        return float((diff > 0).float().mean()), float(pairwise_ranking_loss(chosen, rejected))

    model.train()
    stopped = "completed"
    epoch_batches: tuple[int, list[list[int]]] | None = None
    last_loss: float | None = None
    pairs_seen, train_time = 0, 0.0
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch_batches is None or epoch_batches[0] != epoch:
            epoch_batches = (epoch, length_bucketed_batches(lengths, config.global_batch_size, seed=config.seed,
                                                            epoch=epoch, bucket_batches=config.bucket_batches))
        global_batch = epoch_batches[1][index]
        # Each process takes its contiguous slice; the slices are length-sorted, so padding stays small.
        local = global_batch[ctx.rank * local_batch : (ctx.rank + 1) * local_batch]
        micro = [local[i : i + config.micro_batch_size] for i in range(0, len(local), config.micro_batch_size)]

        t0 = time.monotonic()
        loss_sum, correct = 0.0, 0.0
        for i, idx in enumerate(micro):
            batch_items = [data.train[j] for j in idx]
            if config.token_dropout:
                batch_items = [drop_tokens(data.train[j], config.token_dropout, seed=f"{config.seed}:{epoch}:{j}") for j in idx]
            tokens, seq_lengths, margins = collate_pairs(batch_items)
            sync = ctx.world_size == 1 or i == len(micro) - 1
            with (nullcontext() if sync else ddp_model.no_sync()), autocast:  # type: ignore[operator]
                scores = ddp_model(tokens.to(ctx.device), lengths=seq_lengths.to(ctx.device))  # (2 * b,)
                chosen, rejected = scores[: len(idx)], scores[len(idx) :]
                loss = pairwise_ranking_loss(chosen, rejected, margins.to(ctx.device),
                                             label_smoothing=config.label_smoothing) * len(idx)
                # DDP averages gradients over processes; scaling by world / global makes the result the
                # gradient of the mean loss over the whole global batch, as on one process.
                (loss * ctx.world_size / config.global_batch_size).backward()
            loss_sum += float(loss.detach())
            correct += float((chosen.detach() > rejected.detach()).sum())
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema:
            with torch.no_grad():
                assert config.ema_decay is not None
                for name, param in model.named_parameters():
                    if name in ema:
                        ema[name].lerp_(param.detach(), 1.0 - config.ema_decay)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        train_time += time.monotonic() - t0
        pairs_seen += config.global_batch_size

        loss_sum, correct = _all_sum([loss_sum, correct], ctx)
        last_loss = loss_sum / config.global_batch_size
        record: dict[str, Any] = {
            "step": step, "epoch": epoch, "loss": last_loss, "accuracy": correct / config.global_batch_size,
            "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
        }

        reason = None
        if ctx.is_main and config.max_minutes is not None and elapsed() >= 60 * config.max_minutes:
            reason = "max_minutes"
        if config.stop_after_steps is not None and config.stop_after_steps <= step < total_steps:
            reason = "stop_after_steps"
        evaluate_now = bool(data.validation) and (
            bool(config.eval_every and step % config.eval_every == 0) or step == total_steps or reason is not None
        )
        if evaluate_now and ctx.is_main:
            val_acc, val_loss = validate()
            record.update(validation_accuracy=val_acc, validation_loss=val_loss)
            if best["accuracy"] is None or (val_acc, -val_loss) > (best["accuracy"], -best["loss"]):
                best.update(accuracy=val_acc, loss=val_loss, step=step, bad_evals=0,
                            state=evaluated_state())
            else:
                best["bad_evals"] += 1
                patience = config.early_stopping_patience
                if reason is None and patience is not None and best["bad_evals"] >= patience:
                    reason = "early_stopping"
        history.append(record)
        # Rank 0 decides (its clock, its validation); every process must leave the loop at the same step.
        reason = _STOP_REASONS[_broadcast_code(_STOP_REASONS.index(reason), ctx)]

        if progress is not None and ctx.is_main:
            progress(TrainProgress(
                step=step, total_steps=total_steps, epoch=epoch, loss=last_loss, accuracy=record["accuracy"],
                learning_rate=record["lr"], elapsed_s=elapsed(), pairs_per_s=pairs_seen / max(train_time, 1e-9),
                validation_accuracy=record.get("validation_accuracy"),
            ))
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
            checkpoint()
        if reason is not None:
            stopped = reason
            break

    if stopped != "completed":
        checkpoint()  # an interrupted run (time, step limit) can go on with --resume

    test_report = None
    if ctx.is_main:
        if best["state"] is not None and stopped != "stop_after_steps":
            model.load_state_dict(best["state"])  # model selection on validation accuracy
        elif ema and stopped != "stop_after_steps":
            model.load_state_dict(evaluated_state())
        metadata = {
            "config": dataclasses.asdict(config), "steps": step, "total_steps": total_steps, "stopped": stopped,
            "best_validation_accuracy": best["accuracy"], "best_step": best["step"],
        }
        tie_rare_embeddings(model, data.rare_ids, data.rare_target)
        save_reward_model(model, out_dir / "model", kind=config.kind, tokenizer_path=data.tokenizer_path,
                          max_seq_len=config.max_seq_len or model.args.max_seq_len, metadata=metadata,
                          context_turns=config.context_turns or None)
        if data.test:
            test_report = evaluate_items(model, data.test, batch_size=config.micro_batch_size)
            (out_dir / REPORT_FILE).write_text(json.dumps(test_report, indent=2) + "\n")
    if ctx.world_size > 1:
        dist.barrier()
    return RewardTrainResult(
        out_dir=str(out_dir), steps=step, total_steps=total_steps, stopped=stopped, elapsed_s=elapsed(),
        pairs_per_s=pairs_seen / max(train_time, 1e-9), final_loss=last_loss,
        best_validation_accuracy=best["accuracy"], best_step=best["step"], n_train_pairs=len(data.train),
        n_validation_pairs=len(data.validation), n_test_pairs=len(data.test), test_report=test_report, history=history,
        lm_pretrain_losses=lm_losses,
    )


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rewards.train", description="Train a helpfulness or safety reward model.")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--data", required=True, nargs="+", help="preference file(s), .jsonl or .jsonl.gz")
    parser.add_argument("--format", required=True, choices=FORMATS)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--init", help="chat/policy checkpoint directory (Meta or Hugging Face format)")
    source.add_argument("--config", choices=CONFIG_NAMES, help="train a named config from scratch")
    parser.add_argument("--tokenizer", help="tokenizer.model (required with --config)")
    parser.add_argument("--out", required=True, help="output directory (model/, train_state.pt, eval_report.json)")
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--domain", dest="data_domain", choices=("helpfulness", "safety"),
                        help="domain of pairs whose format has none")
    parser.add_argument("--margin", default="none", choices=sorted(MARGIN_SCHEMES))
    parser.add_argument("--no-mix", dest="mix", action="store_false", help="train on the data as it is")
    parser.add_argument("--other-ratio", type=float, default=1.0)
    parser.add_argument("--helpfulness-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    for name, kind in (("max-seq-len", int), ("global-batch-size", int), ("micro-batch-size", int),
                       ("learning-rate", float), ("epochs", int), ("max-steps", int), ("validation-fraction", float),
                       ("eval-every", int), ("early-stopping-patience", int), ("stop-after-steps", int),
                       ("soup-size", int), ("context-turns", int)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--ensemble", type=int, default=None,
                        help="train this many models from their own initialisations, saved as one ensemble that "
                             "scores with their mean")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--no-resume", dest="resume", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--threads", dest="num_threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> RewardTrainConfig:
    values = vars(args).copy()
    values.pop("quiet")
    values["out_dir"] = values.pop("out")
    return RewardTrainConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    bar, bar_part = None, 0
    is_main = int(os.environ.get("RANK", "0")) == 0

    def on_progress(p: TrainProgress) -> None:
        nonlocal bar, bar_part
        if args.quiet:
            return
        if bar is None or p.part != bar_part:  # a bar for each ensemble member or soup ingredient
            from tqdm import tqdm

            if bar is not None:
                bar.close()
            desc = f"part {p.part + 1}/{p.parts}" if p.parts > 1 else None
            bar, bar_part = tqdm(total=p.total_steps, initial=p.step - 1, unit="step", desc=desc, file=sys.stderr), p.part
        postfix = {"loss": f"{p.loss:.3f}", "acc": f"{p.accuracy:.2f}", "lr": f"{p.learning_rate:.1e}"}
        if p.validation_accuracy is not None:
            postfix["val"] = f"{p.validation_accuracy:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)

    try:
        result = train_reward_model(config, progress=on_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    if is_main:
        summary = result.to_dict()
        summary.pop("history")
        print(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
