"""Grouped-query attention: the kernel's shared heads or repeated ones, the same result on each path."""

import pytest
import torch
import torch.nn.functional as F

import training.llama.attention as attention_module
from training.llama.attention import attention, shares_kv_heads_in_kernel
from training.llama.model import repeat_kv


def test_cuda_repeats_the_heads_where_only_the_math_backend_would_take_enable_gqa():
    # CUDA's flash backend is the only one with enable_gqa, and it takes no mask and no float32
    assert shares_kv_heads_in_kernel("cuda", torch.bfloat16, masked=False)
    assert shares_kv_heads_in_kernel("cuda", torch.float16, masked=False)
    assert not shares_kv_heads_in_kernel("cuda", torch.bfloat16, masked=True)
    assert not shares_kv_heads_in_kernel("cuda", torch.float32, masked=False)
    # CPU's flash kernel takes enable_gqa with a mask and in float32
    assert shares_kv_heads_in_kernel("cpu", torch.float32, masked=True)


@pytest.mark.parametrize("kernel_shares", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_both_paths_equal_attention_over_repeated_heads(monkeypatch, kernel_shares, masked):
    calls = []

    def decide(device_type, dtype, *, masked):
        calls.append(masked)
        return kernel_shares

    monkeypatch.setattr(attention_module, "shares_kv_heads_in_kernel", decide)
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    mask = torch.rand(2, 1, 5, 7) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True  # no query without a key
    repeated = [repeat_kv(t.transpose(1, 2), 4).transpose(1, 2) for t in (k, v)]
    expected = F.scaled_dot_product_attention(q, *repeated, attn_mask=mask)
    torch.testing.assert_close(attention(q, k, v, attn_mask=mask), expected, atol=1e-6, rtol=1e-5)
    assert calls == [masked]


def test_heads_are_not_repeated_without_grouping(monkeypatch):
    monkeypatch.setattr(attention_module, "shares_kv_heads_in_kernel", lambda *a, **k: pytest.fail("asked"))
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    torch.testing.assert_close(attention(q, k, v, is_causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
