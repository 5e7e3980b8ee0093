"""The reward model's pairwise ranking loss with the Llama 2 margin (Table 27)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rewards.data import STRENGTHS

# Table 27 of the Llama 2 report: the margin m(r) for each strength under each scheme.
MARGIN_SCHEMES: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(STRENGTHS, 0.0),
    "small": {
        "significantly_better": 1.0,
        "better": 2.0 / 3.0,
        "slightly_better": 1.0 / 3.0,
        "negligibly_better": 0.0,
    },
    "large": {
        "significantly_better": 3.0,
        "better": 2.0,
        "slightly_better": 1.0,
        "negligibly_better": 0.0,
    },
}


def strength_margin(strength: str | None, scheme: str) -> float:
    """The margin of one strength under a scheme; a pair without a strength gets no margin."""
    if scheme not in MARGIN_SCHEMES:
        raise ValueError(f"unknown margin scheme {scheme!r}; expected one of {sorted(MARGIN_SCHEMES)}")
    if strength is None:
        return 0.0
    if strength not in MARGIN_SCHEMES[scheme]:
        raise ValueError(f"unknown preference strength {strength!r}; expected one of {STRENGTHS}")
    return MARGIN_SCHEMES[scheme][strength]


def strength_margins(strengths: Sequence[str | None], scheme: str) -> torch.Tensor:
    """Margins of a batch of strengths as a float32 tensor of shape (bsz,)."""
    return torch.tensor([strength_margin(s, scheme) for s in strengths], dtype=torch.float32)


def pairwise_ranking_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
    *, label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean of -log(sigmoid(r_chosen - r_rejected - margin)) over the batch (Llama 2, eq. 2).

    With label_smoothing e, each pair counts as chosen-better with weight 1 - e and rejected-better with weight
    e: -(1 - e) log sigmoid(d) - e log sigmoid(-d), whose minimum is at a finite difference d = log((1 - e) / e).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if chosen.shape != rejected.shape:
        raise ValueError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ in shape")
    diff = chosen.float() - rejected.float()  # (bsz,)
    if margin is not None:
        diff = diff - torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
    # logsigmoid is the numerically stable form of log(sigmoid(x)) for large |x|.
    if label_smoothing:
        return -((1.0 - label_smoothing) * F.logsigmoid(diff) + label_smoothing * F.logsigmoid(-diff)).mean()
    return -F.logsigmoid(diff).mean()
