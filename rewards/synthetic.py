"""Synthetic, clearly separable preference pairs: a sanity check that a reward model can learn at all."""

from __future__ import annotations

import random

from rewards.data import PreferencePair
from rewards.losses import STRENGTHS

_FILLER = (
    "the a story about time day little cat dog went house tree park ball friend play saw big small "
    "went said was and then they she he it on in at with".split()
)
_TOPICS = ("cats", "trees", "the park", "a ball", "friends", "the house", "a big dog", "the sun")
_GOOD = "happy kind friend"
_BAD = "sad angry mean"


def synthetic_pairs(n: int, *, seed: int = 0, with_strengths: bool = True) -> list[PreferencePair]:
    """n pairs whose chosen reply contains a "good" phrase and whose rejected one a "bad" phrase.

    The phrase sits at a random place among random filler words, and both replies have random lengths, so
    neither position nor length gives the answer away: the model must find the phrase.
    """
    rng = random.Random(seed)

    def reply(phrase: str) -> str:
        words = [rng.choice(_FILLER) for _ in range(rng.randint(4, 16))]
        words.insert(rng.randint(0, len(words)), phrase)
        return " ".join(words) + "."

    return [
        PreferencePair(
            dialogue=({"role": "user", "content": f"Tell me about {rng.choice(_TOPICS)}."},),
            chosen=reply(_GOOD),
            rejected=reply(_BAD),
            strength=rng.choice(STRENGTHS) if with_strengths else None,
            domain="helpfulness",
            source="synthetic",
        )
        for _ in range(n)
    ]
