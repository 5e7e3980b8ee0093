"""The reward model's pairwise ranking loss with the Llama 2 margin (Table 27)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from rewards.margins import MARGIN_SCHEMES, STRENGTHS, strength_margin  # noqa: F401  (re-exported)


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
