"""A small policy from nothing: a tokenizer fitted on some text, a random Llama, a short LM pass, then SFT.

python -m training.bootstrap --out DIR (--texts FILE... | --random) [--tokenizer PATH] [--vocab-size N]
    [--dim D --layers L --heads H --max-seq-len S] [--seconds S | --steps N] [--seed K] [--layout meta|hf]
    [--overwrite] [--threads N] [--device cpu|cuda] [--quiet]

For the platform's embedded demo (no GPU, no downloaded weights: a policy that answers prompts within seconds)
and for tests and benchmarks that need "a random policy checkpoint".

- `--texts`: prompts files (training.prompts: JSONL with `prompt` or `dialogue` and an optional `response`) and/or
  plain text files (`.txt` or `.txt.gz`, one document a line). Without `--tokenizer`, a SentencePiece tokenizer of
  at most `--vocab-size` pieces is fitted on all the text (rewards.tokenizer_training). Then a random Llama of the
  given shape, a language-model pass over every text (each message, answer and line a document, loss on every
  token) and SFT on the dialogues that have an answer, in the Llama 2 chat format with the loss on the answers.
  Both passes are training.sft.train_sft runs; the time (`--seconds`, default 20, counted from the start and
  tokenizer fitting included) or the optimizer steps (`--steps`) are shared between them.
- `--random`: the random initialisation only, with the `--tokenizer` given (required then).

The output is a checkpoint directory (Meta's layout, or Hugging Face's with `--layout hf`) with tokenizer.model and
bootstrap_report.json inside, which training.llama.checkpoint.load_checkpoint and training.sampling.load_policy
load. It is built in a temporary directory beside it and renamed into place: a failed run leaves nothing. Bad input
(a line of a prompts file, a file that is not UTF-8) stops before anything is written, naming the file and line
(exit status 2).

`bootstrap_policy(BootstrapConfig(...), progress=...)` is the same as a function (for a Celery task or a management
command); `progress` receives a training.engine.StepProgress after every optimizer step of both passes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rewards.tokenizer_training import train_tokenizer
from training.engine import (
    StepProgress,
    cli_progress_bar,
    run_command,
    run_main,
    seed_everything,
    without_history,
)
from training.llama.checkpoint import load_checkpoint, save_hf_checkpoint, save_meta_checkpoint
from training.llama.model import ModelArgs, Transformer
from training.llama.packing import PackedBatch
from training.llama.tokenizer import Tokenizer
from training.prompts import PromptRecord, read_prompts, write_prompts
from training.sft import POLICY_DIR, Example, SFTConfig, SFTResult, pack_rows, read_examples, train_sft

LAYOUTS = ("meta", "hf")
REPORT_FILE = "bootstrap_report.json"
TOKENIZER_FILE = "tokenizer.model"
PLAIN_SUFFIXES = (".txt", ".txt.gz")
DEFAULT_SECONDS = 20.0
DEFAULT_VOCAB_SIZE = 512
_PASS_OVERHEAD_S = 0.05  # a train_sft run's own work besides its steps: loading, packing, saving
_TAIL_S = 0.25  # kept back from the time bound for what follows the last pass: the final loss, the report, renaming


@dataclass
class BootstrapConfig:
    """One bootstrap. The default shape is tiny (about 0.2M parameters): it answers in milliseconds on a CPU."""

    out_dir: str = ""
    texts: list[str] = field(default_factory=list)  # prompts files (.jsonl[.gz]) and/or plain text (.txt[.gz])
    random: bool = False  # the random initialisation only (needs `tokenizer`)
    tokenizer: str | None = None  # default: fitted on the texts
    vocab_size: int | None = None  # pieces of the fitted tokenizer, at most (default 512)
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 512
    seconds: float | None = DEFAULT_SECONDS  # wall-clock bound of the whole call (ignored when `steps` is given)
    steps: int | None = None  # optimizer steps of both passes together, instead of a time bound
    seed: int = 0
    layout: str = "meta"
    lm_fraction: float = 0.4  # of the time (or steps) for the language-model pass when there are answers to learn
    seq_len: int = 256  # tokens a packed training row
    batch_rows: int = 8  # rows an optimizer step (fewer when the text fills fewer)
    lm_learning_rate: float = 3e-3
    sft_learning_rate: float = 2e-3
    overwrite: bool = False  # replace an existing out_dir (else it is an error)
    device: str | None = "cpu"  # None: the GPU where there is one
    num_threads: int | None = 1  # torch threads for the call (restored after); None: as they are. A model this
    # small gains nothing from more, and loses much when the cores are shared (1: 420 steps in 20 s on two busy
    # cores, 2: 52)

    def check(self) -> None:
        if not self.out_dir:
            raise ValueError("give the output directory (--out)")
        if self.random == bool(self.texts):
            raise ValueError("give either texts to train on (--texts) or --random")
        if self.random and not self.tokenizer:
            raise ValueError("--random needs a tokenizer (--tokenizer PATH)")
        if self.vocab_size is not None:
            if self.tokenizer:
                raise ValueError("--vocab-size sizes a fitted tokenizer; with --tokenizer the vocabulary is its own")
            if not 16 <= self.vocab_size <= 65536:
                raise ValueError(f"vocab size must be between 16 and 65536, got {self.vocab_size}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("dim", "n_layers", "n_heads", "max_seq_len", "seq_len", "batch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.steps is None and (self.seconds is None or not self.seconds > 0):
            raise ValueError(f"give a positive time bound (seconds) or a number of steps, got seconds={self.seconds}")
        if not 0.0 <= self.lm_fraction <= 1.0:
            raise ValueError(f"lm_fraction must lie in 0..1, got {self.lm_fraction}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {self.num_threads}")
        self.model_args(DEFAULT_VOCAB_SIZE)  # ModelArgs' own checks (dim divisible by heads, an even head size)

    def model_args(self, vocab_size: int) -> ModelArgs:
        return ModelArgs(dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, vocab_size=vocab_size,
                         multiple_of=16, max_seq_len=self.max_seq_len)


@dataclass
class BootstrapResult:
    out_dir: str
    layout: str
    model_args: dict[str, Any]  # params.json
    parameters: int
    tokenizer: str  # "fitted" or the path given
    vocab_size: int  # the tokenizer's pieces (the model's vocabulary)
    n_documents: int  # texts of the language-model pass
    n_dialogues: int  # dialogues with an answer (the SFT examples)
    lm_steps: int
    sft_steps: int
    steps: int
    seconds: float  # wall-clock of the whole call
    stopped: str  # completed | time_bound (a pass was cut short by the time bound) | random
    final_loss: float | None  # the last optimizer step's training loss
    answer_loss_initial: float | None  # mean loss on the answers' tokens of the random initialisation
    answer_loss_final: float | None  # ... of the policy written
    history: list[dict[str, Any]] = field(default_factory=list)  # every step: pass, step, loss, lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------ input


@dataclass
class Corpus:
    documents: list[str]  # every text, for the tokenizer and the language-model pass
    dialogues: list[PromptRecord]  # the records with an answer


def _plain_lines(path: Path) -> Iterator[str]:
    """The non-blank lines of a text file (.gz too); a ValueError naming the line when one is not UTF-8."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.lower().endswith(".gz") else path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot be read: {exc}") from exc
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        if "\x00" in text:
            raise ValueError(f"{path}:{number}: a NUL character in the text")
        if text.strip():
            yield text.strip()


