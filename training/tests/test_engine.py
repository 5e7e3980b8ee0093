"""The shared engine's optimizer step: clipping exactly as clip_grad_norm_, without its pass when under the limit."""

import copy

import pytest
import torch
from torch import nn

from training.engine import Engine, OptimizerSettings, setup_distributed


@pytest.mark.parametrize("scale", [10.0, 0.01, float("nan")])
def test_the_step_clips_the_gradients_as_clip_grad_norm_does_and_returns_the_norm(scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    engine = Engine(model, OptimizerSettings(learning_rate=1e-3, grad_clip=1.0), total_steps=1,
                    dist=setup_distributed("cpu"))
    grads = [torch.randn_like(p) * scale for p in model.parameters()]
    expected = [g.clone() for g in grads]
    reference = copy.deepcopy(model)
    for p, g in zip(reference.parameters(), expected, strict=True):
        p.grad = g
    want_norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 1.0)
    seen = []
    engine.optimizer.register_step_pre_hook(  # the gradients AdamW is given
        lambda optimizer, args, kwargs: seen.extend(p.grad.clone() for p in model.parameters()))
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g
    norm = engine.optimizer_step()
    torch.testing.assert_close(torch.tensor(norm), want_norm, equal_nan=True)
    for got, want in zip(seen, (p.grad for p in reference.parameters()), strict=True):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    if scale == 0.01:  # under the limit: the very same tensors, untouched
        assert all(torch.equal(a, b) for a, b in zip(seen, grads, strict=True))
