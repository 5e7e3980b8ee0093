"""How much of our PPO optimisation phase is matrix products, and at what rate: the ceiling on its speed-up.

    .venv/bin/python benchmarks/ppo_products.py [--shape llama2-24m|stories260k] [--threads 1]

The same models, prompts and settings as benchmarks/ppo_iteration.py (its `prepare` and `SHAPES`), one process:
one untimed iteration, then one more whose optimisation phase (`_PPORun.optimise`, four minibatch steps) runs
under torch.profiler with FLOP counting. Prints one JSON object: the phase's seconds, the products' seconds
(aten::mm, addmm, bmm) and FLOPs as the profiler counts them, their rate, and their share of the phase, and the
share of SDPA's CPU kernels (forward and backward), which TRL's models call too. The
profiler slows the many small operations more than the products, so the share is a lower bound on a run
without it; the rate is what bounds the phase however the rest is written.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.ppo_iteration import SHAPES, prepare  # noqa: E402

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = "scaled_dot_product"  # SDPA's CPU kernels, forward and backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-24m")
    parser.add_argument("--threads", type=int, default=1)
    opts = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from training import ppo
    from training.engine import setup_distributed
    from training.reward_sources import reward_source

    torch.set_num_threads(opts.threads)
    args = argparse.Namespace(**SHAPES[opts.shape], max_seq_len=256, batch=16, minibatch=4, response_length=32,
                              lr=1e-5, kl_coef=0.01, warmup=1, iterations=1, threads=opts.threads, seed=0)
    with tempfile.TemporaryDirectory(prefix="ppo-products-") as tmp:
        payload = json.loads(prepare(args, Path(tmp)).read_text())
        config = ppo.PPOConfig(
            policy=payload["policy_hf"], tokenizer=payload["tokenizer"], prompts=payload["prompts"],
            out_dir=str(Path(tmp) / "out"), reward_model=payload["reward_dir"], prompt_format="plain", iterations=10,
            batch_size=16, minibatch_size=4, max_new_tokens=32, temperature=1.0, top_p=1.0, kl_coef=0.01,
            learning_rate=1e-5, schedule="constant", eval_every=0, early_stopping_patience=None, resume=False,
            device="cpu", num_threads=opts.threads)
        dist = setup_distributed("cpu")
        run = ppo._PPORun(config, dist, reward_source(reward_model=config.reward_model, device=dist.device))
        run.iterate()  # warm-up
        rollout, _ = run.prepare(run.iteration)
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            start = time.perf_counter()
            run.optimise(rollout)
            phase_s = time.perf_counter() - start
    products = [e for e in prof.key_averages() if e.key in PRODUCTS]
    seconds = sum(e.self_cpu_time_total for e in products) / 1e6
    flops = sum(e.flops for e in products)
    attention_s = sum(e.self_cpu_time_total for e in prof.key_averages()
                      if ATTENTION in e.key and e.key.startswith("aten::_")) / 1e6
    print(json.dumps({
        "benchmark": "ppo_products", "shape": opts.shape, "threads": opts.threads, "torch": torch.__version__,
        "tokens_a_row": int(rollout.tokens.shape[1]), "minibatch_steps": 16 // 4,
        "optimisation_phase_s_profiled": round(phase_s, 3),
        "products_s": round(seconds, 3), "products_gflop": round(flops / 1e9, 2),
        "products_gflop_per_minibatch": round(flops / 1e9 / 4, 2),
        "products_gflop_per_s": round(flops / 1e9 / seconds, 1),
        "products_share_of_phase": round(seconds / phase_s, 3),
        "attention_kernels_s": round(attention_s, 3), "attention_share_of_phase": round(attention_s / phase_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
