"""One reward-model training run: pairwise ranking loss on the shared training engine (training.engine).

The config, progress and result types of every reward-model run live here; `rewards.train` is the entry point
(CLI, and the dispatch to ensembles and soups, which train several such runs in turn: rewards.members).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewards.configs import from_scratch_config
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
from training.engine import (
    Distributed,
    Engine,
    OptimizerSettings,
    seed_everything,
    setup_distributed,
    split_for_rank,
)

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




# ------------------------------------------------------------------------------------------------ train

_STOP_REASONS = ("max_minutes", "stop_after_steps", "early_stopping")


class _RewardRun:
    """The state of one run between optimizer steps: the engine, the moving average, the best validated weights."""

    def __init__(self, config: RewardTrainConfig, data: _Data, model: RewardModel, engine: Engine):
        self.config, self.data, self.model, self.engine = config, data, model, engine
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"accuracy": None, "loss": None, "step": None, "state": None, "bad_evals": 0}
        # The moving average of the trained weights (a cheap ensemble of the last few hundred steps).
        self.ema: dict[str, torch.Tensor] = (
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if config.ema_decay else {}
        )
        assert config.global_batch_size is not None
        self.steps_per_epoch = len(data.train) // config.global_batch_size

    @property
    def signature(self) -> dict[str, Any]:
        return {"n_train": len(self.data.train), "seed": self.config.seed,
                "global_batch_size": self.config.global_batch_size}

    def resume(self) -> None:
        state = self.engine.resume(self.signature)
        if state is not None:
            self.history, self.best = state["history"], state["best"]
            if self.ema:
                self.ema = {n: t.to(self.engine.dist.device) for n, t in state["ema"].items()}

    def checkpoint(self) -> None:
        step = self.engine.step
        self.engine.save({
            "epoch": step // self.steps_per_epoch, "step_in_epoch": step % self.steps_per_epoch,
            "history": self.history, "best": self.best, "ema": self.ema, "config": dataclasses.asdict(self.config),
        }, signature=self.signature)

    def evaluated_state(self) -> dict[str, torch.Tensor]:
        """The weights that are validated and saved: the moving average where there is one."""
        return {k: self.ema.get(k, v).detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def validate(self) -> tuple[float, float]:
        live = None
        if self.ema:
            live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self.evaluated_state())
        chosen, rejected = score_pairs(self.model, self.data.validation, batch_size=self.config.micro_batch_size or 16)
        if live is not None:
            self.model.load_state_dict(live)
        diff = chosen - rejected
        return float((diff > 0).float().mean()), float(pairwise_ranking_loss(chosen, rejected))

    def train_step(self, global_batch: list[int], epoch: int) -> dict[str, Any]:
        """One optimizer step over this process's share of the global batch; the step's record."""
        config, engine, data = self.config, self.engine, self.data
        assert config.global_batch_size is not None
        assert config.micro_batch_size is not None
        local = split_for_rank(global_batch, engine.dist)  # length-sorted slices: little padding
        micro = [local[i: i + config.micro_batch_size] for i in range(0, len(local), config.micro_batch_size)]
        device = engine.dist.device
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" and config.bf16 else nullcontext()
        loss_sum, correct = 0.0, 0.0
        for i, idx in enumerate(micro):
            items = [data.train[j] for j in idx]
            if config.token_dropout:
                items = [drop_tokens(data.train[j], config.token_dropout, seed=f"{config.seed}:{epoch}:{j}") for j in idx]
            tokens, seq_lengths, margins = collate_pairs(items)
            with engine.accumulating(last=i == len(micro) - 1), autocast:
                scores = engine.module(tokens.to(device), lengths=seq_lengths.to(device))  # (2 * b,)
                chosen, rejected = scores[: len(idx)], scores[len(idx):]
                loss = pairwise_ranking_loss(chosen, rejected, margins.to(device),
                                             label_smoothing=config.label_smoothing) * len(idx)
                engine.backward(engine.scale_for_global(loss, config.global_batch_size))
            loss_sum += float(loss.detach())
            correct += float((chosen.detach() > rejected.detach()).sum())
        grad_norm = engine.optimizer_step()
        if self.ema:
            with torch.no_grad():
                assert config.ema_decay is not None
                for name, param in self.model.named_parameters():
                    if name in self.ema:
                        self.ema[name].lerp_(param.detach(), 1.0 - config.ema_decay)
        loss_sum, correct = engine.dist.all_sum([loss_sum, correct])
        return {"step": engine.step, "epoch": epoch, "loss": loss_sum / config.global_batch_size,
                "accuracy": correct / config.global_batch_size, "lr": engine.learning_rate, "grad_norm": grad_norm}

    def validate_into(self, record: dict[str, Any], reason: str | None) -> str | None:
        """Validate (rank 0), keep the best weights, and say whether patience ran out."""
        val_acc, val_loss = self.validate()
        record.update(validation_accuracy=val_acc, validation_loss=val_loss)
        best = self.best
        if best["accuracy"] is None or (val_acc, -val_loss) > (best["accuracy"], -best["loss"]):
            best.update(accuracy=val_acc, loss=val_loss, step=record["step"], bad_evals=0, state=self.evaluated_state())
            return reason
        best["bad_evals"] += 1
        patience = self.config.early_stopping_patience
        if reason is None and patience is not None and best["bad_evals"] >= patience:
            return "early_stopping"
        return reason


def _build_model(config: RewardTrainConfig, data: _Data, device: torch.device) -> RewardModel:
    # The same seed on every process: identical initial weights, which DDP also enforces by broadcast.
    seed_everything(config.seed)
    torch.manual_seed(config.seed if config.init_seed is None else config.init_seed)
    if config.init is not None:
        # float32 master weights: a chat model's bf16/fp16 weights would lose most of AdamW's small updates
        model = RewardModel.from_pretrained(config.init, device=device, dtype=torch.float32)
    else:
        assert config.config is not None
        model = RewardModel.from_args(from_scratch_config(config.config).model_args(data.vocab_size), device=device)
    if config.max_seq_len is not None and config.max_seq_len > model.args.max_seq_len:
        raise ValueError(f"max_seq_len {config.max_seq_len} exceeds the model's context {model.args.max_seq_len}")
    return model


def train_single_reward_model(
    config: RewardTrainConfig,
    *,
    pairs: Sequence[PreferencePair] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> RewardTrainResult:
    """Train one reward model (no ensemble, no soup) as configured; resumable, and the same under torchrun."""
    config = config.resolved(has_pairs=pairs is not None)
    assert config.global_batch_size is not None
    assert config.micro_batch_size is not None
    assert config.epochs is not None
    dist_ = setup_distributed(config.device)
    if config.global_batch_size % dist_.world_size:
        raise ValueError(f"global_batch_size {config.global_batch_size} is not divisible by {dist_.world_size} processes")
    out_dir = Path(config.out_dir)
    start_time = time.monotonic()

    data = _load_data(config, pairs)
    lengths = [p.length for p in data.train]
    steps_per_epoch = len(data.train) // config.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(data.train)} training pairs are fewer than one global batch of {config.global_batch_size}")
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    model = _build_model(config, data, dist_.device)
    engine = Engine(model, OptimizerSettings.of(config), total_steps=total_steps, dist=dist_,
                    state_path=out_dir / TRAIN_STATE_FILE, max_minutes=config.max_minutes,
                    started_at=start_time)  # the budget counts loading the data and the model
    resuming = config.resume and engine.has_checkpoint()  # continue where train_state.pt stopped
    lm_losses: list[float] = []
    if config.lm_pretrain_epochs and not resuming:  # a resumed run loads weights that already had it
        lm_losses = pretrain_language_model(
            model, data.train, epochs=config.lm_pretrain_epochs, learning_rate=config.learning_rate or 1e-3,
            batch_size=config.micro_batch_size, seed=config.seed, device=dist_.device,
        )
    run = _RewardRun(config, data, model, engine)
    if resuming:
        run.resume()

    model.train()
    stopped = "completed"
    epoch_batches: tuple[int, list[list[int]]] | None = None
    pairs_seen, train_time = 0, 0.0
    while engine.step < total_steps:
        epoch, index = divmod(engine.step, steps_per_epoch)
        if epoch_batches is None or epoch_batches[0] != epoch:
            epoch_batches = (epoch, length_bucketed_batches(lengths, config.global_batch_size, seed=config.seed,
                                                            epoch=epoch, bucket_batches=config.bucket_batches))
        t0 = time.monotonic()
        record = run.train_step(epoch_batches[1][index], epoch)
        train_time += time.monotonic() - t0
        pairs_seen += config.global_batch_size
        step = engine.step

        reason = "max_minutes" if engine.out_of_time() else None
        if config.stop_after_steps is not None and config.stop_after_steps <= step < total_steps:
            reason = "stop_after_steps"
        evaluate_now = bool(data.validation) and (
            bool(config.eval_every and step % config.eval_every == 0) or step == total_steps or reason is not None
        )
        if evaluate_now and dist_.is_main:
            reason = run.validate_into(record, reason)
        run.history.append(record)
        reason = engine.decide(reason, _STOP_REASONS)

        if progress is not None and dist_.is_main:
            progress(TrainProgress(
                step=step, total_steps=total_steps, epoch=epoch, loss=record["loss"], accuracy=record["accuracy"],
                learning_rate=record["lr"], elapsed_s=engine.elapsed(), pairs_per_s=pairs_seen / max(train_time, 1e-9),
                validation_accuracy=record.get("validation_accuracy"),
            ))
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
            run.checkpoint()
        if reason is not None:
            stopped = reason
            break

    if stopped != "completed":
        run.checkpoint()  # an interrupted run (time, step limit) can go on with --resume
    test_report = _save_and_test(run, stopped, dist_) if dist_.is_main else None
    dist_.barrier()
    best = run.best
    return RewardTrainResult(
        out_dir=str(out_dir), steps=engine.step, total_steps=total_steps, stopped=stopped, elapsed_s=engine.elapsed(),
        pairs_per_s=pairs_seen / max(train_time, 1e-9), final_loss=run.history[-1]["loss"] if run.history else None,
        best_validation_accuracy=best["accuracy"], best_step=best["step"], n_train_pairs=len(data.train),
        n_validation_pairs=len(data.validation), n_test_pairs=len(data.test), test_report=test_report,
        history=run.history, lm_pretrain_losses=lm_losses,
    )


def _save_and_test(run: _RewardRun, stopped: str, dist_: Distributed) -> dict[str, Any] | None:
    """Select the weights (best validated, else the moving average), save the model, test it on the test split."""
    config, model, data = run.config, run.model, run.data
    if run.best["state"] is not None and stopped != "stop_after_steps":
        model.load_state_dict(run.best["state"])  # model selection on validation accuracy
    elif run.ema and stopped != "stop_after_steps":
        model.load_state_dict(run.evaluated_state())
    metadata = {
        "config": dataclasses.asdict(config), "steps": run.engine.step, "total_steps": run.engine.total_steps,
        "stopped": stopped, "best_validation_accuracy": run.best["accuracy"], "best_step": run.best["step"],
    }
    tie_rare_embeddings(model, data.rare_ids, data.rare_target)
    out_dir = Path(config.out_dir)
    save_reward_model(model, out_dir / "model", kind=config.kind, tokenizer_path=data.tokenizer_path,
                      max_seq_len=config.max_seq_len or model.args.max_seq_len, metadata=metadata,
                      context_turns=config.context_turns or None)
    if not data.test:
        return None
    test_report = evaluate_items(model, data.test, batch_size=config.micro_batch_size or 16)
    (out_dir / REPORT_FILE).write_text(json.dumps(test_report, indent=2) + "\n")
    return test_report
