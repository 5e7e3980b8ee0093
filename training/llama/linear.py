"""The linear layers of a decoding step on CPU: products of a few rows with large weights.

A decoding step multiplies a handful of rows (one a sequence) by every weight matrix of the model, so it is
bound by how fast those weights stream from memory, and MKL's float32 product, what `nn.Linear` calls, reads
them slowly with a few rows (5-8 GB/s at 8 rows on the AVX-512 EPYC of docs/benchmarks.md), whether as
x @ weight.T or weight @ x.T. oneDNN's inner product from a copy of the weight in its blocked layout for that
number of rows (`torch.ops.mkldnn._reorder_linear_weight`, the layout inductor uses when it freezes weights)
reads them faster there: 1.4-1.6x at 8 rows and 0.8-2.7x by shape from 3 to 64 rows on one thread, 1.1-2.4x at 8 rows
on two (`benchmarks/llama_decode_products.py`). bfloat16 products on CPU are oneDNN's already; packed, they
give the same numbers faster.

`packed_weights(model, rows)` makes that copy of every eligible layer for the time of a generation, and
`decode_linear` uses it: the copy costs the layers' weights once more in memory, and about the time of a
copy of them (166 MB for the 58M model) each time it is made. The copies are kept beside the
model (a weak mapping from each layer), not on it: saving or copying the model is unaffected.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.modules.module as _module
from torch import nn

# Decoding batches of this many rows take the packed weights: measured faster from 3 to 64 rows on AVX-512
# (`benchmarks/llama_decode_products.py`); at 1-2 rows MKL's products are as fast or faster for some shapes.
MIN_PACKED_ROWS = 3
MAX_PACKED_ROWS = 64
# Smaller matrices gain less from either faster path than its extra dispatch costs: they run as `layer(x)`.
MIN_PACKED_WEIGHTS = 65536


def _plain(layer: nn.Module) -> bool:
    """A bias-free `nn.Linear` with no hooks, its own or global ones (`register_module_forward_hook`):
    `layer(x)` is x @ weight.T and nothing else."""
    return (type(layer) is nn.Linear and layer.bias is None and not layer._forward_hooks
            and not layer._forward_pre_hooks and not _module._global_forward_hooks
            and not _module._global_forward_pre_hooks)


def _packable(layer: nn.Module) -> bool:
    if not _plain(layer) or layer.weight.device.type != "cpu" or layer.weight.numel() < MIN_PACKED_WEIGHTS:
        return False
    # bfloat16 where oneDNN has bf16 kernels for this CPU (AVX-512): its products are oneDNN's already, and
    # packed they give the same numbers faster
    return layer.weight.dtype == torch.float32 or (
        layer.weight.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packing_pays() -> bool:
    """Whether this CPU is one where packed products were measured faster: AVX-512. Held to AVX2 the gain was
    1.0-1.2x at 8 rows, and sometimes below MKL, too little for the weights' memory twice."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and onednn_available()


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed-weight inner product (CPU builds with mkldnn do)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _room_in(directory: Path, limit_file: str, usage_file: str) -> int | None:
    """Bytes left under one cgroup's memory limit, or None where it has none (or no such files)."""
    try:
        limit = (directory / limit_file).read_text().strip()
        usage = int((directory / usage_file).read_text())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 2**60:  # "max" (v2), or v1's huge number: no limit
        return None
    stat: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError):
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            stat[key] = int(value)
    # the page cache the kernel can drop does not count as used (v1's usage is hierarchical: total_ counts)
    reclaimable = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    return max(0, int(limit) - max(0, usage - reclaimable))


def _cgroup_memory_left(proc_cgroup: Path = Path("/proc/self/cgroup"),
                        root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process may still use under the memory limits of its cgroup and the ones above it (a
    container's, a systemd unit's, a batch job's): the least room under any of them; None without a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    left = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base, files = root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):  # v1's memory controller
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        directory = base / path.strip("/")
        while True:  # the cgroup, then its ancestors (inside a container, its own root is all it sees)
            room = _room_in(directory, *files)
            if room is not None:
                left = room if left is None else min(left, room)
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return left


def available_memory() -> int | None:
    """Bytes of memory this process can still get: Linux's MemAvailable, or less under a container's limit;
    None where it cannot tell."""
    system = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    system = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if system is None:
        try:
            system = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    container = _cgroup_memory_left()
    return system if container is None else min(system, container)


class _Packed:
    """A layer's packed weight and what it was made from: the weight tensor, its data and its version."""

    __slots__ = ("weight", "storage", "data_ptr", "version", "copy")

    def __init__(self, weight: torch.Tensor, copy: torch.Tensor):
        self.weight, self.data_ptr, self.copy = weight, weight.data_ptr(), copy
        # held so that replaced data cannot free its memory and new data land at the same address
        self.storage = weight.untyped_storage()
        # inference tensors (weights loaded under inference_mode) have no version counter
        self.version = None if weight.is_inference() else weight._version

    def serves(self, weight: torch.Tensor) -> bool:
        """Whether the copy still holds this weight: the same tensor, data and version."""
        return (weight is self.weight and weight.data_ptr() == self.data_ptr
                and (self.version is None or weight._version == self.version))


_PACKED: weakref.WeakKeyDictionary[nn.Linear, _Packed] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def packed_weights(model: nn.Module, rows: int) -> Iterator[bool]:
    """Within the block, `decode_linear` runs `model`'s CPU linear layers (float32, or bfloat16 where oneDNN
    has bf16 kernels) from packed copies of their weights, laid out for products of `rows` rows. Yields
    whether any weight was packed.

    For sampling only: the weights must not change inside the block. As a guard, a layer whose weight was
    replaced (the parameter, or its `.data`) or changed in place through ops that bump its version counter
    falls back to the usual product; changes that bypass the counter (writes through `.data`, fused
    optimizers) are not seen, nor are in-place changes to weights made under `inference_mode` (they have no
    version counter). Nothing is packed (and the usual products run) for fewer than `MIN_PACKED_ROWS` or more
    than `MAX_PACKED_ROWS` rows, on a CPU without AVX-512 or a build without oneDNN, when the copies would take
    more than half of the memory still available, or if oneDNN refuses to pack. Layers already packed by an enclosing block (or another thread's) keep those copies.
    """
    layers = []
    if MIN_PACKED_ROWS <= rows <= MAX_PACKED_ROWS and packing_pays():
        layers = [m for m in model.modules() if _packable(m) and m not in _PACKED]
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    available = available_memory()
    if not layers or available is None or nbytes > available // 2:
        yield False
        return
    try:  # whatever happens (an interrupt while packing too), the copies go with the block
        try:
            with torch.no_grad():
                for m in layers:
                    _PACKED[m] = _Packed(m.weight, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows))
        except RuntimeError:  # a oneDNN build or CPU that cannot pack: the usual products
            for m in layers:
                _PACKED.pop(m, None)
            yield False
            return
        yield True
    finally:
        for m in layers:
            _PACKED.pop(m, None)


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
    packed = _PACKED.get(layer)
    # not under autocast, whose dtype nn.Linear would follow; not from a copy of another weight or dtype
    if (packed is not None and rows <= MAX_PACKED_ROWS and not torch.is_autocast_enabled("cpu")
            and x.dtype == layer.weight.dtype and packed.serves(layer.weight)):
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), packed.copy, None, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])
    if rows > 8 or (torch.get_num_threads() == 1 and not on_one_thread):
        return layer(x)
    out = torch.mm(layer.weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    return out.view(*x.shape[:-1], out.shape[-1])
