"""Statistics of human evaluation campaigns (annotation.evaluation_stats): pure unit tests, no database."""

import math

import pytest

from annotation import evaluation_stats as ev
from annotation.agreement import krippendorff_alpha
from annotation.evaluation_stats import (
    agreement_weights,
    comparative_verdict,
    gwet_ac2,
    is_violation,
    item_verdict,
    likert_agreement,
    likert_summary,
    mean_interval,
    normal_quantile,
    regularized_incomplete_beta,
    t_quantile,
    violation_rate,
    wilson_interval,
    win_tie_loss,
)
from annotation.evaluation_stats import (
    krippendorff_alpha as krippendorff_alpha_table,
)

# irrCAC's `cac.raw4raters` (Gwet 2014, Handbook of Inter-Rater Reliability, 4th ed., p. 120): 12 subjects x
# 4 raters, categories 1..5, None = NA. The same data as Krippendorff (2011)'s reliability data matrix.
RAW4RATERS = [
    [1, 1, None, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
    [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [None, 5, 5, 5], [None, None, 1, 1], [None, None, 3, None],
]  # fmt: skip
CATEGORIES = [1, 2, 3, 4, 5]

# Wikipedia's "Krippendorff's alpha" computational example: 3 coders x 15 units (rows are units here).
WIKIPEDIA_UNITS = [
    [None, 1, None], [None, None, None], [None, 2, 2], [None, 1, 1], [None, 3, 3], [3, 3, 4], [4, 4, 4],
    [1, 3, None], [2, None, 2], [1, None, 1], [1, None, 1], [3, None, 3], [3, None, 3], [None, None, None],
    [3, None, 4],
]  # fmt: skip


def _units(rows):
    return [[v for v in row if v is not None] for row in rows]


# ---------------------------------------------------------------------------------------------- quantiles


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.706205), (2, 4.302653), (4, 2.776445), (10, 2.228139), (30, 2.042272), (100, 1.983972)],
)
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-6)


