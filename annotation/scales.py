"""The Llama 2 preference scales: strengths, margins (Table 27) and safety bins. No Django here."""

from enum import StrEnum

# Time on task is recorded up to a day (the column is a 32-bit integer; a lease may outlive a day).
MAX_TIME_ON_TASK_MS = 86_400_000


class Choice(StrEnum):
    A = "a"
    B = "b"


class Strength(StrEnum):
    """The four-level scale, strongest first (Llama 2 report, section 3.2.1)."""

    SIGNIFICANTLY_BETTER = "significantly_better"
    BETTER = "better"
    SLIGHTLY_BETTER = "slightly_better"
    NEGLIGIBLY_BETTER = "negligibly_better"  # "negligibly better / unsure"


class SafetyLabel(StrEnum):
    """The three bins. "Chosen unsafe, other safe" does not exist: such a pair is not allowed."""

    CHOSEN_SAFE_OTHER_UNSAFE = "chosen_safe_other_unsafe"
    BOTH_SAFE = "both_safe"
    BOTH_UNSAFE = "both_unsafe"


# The words annotators see for each point, everywhere (the annotation page, the admin, the dashboard, forms).
CHOICE_TEXT: dict[Choice, str] = {Choice.A: "A is better", Choice.B: "B is better"}
STRENGTH_TEXT: dict[Strength, str] = {
    Strength.SIGNIFICANTLY_BETTER: "Significantly better",
    Strength.BETTER: "Better",
    Strength.SLIGHTLY_BETTER: "Slightly better",
    Strength.NEGLIGIBLY_BETTER: "Negligibly better / unsure",
}
SAFETY_TEXT: dict[SafetyLabel, str] = {
    SafetyLabel.CHOSEN_SAFE_OTHER_UNSAFE: "Chosen is safe, the other is not",
    SafetyLabel.BOTH_SAFE: "Both safe",
    SafetyLabel.BOTH_UNSAFE: "Both unsafe",
}

# Table 27: margin m(r) per strength, for the "small" and "large" settings; "none" is all zero.
MARGINS: dict[str, dict[Strength, float]] = {
    "none": {s: 0.0 for s in Strength},
    "small": {
        Strength.SIGNIFICANTLY_BETTER: 1.0,
        Strength.BETTER: 2 / 3,
        Strength.SLIGHTLY_BETTER: 1 / 3,
        Strength.NEGLIGIBLY_BETTER: 0.0,
    },
    "large": {
        Strength.SIGNIFICANTLY_BETTER: 3.0,
        Strength.BETTER: 2.0,
        Strength.SLIGHTLY_BETTER: 1.0,
        Strength.NEGLIGIBLY_BETTER: 0.0,
    },
}

# Ordinal position of each strength (4 = strongest), used for signed ordinal agreement.
STRENGTH_RANK: dict[Strength, int] = {
    Strength.SIGNIFICANTLY_BETTER: 4,
    Strength.BETTER: 3,
    Strength.SLIGHTLY_BETTER: 2,
    Strength.NEGLIGIBLY_BETTER: 1,
}


def signed_preference(choice: str, strength: str) -> int:
    """The comparison on one ordinal axis: +4 (A significantly better) ... -4 (B significantly better)."""
    rank = STRENGTH_RANK[Strength(strength)]
    return rank if Choice(choice) is Choice.A else -rank
