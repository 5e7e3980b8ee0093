"""What the sample-then-fine-tune stages (rejection sampling, context distillation) share.

Each such stage samples the policy, scores and selects answers, writes them as a prompts file with responses and
fine-tunes on it with `training.sft`. The sampling part is expensive and not resumable mid-way, so its outputs
are written atomically (a temporary file renamed) and a marker written last says it finished and with which
settings; a second run with the same settings skips it, and SFT resumes from its own `train_state.pt`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.engine import Distributed, StepProgress, run_command, setup_distributed
from training.prompts import PROMPT_FORMATS
from training.sft import POLICY_DIR, SFTConfig, train_sft

STAGES = ("sampling", "scoring", "sft")


@dataclass(frozen=True)
class StageProgress:
    """What a stage's progress callback receives: the part running, how far it is, and SFT's step when training."""

    stage: str  # sampling | scoring | sft
    done: int
    total: int
    step: StepProgress | None = None


class cli_stage_bar:  # noqa: N801  (used like a function: bar = cli_stage_bar("rs"); bar(progress))
    """One tqdm bar on stderr per stage, driven by a StageProgress callback; `close()` when done."""

    def __init__(self, desc: str):
        self.desc = desc
        self._stage: str | None = None
        self._bar: Any = None

    def __call__(self, p: StageProgress) -> None:

        from tqdm import tqdm

        if p.stage != self._stage:
            self.close()
            self._stage = p.stage
            initial = p.done - 1 if p.step is not None else 0  # SFT counts steps, the others items
            self._bar = tqdm(total=p.total, initial=max(0, initial), desc=f"{self.desc} {p.stage}", file=sys.stderr,
                             unit="step" if p.step is not None else "sample")
        if p.step is not None:
            self._bar.set_postfix({"loss": f"{p.step.loss:.3f}", "lr": f"{p.step.learning_rate:.1e}"}, refresh=False)
        self._bar.update(p.done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def emit(progress: Callable[[StageProgress], None] | None, stage: str) -> Callable[[int, int], None] | None:
    """A (done, total) callback (as sample_answers takes) that tells `progress` about `stage`."""
    if progress is None:
        return None
    return lambda done, total: progress(StageProgress(stage, done, total))


def emit_steps(progress: Callable[[StageProgress], None] | None) -> Callable[[StepProgress], None] | None:
    """A train_sft progress callback that tells `progress` about the sft stage."""
    if progress is None:
        return None
    return lambda p: progress(StageProgress("sft", p.step, p.total_steps, p))


# ------------------------------------------------------------------------------------------------- files


def _atomic_write(path: Path, write: Callable[[Any], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """obj as indented JSON, written to a temporary file and renamed."""
    return _atomic_write(Path(path), lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def write_jsonl_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object a line, written to a temporary file and renamed."""
    def write(f: Any) -> None:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return _atomic_write(Path(path), write)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def finished_stage(marker: Path, signature: Mapping[str, Any]) -> dict[str, Any] | None:
    """The marker's content where the stage finished with these settings, None where it has not run.

    A marker from other settings is a ValueError rather than a silent mix of two runs in one directory.
    """
    if not marker.is_file():
        return None
    found = json.loads(marker.read_text(encoding="utf-8"))
    if found.get("signature") != json.loads(json.dumps(dict(signature))):
        raise ValueError(f"{marker.parent} holds a run with other settings ({marker.name}: {found.get('signature')}; "
                         f"now {dict(signature)}): use another output directory or remove it")
    return found  # type: ignore[no-any-return]


NOT_STARTED, SAMPLED, FINISHED = 0, 1, 2


def stage_status(dist_: Distributed, marker: Path, report: Path, signature: Mapping[str, Any]) -> int:
    """Where a stage in this directory stands, as rank 0 sees it and the same on every process: NOT_STARTED,
    SAMPLED (the sampling stage finished; SFT to run or resume) or FINISHED (the report says SFT completed, or that
    there was nothing to fine-tune on)."""
    status = NOT_STARTED
    if dist_.is_main and finished_stage(marker, signature) is not None:
        status = SAMPLED
        if report.is_file():
            sft = json.loads(report.read_text(encoding="utf-8")).get("sft")
            if sft is None or sft.get("stopped") == "completed":
                status = FINISHED
    return dist_.broadcast_int(status)


