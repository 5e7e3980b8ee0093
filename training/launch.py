"""The stages a platform run calls, by kind, and how a worker runs one on several processes under torchrun.

Each stage is (its config class, its function, a progress adapter). The adapter turns the stage's own progress
object into what a run's row shows: a fraction of the run and, where there is one, a metrics point. A worker calls
the stage in its own process (`call_stage`) or, for a run with `world_size` > 1, launches

    python -m torch.distributed.run --standalone --nproc_per_node W -m training.launch --kind K --dir D

(`launch_stage`), where every rank runs the same function (DDP/FSDP inside the trainers), rank 0 appends
`{"fraction", "point"}` lines to D/progress.jsonl and writes the result to D/result.json, and the worker reads
them into the row. If the worker dies, its torchrun and the ranks die with it (parent-death signals), so a re-queued
run never has two sets of processes writing one directory. A cancel kills the process group.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Report = Callable[[float | None, dict[str, Any] | None], None]


def _sft_progress(p: Any, config: Any) -> tuple[float, dict[str, Any] | None]:
    return p.fraction, {"step": p.step, "loss": round(p.loss, 5)}


def _stage_progress(p: Any, config: Any) -> tuple[float, dict[str, Any] | None]:
    """Sample-then-fine-tune stages: sampling and scoring take the first half of the bar, SFT the second."""
    part = p.done / max(p.total, 1)
    if p.stage == "sft":
        point = {"step": p.step.step, "loss": round(p.step.loss, 5)} if p.step is not None else None
        return 0.5 + 0.5 * part, point
    return (0.5 * part if p.stage == "sampling" else 0.5), None


def _ppo_progress(record: dict[str, Any], config: Any) -> tuple[float, dict[str, Any] | None]:
    keys = ("iteration", "reward_mean", "kl", "entropy", "clip_fraction", "value_loss", "response_length")
    return record["iteration"] / config.iterations, {k: record[k] for k in keys if k in record}


def _reward_progress(p: Any, config: Any) -> tuple[float, dict[str, Any] | None]:
    point = {"step": p.step, "loss": round(p.loss, 5), "accuracy": round(p.accuracy, 4),
             "validation_accuracy": p.validation_accuracy}  # fmt: skip
    if p.parts > 1:
        point["part"] = p.part  # an ensemble member's or soup ingredient's steps count from 1 again
    return p.fraction, point


# Each stage's config class and function, imported when a stage runs (torch and the trainers load in workers only).
def _sft() -> tuple[type, Callable[..., Any]]:
    from training.sft import SFTConfig, train_sft

    return SFTConfig, train_sft


def _rejection_sampling() -> tuple[type, Callable[..., Any]]:
    from training.rejection_sampling import RejectionSamplingConfig, run_rejection_sampling

    return RejectionSamplingConfig, run_rejection_sampling


def _distillation() -> tuple[type, Callable[..., Any]]:
    from training.distill import DistillConfig, run_distillation

    return DistillConfig, run_distillation


def _ppo() -> tuple[type, Callable[..., Any]]:
    from training.ppo import PPOConfig, train_ppo

    return PPOConfig, train_ppo


def _reward_model() -> tuple[type, Callable[..., Any]]:
    from rewards.train import RewardTrainConfig, train_reward_model

    return RewardTrainConfig, train_reward_model


@dataclass(frozen=True)
class Stage:
    load: Callable[[], tuple[type, Callable[..., Any]]]
    progress: Callable[[Any, Any], tuple[float, dict[str, Any] | None]]  # (its progress object, config) -> report
    callback: str = "progress"  # the keyword the function takes its callback by


STAGES = {
    "sft": Stage(_sft, _sft_progress),
    "rejection_sampling": Stage(_rejection_sampling, _stage_progress),
    "distillation": Stage(_distillation, _stage_progress),
    "ppo": Stage(_ppo, _ppo_progress, callback="on_iteration"),
    "reward_model": Stage(_reward_model, _reward_progress),
}


def call_stage(kind: str, config: Any, report: Report) -> dict[str, Any]:
    """Run the stage in this process, telling `report(fraction, point)` as it goes; its result as a dict."""
    stage = STAGES[kind]
    _, function = stage.load()
    result = function(config, **{stage.callback: lambda p: report(*stage.progress(p, config))})
    return result if isinstance(result, dict) else dataclasses.asdict(result)


def run_stage(kind: str, config: Any, report: Report, *, world_size: int = 1, directory: Path | None = None) -> dict[str, Any]:
    """The stage in this process, or on `world_size` processes under torchrun (launch files in `directory`)."""
    if world_size > 1:
        assert directory is not None
        return launch_stage(kind, config, report, world_size=world_size, directory=directory)
    return call_stage(kind, config, report)


# ------------------------------------------------------------------------------------------------ torchrun

PROGRESS_FILE, RESULT_FILE, CONFIG_FILE, LOG_FILE = "progress.jsonl", "result.json", "config.json", "torchrun.log"


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def launch_stage(kind: str, config: Any, report: Report, *, world_size: int, directory: Path,
                 poll_s: float = 0.5) -> dict[str, Any]:
    """Run the stage on `world_size` processes under torchrun; `report` is called with rank 0's progress (and may
    raise to stop it: the processes are killed). Its result as a dict; a failure raises with the log's tail."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in (PROGRESS_FILE, RESULT_FILE):
        (directory / name).unlink(missing_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "training.launch", "--kind", kind, "--dir", str(directory)]  # fmt: skip
    with (directory / LOG_FILE).open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
        seen = 0
        try:
            while True:
                done = proc.poll() is not None
                seen = _read_progress(directory / PROGRESS_FILE, seen, report)
                if done:
                    break
                time.sleep(poll_s)
        except BaseException:
            _kill_group(proc)
            raise
    if proc.returncode != 0 or not (directory / RESULT_FILE).is_file():
        tail = (directory / LOG_FILE).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"torchrun ({world_size} processes) exited with {proc.returncode}:\n{tail}")
    return json.loads((directory / RESULT_FILE).read_text())


def _read_progress(path: Path, seen: int, report: Report) -> int:
    if not path.is_file():
        return seen
    complete = path.read_text().split("\n")[:-1]  # the last piece may be a line rank 0 is still writing
    for line in complete[seen:]:
        if line.strip():
            event = json.loads(line)
            report(event["fraction"], event["point"])
    return len(complete)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """One rank of a launched stage (under torchrun)."""
    _die_with_parent()  # the torchrun agent dies with the worker; the ranks die with the agent
    parser = argparse.ArgumentParser(prog="python -m training.launch")
    parser.add_argument("--kind", required=True, choices=sorted(STAGES))
    parser.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    directory = Path(args.dir)
    config_class, _ = STAGES[args.kind].load()
    config = config_class(**json.loads((directory / CONFIG_FILE).read_text()))
    is_main = int(os.environ.get("RANK", "0")) == 0
    progress = (directory / PROGRESS_FILE).open("a") if is_main else None

    def report(fraction: float | None, point: dict[str, Any] | None) -> None:
        if progress is not None:
            progress.write(json.dumps({"fraction": fraction, "point": point}) + "\n")
            progress.flush()

    result = call_stage(args.kind, config, report)
    if is_main:
        from training.stages import write_json_atomic

        write_json_atomic(directory / RESULT_FILE, result)
    return 0


if __name__ == "__main__":
    from training.engine import run_main

    run_main(main)
