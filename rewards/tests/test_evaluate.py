import pytest
import torch

from rewards.data import TokenizedPair
from rewards.evaluate import build_report, calibration, format_markdown


def _item(strength, domain="helpfulness", batch="b1", chosen_len=3, rejected_len=4):
    return TokenizedPair(tuple(range(chosen_len)), tuple(range(rejected_len)), 0.0, strength, domain, batch)


def test_report_breaks_accuracy_down_by_strength_domain_and_batch():
    items = [
        _item("significantly_better"), _item("significantly_better"),
        _item("better", domain="safety"), _item("better", domain="safety", batch="b2"),
        _item("slightly_better", batch="b2"), _item(None, chosen_len=5),
    ]
    chosen = torch.tensor([2.0, 1.0, 1.0, 0.0, 0.0, 3.0])
    rejected = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # wrong: pair 4 (reversed) and pair 5 (a tie)
    report = build_report(chosen, rejected, items)
    assert report["n_pairs"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["mean_margin"] == pytest.approx((2 + 1 + 1 - 1 + 0 + 3) / 6)
    by_strength = report["by_strength"]
    assert list(by_strength) == ["significantly_better", "better", "slightly_better", "negligibly_better", "unknown"]
    assert by_strength["significantly_better"] == {"n": 2, "accuracy": 1.0}
    assert by_strength["better"] == {"n": 2, "accuracy": 0.5}
    assert by_strength["slightly_better"] == {"n": 1, "accuracy": 0.0}
    assert by_strength["negligibly_better"] == {"n": 0, "accuracy": None}
    assert report["by_domain"]["safety"] == {"n": 2, "accuracy": 0.5}
    assert report["by_batch"]["b2"] == {"n": 2, "accuracy": 0.0}
    assert report["length_rule_accuracy"] == pytest.approx(5 / 6)


def test_calibration_of_sigmoid_score_differences():
    # four pairs at confidence sigmoid(3) = 0.95, three of them right: a gap of 0.20
    diff = torch.tensor([3.0, 3.0, 3.0, -3.0])
    result = calibration(diff)
    top = result["bins"][-1]
    assert top["n"] == 4
    assert top["accuracy"] == pytest.approx(0.75)
    assert result["ece"] == pytest.approx(float(torch.sigmoid(torch.tensor(3.0))) - 0.75, abs=1e-6)
    assert result["log_loss"] == pytest.approx(float(-torch.nn.functional.logsigmoid(diff).mean()))
    assert sum(b["n"] for b in result["bins"]) == 4


def test_markdown_table_has_the_layout_of_table_8():
    items = [_item("significantly_better"), _item("negligibly_better")]
    report = build_report(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.0]), items)
    table = format_markdown({"Meta Helpful": report})
    header, rule, row = table.splitlines()
    assert header.startswith("| Test set | Significantly Better | Better | Slightly Better | Negligibly Better / Unsure | Avg")
    assert row.startswith("| Meta Helpful | 100.0 (n=1) | - | - | 0.0 (n=1) | 50.0 | 2 |")
