"""The linear layers of a decoding step on CPU: products of a few rows with large weights.

A decoding step multiplies a handful of rows (one a sequence) by every weight matrix of the model, so it is
bound by how fast those weights stream from memory. MKL's float32 product, what `nn.Linear` calls, reads
them at about a third of what one core can stream (7 GB/s against 23-27 GB/s on the AVX-512 EPYC of
docs/benchmarks.md), whether as x @ weight.T or weight @ x.T. oneDNN's inner product from a copy of the weight
in its blocked layout for that number of rows (`torch.ops.mkldnn._reorder_linear_weight`, the layout inductor
uses when it freezes weights) reads them 1.3-2.3x faster at 1 to 64 rows, on one thread and on two. bfloat16
products on CPU are oneDNN's already; packed, they give the same numbers about twice as fast.

`packed_weights(model, rows)` makes that copy of every eligible layer for the time of a generation, and
`decode_linear` uses it: the copy costs the layers' weights once more in memory, and about the time of a
copy of them (0.1-0.3 s for the 166 MB of a 58M model) each time it is made.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

# Decoding batches up to this many rows take the packed weights (measured faster from 1 to 64 rows).
MAX_PACKED_ROWS = 64
# Smaller matrices gain less from either faster path than its extra dispatch costs: they run as `layer(x)`.
MIN_PACKED_WEIGHTS = 65536


def _plain(layer: nn.Module) -> bool:
    """A bias-free `nn.Linear` with no hooks: `layer(x)` is x @ weight.T and nothing else."""
    return (type(layer) is nn.Linear and layer.bias is None and not layer._forward_hooks
            and not layer._forward_pre_hooks)


def _packable(layer: nn.Module) -> bool:
    if not _plain(layer) or layer.weight.device.type != "cpu" or layer.weight.numel() < MIN_PACKED_WEIGHTS:
        return False
    # bfloat16 where oneDNN has bf16 kernels for this CPU (AVX-512): its products are oneDNN's already, and
    # packed they give the same numbers twice as fast
    return layer.weight.dtype == torch.float32 or (
        layer.weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed-weight inner product (CPU builds with mkldnn do)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable), or None where it cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@contextlib.contextmanager
def packed_weights(model: nn.Module, rows: int) -> Iterator[bool]:
    """Within the block, `decode_linear` runs `model`'s CPU linear layers (float32, or bfloat16 where oneDNN
    has bf16 kernels) from packed copies of their weights, laid out for products of `rows` rows. Yields
    whether any weight was packed.

    Nothing is packed (and the usual products run) for more than `MAX_PACKED_ROWS` rows, without oneDNN, or
    when the copies would take more than half of the memory still available. Layers already packed by an
    enclosing block keep their copies. A copy serves only the weight it was made from, unchanged: a weight
    updated in place (an optimizer step) or replaced inside the block makes its layer fall back to the usual
    product, never to a stale copy.
    """
    layers = []
    if 0 < rows <= MAX_PACKED_ROWS and onednn_available():
        layers = [m for m in model.modules() if _packable(m) and m.__dict__.get("_packed_weight") is None]
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    available = available_memory()
    if not layers or available is None or nbytes > available // 2:
        yield False
        return
    try:
        with torch.no_grad():
            for m in layers:
                weight = m.weight.detach()
                m._packed_weight = (m.weight, m.weight._version, torch.ops.mkldnn._reorder_linear_weight(weight, rows))
        yield True
    finally:
        for m in layers:
            m._packed_weight = None


def decode_linear(layer: nn.Linear, x: torch.Tensor, *, on_one_thread: bool = False) -> torch.Tensor:
    """`layer(x)`, computed faster for the few rows of a decoding step on CPU (no gradients).

    Inside `packed_weights`: from the layer's packed weight, up to `MAX_PACKED_ROWS` rows. Otherwise, with
    several threads, as weight @ x.T: MKL runs x @ weight.T (what `nn.Linear` asks for) with a handful of rows
    on one thread whatever `torch.get_num_threads()` says, while weight @ x.T is split over the threads (for
    the 58M model's layers at 8 rows and two threads 1.0-1.8x faster a product). On one thread that order is
    mixed (0.6x-1.07x by shape), so the usual one stays there, as it does for small matrices (under 65,536
    weights: the extra transposes cost more than they save); `on_one_thread` takes it there too (the output
    head: 32,000 x 512 at 8 rows, 7.7 against 11.4 ms; it holds up to 8 rows, from 12 it is slower). The same
    products, summed in another order. A layer that is not a plain bias-free `nn.Linear` (an adapter) or has
    hooks is called as usual, as is training.
    """
    if (not _plain(layer) or layer.weight.numel() < MIN_PACKED_WEIGHTS or x.device.type != "cpu"
            or torch.is_grad_enabled()):
        return layer(x)
    rows = x.numel() // x.shape[-1]
    packed = layer.__dict__.get("_packed_weight")  # (weight, its version when packed, the packed copy)
    # not under autocast, whose dtype nn.Linear would follow
    if packed is not None and rows <= MAX_PACKED_ROWS and not torch.is_autocast_enabled("cpu"):
        weight, version, copy = packed
        # else the weight changed (never read from a stale copy) or x has another dtype
        if weight is layer.weight and weight._version == version and x.dtype == weight.dtype:
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), copy, None, "none", [], "")
            return out.view(*x.shape[:-1], out.shape[-1])
    if rows > 8 or (torch.get_num_threads() == 1 and not on_one_thread):
        return layer(x)
    out = torch.mm(layer.weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    return out.view(*x.shape[:-1], out.shape[-1])
