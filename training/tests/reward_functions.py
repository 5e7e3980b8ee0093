"""Rule-based reward functions the tests name as `--reward-fn training.tests.reward_functions:NAME`."""


def says_the_cat_sat(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for an answer that starts with "The cat sat", else 0."""
    return [1.0 if r.strip().startswith("The cat sat") else 0.0 for r in responses]


def wrong_length(prompts: list[str], responses: list[str]) -> list[float]:
    return [0.0]


def not_a_number(prompts: list[str], responses: list[str]) -> list[object]:
    return ["high" for _ in responses]
