"""What a policy is rewarded by, and the report's combined reward, shared by evaluation, rejection sampling and PPO.

A reward source is a helpfulness reward model and/or a safety one (directories as `rewards.train` saves them),
or a Python function `f(prompts: list[str], responses: list[str]) -> list[float]` named `package.module:function`
(rule-based rewards: a real research need, and what makes known-answer tests possible).

The combined reward (Llama 2, section 3.2.3):

    R_c = R_s   if the prompt is tagged safety or R_s < 0.15,   else R_h
    R   = whiten(logit(R_c))

The report's reward models give probabilities (R_s < 0.15 is a probability threshold); ours give the logit of
that probability, the raw score of the ranking loss. So R_s = sigmoid(score_s), and logit(R_c) is the chosen
model's own score: it is taken as it is, with no round trip through a probability that would clamp large scores
(a rule-based reward of 30 would come back as 27.6 and tie with 40). A reward function's values are scores too.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from training.prompts import PromptRecord

SAFETY_THRESHOLD = 0.15  # Table/section 3.2.3: precision 0.89, recall 0.55 on the safety test set


@dataclass(frozen=True)
class RewardScores:
    """Scores (n,) of n responses: helpfulness and/or safety, each with the members' spread of an ensemble."""

    helpfulness: torch.Tensor | None = None
    safety: torch.Tensor | None = None
    helpfulness_spread: torch.Tensor | None = None
    safety_spread: torch.Tensor | None = None


class RewardSource(Protocol):
    def score(self, records: Sequence[PromptRecord], responses: Sequence[str]) -> RewardScores: ...


