"""Grouped-query attention: the kernel's shared heads or repeated ones, the same result on each path."""

import pytest
import torch
import torch.nn.functional as F

import training.llama.attention as attention_module
from training.llama.attention import attention, shares_kv_heads_in_kernel
from training.llama.model import Attention, ModelArgs, precompute_freqs_cis, repeat_kv


def test_cuda_repeats_the_heads_where_only_the_math_backend_would_take_enable_gqa():
    flash = dict(masked=False, head_dim=128, capability=(9, 0))
    # CUDA's flash backend is the only one with enable_gqa: bf16/fp16, no mask, head_dim <= 256, sm80 or newer
    assert shares_kv_heads_in_kernel("cuda", torch.bfloat16, **flash)
    assert shares_kv_heads_in_kernel("cuda", torch.float16, **{**flash, "capability": (8, 0)})
    assert not shares_kv_heads_in_kernel("cuda", torch.bfloat16, **{**flash, "masked": True})
    assert not shares_kv_heads_in_kernel("cuda", torch.float32, **flash)
    assert not shares_kv_heads_in_kernel("cuda", torch.bfloat16, **{**flash, "head_dim": 320})
    assert not shares_kv_heads_in_kernel("cuda", torch.float16, **{**flash, "capability": (7, 0)})  # V100
    # CPU's flash kernel takes enable_gqa with a mask and in float32
    assert shares_kv_heads_in_kernel("cpu", torch.float32, masked=True, head_dim=64)


class _SDPASpy:
    """Records the key heads and enable_gqa of each SDPA call, and makes it."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, **kwargs):
        self.calls.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return _SDPA(q, k, v, **kwargs)


_SDPA = F.scaled_dot_product_attention


@pytest.mark.parametrize("kernel_shares", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_each_path_gives_attention_over_repeated_heads_and_calls_sdpa_as_decided(monkeypatch, kernel_shares, masked):
    asked = []

    def decide(device_type, dtype, *, masked, head_dim, capability=None):
        asked.append((device_type, masked, head_dim))
        return kernel_shares

    monkeypatch.setattr(attention_module, "shares_kv_heads_in_kernel", decide)
    spy = _SDPASpy()
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = torch.rand(2, 1, 5, 7) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True  # no query without a key
    repeated = [repeat_kv(t.transpose(1, 2), 4).transpose(1, 2) for t in (k, v)]
    expected = _SDPA(q, *repeated, attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, attn_mask=mask), expected, atol=1e-6, rtol=1e-5)
    assert asked == [("cpu", masked, 16)]
    # the kernel shares the 2 key/value heads, or gets them repeated to the 8 query heads
    assert spy.calls == ([(8, 2, True)] if kernel_shares else [(8, 8, False)])


@pytest.mark.parametrize("kernel_shares", [True, False])
def test_the_model_attends_through_the_decision(monkeypatch, kernel_shares):
    monkeypatch.setattr(attention_module, "shares_kv_heads_in_kernel", lambda *args, **kwargs: kernel_shares)
    spy = _SDPASpy()
    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", spy)
    args = ModelArgs.preset("tiny", n_heads=4, n_kv_heads=2)
    layer = Attention(args)
    h = torch.randn(2, 6, args.dim)
    layer(h, precompute_freqs_cis(args.head_dim, 6), None)
    assert spy.calls == ([(4, 2, True)] if kernel_shares else [(4, 4, False)])


def test_heads_are_not_repeated_without_grouping(monkeypatch):
    monkeypatch.setattr(attention_module, "shares_kv_heads_in_kernel", lambda *a, **k: pytest.fail("asked"))
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    torch.testing.assert_close(attention(q, k, v, is_causal=True), _SDPA(q, k, v, is_causal=True))