def run_stage(config: Any, *, report_file: str, marker_file: str, data_file: str,
              sample: Callable[[Path, torch.device], Any],
              progress: Callable[[StageProgress], None] | None) -> dict[str, Any]:
    """A sample-then-fine-tune stage in config.out_dir, resumable: `sample(out_dir, device)` (on rank 0 only, once;
    it writes `data_file` and, last, the marker), then SFT on `data_file` from config.policy on every process
    unless the marker kept nothing (`n_kept` 0). Returns the report, also written to `report_file`."""
    config.check()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report_path, marker_path = out_dir / report_file, out_dir / marker_file
    dist_ = setup_distributed(config.device)
    status = stage_status(dist_, marker_path, report_path, config.signature)
    if status == FINISHED:
        return json.loads(report_path.read_text(encoding="utf-8"))  # type: ignore[no-any-return]
    if status == NOT_STARTED:
        if dist_.is_main:  # under torchrun one process samples, then all fine-tune
            sample(out_dir, dist_.device)
        dist_.barrier()
    marker = finished_stage(marker_path, config.signature)
    assert marker is not None

    t0 = time.monotonic()
    sft_summary: dict[str, Any] | None = None
    if marker.get("n_kept", 1):
        sft = train_sft(finetune_config(config, init=config.policy, data=out_dir / data_file, out_dir=out_dir),
                        progress=emit_steps(progress))
        sft_summary = sft.to_dict()
        sft_summary.pop("history")
    report = {**{k: v for k, v in marker.items() if k != "signature"},
              "sampling_resumed": status == SAMPLED,
              "policy_dir": str(out_dir / POLICY_DIR) if sft_summary else None,
              "sft": sft_summary,
              "config": dataclasses.asdict(config)}
    report["timings"] = {**marker["timings"], "sft_s": time.monotonic() - t0}
    if dist_.is_main:
        write_json_atomic(report_path, report)
    return report


# ---------------------------------------------------------------------------------------------- fine-tuning


@dataclass(kw_only=True)
class FineTuneOptions:
    """The SFT settings a sample-then-fine-tune stage passes on to `training.sft` (same names and defaults)."""

    tokenizer: str | None = None  # default: tokenizer.model in or beside the policy
    prompt_format: str = "chat"
    max_new_tokens: int = 128
    top_p: float = 0.9
    batch_size: int = 16  # sequences a generate() call
    seq_len: int | None = None
    global_batch_rows: int = 64
    micro_batch_rows: int = 4
    epochs: int | None = 2
    max_steps: int | None = None
    stop_after_steps: int | None = None
    max_minutes: float | None = None
    learning_rate: float = 2e-5
    schedule: str = "cosine"
    min_warmup_steps: int = 5
    checkpoint_every: int = 50
    sharding: str = "ddp"  # under torchrun: ddp or fsdp (training.sft)
    fit_batch: bool = False  # training.sft: shrink the batch to fewer rows rather than refuse
    seed: int = 0
    device: str | None = None
    num_threads: int | None = None

    def check_finetune(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be at least 1")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give epochs or max_steps")


_SFT_FIELDS = {f.name for f in dataclasses.fields(SFTConfig)}


def finetune_config(options: FineTuneOptions, *, init: str, data: Path, out_dir: Path) -> SFTConfig:
    """The SFTConfig that fine-tunes `init` on the prompts file `data` into out_dir/policy."""
    values = {f.name: getattr(options, f.name) for f in dataclasses.fields(FineTuneOptions) if f.name in _SFT_FIELDS}
    return SFTConfig(init=init, data=[str(data)], format="prompts", out_dir=str(out_dir), **values)


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The sampling and SFT options a sample-then-fine-tune CLI shares."""
    parser.add_argument("--tokenizer", help="tokenizer.model (default: in or beside --policy)")
    parser.add_argument("--prompt-format", default="chat", choices=PROMPT_FORMATS)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens an answer at most (default 128)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default 0.9)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences a generate() call (default 16)")
    epochs = parser.add_mutually_exclusive_group()
    epochs.add_argument("--epochs", type=int, default=None, help="SFT passes over the kept answers (default 2)")
    epochs.add_argument("--max-steps", type=int, default=None, help="SFT optimizer steps instead of epochs")
    for name, kind, what in (("seq-len", int, "SFT tokens a packed row"),
                             ("global-batch-rows", int, "SFT rows an optimizer step (default 64)"),
                             ("micro-batch-rows", int, "SFT rows a forward pass (default 4)"),
                             ("learning-rate", float, "SFT peak learning rate (default 2e-5)"),
                             ("max-minutes", float, "SFT time budget"),
                             ("stop-after-steps", int, "stop SFT (checkpointed) after this many steps"),
                             ("checkpoint-every", int, "SFT steps between checkpoints (default 50)"),
                             ("seed", int, "sampling and SFT seed (default 0)")):
        parser.add_argument(f"--{name}", type=kind, default=None, help=what)
    parser.add_argument("--schedule", default=None, choices=("cosine", "constant"))
    parser.add_argument("--fsdp", dest="sharding", action="store_const", const="fsdp", default=None,
                        help="under torchrun, fine-tune with FSDP instead of DDP")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", dest="num_threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_values(args: argparse.Namespace, *, drop: Iterable[str] = ()) -> dict[str, Any]:
    """The parsed options as config keyword arguments: unset ones left to the config's defaults."""
    skip = {"quiet", *drop}
    values = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    values["out_dir"] = values.pop("out")
    if args.max_steps is not None:
        values["epochs"] = None  # the steps decide
    return values


def stage_main(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, name: str,
               run: Callable[[argparse.Namespace, Callable[[StageProgress], None] | None], Mapping[str, Any]]) -> int:
    """A stage command: parse, run with a progress bar (unless --quiet), print the report on rank 0; 2 on a
    ValueError or a missing file, with its message."""
    args = parser.parse_args(argv)
    return run_command(lambda bar: run(args, bar), bar=None if args.quiet else cli_stage_bar(name), device=args.device,
                       summary=lambda report: {k: v for k, v in report.items() if k != "config"})
