"""Rule-based reward functions the tests name as `--reward-fn training.tests.reward_functions:NAME`."""

import re


def says_the_cat_sat(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for an answer that starts with "The cat sat", else 0."""
    return [1.0 if r.strip().startswith("The cat sat") else 0.0 for r in responses]


def wrong_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0]


def not_a_number(prompts: list[str], responses: list[str]) -> list[object]:
    return ["high" for _ in responses]


def share_of_letter_e(prompts: list[str], responses: list[str]) -> list[float]:
    """The share of an answer's characters that are an "e" (a reward that one piece of the vocabulary earns)."""
    return [r.count("e") / max(1, len(r)) * 10 for r in responses]


def response_length(prompts: list[str], responses: list[str]) -> list[float]:
    """The answer's length in tens of characters (many distinct values: a clear argmax)."""
    return [len(r) / 10 for r in responses]


def shortness(prompts: list[str], responses: list[str]) -> list[float]:
    """Minus the answer's length in tens of characters: the opposite judge of response_length."""
    return [-len(r) / 10 for r in responses]


def mentions_a_dog(prompts: list[str], responses: list[str]) -> list[float]:
    """How many times the answer says "dog" (stories260K writes it in about one answer of ten)."""
    return [float(len(re.findall(r"\bdogs?\b", r.lower()))) for r in responses]


def fails_on_small_batches(prompts: list[str], responses: list[str]) -> list[float]:
    """share_of_letter_e, but a ValueError for fewer than 4 answers (a held-out evaluation of 2 prompts)."""
    if len(responses) < 4:
        raise ValueError("this judge needs at least 4 answers")
    return share_of_letter_e(prompts, responses)
