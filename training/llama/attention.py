"""Grouped-query attention through `F.scaled_dot_product_attention`, on a fused kernel on every device.

SDPA can share each key/value head among its `n_rep` query heads itself (`enable_gqa`), without copying them
(`repeat_kv` in `model.py` is the definition of what that computes). On CPU its flash kernel takes
`enable_gqa` with or without a mask, in any dtype. On CUDA only the flash backend takes `enable_gqa`
(PyTorch's documentation; pytorch/pytorch#139586), and flash takes no mask, no float32, no head_dim above 256
and no GPU older than Ampere (sm80): any other call with `enable_gqa` falls to the math backend, which
materialises the (queries x keys) scores in float32, O(seqlen^2) memory. There the heads are repeated
instead, so that the memory-efficient kernel takes the call: ragged sampling batches (a padding mask), packed
rows under `compile_blocks` (a block-diagonal mask), float32 runs, V100s and T4s.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

FLASH_MAX_HEAD_DIM = 256


def shares_kv_heads_in_kernel(device_type: str, dtype: torch.dtype, *, masked: bool, head_dim: int,
                              capability: tuple[int, int] | None = None) -> bool:
    """Whether SDPA gets `enable_gqa` (True) or the key/value heads repeated beforehand (False).

    `capability`: the CUDA device's compute capability (major, minor), for CUDA only.
    """
    if device_type != "cuda":
        return True
    return (not masked and dtype in (torch.float16, torch.bfloat16) and head_dim <= FLASH_MAX_HEAD_DIM
            and capability is not None and capability >= (8, 0))


@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    """A CUDA device's compute capability, asked once (not in every layer's call, nor in a compiled graph)."""
    return torch.cuda.get_device_capability(index)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """SDPA of q (bsz, n_heads, seqlen, head_dim) over k, v (bsz, n_kv_heads, kv_len, head_dim).

    n_heads is a multiple of n_kv_heads: query head i reads key/value head i // (n_heads // n_kv_heads).
    """
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        capability = _capability(q.device.index) if q.device.type == "cuda" else None
        if not shares_kv_heads_in_kernel(q.device.type, q.dtype, masked=attn_mask is not None,
                                         head_dim=q.shape[-1], capability=capability):
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            n_rep = 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=n_rep > 1)
