"""Supervised fine-tuning of a Llama policy: loss on the answers only, packed rows, the report's optimizer.

python -m training.sft --init CKPT --tokenizer PATH --data PATH... --format native|hh-rlhf|oasst|prompts
    [--prompt-format chat|plain] [--epochs E | --max-steps N] [--max-minutes M] --out DIR
Several processes: torchrun --nproc-per-node N -m training.sft ... (DDP; gloo on CPU, NCCL on GPU).

The examples: a dialogue and the answer to learn. From preference files (`native`, `hh-rlhf`, `oasst`) the
chosen reply of each pair (`--both-replies`: the rejected one too, for language modelling on the text); from a
prompts file (`prompts`, training.prompts) each line's `response`. Every example is rendered in the Llama 2 chat
format (or `plain`: the text continued as it is), packed whole into rows of `--seq-len` tokens (each attending
only to itself, training.llama.packing), and the loss falls on the answer tokens and the EOS closing them
(`--loss-on all`: on every token, language modelling). Section 3.1 of the report: lr 2e-5, cosine, weight decay
0.1, 2 epochs. Ghost Attention (`--ghost-attention`): for dialogues with a system instruction, no loss on the
answers before the last (the instruction stays in the first turn only, as the chat format puts it).

Writes out/policy (a checkpoint in the layout of --init, with tokenizer.model), out/sft_report.json and, while it
runs, out/train_state.pt (`--resume` is the default: a stopped run goes on from its last checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewards.data import assign_splits, read_pairs
from training.engine import (
    Engine,
    OptimizerSettings,
    StepProgress,
    cli_progress_bar,
    run_command,
    run_main,
    seed_everything,
    setup_distributed,
    split_for_rank,
    without_history,
)
from training.llama.checkpoint import detect_format, load_checkpoint, save_hf_checkpoint, save_meta_checkpoint
from training.llama.model import Transformer
from training.llama.packing import PackedBatch, pack_examples
from training.llama.tokenizer import Tokenizer
from training.prompts import PROMPT_FORMATS, encode_answered, read_prompts
from training.sampling import check_vocabulary, find_tokenizer

SFT_FORMATS = ("native", "hh-rlhf", "oasst", "prompts")
POLICY_DIR = "policy"
TRAIN_STATE_FILE = "train_state.pt"
REPORT_FILE = "sft_report.json"
_STOP_REASONS = ("max_minutes", "stop_after_steps")


@dataclass
class SFTConfig:
    """One fine-tuning run. The defaults are the report's (section 3.1), with batch sizes for one node."""

    init: str = ""  # the policy checkpoint to start from (Meta or Hugging Face directory)
    data: list[str] = field(default_factory=list)
    format: str = "native"
    out_dir: str = "var/sft"
    tokenizer: str | None = None  # default: tokenizer.model in or beside --init
    prompt_format: str = "chat"
    split: str = "all"  # preference files: train | test | all, by the fixed split rewards.train holds out
    test_fraction: float = 0.2
    both_replies: bool = False  # preference files: the rejected replies are examples too
    loss_on: str = "answers"  # answers | all
    ghost_attention: bool = False
    seq_len: int | None = None  # tokens a packed row; default the model's context (at most 4,096)
    global_batch_rows: int = 64  # packed rows an optimizer step, over all processes
    micro_batch_rows: int = 4  # rows a forward pass on one process
    epochs: int | None = 2  # None: max_steps decides
    max_steps: int | None = None  # cap on the planned steps (the schedule is planned over them)
    stop_after_steps: int | None = None  # stop (checkpointed) after this many steps, the schedule unchanged
    max_minutes: float | None = None
    learning_rate: float = 2e-5
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # cosine to 10% of the peak, as the report's other schedules
    warmup_ratio: float = 0.03
    min_warmup_steps: int = 5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 50  # steps between checkpoints (0: only when the run stops early)
    resume: bool = True
    seed: int = 0
    device: str | None = None
    bf16: bool = True  # autocast to bfloat16 on GPU
    activation_checkpointing: bool = False
    sharding: str = "ddp"  # under torchrun: ddp (a full copy a process) or fsdp (weights, gradients, optimizer sharded)
    fit_batch: bool = False  # fewer rows than a global batch: shrink the batch to the rows rather than refuse
    num_threads: int | None = None

    def check(self) -> None:
        if not self.init:
            raise ValueError("give the checkpoint to fine-tune (--init)")
        if not self.data:
            raise ValueError("no data files given")
        if self.format not in SFT_FORMATS:
            raise ValueError(f"format must be one of {SFT_FORMATS}, got {self.format!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.split not in ("train", "test", "all"):
            raise ValueError(f"split must be train, test or all, got {self.split!r}")
        if self.loss_on not in ("answers", "all"):
            raise ValueError(f"loss_on must be 'answers' or 'all', got {self.loss_on!r}")
        if self.global_batch_rows < 1 or self.micro_batch_rows < 1:
            raise ValueError("global_batch_rows and micro_batch_rows must be positive")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps")
        if (self.epochs is not None and self.epochs < 1) or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("epochs and max_steps must be at least 1")


@dataclass
class SFTResult:
    out_dir: str
    policy_dir: str
    steps: int
    total_steps: int
    stopped: str  # completed | max_minutes | stop_after_steps
    elapsed_s: float
    tokens_per_s: float  # of the packed rows, padding included
    n_examples: int
    n_skipped: int  # empty answers
    n_rows: int
    n_truncated: int  # examples longer than a row: their oldest turns (then tokens) left out
    row_fill: float
    final_loss: float | None
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Example:
    """A dialogue ending with a user turn and the answer to learn."""

    dialogue: tuple[dict[str, str], ...]
    answer: str


def read_examples(config: SFTConfig) -> tuple[list[Example], int]:
    """The run's examples (in file order, duplicates dropped) and how many empty answers were skipped."""
    examples: list[Example] = []
    skipped = 0
    for path in config.data:
        if config.format == "prompts":
            items = [(tuple(dict(m) for m in r.dialogue), r.response or "")
                     for r in read_prompts(path, require_response=True)]
        else:
            pairs = read_pairs(path, config.format)
            if config.split != "all":
                pairs = [p for p in assign_splits(pairs, config.test_fraction) if p.split == config.split]
            items = [(p.dialogue, p.chosen) for p in pairs]
            if config.both_replies:
                items += [(p.dialogue, p.rejected) for p in pairs]
        for dialogue, answer in items:
            if not answer.strip():
                skipped += 1  # HH-RLHF has empty replies preferred to harmful ones: nothing to imitate
                continue
            examples.append(Example(tuple(dialogue), answer))
    key = lambda e: json.dumps([e.dialogue, e.answer])  # noqa: E731  (dicts do not hash)
    unique = list({key(e): e for e in reversed(examples)}.values())[::-1]
    if not unique:
        raise ValueError(f"{', '.join(config.data)}: no examples with an answer to learn")
    return unique, skipped


def encode_example(tokenizer: Tokenizer, example: Example, config: SFTConfig,
                   seq_len: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of one example (answers only, or every token after BOS), at most seq_len long.

    An example longer than a row loses its oldest exchanges (a user turn and its answer; a system turn stays),
    and if the last user turn and the answer alone are still too long, their oldest tokens after BOS: the answer,
    which is what is learnt, is kept (as rewards.data.render_reply keeps the reply a reward model scores).
    """
    dialogue = list(example.dialogue)
    while True:
        ids, mask = encode_answered(tokenizer, dialogue, example.answer, config.prompt_format)
        head = 1 if dialogue[0]["role"] == "system" else 0
        if seq_len is None or len(ids) <= seq_len or len(dialogue) - head < 3:
            break
        dialogue = dialogue[:head] + dialogue[head + 2:]
    if config.ghost_attention and dialogue[0]["role"] == "system":
        mask = last_answer_only(ids, mask)
    if config.loss_on == "all":
        mask = [False, *([True] * (len(ids) - 1))]
    if seq_len is not None and len(ids) > seq_len:
        ids, mask = [ids[0], *ids[len(ids) - seq_len + 1:]], [False, *mask[len(mask) - seq_len + 1:]]
    return ids, mask


def last_answer_only(ids: Sequence[int], mask: Sequence[bool]) -> list[bool]:
    """Ghost Attention's training mask: of the answers' spans, only the last keeps its loss."""
    out = list(mask)
    last_start = max((i for i in range(len(out)) if out[i] and (i == 0 or not out[i - 1])), default=0)
    for i in range(last_start):
        out[i] = False
    return out


def pack_rows(tokenizer: Tokenizer, examples: Sequence[Example], config: SFTConfig, seq_len: int) -> tuple[PackedBatch, int]:
    """The examples packed into rows of seq_len tokens, and how many had to be shortened to fit one."""
    encoded = [encode_example(tokenizer, e, config) for e in examples]
    fitted = [encode_example(tokenizer, e, config, seq_len) if len(ids) > seq_len else (ids, mask)
              for e, (ids, mask) in zip(examples, encoded, strict=True)]
    return pack_examples(fitted, seq_len), sum(len(ids) > seq_len for ids, _ in encoded)


def fit_batch_to_rows(config: SFTConfig, n_rows: int, world_size: int) -> SFTConfig:
    """The config with the largest global batch that `n_rows` fill, in whole micro batches on every process (a
    smaller micro batch where even one of the configured size per process does not fit)."""
    micro = config.micro_batch_rows if n_rows >= config.micro_batch_rows * world_size else max(1, n_rows // world_size)
    unit = micro * world_size
    return dataclasses.replace(config, micro_batch_rows=micro, global_batch_rows=max(unit, n_rows // unit * unit))


def epoch_order(n_rows: int, *, seed: int, epoch: int) -> list[int]:
    """The rows of one epoch in a seeded order: the same on every process and after a resume."""
    order = list(range(n_rows))
    random.Random(f"sft:{seed}:{epoch}").shuffle(order)
    return order


# ------------------------------------------------------------------------------------------------ train


class _SFTRun:
    """The rows, the engine and the history of one run between optimizer steps."""

    def __init__(self, config: SFTConfig, rows: PackedBatch, engine: Engine):
        self.config, self.rows, self.engine = config, rows, engine
        self.steps_per_epoch = rows.tokens.shape[0] // config.global_batch_rows
        self.history: list[dict[str, Any]] = []

    @property
    def signature(self) -> dict[str, Any]:
        return {"n_rows": int(self.rows.tokens.shape[0]), "seq_len": int(self.rows.tokens.shape[1]),
                "seed": self.config.seed, "global_batch_rows": self.config.global_batch_rows}

    def checkpoint(self) -> None:
        self.engine.save({"history": self.history, "config": dataclasses.asdict(self.config)}, signature=self.signature)

    def resume(self) -> None:
        state = self.engine.resume(self.signature)
        if state is not None:
            self.history = state["history"]

    def global_batch(self) -> tuple[list[int], int]:
        epoch, index = divmod(self.engine.step, self.steps_per_epoch)
        order = epoch_order(self.rows.tokens.shape[0], seed=self.config.seed, epoch=epoch)
        size = self.config.global_batch_rows
        return order[index * size:(index + 1) * size], epoch

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: the mean loss over every answer token of the global batch, as on one process."""
        config, engine, rows = self.config, self.engine, self.rows
        device = engine.dist.device
        global_rows, epoch = self.global_batch()
        n_targets = int((rows.targets[global_rows] != -100).sum())
        local = split_for_rank(global_rows, engine.dist)
        micro = [local[i:i + config.micro_batch_rows] for i in range(0, len(local), config.micro_batch_rows)]
        autocast = (torch.autocast(device_type="cuda", dtype=torch.bfloat16)
                    if device.type == "cuda" and config.bf16 else nullcontext())
        loss_sum = 0.0
        for i, idx in enumerate(micro):
            targets = rows.targets[idx]
            n = int((targets != -100).sum())
            if n == 0:  # a row of padding only (cannot happen with whole examples, but costs nothing to skip)
                continue
            with engine.accumulating(last=i == len(micro) - 1), autocast:
                mean = engine.module(rows.tokens[idx].to(device), position_ids=rows.position_ids[idx].to(device),
                                     targets=targets.to(device))
                engine.backward(engine.scale_for_global(mean * n, max(1, n_targets)))
            loss_sum += float(mean.detach()) * n
        grad_norm = engine.optimizer_step()
        (loss_sum,) = engine.dist.all_sum([loss_sum])
        return {"step": engine.step, "epoch": epoch, "loss": loss_sum / max(1, n_targets), "lr": engine.learning_rate,
                "grad_norm": grad_norm, "tokens": n_targets}


def save_policy(model: Transformer, out: Path, *, like: str | Path, tokenizer: str | Path) -> Path:
    """Save a policy in the layout of the checkpoint `like` (Meta or Hugging Face), with its tokenizer inside.

    In the model's dtype: trainers train float32 master weights and cast back to the dtype they loaded."""
    if detect_format(like) == "meta":
        save_meta_checkpoint(model, out)
    else:
        save_hf_checkpoint(model, out)
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    return out


def train_sft(config: SFTConfig, *, progress: Callable[[StepProgress], None] | None = None) -> SFTResult:
    """Fine-tune as configured; resumable, and the same function under torchrun. `progress` is told on rank 0
    after every optimizer step."""
    config.check()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    start = time.monotonic()
    dist_ = setup_distributed(config.device)
    if config.global_batch_rows % dist_.world_size:
        raise ValueError(f"global_batch_rows {config.global_batch_rows} is not divisible by {dist_.world_size} processes")
    out_dir = Path(config.out_dir)
    tokenizer_path = find_tokenizer(config.init, config.tokenizer)
    tokenizer = Tokenizer(tokenizer_path)

    seed_everything(config.seed)
    model, args = load_checkpoint(config.init, device=dist_.device)
    stored_dtype = model.tok_embeddings.weight.dtype
    model.float()  # float32 master weights: AdamW's small updates vanish in bf16/fp16 weights (Meta's, HF's files)
    check_vocabulary(model, tokenizer)
    seq_len = min(config.seq_len or min(args.max_seq_len, 4096), args.max_seq_len)
    examples, skipped = read_examples(config)
    rows, n_shortened = pack_rows(tokenizer, examples, config, seq_len)
    n_rows = rows.tokens.shape[0]
    if n_rows < config.global_batch_rows and config.fit_batch:
        config = fit_batch_to_rows(config, n_rows, dist_.world_size)
    steps_per_epoch = n_rows // config.global_batch_rows
    if steps_per_epoch == 0:
        raise ValueError(f"{len(examples)} examples pack into {n_rows} rows of {seq_len} tokens, fewer than one global "
                         f"batch of {config.global_batch_rows} rows: lower --global-batch-rows or --seq-len")
    total_steps = min(steps_per_epoch * config.epochs if config.epochs else config.max_steps or 0,
                      config.max_steps or sys.maxsize)

    model.set_activation_checkpointing(config.activation_checkpointing)
    model.train()
    engine = Engine(model, OptimizerSettings.of(config), total_steps=total_steps, dist=dist_,
                    state_path=out_dir / TRAIN_STATE_FILE, max_minutes=config.max_minutes, started_at=start,
                    sharding=config.sharding)
    run = _SFTRun(config, rows, engine)
    if config.resume:
        run.resume()

    stopped, tokens_seen, train_time = "completed", 0, 0.0
    while engine.step < total_steps:
        t0 = time.monotonic()
        record = run.train_step()
        train_time += time.monotonic() - t0
        tokens_seen += config.global_batch_rows * seq_len
        run.history.append(record)
        reason = "max_minutes" if engine.out_of_time() else None
        if config.stop_after_steps is not None and config.stop_after_steps <= engine.step < total_steps:
            reason = "stop_after_steps"
        reason = engine.decide(reason, _STOP_REASONS)
        if progress is not None and dist_.is_main:
            progress(StepProgress(step=engine.step, total_steps=total_steps, loss=record["loss"],
                                  learning_rate=record["lr"], elapsed_s=engine.elapsed(),
                                  items_per_s=tokens_seen / max(train_time, 1e-9)))
        if reason is not None:
            stopped = reason
            break
        if config.checkpoint_every and engine.step % config.checkpoint_every == 0 and engine.step < total_steps:
            run.checkpoint()

    if stopped != "completed":
        run.checkpoint()
    result = SFTResult(
        out_dir=str(out_dir), policy_dir=str(out_dir / POLICY_DIR), steps=engine.step, total_steps=total_steps,
        stopped=stopped, elapsed_s=engine.elapsed(), tokens_per_s=tokens_seen / max(train_time, 1e-9),
        n_examples=len(examples), n_skipped=skipped, n_rows=n_rows, n_truncated=n_shortened,
        row_fill=rows.fill, final_loss=run.history[-1]["loss"] if run.history else None, history=run.history,
    )
    state = engine.full_model_state()  # every process takes part when the model is sharded
    if dist_.is_main:
        if engine.sharded:
            model = Transformer(args)
            model.load_state_dict(state)
        model.eval()
        save_policy(model.to(stored_dtype), out_dir / POLICY_DIR, like=config.init, tokenizer=tokenizer_path)
        report = result.to_dict()
        report["config"] = dataclasses.asdict(config)
        (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    dist_.barrier()
    return result


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.sft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", required=True, help="policy checkpoint directory (Meta or Hugging Face)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: in or beside --init)")
    parser.add_argument("--data", required=True, nargs="+", help="data file(s), .jsonl or .jsonl.gz")
    parser.add_argument("--format", required=True, choices=SFT_FORMATS)
    parser.add_argument("--prompt-format", default="chat", choices=PROMPT_FORMATS)
    parser.add_argument("--out", required=True, help="output directory (policy/, sft_report.json, train_state.pt)")
    parser.add_argument("--split", default="all", choices=("train", "test", "all"),
                        help="preference files: the fixed split of rewards.train (train: leave its test pairs out)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--both-replies", action="store_true", help="preference files: the rejected replies too")
    parser.add_argument("--loss-on", default="answers", choices=("answers", "all"))
    parser.add_argument("--ghost-attention", action="store_true",
                        help="dialogues with a system instruction: no loss on the answers before the last")
    epochs = parser.add_mutually_exclusive_group()
    epochs.add_argument("--epochs", type=int, default=None, help="passes over the data (default 2)")
    epochs.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--stop-after-steps", type=int, default=None)
    for name, kind in (("seq-len", int), ("global-batch-rows", int), ("micro-batch-rows", int),
                       ("learning-rate", float), ("min-lr-ratio", float), ("weight-decay", float),
                       ("checkpoint-every", int), ("seed", int)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "constant"))
    parser.add_argument("--no-resume", dest="resume", action="store_false")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--fsdp", dest="sharding", action="store_const", const="fsdp",
                        help="under torchrun, shard weights, gradients and optimizer state (FSDP2) instead of DDP")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--threads", dest="num_threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> SFTConfig:
    values = {k: v for k, v in vars(args).items() if v is not None and k != "quiet"}
    values["out_dir"] = values.pop("out")
    if args.max_steps is not None:
        values["epochs"] = None  # the steps decide
    return SFTConfig(**values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda bar: train_sft(config_from_args(args), progress=bar), device=args.device,
                       bar=None if args.quiet else cli_progress_bar("sft"), summary=without_history)

if __name__ == "__main__":
    run_main(main)

