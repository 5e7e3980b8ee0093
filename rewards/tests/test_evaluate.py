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


def test_an_ensemble_is_evaluated_with_one_pass_of_each_member():
    from rewards.data import collate_pairs
    from rewards.evaluate import evaluate_items
    from rewards.model import EnsembleRewardModel, RewardModel
    from training.llama.model import ModelArgs

    torch.manual_seed(0)
    args = ModelArgs.preset("tiny", vocab_size=32)
    ensemble = EnsembleRewardModel([RewardModel.from_args(args) for _ in range(3)])
    items = [_item("better", chosen_len=3 + i % 4, rejected_len=2 + i % 5) for i in range(10)]
    calls = [0, 0, 0]
    for i, member in enumerate(ensemble.members):
        member.register_forward_hook(lambda module, args, out, i=i: calls.__setitem__(i, calls[i] + 1))
    report = evaluate_items(ensemble, items, batch_size=4)
    assert calls == [3, 3, 3]  # 10 pairs in batches of 4: three passes of each member, not six
    tokens, lengths, _ = collate_pairs(items)  # one batch: chosen then rejected
    with torch.no_grad():
        scores = ensemble(tokens, lengths=lengths)  # the ensemble's own scores: its members' mean
    assert report["mean_margin"] == pytest.approx(float((scores[:10] - scores[10:]).mean()), abs=1e-6)
    member_margins = [m["mean_margin"] for m in report["ensemble"]["members"]]
    assert report["mean_margin"] == pytest.approx(sum(member_margins) / 3, abs=1e-6)
    assert len(set(member_margins)) == 3
