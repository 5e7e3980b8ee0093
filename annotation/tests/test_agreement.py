import pytest

from annotation.agreement import krippendorff_alpha, percent_agreement
from annotation.scales import MARGINS, Strength, signed_preference

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 coders, 12 units, missing values.
KRIPPENDORFF_UNITS = [
    [1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4],
    [4, 4, 4, 4], [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3],
]  # fmt: skip


def test_alpha_matches_krippendorffs_worked_example():
    assert krippendorff_alpha(KRIPPENDORFF_UNITS, level="nominal") == pytest.approx(0.743, abs=1e-3)
    assert krippendorff_alpha(KRIPPENDORFF_UNITS, level="ordinal") == pytest.approx(0.815, abs=1e-3)


def test_alpha_edges():
    assert krippendorff_alpha([["a", "a"], ["b", "b"]]) == pytest.approx(1.0)
    assert krippendorff_alpha([["a"], ["b"]]) is None  # nothing pairable
    assert krippendorff_alpha([["a", "b"], ["b", "a"]]) < 0  # systematic disagreement
    with pytest.raises(ValueError, match="level"):
        krippendorff_alpha([[1, 2]], level="ratio")


def test_percent_agreement_counts_pairs():
    assert percent_agreement([["a", "a", "b"]]) == pytest.approx(1 / 3)
    assert percent_agreement([["a", "a"], ["a", "b"]]) == pytest.approx(0.5)
    assert percent_agreement([["a"]]) is None


def test_table_27_margins_and_signed_scale():
    assert [MARGINS["small"][s] for s in Strength] == pytest.approx([1, 2 / 3, 1 / 3, 0])
    assert [MARGINS["large"][s] for s in Strength] == [3, 2, 1, 0]
    assert signed_preference("a", "significantly_better") == 4
    assert signed_preference("b", "negligibly_better") == -1


def test_units_may_be_given_as_counts_of_their_values():
    units = [["a", "a", "b"], ["b", "a", "a"], ["a", "a"], ["b", "b", "a"]]
    counts = {("a", "a", "b"): 1, ("a", "b", "a"): 1, ("a", "a"): 1, ("a", "b", "b"): 1}  # one order or another
    assert percent_agreement(counts) == pytest.approx(percent_agreement(units))
    assert krippendorff_alpha(counts) == pytest.approx(krippendorff_alpha(units))
    assert krippendorff_alpha({(1, 2, 2): 3, (4, 4): 2}, level="ordinal") == pytest.approx(
        krippendorff_alpha([[1, 2, 2]] * 3 + [[4, 4]] * 2, level="ordinal"))
