"""The annotators' preference strengths and the Llama 2 margin table (Table 27): no torch, no other import.

Read by the pair readers (rewards.data) and the ranking loss (rewards.losses) alike.
"""

from __future__ import annotations

# The annotators' four preference strengths, strongest first (the column order of Table 8).
STRENGTHS = ("significantly_better", "better", "slightly_better", "negligibly_better")

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
