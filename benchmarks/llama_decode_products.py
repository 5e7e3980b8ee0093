"""The matrix products of a decoding step on CPU: a few rows times large weights, as MKL runs them (what
`nn.Linear` and transformers call, in either order) against oneDNN from weights packed for that many rows
(`training/llama/linear.py`, what `generate` uses).

    .venv/bin/python benchmarks/llama_decode_products.py [--threads 1] [--rows 1 5 8 16 64]

For each weight shape of the 58M benchmark model (the layers' 1,536 x 512, 512 x 1,536, 512 x 512, 256 x 512 and
the 32,000 x 512 head), enough distinct matrices to fill ~200 MB are cycled through, so that the weights come
from memory as in a decoding step, not from the cache. Prints JSON: GB/s of weights read, per shape and row
count, and packed over the faster MKL order. `ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2` in the
environment holds both libraries to what an AVX2-only CPU has.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

SHAPES = [(1536, 512), (512, 1536), (512, 512), (256, 512), (32000, 512)]
TARGET_BYTES = 200 * 2**20


def gb_per_s(products: list[Callable[[], object]], nbytes: int, repeats: int) -> float:
    """GB/s of weights read by running every product once (after one untimed pass), `repeats` times over."""
    for product in products:
        product()
    start = time.perf_counter()
    for _ in range(repeats):
        for product in products:
            product()
    return round(nbytes / 1e9 / ((time.perf_counter() - start) / repeats), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 5, 8, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()

    import torch

    torch.set_num_threads(opts.threads)
    mm, packed_mm = torch.mm, torch.ops.mkldnn._linear_pointwise
    results = []
    for n_out, n_in in SHAPES:
        weights = [torch.randn(n_out, n_in) for _ in range(max(1, TARGET_BYTES // (n_out * n_in * 4)))]
        nbytes = sum(w.numel() * 4 for w in weights)
        for rows in opts.rows:
            x = torch.randn(rows, n_in)
            packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in weights]
            row = {
                "shape": [n_out, n_in], "rows": rows,
                "mkl_x_wT": gb_per_s([partial(mm, x, w.t()) for w in weights], nbytes, opts.repeats),
                "mkl_w_xT": gb_per_s([partial(mm, w, x.t()) for w in weights], nbytes, opts.repeats),
                "onednn_packed": gb_per_s([partial(packed_mm, x, p, None, "none", [], "") for p in packed], nbytes,
                                          opts.repeats),
            }
            row["packed_over_best_mkl"] = round(row["onednn_packed"] / max(row["mkl_x_wT"], row["mkl_w_xT"]), 2)
            results.append(row)
    print(json.dumps({"benchmark": "llama_decode_products", "threads": opts.threads, "torch": torch.__version__,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
