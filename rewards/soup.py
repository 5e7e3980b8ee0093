"""A uniform model soup (Wortsman et al., 2022): several runs from one initialisation, their weights averaged.

The runs ("ingredients") share the initial weights (`init_seed`) and differ in the order of the batches and the
dropped tokens (`seed`). Averaging the weights, rather than the scores, gives one RewardModel of the same shape,
which scores a conversation in one forward pass like any other. A from-scratch model on a few thousand pairs
trains in seconds, so a time budget of minutes buys many ingredients.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rewards.data import PreferencePair
from rewards.model import RewardModel, load_reward_model, read_reward_model_info, save_reward_model

if TYPE_CHECKING:
    from rewards.train import RewardTrainConfig, RewardTrainResult, TrainProgress

INGREDIENTS_DIR = "ingredients"


@torch.no_grad()
def average_weights(models: Sequence[RewardModel]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the models' state dicts (same shapes; float32 accumulation)."""
    if not models:
        raise ValueError("a soup needs at least one model")
    states = [m.state_dict() for m in models]
    return {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}


def ingredient_config(config: RewardTrainConfig, index: int, *, max_minutes: float | None) -> RewardTrainConfig:
    """The config of one ingredient: the soup's initial weights, its own batch order, its own directory."""
    assert config.soup_size is not None
    return dataclasses.replace(
        config, soup_size=1, init_seed=config.seed if config.init_seed is None else config.init_seed,
        seed=config.seed * config.soup_size + index, out_dir=str(Path(config.out_dir) / INGREDIENTS_DIR / str(index)),
        max_minutes=max_minutes,
    )


def train_reward_soup(
    config: RewardTrainConfig,
    *,
    pairs: Sequence[PreferencePair] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> RewardTrainResult:
    """Train config.soup_size ingredients one after another, save their average in out_dir/model, test it.

    A finished ingredient (its model saved, its run completed) is not trained again, so a stopped soup resumes.
    Under a time budget each ingredient may use all that is left; one that the budget stops is left out of the
    average, and no ingredient starts once the budget is spent.
    """
    from rewards.evaluate import evaluate_reward_model
    from rewards.train import REPORT_FILE, RewardTrainResult, load_pairs, train_reward_model

    assert config.soup_size is not None
    start = time.monotonic()
    results = []
    for index in range(config.soup_size):
        left = None if config.max_minutes is None else config.max_minutes - (time.monotonic() - start) / 60
        if left is not None and left <= 0:
            break
        ingredient = ingredient_config(config, index, max_minutes=left)
        model_dir = Path(ingredient.out_dir) / "model"
        if config.resume and model_dir.is_dir() and read_reward_model_info(model_dir).metadata.get("stopped") == "completed":
            continue
        results.append(train_reward_model(ingredient, pairs=pairs, progress=progress))

    dirs = [Path(ingredient_config(config, i, max_minutes=None).out_dir) / "model" for i in range(config.soup_size)]
    finished = [d for d in dirs if d.is_dir() and read_reward_model_info(d).metadata.get("stopped") == "completed"]
    if not finished:
        raise ValueError("no ingredient of the soup finished within the time budget; give more --max-minutes")
    models = [load_reward_model(d)[0] for d in finished]
    soup = models[0]
    soup.load_state_dict(average_weights(models))
    info = read_reward_model_info(finished[0])
    out_dir = Path(config.out_dir)
    metadata = {**info.metadata, "soup": {"size": len(finished), "ingredients": [str(d) for d in finished]}}
    save_reward_model(soup, out_dir / "model", kind=config.kind, tokenizer_path=finished[0] / info.tokenizer_file,
                      max_seq_len=info.max_seq_len, metadata=metadata, context_turns=info.context_turns)

    _, _, test = load_pairs(config, pairs)
    test_report = evaluate_reward_model(out_dir / "model", test) if test else None
    if test_report is not None:
        (out_dir / REPORT_FILE).write_text(json.dumps(test_report, indent=2) + "\n")
    elapsed = time.monotonic() - start
    return RewardTrainResult(
        out_dir=str(out_dir), steps=sum(r.steps for r in results), total_steps=sum(r.total_steps for r in results),
        stopped="completed" if len(finished) == config.soup_size else "max_minutes", elapsed_s=elapsed,
        pairs_per_s=sum(r.pairs_per_s for r in results) / max(1, len(results)),
        final_loss=results[-1].final_loss if results else None, best_validation_accuracy=None, best_step=None,
        n_train_pairs=results[0].n_train_pairs if results else 0,
        n_validation_pairs=results[0].n_validation_pairs if results else 0, n_test_pairs=len(test),
        test_report=test_report,
        history=[{**h, "ingredient": i} for i, r in enumerate(results) for h in r.history],
    )
