"""Inter-annotator agreement: pairwise percent agreement and Krippendorff's alpha. Plain Python."""

from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from itertools import permutations

# The values of each unit, or a mapping from a unit's values to how many units have them (as a database can
# count them, without sending every unit).
Units = Iterable[Sequence[Hashable]] | Mapping[tuple, int]

# The metrics of krippendorff_alpha (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability").
LEVELS = ("nominal", "ordinal", "interval")


def percent_agreement(units: Units) -> float | None:
    """Share of annotator pairs within the same unit that gave the same value; None without pairs."""
    agree = pairs = 0
    for values, n_units in _distinct_units(units).items():
        m = len(values)
        pairs += n_units * (m * (m - 1) // 2)
        agree += n_units * sum(c * (c - 1) // 2 for c in Counter(values).values())
    return agree / pairs if pairs else None


def _distinct_units(units: Units) -> dict[tuple, int]:
    """Distinct units (as multisets of values) and how often each occurs: a batch of 100,000 tasks has only a
    few dozen distinct ones. Values need only be hashable."""
    counts: Counter = Counter()
    if isinstance(units, Mapping):
        for values, times in units.items():
            counts[frozenset(Counter(values).items())] += times
    else:
        counts.update(frozenset(Counter(values).items()) for values in units)
    return {tuple(v for v, n in unit for _ in range(n)): times for unit, times in counts.items()}


def krippendorff_alpha(units: Units, *, level: str = "nominal") -> float | None:
    """Krippendorff's alpha over units of values (units with fewer than two values are not pairable).

    `level` is "nominal" (any difference counts 1), "ordinal" (values are ordered; the distance
    between two values grows with how many judgements fall between them) or "interval" (numbers; the
    squared difference, as for a Likert scale read as equally spaced). None when undefined.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(map(repr, LEVELS))}, got {level!r}")
    coincidence: dict[tuple, float] = defaultdict(float)
    for values, n_units in _distinct_units(units).items():
        m = len(values)
        if m < 2:
            continue
        for a, b in permutations(values, 2):
            coincidence[(a, b)] += n_units / (m - 1)
    if not coincidence:
        return None
    marginals: dict = defaultdict(float)
    for (a, _b), w in coincidence.items():
        marginals[a] += w
    n = sum(marginals.values())
    categories = sorted(marginals)
    if len(categories) < 2:
        return None  # everyone gave the same single value: agreement is perfect but alpha is undefined

    if level == "nominal":

        def delta(a, b) -> float:
            return 0.0 if a == b else 1.0

    elif level == "interval":

        def delta(a, b) -> float:
            return float(a - b) ** 2

    else:
        index = {c: i for i, c in enumerate(categories)}

        def delta(a, b) -> float:
            lo, hi = sorted((index[a], index[b]))
            between = sum(marginals[categories[g]] for g in range(lo, hi + 1))
            return (between - (marginals[a] + marginals[b]) / 2) ** 2

    observed = sum(w * delta(a, b) for (a, b), w in coincidence.items()) / n
    expected = sum(marginals[a] * marginals[b] * delta(a, b) for a in categories for b in categories) / (n * (n - 1))
    return 1.0 - observed / expected if expected else None