def read_corpus(paths: Sequence[str | os.PathLike[str]]) -> Corpus:
    """The documents and answered dialogues of the files, in order. Prompts files name the line of an error."""
    documents: list[str] = []
    dialogues: list[PromptRecord] = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        if path.name.lower().endswith(PLAIN_SUFFIXES):
            documents.extend(_plain_lines(path))
            continue
        for record in read_prompts(path):
            documents.extend(turn["content"].strip() for turn in record.dialogue)
            if record.response is not None and record.response.strip():
                documents.append(record.response.strip())
                dialogues.append(record)
    if not any(documents):
        raise ValueError(f"{', '.join(map(str, paths))}: no text")
    return Corpus(documents, dialogues)


def _split_document(document: str) -> tuple[str, str] | None:
    """A document as a prompt and its continuation (for a `plain` prompts file: BOS + both together + EOS is the
    document's encoding), at the end of its first word; None for a document of one character."""
    document = document.strip()
    if len(document) < 2:
        return None
    cut = re.match(r"\S+", document).end()  # type: ignore[union-attr]
    if cut == len(document):
        cut -= 1
    return document[:cut], document[cut:]


def _chunks(tokenizer: Tokenizer, document: str, max_tokens: int) -> list[str]:
    """A document in pieces of about max_tokens tokens at most, cut between words (whole when it fits a row)."""
    n_tokens = len(tokenizer.encode(document, bos=False, eos=False))
    if n_tokens <= max_tokens:
        return [document]
    words = document.split()
    n = min(len(words), math.ceil(n_tokens / max_tokens))
    size = math.ceil(len(words) / n)
    return [" ".join(words[i:i + size]) for i in range(0, len(words), size)]


