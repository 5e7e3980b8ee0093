"""The chunked linear cross-entropy and the token log-probs: the values and gradients of the plain paths."""

import pytest
import torch
import torch.nn.functional as F

from training.llama.loss import linear_cross_entropy, token_logprobs
from training.llama.model import ModelArgs, Transformer


def reference_and_ours(n_tokens, dim, vocab_size, chunk_size, *, ignore=(), scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, dim, generator=g)
    weight = torch.randn(vocab_size, dim, generator=g) * 0.5
    targets = torch.randint(0, vocab_size, (n_tokens,), generator=g)
    targets[list(ignore)] = -100
    results = []
    for fused in (False, True):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        if fused:
            loss = linear_cross_entropy(h, w, targets, chunk_size=chunk_size)
        else:
            loss = F.cross_entropy(h @ w.t(), targets)
        (loss * scale).backward()
        results.append((loss.detach(), h.grad, w.grad))
    return results


@pytest.mark.parametrize(("n_tokens", "chunk_size"), [(37, 8), (37, 37), (37, 1000), (64, 16), (5, 1)])
def test_value_and_gradients_equal_cross_entropy_on_full_logits(n_tokens, chunk_size):
    (ref_loss, ref_h, ref_w), (loss, grad_h, grad_w) = reference_and_ours(n_tokens, 24, 101, chunk_size)
    assert ref_loss > 1.0  # random logits of a wide head: a loss well away from zero
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_h, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-5)


def test_ignore_index_and_a_scaled_loss():
    """Ignored targets add no loss and no gradient; the mean is over the others; grad_output scales both grads."""
    (ref_loss, ref_h, ref_w), (loss, grad_h, grad_w) = reference_and_ours(
        30, 16, 50, chunk_size=7, ignore=(0, 3, 4, 29), scale=2.5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_h, ref_h, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_w, ref_w, atol=1e-5, rtol=1e-5)
    assert grad_h[[0, 3, 4, 29]].abs().max() == 0


def test_positions_without_a_target_never_reach_the_head():
    """Ignored positions are dropped before the head: their hidden states (NaN here) touch neither the loss nor
    the head's gradient, which the plain loss would turn into NaN through its masked rows' zero * NaN."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 8, generator=g)
    weight = torch.randn(30, 8, generator=g)
    targets = torch.randint(0, 30, (20,), generator=g)
    prompt = torch.arange(20) < 12  # a fine-tuning example: no loss on the prompt's 12 tokens
    targets[prompt] = -100
    hidden[prompt] = float("nan")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, chunk_size=3)
    loss.backward()
    ref_h, ref_w = hidden[~prompt].clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ ref_w.t(), targets[~prompt])
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(w.grad, ref_w.grad)
    torch.testing.assert_close(h.grad[~prompt], ref_h.grad)
    assert h.grad[prompt].abs().max() == 0


def test_every_target_ignored_gives_nan_and_zero_gradients_as_cross_entropy():
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((6,), -100))
    assert torch.isnan(loss)
    loss.backward()
    assert hidden.grad.abs().max() == 0
    assert weight.grad.abs().max() == 0


def test_no_grad_gives_the_loss_and_backward_runs_once():
    hidden = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    targets = torch.randint(0, 20, (12,))
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    assert not value.requires_grad
    torch.testing.assert_close(value, F.cross_entropy(hidden @ weight.t(), targets).detach())
    loss = linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk_size=0)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16))
    model.init_weights(std=0.2)
    return model.train()


def test_model_targets_give_the_loss_and_gradients_of_its_logits():
    """model(tokens, targets=...) is F.cross_entropy of model(tokens): the value and every parameter's gradient."""
    model = tiny_model()
    data = torch.randint(0, 97, (3, 41), generator=torch.Generator().manual_seed(1))
    tokens, targets = data[:, :-1], data[:, 1:].clone()
    targets[0, :5] = -100  # e.g. a prompt that is not trained on

    def loss_and_grads(fused):
        model.zero_grad(set_to_none=True)
        if fused:
            loss = model(tokens, targets=targets)
        else:
            loss = F.cross_entropy(model(tokens).reshape(-1, 97), targets.reshape(-1))
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    ref_loss, ref_grads = loss_and_grads(False)
    loss, grads = loss_and_grads(True)
    assert loss.shape == ()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    with pytest.raises(ValueError, match="targets must have the shape of tokens"):
        model(tokens, targets=targets[:, :-1])


def test_bfloat16_model_loss_is_close_to_float32():
    model = tiny_model()
    data = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2))
    reference = model(data[:, :-1], targets=data[:, 1:])
    reference.backward()
    reference_grad = model.output.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    model.to(torch.bfloat16)
    loss = model(data[:, :-1], targets=data[:, 1:])
    loss.backward()
    assert loss.dtype == torch.float32
    assert model.output.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, reference.detach(), atol=0.05, rtol=0.02)
    torch.testing.assert_close(model.output.weight.grad.float(), reference_grad, atol=0.01, rtol=0.1)


def test_under_autocast_the_head_runs_in_the_autocast_dtype_as_nn_linear_does():
    """Under bf16 autocast the head's product takes bf16 inputs (float32 sums), like `F.linear` there."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 32, generator=g)
    weight = torch.randn(101, 32, generator=g)
    targets = torch.randint(0, 101, (40,), generator=g)
    targets[:7] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, chunk_size=16)
        reference = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    loss.backward()
    float32 = F.cross_entropy(hidden @ weight.t(), targets)
    assert (loss - float32).abs() > 1e-4  # bf16 inputs move the loss measurably ...
    torch.testing.assert_close(loss, reference, atol=2e-5, rtol=2e-5)  # ... to what autocast's F.linear gives
    assert loss.dtype == torch.float32
    assert w.grad.dtype == torch.float32  # the parameters' gradients stay in their dtype
    assert h.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------ token_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_gradients_equal_log_softmax_gather(temperature):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(3, 5, 24, generator=g), torch.randn(101, 24, generator=g) * 0.3
    targets = torch.randint(0, 101, (3, 5), generator=g)
    upstream = torch.randn(3, 5, generator=g)  # a loss that weighs each token differently, as PPO's does
    results = []
    for fused in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            logprobs, entropy = token_logprobs(h, w, targets, temperature=temperature, entropy=True)
        else:
            log_p = F.log_softmax((h @ w.t()) / temperature, dim=-1)
            logprobs, entropy = log_p.gather(-1, targets[..., None]).squeeze(-1), -(log_p.exp() * log_p).sum(-1)
        (logprobs * upstream).sum().backward()
        results.append((logprobs.detach(), entropy.detach(), h.grad, w.grad))
    (ref_lp, ref_ent, ref_h, ref_w), (lp, ent, grad_h, grad_w) = results
    assert lp.shape == ent.shape == (3, 5)
    assert ref_ent.min() > 1.0
    for got, want in zip((lp, ent, grad_h, grad_w), (ref_lp, ref_ent, ref_h, ref_w), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_token_logprobs_without_entropy_under_no_grad_and_backward_once():
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8)
    targets = torch.tensor([0, 3, 10, 3])
    with torch.no_grad():
        logprobs, entropy = token_logprobs(hidden, weight, targets)
    assert entropy is None
    assert logprobs.grad_fn is None
    torch.testing.assert_close(logprobs, F.log_softmax(hidden @ weight.t(), -1)[torch.arange(4), targets])
    out, _ = token_logprobs(hidden, weight, targets)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        out.sum().backward()
    with pytest.raises(ValueError, match="do not fit"):
        token_logprobs(hidden, weight, targets[:3])