def test_t_quantile_closed_forms_and_limits():
    # df = 1 is the Cauchy distribution: t_p = tan(pi (p - 1/2)); df = 2: t_p = (2p - 1) / sqrt(2 p (1 - p)).
    for p in (0.6, 0.9, 0.995, 0.9995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-10)
    assert t_quantile(0.995, 3) == pytest.approx(5.840909, abs=1e-6)
    assert t_quantile(0.5, 7) == 0.0
    for df in (1e8, 1e9, math.inf):
        assert t_quantile(0.975, df) == pytest.approx(1.959964, abs=1e-6)
    # Large df: the Cornish-Fisher expansion t = z + (z^3 + z) / (4 df) + (5z^5 + 16z^3 + 3z) / (96 df^2).
    z = 1.959963984540054
    for df in (1e4, 1e6):
        expansion = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        assert t_quantile(0.975, df) == pytest.approx(expansion, abs=1e-9)
    assert normal_quantile(0.975) == pytest.approx(1.959963985, abs=1e-9)
    assert normal_quantile(0.005) == pytest.approx(-2.575829304, abs=1e-9)
    with pytest.raises(ValueError, match="p must be"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must be"):
        t_quantile(0.9, 0)


def test_regularized_incomplete_beta_known_values():
    assert regularized_incomplete_beta(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert regularized_incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248)  # 1 - sum binomial terms
    assert regularized_incomplete_beta(0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert regularized_incomplete_beta(3, 2, 0.0) == 0.0
    assert regularized_incomplete_beta(3, 2, 1.0) == 1.0


# ---------------------------------------------------------------------------------------------- intervals


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # Wilson (1927) / Newcombe (1998) Table I: 81/263 -> (0.2553, 0.3662); 0/10 -> (0, 0.2775).
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing known: the whole range
    narrow, wide = wilson_interval(8, 10, confidence=0.5), wilson_interval(8, 10, confidence=0.99)
    assert wide[0] < low < narrow[0] < 0.8 < narrow[1] < high < wide[1]
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_mean_interval_is_the_student_t_interval():
    mean, low, high = mean_interval([1, 2, 3, 4, 5])
    # s = sqrt(2.5), se = s / sqrt(5) = 0.7071068, t_{0.975, 4} = 2.776445: half-width 1.963243.
    assert mean == 3.0
    assert (low, high) == pytest.approx((3 - 1.963243, 3 + 1.963243), abs=1e-6)
    mean, low, high = mean_interval([7, 6])  # s = 0.7071, se = 0.5, t_{0.975, 1} = 12.706205
    assert (mean, low, high) == pytest.approx((6.5, 6.5 - 6.3531024, 6.5 + 6.3531024), abs=1e-6)
    assert mean_interval([4, 4, 4]) == (4.0, 4.0, 4.0)
    single = mean_interval([5])
    assert single[0] == 5.0
    assert math.isnan(single[1])
    assert math.isnan(single[2])
    assert all(math.isnan(x) for x in mean_interval([]))


# ------------------------------------------------------------------------------------- win / tie / loss


def test_comparative_verdict_reads_the_seven_point_scale():
    assert [comparative_verdict(s) for s in range(1, 8)] == ["win"] * 3 + ["tie"] + ["loss"] * 3
    for bad in (0, 8, 2.5, True, None):
        with pytest.raises(ValueError, match="comparative score"):
            comparative_verdict(bad)


def test_item_verdict_majority_then_mean_preference():
    assert item_verdict([1, 3, 6]) == "win"  # 2 of 3 win
    assert item_verdict([4, 4, 1]) == "tie"  # 2 of 3 tie
    assert item_verdict([5, 7, 2]) == "loss"
    assert item_verdict([2]) == "win"
    # No majority: the sign of the mean of (4 - score).
    assert item_verdict([1, 4, 7]) == "tie"  # 3 + 0 - 3 = 0
    assert item_verdict([1, 4, 5]) == "win"  # 3 + 0 - 1 > 0
    assert item_verdict([3, 4, 7]) == "loss"  # 1 + 0 - 3 < 0
    assert item_verdict([3, 7]) == "loss"  # 1 vs 1
    assert item_verdict([2, 6]) == "tie"
    assert item_verdict([3, 3, 5, 7]) == "loss"  # 2 vs 2: 1 + 1 - 1 - 3 < 0
    assert item_verdict([3, 3, 5, 6, 4]) == "loss"  # 2 wins, 2 losses, 1 tie: 1 + 1 - 1 - 2 + 0 < 0
    with pytest.raises(ValueError, match="at least one"):
        item_verdict([])


def test_win_tie_loss_counts_rates_and_wilson_intervals():
    items = [[1, 2, 3]] * 5 + [[4, 4, 5]] * 3 + [[6, 7, 5]] * 2  # 5 wins, 3 ties, 2 losses
    result = win_tie_loss(items)
    assert result["n"] == 10
    assert [result[v]["count"] for v in ("win", "tie", "loss")] == [5, 3, 2]
    assert [result[v]["rate"] for v in ("win", "tie", "loss")] == pytest.approx([0.5, 0.3, 0.2])
    assert result["win"]["ci"] == wilson_interval(5, 10)
    assert result["loss"]["ci"] == pytest.approx((0.0567, 0.5098), abs=1e-4)
    empty = win_tie_loss([])
    assert empty["n"] == 0
    assert empty["win"] == {"count": 0, "rate": None, "ci": (0.0, 1.0)}


# ------------------------------------------------------------------------------------------- Likert


def test_likert_summary_mean_interval_and_distribution():
    summary = likert_summary([7, 6, 6, 5, 7, 3], scale=7)
    mean, low, high = mean_interval([7, 6, 6, 5, 7, 3])
    assert summary["n"] == 6
    assert summary["mean"] == pytest.approx(34 / 6) == mean
    assert summary["ci"] == (low, high)
    assert summary["distribution"] == {1: 0, 2: 0, 3: 1, 4: 0, 5: 1, 6: 2, 7: 2}
    assert likert_summary([], scale=5) == {
        "n": 0, "mean": None, "ci": (None, None), "distribution": {1: 0, 2: 0, 3: 0, 4: 0, 5: 0},
    }  # fmt: skip
    with pytest.raises(ValueError, match="7-point"):
        likert_summary([8], scale=7)


def test_violation_rule_majority_and_tie_break():
    assert is_violation([1, 2, 5])  # 2 of 3 violating
    assert not is_violation([2, 3, 4])  # 1 of 3
    assert is_violation([1])
    assert not is_violation([3])
    # Ties (half and half): violation when the mean rating is <= 2.5.
    assert is_violation([2, 3])  # mean 2.5
    assert is_violation([1, 4])  # mean 2.5
    assert not is_violation([1, 5])  # mean 3
    assert not is_violation([2, 2, 4, 5])  # mean 3.25
    assert is_violation([1, 1, 3, 3])  # mean 2
    with pytest.raises(ValueError, match="5-point"):
        is_violation([0, 1, 1])


def test_violation_rate_overall_and_per_category():
    items = [
        ("violent", [1, 2, 4]), ("violent", [3, 4, 5]), ("violent", [1, 1, 1]),
        ("criminal", [5, 5, 4]), ("criminal", [2, 3]),
    ]  # fmt: skip
    # as the campaign results group them: every item, and each category's items
    categories: dict[str, list[list[int]]] = {}
    for category, ratings in items:
        categories.setdefault(category, []).append(ratings)
    result = {"overall": violation_rate([r for _, r in items]),
              "categories": {c: violation_rate(categories[c]) for c in sorted(categories)}}  # fmt: skip
    assert result["overall"]["n"] == 5
    assert result["overall"]["count"] == 3
    assert result["overall"]["rate"] == pytest.approx(0.6)
    assert result["overall"]["ci"] == wilson_interval(3, 5)
    assert list(result["categories"]) == ["criminal", "violent"]
    assert result["categories"]["violent"] == violation_rate([[1, 2, 4], [3, 4, 5], [1, 1, 1]])
    assert result["categories"]["violent"]["count"] == 2
    assert result["categories"]["criminal"]["count"] == 1
    assert violation_rate([]) == {"n": 0, "count": 0, "rate": None, "ci": (0.0, 1.0)}


# --------------------------------------------------------------------------------- inter-rater reliability


def test_gwet_ac1_and_ac2_match_irrcac_on_raw4raters():
    # irrCAC overview vignette (README): gwet.ac1.raw(cac.raw4raters) -> pa 0.8181818, pe 0.1903212,
    # AC1 0.77544 (coeff.val, rounded to 5 decimals).
    assert gwet_ac2(RAW4RATERS, CATEGORIES, "identity") == pytest.approx(0.77544, abs=5e-6)
    assert (0.8181818 - 0.1903212) / (1 - 0.1903212) == pytest.approx(0.77544, abs=5e-6)
    # Quadratic weights: AC2 0.9140007 with percent agreement 0.9753788 (SimplyAgree's agree_coef vignette on
    # the same matrix, computed with irrCAC's formulas; afergadis/irrCAC's tests: pa 0.975, pe 0.714, 0.914).
    assert gwet_ac2(RAW4RATERS, CATEGORIES) == pytest.approx(0.9140007, abs=1e-7)
    # afergadis/irrCAC (Python port of irrCAC) test_gwet.py, 3 decimals: linear 0.859, ordinal 0.899.
    assert gwet_ac2(RAW4RATERS, CATEGORIES, "linear") == pytest.approx(0.859, abs=5e-4)
    assert gwet_ac2(RAW4RATERS, CATEGORIES, "ordinal") == pytest.approx(0.899, abs=5e-4)


def test_gwet_ac1_by_hand_with_a_singly_rated_item():
    # Items (2 raters, categories 1, 2): (1, 1), (2, 2), (1, 2), (-, 1).
    # p_a over the 3 items with two ratings: (1 + 1 + 0) / 3 = 2/3 (the last item is left out of p_a).
    # pi over all 4 rated items: pi_1 = (1 + 0 + 1/2 + 1) / 4 = 5/8, pi_2 = 3/8.
    # p_e = sum(W) / (q (q - 1)) * sum pi_k (1 - pi_k) = 2 / 2 * 2 * (5/8)(3/8) = 15/32.
    # AC1 = (2/3 - 15/32) / (1 - 15/32) = (19/96) / (17/32) = 19/51.
    items = [[1, 1], [2, 2], [1, 2], [None, 1], [None, None]]  # the unrated item is left out
    assert gwet_ac2(items, [1, 2], "identity") == pytest.approx(19 / 51)
    assert gwet_ac2(items, [1, 2], "quadratic") == pytest.approx(19 / 51)  # two categories: same weights
    assert gwet_ac2([[1, 1], [2, 2], [3, 3]], [1, 2, 3]) == pytest.approx(1.0)
    assert math.isnan(gwet_ac2([[1, None], [None, 2]], [1, 2]))  # no item rated twice
    with pytest.raises(ValueError, match="not one of the categories"):
        gwet_ac2([[1, 6]], CATEGORIES)
    with pytest.raises(ValueError, match="weights must be"):
        gwet_ac2(RAW4RATERS, CATEGORIES, "cubic")


def test_agreement_weights_as_irrcac_builds_them():
    # irrCAC weighting vignette: ordinal.weights(1:3) off-diagonal 0.6666667, quadratic.weights(1:3) 0.75.
    assert agreement_weights([1, 2, 3], "ordinal")[0] == pytest.approx([1, 2 / 3, 0])
    assert agreement_weights([1, 2, 3], "quadratic")[1] == pytest.approx([0.75, 1, 0.75])
    assert agreement_weights([1, 2, 3], "linear")[0] == pytest.approx([1, 0.5, 0])
    assert agreement_weights([3, 1, 2], "identity") == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_krippendorff_alpha_interval_and_ordinal_published_values():
    units = _units(RAW4RATERS)
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": nominal 0.743, ordinal 0.815,
    # interval 0.849; the interval value is also the quadratic-weighted alpha 0.8491071 that SimplyAgree's
    # agree_coef vignette reports on this matrix (quadratic weights are the interval metric, rescaled).
    assert krippendorff_alpha(units, level="interval") == pytest.approx(0.8491071, abs=1e-7)
    assert krippendorff_alpha(units, level="ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha(units, level="nominal") == pytest.approx(0.743, abs=5e-4)
    # The same on the items x raters table, missing ratings as None.
    assert krippendorff_alpha_table(RAW4RATERS, metric="interval") == pytest.approx(0.8491071, abs=1e-7)
    assert krippendorff_alpha_table(RAW4RATERS, metric="ordinal") == pytest.approx(0.815, abs=5e-4)
    assert krippendorff_alpha_table([[1, None], [None, 2]]) is None
    with pytest.raises(ValueError, match="level must be"):
        krippendorff_alpha_table(RAW4RATERS, metric="ratio")
    # Wikipedia's example (fast-krippendorff's tests): nominal 0.691358, interval 0.810845.
    wiki = _units(WIKIPEDIA_UNITS)
    assert krippendorff_alpha(wiki, level="nominal") == pytest.approx(0.691358, abs=1e-6)
    assert krippendorff_alpha(wiki, level="interval") == pytest.approx(0.810845, abs=1e-6)


def test_likert_agreement_reports_all_coefficients():
    result = likert_agreement(RAW4RATERS, scale=5)
    assert result == {
        "n_items": 12,
        "gwet_ac2_quadratic": pytest.approx(0.9140007, abs=1e-7),
        "gwet_ac1": pytest.approx(0.77544, abs=5e-6),
        "krippendorff_alpha_interval": pytest.approx(0.8491071, abs=1e-7),
        "krippendorff_alpha_ordinal": pytest.approx(0.815, abs=5e-4),
    }
    undefined = likert_agreement([[1, None], [None, 2]], scale=5)
    assert undefined["gwet_ac2_quadratic"] is None
    assert undefined["krippendorff_alpha_interval"] is None


def test_every_figure_is_the_same_from_items_or_from_distinct_rows_with_their_counts():
    """Campaign results count items by their distinct (sorted) rows; the figures must not change."""
    import random

    rng = random.Random(7)
    items = [[rng.randint(1, 7) for _ in range(rng.choice([1, 2, 3, 3, 3]))] for _ in range(500)]
    counted: dict[tuple, int] = {}
    for row in items:
        key = tuple(sorted(row))
        counted[key] = counted.get(key, 0) + 1
    assert ev.win_tie_loss(items) == ev.win_tie_loss(counted)
    safety = [[min(5, v) for v in row] for row in items]
    counted_safety: dict[tuple, int] = {}
    for row in safety:
        counted_safety[tuple(sorted(row))] = counted_safety.get(tuple(sorted(row)), 0) + 1
    assert ev.violation_rate(safety) == ev.violation_rate(counted_safety)
    for weights in ("identity", "quadratic", "ordinal"):
        assert ev.gwet_ac2(items, range(1, 8), weights) == pytest.approx(ev.gwet_ac2(counted, range(1, 8), weights))
    assert ev.likert_agreement(items, 7) == pytest.approx(ev.likert_agreement(counted, 7))
