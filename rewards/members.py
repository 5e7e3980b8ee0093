"""Training several reward models one after another within one time budget: a soup's ingredients, an ensemble's
members. Shared by rewards.soup and rewards.ensemble.

A finished run (its model saved, its run completed) is not trained again, so a stopped soup or ensemble resumes;
a run that the budget stopped keeps its train_state.pt and goes on from there next time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from rewards.data import PreferencePair
from rewards.evaluate import evaluate_reward_model
from rewards.model import read_reward_model_info
from rewards.trainer import (
    REPORT_FILE,
    TRAIN_STATE_FILE,
    RewardTrainConfig,
    RewardTrainResult,
    TrainProgress,
    load_pairs,
)
from training.engine import read_elapsed_minutes


class TrainRun(Protocol):
    """How a part is trained: rewards.train.train_reward_model (a part may itself be a soup)."""

    def __call__(self, config: RewardTrainConfig, *, pairs: Sequence[PreferencePair] | None = ...,
                 progress: Callable[[TrainProgress], None] | None = ...) -> RewardTrainResult: ...


def is_completed(run_dir: str | Path) -> bool:
    """Whether a training output directory holds a model whose run completed."""
    model_dir = Path(run_dir) / "model"
    return model_dir.is_dir() and read_reward_model_info(model_dir).metadata.get("stopped") == "completed"


def _as_part(progress: Callable[[TrainProgress], None] | None, part: int,
             parts: int) -> Callable[[TrainProgress], None] | None:
    """The progress callback of run `part` of `parts`: its reports say which part they come from. A run that
    is itself trained in turn (an ensemble member that is a soup) already numbers its own parts: each of them
    becomes a part of this whole."""
    if progress is None:
        return None
    return lambda p: progress(replace(p, part=part * p.parts + p.part, parts=parts * p.parts))


def train_in_turn(
    config: RewardTrainConfig,
    count: int,
    run_config: Callable[[int, float | None], RewardTrainConfig],
    *,
    train: TrainRun,
    fair_share: bool,
    pairs: Sequence[PreferencePair] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> tuple[list[RewardTrainResult], list[Path]]:
    """Train run_config(i, minutes) for i < count, one after another, within config.max_minutes.

    Each run gets the time that is left (fair_share False) or its fair share of it, the time left over the runs
    still to train (fair_share True); no run starts once the budget is spent. Returns the results of the runs
    trained now and the output directories of all completed runs, in order.
    """
    start = time.monotonic()
    dirs = [Path(run_config(i, None).out_dir) for i in range(count)]
    results, trained = [], set()
    for index, run_dir in enumerate(dirs):
        if config.resume and is_completed(run_dir):
            continue
        minutes = None
        if config.max_minutes is not None:
            left = config.max_minutes - (time.monotonic() - start) / 60
            if left <= 0:
                break
            to_train = sum(1 for d in dirs[index:] if not (config.resume and is_completed(d)))
            minutes = left / to_train if fair_share else left
            if config.resume:
                minutes += read_elapsed_minutes(run_dir / TRAIN_STATE_FILE)  # its budget counts it
        results.append(train(run_config(index, minutes), pairs=pairs, progress=_as_part(progress, index, count)))
        trained.add(index)
    # Without resume, what an earlier call left in the directories does not count.
    return results, [d for i, d in enumerate(dirs) if (config.resume or i in trained) and is_completed(d)]


def combined_result(
    config: RewardTrainConfig, results: Sequence[RewardTrainResult], *, pairs: Sequence[PreferencePair] | None,
    complete: bool, elapsed_s: float, label: str,
) -> RewardTrainResult:
    """One RewardTrainResult for several runs, the combined model in out_dir/model tested on the test split.

    Their steps summed, their histories tagged with `label`: index; the test report also written to out_dir.
    """
    _, _, test = load_pairs(config, pairs)
    test_report = evaluate_reward_model(Path(config.out_dir) / "model", test) if test else None
    if test_report is not None:
        (Path(config.out_dir) / REPORT_FILE).write_text(json.dumps(test_report, indent=2) + "\n")
    n_test_pairs = len(test)
    return RewardTrainResult(
        out_dir=str(config.out_dir), steps=sum(r.steps for r in results), total_steps=sum(r.total_steps for r in results),
        stopped="completed" if complete else "max_minutes", elapsed_s=elapsed_s,
        pairs_per_s=sum(r.pairs_per_s for r in results) / max(1, len(results)),
        final_loss=results[-1].final_loss if results else None, best_validation_accuracy=None, best_step=None,
        n_train_pairs=results[0].n_train_pairs if results else 0,
        n_validation_pairs=results[0].n_validation_pairs if results else 0, n_test_pairs=n_test_pairs,
        test_report=test_report,
        history=[{**h, label: i} for i, r in enumerate(results) for h in r.history],
    )