def whiten(x: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the batch (population std); with shift_mean False the mean is put back."""
    mean, var = x.mean(), x.var(correction=0)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def piecewise_reward(scores: RewardScores, safety_prompts: torch.Tensor, *,
                     threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """logit(R_c) (n,): the safety score where the prompt is a safety prompt or sigmoid(safety score) < threshold,
    else the helpfulness score. With one of the two models only, its score. `safety_prompts` is bool (n,)."""
    h, s = scores.helpfulness, scores.safety
    if h is None and s is None:
        raise ValueError("no reward scores")
    if s is None or h is None:
        return next(t for t in (h, s) if t is not None).float()
    use_safety = safety_prompts.to(torch.bool) | (torch.sigmoid(s.double()) < threshold)
    return torch.where(use_safety, s.float(), h.float())


def uncertainty_penalty(scores: RewardScores, safety_prompts: torch.Tensor, coef: float,
                        *, threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """coef x the spread of the ensemble whose score `piecewise_reward` took (0 where there is no ensemble)."""
    n = next(t for t in (scores.helpfulness, scores.safety) if t is not None).shape[0]
    zero = torch.zeros(n)
    if coef == 0:
        return zero
    h_spread = scores.helpfulness_spread if scores.helpfulness_spread is not None else zero
    s_spread = scores.safety_spread if scores.safety_spread is not None else zero
    if scores.safety is None:
        return coef * h_spread
    if scores.helpfulness is None:
        return coef * s_spread
    use_safety = safety_prompts.to(torch.bool) | (torch.sigmoid(scores.safety.float()) < threshold)
    return coef * torch.where(use_safety, s_spread, h_spread)


def combined_reward(scores: RewardScores, records: Sequence[PromptRecord], *, whitened: bool = True,
                    uncertainty_coef: float = 0.0, threshold: float = SAFETY_THRESHOLD) -> torch.Tensor:
    """The reward (n,) of rejection sampling and PPO: whiten(logit(R_c) - uncertainty_coef * spread).

    The uncertainty penalty (off by default) subtracts a multiple of the ensemble members' spread of the model
    whose score was taken (Coste et al., 2023). Without `whitened`, the reward before whitening.
    """
    safety_prompts = torch.tensor([r.is_safety for r in records], dtype=torch.bool)
    reward = piecewise_reward(scores, safety_prompts, threshold=threshold)
    if uncertainty_coef:
        reward = reward - uncertainty_penalty(scores, safety_prompts, uncertainty_coef, threshold=threshold)
    return whiten(reward) if whitened and reward.numel() > 1 else reward


# ------------------------------------------------------------------------------------------------ sources


def _dialogue(record: PromptRecord) -> list[dict[str, str]]:
    """The dialogue a reward model reads: its turns without the system prompt (the reward models never see it)."""
    return [dict(m) for m in record.dialogue if m["role"] != "system"]


class RewardModelSource:
    """A helpfulness and/or a safety reward model (rewards.scoring.RewardScorer), loaded once."""

    def __init__(self, helpfulness: str | Path | None = None, safety: str | Path | None = None, *,
                 device: torch.device | str | None = None, batch_size: int = 16):
        from rewards.scoring import RewardScorer

        if helpfulness is None and safety is None:
            raise ValueError("give --reward-model and/or --safety-reward-model, or --reward-fn")
        self.helpfulness = RewardScorer.load(helpfulness, device=device) if helpfulness is not None else None
        self.safety = RewardScorer.load(safety, device=device) if safety is not None else None
        for name, scorer in (("helpfulness", self.helpfulness), ("safety", self.safety)):
            if scorer is not None and scorer.kind != name:
                raise ValueError(f"the {name} reward model given is a {scorer.kind} reward model")
        self.batch_size = batch_size

    def score(self, records: Sequence[PromptRecord], responses: Sequence[str]) -> RewardScores:
        dialogues = [_dialogue(r) for r in records]
        out: dict[str, torch.Tensor | None] = {}
        for name in ("helpfulness", "safety"):
            scorer = getattr(self, name)
            if scorer is None:
                continue
            if scorer.n_members > 1:
                out[name], out[f"{name}_spread"] = scorer.score_with_spread(dialogues, responses,
                                                                            batch_size=self.batch_size)
            else:
                out[name] = scorer.score(dialogues, responses, batch_size=self.batch_size)
        return RewardScores(**out)


class RewardFunctionSource:
    """A Python reward function `f(prompts, responses) -> scores`, scored as a helpfulness score."""

    def __init__(self, function: Callable[[list[str], list[str]], Sequence[float]], name: str = ""):
        self.function = function
        self.name = name or getattr(function, "__qualname__", "reward function")

    @classmethod
    def load(cls, spec: str) -> RewardFunctionSource:
        return cls(load_reward_function(spec), spec)

    def score(self, records: Sequence[PromptRecord], responses: Sequence[str]) -> RewardScores:
        values = list(self.function([r.text for r in records], list(responses)))
        if len(values) != len(responses):
            raise ValueError(f"{self.name} returned {len(values)} rewards for {len(responses)} responses")
        for i, v in enumerate(values):
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{self.name} returned {v!r} for response {i}: expected a finite number")
        return RewardScores(helpfulness=torch.tensor(values, dtype=torch.float32))


def load_reward_function(spec: str) -> Callable[[list[str], list[str]], Sequence[float]]:
    """`package.module:function` as a callable; ValueError naming what is missing."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward-fn must be package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--reward-fn {spec}: cannot import {module_name} ({exc})") from exc
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"--reward-fn {spec}: {module_name} has no function {attr!r}")
    return function  # type: ignore[no-any-return]


def reward_source(*, reward_model: str | None = None, safety_reward_model: str | None = None,
                  reward_fn: str | None = None, device: torch.device | str | None = None) -> RewardSource:
    """The source a CLI's options name: reward model(s) or a reward function, not both."""
    if reward_fn is not None:
        if reward_model is not None or safety_reward_model is not None:
            raise ValueError("give reward model(s) or --reward-fn, not both")
        return RewardFunctionSource.load(reward_fn)
    return RewardModelSource(reward_model, safety_reward_model, device=device)


def add_reward_arguments(parser: object, *, safety_only: bool = False) -> None:
    """--reward-model / --safety-reward-model / --reward-fn on an argparse parser."""
    import argparse

    assert isinstance(parser, argparse.ArgumentParser)
    if safety_only:
        parser.add_argument("--safety-reward-model", required=True, help="safety reward-model directory")
        return
    parser.add_argument("--reward-model", help="helpfulness reward-model directory (as rewards.train saves it)")
    parser.add_argument("--safety-reward-model", help="safety reward-model directory")
    parser.add_argument("--reward-fn", help="a reward function package.module:function, f(prompts, responses)")
