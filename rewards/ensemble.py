"""A reward-model ensemble: several independently trained runs, their scores averaged.

Unlike a soup's ingredients (one initialisation, weights averaged), the members start from their own initial
weights and see their own batch order and dropped tokens, so their errors decorrelate; the ensemble keeps every
member and scores a conversation with the mean of their scores (Coste et al., 2023, "Reward Model Ensembles Help
Mitigate Overoptimization"). The members' spread is an uncertainty estimate: see RewardScorer.score_with_spread.

out_dir/members/<i>/ are the members' training outputs (model/, eval_report.json, train_state.pt of a stopped
one); out_dir/model/ is the ensemble, one reward-model directory (rewards.model.save_reward_ensemble) that
rewards.evaluate, rewards.scoring and the platform load like any other.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rewards.data import PreferencePair
from rewards.members import TrainRun, combined_result, train_in_turn
from rewards.model import read_reward_model_info, save_reward_ensemble
from rewards.trainer import RewardTrainConfig, RewardTrainResult, TrainProgress

MEMBERS_RUN_DIR = "members"


def member_config(config: RewardTrainConfig, index: int, *, max_minutes: float | None) -> RewardTrainConfig:
    """The config of one member: its own seed (initial weights, batch order, dropped tokens), its own directory.

    Member i of the ensemble with seed s has seed s * size + i: the members of one ensemble differ, and so do
    those of ensembles with other seeds. (Member 0 of seed 0 is the single run of seed 0.)
    """
    assert config.ensemble is not None
    return dataclasses.replace(
        config, ensemble=1, init_seed=None, seed=config.seed * config.ensemble + index,
        out_dir=str(Path(config.out_dir) / MEMBERS_RUN_DIR / str(index)), max_minutes=max_minutes,
    )


def train_reward_ensemble(
    config: RewardTrainConfig,
    *,
    pairs: Sequence[PreferencePair] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    train_member: TrainRun,
) -> RewardTrainResult:
    """Train config.ensemble members one after another, save them as one ensemble in out_dir/model, test it.

    Under a time budget each member gets a fair share of the time that is left (left / members still to train),
    so that a slow member cannot starve the rest; one that its share stops is left out of the ensemble (and resumes
    from its checkpoint when the ensemble is trained again), and no member starts once the budget is spent. A
    finished member is not trained again.
    """
    assert config.ensemble is not None
    start = time.monotonic()
    results, finished_runs = train_in_turn(
        config, config.ensemble, lambda i, minutes: member_config(config, i, max_minutes=minutes),
        train=train_member, fair_share=True, pairs=pairs, progress=progress,
    )
    if not finished_runs:
        raise ValueError("no member of the ensemble finished within the time budget; give more --max-minutes")
    finished = [d / "model" for d in finished_runs]
    out_dir = Path(config.out_dir)
    metadata = {
        **read_reward_model_info(finished[0]).metadata,
        "config": dataclasses.asdict(config),
        "stopped": "completed" if len(finished) == config.ensemble else "max_minutes",
        "ensemble": {"size": len(finished), "planned": config.ensemble, "members": [str(d) for d in finished]},
    }
    save_reward_ensemble(finished, out_dir / "model", metadata=metadata)

    return combined_result(config, results, pairs=pairs, complete=len(finished) == config.ensemble,
                           elapsed_s=time.monotonic() - start, label="member")
