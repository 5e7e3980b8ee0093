import math

import pytest
import torch

from rewards.losses import MARGIN_SCHEMES, STRENGTHS, pairwise_ranking_loss, strength_margin, strength_margins


def test_loss_matches_the_formula_exactly():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([1.0, 0.0, 1.0])
    expected = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(0.5) + math.log(1 / (1 + math.exp(2.0)))) / 3
    torch.testing.assert_close(pairwise_ranking_loss(chosen, rejected), torch.tensor(expected))


def test_equal_scores_give_ln2():
    torch.testing.assert_close(pairwise_ranking_loss(torch.zeros(4), torch.zeros(4)), torch.tensor(math.log(2.0)))


def test_margin_is_subtracted_from_the_difference():
    chosen, rejected = torch.tensor([3.0, 1.0]), torch.tensor([0.0, 0.0])
    margin = torch.tensor([3.0, 1.0])
    # with the margin equal to the difference every pair sits at ln 2
    torch.testing.assert_close(pairwise_ranking_loss(chosen, rejected, margin), torch.tensor(math.log(2.0)))
    # a margin makes the loss larger for the same scores
    assert pairwise_ranking_loss(chosen, rejected, 0.5) > pairwise_ranking_loss(chosen, rejected)


def test_loss_is_stable_for_large_differences():
    loss = pairwise_ranking_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    torch.testing.assert_close(loss, torch.tensor(400.0))
    assert torch.isfinite(pairwise_ranking_loss(torch.tensor([200.0]), torch.tensor([-200.0])))


def test_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.zeros(2, requires_grad=True)
    rejected = torch.zeros(2, requires_grad=True)
    pairwise_ranking_loss(chosen, rejected).backward()
    torch.testing.assert_close(chosen.grad, torch.tensor([-0.25, -0.25]))
    torch.testing.assert_close(rejected.grad, torch.tensor([0.25, 0.25]))


def test_table_27_margins():
    assert [MARGIN_SCHEMES["large"][s] for s in STRENGTHS] == [3.0, 2.0, 1.0, 0.0]
    torch.testing.assert_close(
        strength_margins(list(STRENGTHS), "small"), torch.tensor([1.0, 2 / 3, 1 / 3, 0.0])
    )
    assert strength_margins(list(STRENGTHS), "none").abs().sum() == 0
    assert strength_margin(None, "large") == 0.0


def test_unknown_strength_or_scheme_is_an_error():
    with pytest.raises(ValueError, match="unknown preference strength"):
        strength_margin("much_better", "small")
    with pytest.raises(ValueError, match="unknown margin scheme"):
        strength_margin("better", "huge")
    with pytest.raises(ValueError, match="shape"):
        pairwise_ranking_loss(torch.zeros(2), torch.zeros(3))


def test_label_smoothing_weighs_the_reversed_label():
    chosen, rejected = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0])
    d = chosen - rejected
    expected = -(0.9 * torch.nn.functional.logsigmoid(d) + 0.1 * torch.nn.functional.logsigmoid(-d)).mean()
    torch.testing.assert_close(pairwise_ranking_loss(chosen, rejected, label_smoothing=0.1), expected)
    # its minimum is at a finite difference, log(0.9 / 0.1)
    at = torch.tensor([math.log(9.0)], requires_grad=True)
    pairwise_ranking_loss(at, torch.zeros(1), label_smoothing=0.1).backward()
    assert abs(float(at.grad)) < 1e-6
    assert pairwise_ranking_loss(chosen, rejected, label_smoothing=0.0) == pairwise_ranking_loss(chosen, rejected)


@pytest.mark.parametrize("bad", [-0.1, 0.5])
def test_label_smoothing_must_leave_the_label_in_charge(bad):
    with pytest.raises(ValueError, match="label_smoothing"):
        pairwise_ranking_loss(torch.zeros(1), torch.zeros(1), label_smoothing=bad)
