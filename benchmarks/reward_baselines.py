"""Baselines that a reward model must beat, on any list of preference pairs: the length rule and a linear
bag-of-words model on the final reply (logistic regression on word-presence differences, L-BFGS, L2)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch

from rewards.data import PreferencePair

_WORD = re.compile(r"[a-z']+|[^\sa-z]")


def shorter_reply_accuracy(pairs: Sequence[PreferencePair]) -> float:
    """How often the shorter final reply (in characters) is the chosen one."""
    return sum(len(p.chosen) < len(p.rejected) for p in pairs) / len(pairs)


def bag_of_words_accuracy(train: Sequence[PreferencePair], test: Sequence[PreferencePair], *, l2: float = 0.03) -> dict:
    """Train/test accuracy of a linear pairwise model on final-reply word presence plus reply length."""
    words = lambda s: set(_WORD.findall(s.lower()))  # noqa: E731
    counts = Counter(w for p in train for s in (p.chosen, p.rejected) for w in words(s))
    vocab = {w: i for i, (w, c) in enumerate(counts.most_common()) if c >= 2}

    def features(s: str) -> torch.Tensor:
        v = torch.zeros(len(vocab) + 1)
        for w in words(s):
            if w in vocab:
                v[vocab[w]] = 1.0
        v[-1] = len(s) / 1000
        return v

    def diffs(pairs: Sequence[PreferencePair]) -> torch.Tensor:
        return torch.stack([features(p.chosen) - features(p.rejected) for p in pairs])

    x_train, x_test = diffs(train), diffs(test)
    w = torch.zeros(len(vocab) + 1, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(x_train @ w).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {
            "train_accuracy": float((x_train @ w > 0).float().mean()),
            "test_accuracy": float((x_test @ w > 0).float().mean()),
            "test_correct": (x_test @ w > 0).tolist(),
            "l2": l2,
        }