def write_lm_file(tokenizer: Tokenizer, documents: Sequence[str], path: Path, seq_len: int) -> int:
    """The documents as a prompts file that SFT in the `plain` format with the loss on all tokens trains on as a
    language model; returns how many lines it holds."""
    records = []
    for document in documents:
        for chunk in _chunks(tokenizer, document, max(8, int(0.9 * seq_len) - 2)):
            split = _split_document(chunk)
            if split is not None:
                records.append(PromptRecord.of(split[0], response=split[1]))
    if not records:
        raise ValueError("no document of two characters or more to train a language model on")
    write_prompts(records, path)
    return len(records)


# ----------------------------------------------------------------------------------------------- output


def _claim_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists (pass --overwrite to replace it)")


def _move_into_place(built: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished directory to `out` (an existing one replaced only with `overwrite`)."""
    _claim_output(out, overwrite)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(built, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, out)


def save_random_policy(args: ModelArgs, out: Path, *, layout: str, seed: int) -> Transformer:
    """A randomly initialised Llama (Transformer.init_weights, seeded) saved in the layout."""
    seed_everything(seed)
    model = Transformer(args)
    (save_meta_checkpoint if layout == "meta" else save_hf_checkpoint)(model, out)
    return model


# ------------------------------------------------------------------------------------------------ train


def answer_loss(model: Transformer, tokenizer: Tokenizer, examples: Sequence[Example], *, seq_len: int,
                prompt_format: str = "chat", batch_rows: int = 16) -> float:
    """The mean loss on the answer tokens (and the EOS closing each) of the examples, packed as SFT packs them."""
    rows, _ = pack_rows(tokenizer, examples, SFTConfig(prompt_format=prompt_format), seq_len)
    device = model.tok_embeddings.weight.device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, rows.tokens.shape[0], batch_rows):
            targets = rows.targets[start:start + batch_rows]
            n = int((targets != -100).sum())
            if n:
                loss = model(rows.tokens[start:start + batch_rows].to(device),
                             position_ids=rows.position_ids[start:start + batch_rows].to(device),
                             targets=targets.to(device))
                total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(1, count)


def _step_seconds(model: Transformer, rows: PackedBatch, n_rows: int, device: str) -> float:
    """Seconds a forward and backward pass of `n_rows` packed rows takes on the random initialisation: how many
    optimizer steps the time bound leaves room for, before a pass has measured its own speed."""
    tokens, position_ids, targets = (t[:n_rows].to(device) for t in (rows.tokens, rows.position_ids, rows.targets))
    model = model.to(device).train()
    timings = []
    for _ in range(3):  # the first call allocates: the best of the other two
        t0 = time.perf_counter()
        model(tokens, position_ids=position_ids, targets=targets).backward()
        if tokens.device.type == "cuda":
            torch.cuda.synchronize(tokens.device)
        timings.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return min(timings[1:])


@dataclass
class _Pass:
    """One train_sft run of the bootstrap: the language-model pass or SFT."""

    name: str
    config: SFTConfig
    examples: list[Example]
    rows: PackedBatch

    @property
    def policy(self) -> Path:
        return Path(self.config.out_dir) / POLICY_DIR


def _pass(name: str, config: BootstrapConfig, tokenizer: Tokenizer, *, init: Path, data: Path, out: Path,
          tokenizer_path: Path) -> _Pass:
    lm = name == "lm"
    stage = SFTConfig(
        init=str(init), data=[str(data)], format="prompts", out_dir=str(out), tokenizer=str(tokenizer_path),
        prompt_format="plain" if lm else "chat", loss_on="all" if lm else "answers",
        seq_len=min(config.seq_len, config.max_seq_len), epochs=None, max_steps=1,
        learning_rate=config.lm_learning_rate if lm else config.sft_learning_rate, warmup_ratio=0.05,
        checkpoint_every=0, resume=False, seed=config.seed, device=config.device,
    )
    examples, _ = read_examples(stage)  # what train_sft will read and pack: how many rows an optimizer step
    rows, _ = pack_rows(tokenizer, examples, stage, stage.seq_len or 0)
    stage.global_batch_rows = stage.micro_batch_rows = min(config.batch_rows, int(rows.tokens.shape[0]))
    return _Pass(name, stage, examples, rows)


def bootstrap_policy(config: BootstrapConfig,
                     progress: Callable[[StepProgress], None] | None = None) -> BootstrapResult:
    """Build the policy as configured and write it to config.out_dir (see the module's docstring)."""
    start = time.monotonic()
    config.check()
    out = Path(config.out_dir)
    _claim_output(out, config.overwrite)
    given_tokenizer = Tokenizer(config.tokenizer) if config.tokenizer else None  # a bad file fails here, first
    corpus = read_corpus(config.texts) if config.texts else None
    previous_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.bootstrap-", dir=out.parent))
    try:
        result = _bootstrap(config, corpus, given_tokenizer, work, start, progress)
        _move_into_place(work / "policy", out, config.overwrite)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
        torch.set_num_threads(previous_threads)


def _bootstrap(config: BootstrapConfig, corpus: Corpus | None, given_tokenizer: Tokenizer | None, work: Path,
               start: float, progress: Callable[[StepProgress], None] | None) -> BootstrapResult:
    deadline = None if config.steps is not None else start + float(config.seconds or 0)
    if given_tokenizer is not None:
        tokenizer_path = Path(str(config.tokenizer))
    else:
        assert corpus is not None
        tokenizer_path = work / TOKENIZER_FILE
        try:
            train_tokenizer(corpus.documents, tokenizer_path, vocab_size=config.vocab_size or DEFAULT_VOCAB_SIZE)
        except RuntimeError as exc:  # sentencepiece: e.g. more distinct characters than pieces
            raise ValueError(f"cannot fit a tokenizer of {config.vocab_size or DEFAULT_VOCAB_SIZE} pieces on the "
                             f"texts: {exc}") from exc
    tokenizer = given_tokenizer or Tokenizer(tokenizer_path)
    args = config.model_args(tokenizer.n_words)
    init = work / ("policy" if corpus is None else "init")
    model = save_random_policy(args, init, layout=config.layout, seed=config.seed)

    result = BootstrapResult(
        out_dir=str(config.out_dir), layout=config.layout, model_args=args.to_params_json(),
        parameters=sum(p.numel() for p in model.parameters()),
        tokenizer="fitted" if given_tokenizer is None else str(config.tokenizer), vocab_size=tokenizer.n_words,
        n_documents=0, n_dialogues=0, lm_steps=0, sft_steps=0, steps=0, seconds=0.0, stopped="random",
        final_loss=None, answer_loss_initial=None, answer_loss_final=None,
    )
    if corpus is not None:
        _train(config, corpus, model, tokenizer, tokenizer_path, init, work, deadline, result, progress)
    else:
        shutil.copyfile(tokenizer_path, init / TOKENIZER_FILE)
    result.seconds = time.monotonic() - start
    (work / "policy" / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _train(config: BootstrapConfig, corpus: Corpus, model: Transformer, tokenizer: Tokenizer, tokenizer_path: Path,
           init: Path, work: Path, deadline: float | None, result: BootstrapResult,
           progress: Callable[[StepProgress], None] | None) -> None:
    seq_len = min(config.seq_len, config.max_seq_len)
    result.n_documents = write_lm_file(tokenizer, corpus.documents, work / "lm.jsonl", seq_len)
    lm_share = config.lm_fraction if corpus.dialogues else 1.0
    if corpus.dialogues and config.steps == 1:
        lm_share = 0.0  # one step: SFT's
    passes: list[_Pass] = []
    if lm_share > 0:
        passes.append(_pass("lm", config, tokenizer, init=init, data=work / "lm.jsonl", out=work / "lm",
                            tokenizer_path=tokenizer_path))
    if corpus.dialogues and lm_share < 1:
        write_prompts(corpus.dialogues, work / "sft.jsonl")
        passes.append(_pass("sft", config, tokenizer, init=passes[0].policy if passes else init,
                            data=work / "sft.jsonl", out=work / "sft", tokenizer_path=tokenizer_path))
    answers = passes[-1].examples if passes[-1].name == "sft" else []
    result.n_dialogues = len(answers)
    if answers:
        result.answer_loss_initial = answer_loss(model, tokenizer, answers, seq_len=seq_len)

    # The plan: the steps (given, or those the time bound leaves at the speed measured) shared by the passes.
    # Under a time bound each pass is planned when it starts, from the time left and the speed of the pass before
    # (the first from a timed step): the last one ends the cosine schedule just before the deadline.
    shares = [lm_share if p.name == "lm" else 1.0 - lm_share for p in passes]
    row_s = 0.0  # seconds a packed row costs in an optimizer step

    def plan(i: int) -> int:
        left = deadline - time.monotonic() - _TAIL_S  # type: ignore[operator]
        budget = left * shares[i] / sum(shares[i:]) - _PASS_OVERHEAD_S
        return max(1, int(budget / (row_s * passes[i].config.global_batch_rows)))

    if config.steps is not None:
        planned = [max(1, round(config.steps * s)) for s in shares]
        planned[-1] = max(1, config.steps - sum(planned[:-1]))
    else:
        first = passes[0]
        row_s = 1.2 * _step_seconds(model, first.rows, first.config.global_batch_rows, config.device or "cpu") / \
            first.config.global_batch_rows
        planned = [plan(i) for i in range(len(passes))]
    done = 0
    last: SFTResult | None = None
    for i, p in enumerate(passes):
        if deadline is not None:
            planned[i] = plan(i)
            left = deadline - time.monotonic() - _TAIL_S
            p.config.max_minutes = max(1e-4, left * shares[i] / sum(shares[i:]) / 60)
        p.config.max_steps = planned[i]

        def told(step: StepProgress, offset: int = done, total: int = done + sum(planned[i:])) -> None:
            if progress is not None:
                progress(dataclasses.replace(step, step=offset + step.step, total_steps=total))

        last = train_sft(p.config, progress=told)
        result.history += [{"pass": p.name, **h} for h in last.history]
        setattr(result, f"{p.name}_steps", last.steps)
        if last.stopped != "completed":
            result.stopped = "time_bound"
        done += last.steps
        row_s = 1.05 * p.config.seq_len / max(last.tokens_per_s, 1e-9)  # type: ignore[operator]
    assert last is not None
    result.steps = done
    result.final_loss = last.final_loss
    if result.stopped == "random":
        result.stopped = "completed"
    if answers:
        trained, _ = load_checkpoint(passes[-1].policy)
        result.answer_loss_final = answer_loss(trained, tokenizer, answers, seq_len=seq_len)
    os.replace(passes[-1].policy, work / "policy")


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.bootstrap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the checkpoint directory to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--texts", nargs="+", help="prompts files (.jsonl, .jsonl.gz) and/or text files (.txt, .txt.gz)")
    source.add_argument("--random", action="store_true", help="the random initialisation only (needs --tokenizer)")
    parser.add_argument("--tokenizer", help="a SentencePiece tokenizer.model (default: fitted on the texts)")
    parser.add_argument("--vocab-size", type=int, help=f"pieces of the fitted tokenizer, at most (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", dest="n_layers", type=int, default=2)
    parser.add_argument("--heads", dest="n_heads", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                       help=f"wall-clock bound, tokenizer fitting included (default {DEFAULT_SECONDS:g})")
    bound.add_argument("--steps", type=int, help="optimizer steps of both passes together, instead of --seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="meta")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", dest="num_threads", type=int, default=1,
                        help="torch threads (default 1: a tiny model gains nothing from more)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> BootstrapConfig:
    values = {k: v for k, v in vars(args).items() if k not in ("quiet", "out")}
    values["texts"] = values["texts"] or []
    if args.steps is not None:
        values["seconds"] = None
    return BootstrapConfig(out_dir=args.out, **values)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda bar: bootstrap_policy(config_from_args(args), progress=bar), device=args.device,
                       bar=None if args.quiet else cli_progress_bar("bootstrap"), summary=without_history)

if __name__ == "__main__":
    run_main(main)
