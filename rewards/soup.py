"""A uniform model soup (Wortsman et al., 2022): several runs from one initialisation, their weights averaged.

The runs ("ingredients") share the initial weights (`init_seed`) and differ in the order of the batches and the
dropped tokens (`seed`). Averaging the weights, rather than the scores, gives one RewardModel of the same shape,
which scores a conversation in one forward pass like any other. A from-scratch model on a few thousand pairs
trains in seconds, so a time budget of minutes buys many ingredients.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from rewards.data import PreferencePair
from rewards.members import TrainRun, combined_result, train_in_turn
from rewards.model import RewardModel, load_single_reward_model, read_reward_model_info, save_reward_model
from rewards.trainer import RewardTrainConfig, RewardTrainResult, TrainProgress

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
    train_ingredient: TrainRun,
) -> RewardTrainResult:
    """Train config.soup_size ingredients one after another, save their average in out_dir/model, test it.

    A finished ingredient (its model saved, its run completed) is not trained again, so a stopped soup resumes.
    Under a time budget each ingredient may use all that is left; one that the budget stops is left out of the
    average, and no ingredient starts once the budget is spent.
    """
    assert config.soup_size is not None
    start = time.monotonic()
    results, finished_runs = train_in_turn(
        config, config.soup_size, lambda i, minutes: ingredient_config(config, i, max_minutes=minutes),
        train=train_ingredient, fair_share=False, pairs=pairs, progress=progress,
    )
    finished = [d / "model" for d in finished_runs]
    if not finished:
        raise ValueError("no ingredient of the soup finished within the time budget; give more --max-minutes")
    models = [load_single_reward_model(d) for d in finished]
    soup = models[0]
    soup.load_state_dict(average_weights(models))
    info = read_reward_model_info(finished[0])
    out_dir = Path(config.out_dir)
    metadata = {**info.metadata, "soup": {"size": len(finished), "ingredients": [str(d) for d in finished]}}
    save_reward_model(soup, out_dir / "model", kind=config.kind, tokenizer_path=finished[0] / info.tokenizer_file,
                      max_seq_len=info.max_seq_len, metadata=metadata, context_turns=info.context_turns)

    return combined_result(config, results, pairs=pairs, complete=len(finished) == config.soup_size,
                           elapsed_s=time.monotonic() - start, label="ingredient")
