"""Batched scoring for the policy trainers: one reward model, or helpfulness and safety side by side.

A reward-model ensemble (rewards.ensemble) loads like a single model and scores with its members' mean;
`score_with_spread` also gives the members' standard deviation, for an uncertainty-penalised reward in PPO.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from rewards.data import check_dialogue, render_reply
from rewards.model import (
    AnyRewardModel,
    EnsembleRewardModel,
    load_reward_model,
    member_scores,
    resolve_reward_model_dir,
)


class RewardScorer:
    """A loaded reward model with its tokenizer; `score` takes conversations as text."""

    def __init__(self, model: AnyRewardModel, tokenizer: object, *, kind: str, max_seq_len: int,
                 context_turns: int | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_seq_len = max_seq_len
        self.context_turns = context_turns

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RewardScorer:
        """Load a reward-model directory written by rewards.train."""
        from training.llama.tokenizer import Tokenizer

        path = resolve_reward_model_dir(path)
        model, info = load_reward_model(path, device=device, dtype=dtype)
        return cls(model, Tokenizer(path / info.tokenizer_file), kind=info.kind, max_seq_len=info.max_seq_len,
                   context_turns=info.context_turns)

    def tokenize(self, dialogues: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each dialogue (ending with a user turn) answered by its response."""
        if len(dialogues) != len(responses):
            raise ValueError(f"{len(dialogues)} dialogues but {len(responses)} responses")
        return [
            render_reply(self.tokenizer, check_dialogue(d), r, self.max_seq_len,  # type: ignore[arg-type]
                         context_turns=self.context_turns)
            for d, r in zip(dialogues, responses, strict=True)
        ]

    @property
    def n_members(self) -> int:
        """How many models score: an ensemble's members, or 1."""
        return len(self.model.members) if isinstance(self.model, EnsembleRewardModel) else 1

    @torch.inference_mode()
    def score_ids(self, sequences: Sequence[Sequence[int]], *, batch_size: int = 16) -> torch.Tensor:
        """Scores (n,) float32 on the CPU of token-id sequences, in their order (an ensemble's: the members' mean)."""
        return self._score_batches(sequences, batch_size, lambda t, n: self.model(t, lengths=n)[None])[0]

    @torch.inference_mode()
    def score_ids_by_member(self, sequences: Sequence[Sequence[int]], *, batch_size: int = 16) -> torch.Tensor:
        """Scores (n_members, n) float32 on the CPU: one row a member of an ensemble, one row for a single model."""
        return self._score_batches(sequences, batch_size, lambda t, n: member_scores(self.model, t, lengths=n))

    def _score_batches(self, sequences: Sequence[Sequence[int]], batch_size: int,
                       forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        scores: torch.Tensor | None = None
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths together
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seqlen = max(len(sequences[i]) for i in idx)
            tokens = torch.zeros((len(idx), seqlen), dtype=torch.long)  # (b, seqlen), right-padded
            for row, i in enumerate(idx):
                tokens[row, : len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
            lengths = torch.tensor([len(sequences[i]) for i in idx])
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = forward(tokens.to(device), lengths.to(device)).float().cpu()  # (k, b)
            if scores is None:
                scores = torch.empty((out.shape[0], len(sequences)))
            scores[:, idx] = out
        return scores if scores is not None else torch.empty((self.n_members, 0))

    def score(
        self, dialogues: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str], *, batch_size: int = 16
    ) -> torch.Tensor:
        """Scores (n,) of responses to their dialogues; dialogues[i] ends with the user turn responses[i] answers."""
        return self.score_ids(self.tokenize(dialogues, responses), batch_size=batch_size)

    def score_with_spread(
        self, dialogues: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str], *, batch_size: int = 16
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (n,): the members' mean score (what `score` gives) and their standard deviation
        (over the members, not a sample estimate: 0 for a single model or identical members).

        For an uncertainty-penalised reward in PPO, e.g. mean - k * std (Coste et al., 2023).
        """
        by_member = self.score_ids_by_member(self.tokenize(dialogues, responses), batch_size=batch_size)
        return by_member.mean(dim=0), by_member.std(dim=0, correction=0)


class RewardModels:
    """The helpfulness and the safety reward model loaded side by side, as PPO and rejection sampling use them."""

    def __init__(self, helpfulness: RewardScorer, safety: RewardScorer):
        for name, scorer in (("helpfulness", helpfulness), ("safety", safety)):
            if scorer.kind != name:
                raise ValueError(f"the {name} slot holds a {scorer.kind} reward model")
        self.helpfulness = helpfulness
        self.safety = safety

    @classmethod
    def load(
        cls,
        helpfulness: str | Path,
        safety: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> RewardModels:
        return cls(RewardScorer.load(helpfulness, device=device, dtype=dtype), RewardScorer.load(safety, device=device, dtype=dtype))

    def score(
        self, dialogues: Sequence[Sequence[Mapping[str, str]]], responses: Sequence[str], *, batch_size: int = 16
    ) -> dict[str, torch.Tensor]:
        """{"helpfulness": (n,), "safety": (n,)} scores of the same responses under both models."""
        return {
            "helpfulness": self.helpfulness.score(dialogues, responses, batch_size=batch_size),
            "safety": self.safety.score(dialogues, responses, batch_size=batch_size),
        }
