"""Batched sampling throughput and peak memory: training.llama `generate` vs transformers `generate()`.

    .venv/bin/python benchmarks/llama_sampling.py [--threads 2] [--rounds 3] [--prompts 8] [--dtype float32|bfloat16]

Same weights (ours saved in Hugging Face format and loaded by both), same dtype (float32 unless --dtype), same
threads. 8 prompts of
ragged lengths (left-padded with an attention mask on the transformers side), 128 new tokens each, nucleus
sampling (temperature 0.6, top-p 0.9, no top-k). EOS is disabled on both sides (ours: eos_id=None; theirs:
eos_token_id=None) and the generated tokens are counted exactly, so both produce 8 x 128 tokens. Ours also
returns the log-prob of every sampled token (PPO needs them); theirs computes no scores. Each implementation
runs in its own child process, alternating for `--rounds` rounds. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def prompts(n: int, min_len: int, max_len: int, vocab_size: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [[1, *torch.randint(3, vocab_size, (k - 1,), generator=g).tolist()] for k in lengths]


def left_padded(batch: list[list[int]], device=None):
    """`generate()`'s inputs for token-id prompts: (input_ids, attention_mask), left-padded with id 0."""
    import torch

    width = max(len(p) for p in batch)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    return input_ids, attention_mask


def proc_status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def start_peak_window(model) -> int:
    """Page in every weight (loaders may mmap them), reset the peak-RSS mark; return the resident bytes now."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return proc_status_bytes("VmRSS")


def child(opts: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(opts.threads)
    if opts.impl == "ours":
        sys.path.insert(0, str(REPO_ROOT))
        from training.llama.checkpoint import load_checkpoint
        from training.llama.generation import generate

        model, args = load_checkpoint(opts.checkpoint, dtype=getattr(torch, opts.dtype))
        model.eval()
        batch = prompts(opts.prompts, opts.min_prompt, opts.max_prompt, args.vocab_size)

        def run(seed: int) -> int:
            result = generate(model, batch, max_new_tokens=opts.new_tokens, temperature=opts.temperature,
                              top_p=opts.top_p, eos_id=None, seed=seed)
            return sum(len(t) for t in result.tokens)
    else:
        from transformers import GenerationConfig, LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(opts.checkpoint, attn_implementation="sdpa",
                                                 dtype=getattr(torch, opts.dtype)).eval()
        batch = prompts(opts.prompts, opts.min_prompt, opts.max_prompt, model.config.vocab_size)
        input_ids, attention_mask = left_padded(batch)
        config = GenerationConfig(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=0,
                                  max_new_tokens=opts.new_tokens, eos_token_id=None, pad_token_id=0,
                                  bos_token_id=1)

        def run(seed: int) -> int:
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            return (out.shape[1] - input_ids.shape[1]) * out.shape[0]

    rss_loaded = start_peak_window(model)
    expected = opts.prompts * opts.new_tokens
    for i in range(opts.warmup):
        run(seed=100 + i)
    times = []
    for i in range(opts.repeats):
        t0 = time.perf_counter()
        n_tokens = run(seed=i)
        times.append(time.perf_counter() - t0)
        if n_tokens != expected:
            raise SystemExit(f"{opts.impl} generated {n_tokens} tokens, expected {expected}")
    peak = proc_status_bytes("VmHWM")
    print(json.dumps({
        "seconds": statistics.median(times),
        "tokens_per_s": expected / statistics.median(times),
        "peak_rss_mib": peak / 2**20,
        "peak_over_loaded_mib": (peak - rss_loaded) / 2**20,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the weights' dtype on both sides (the same float32 checkpoint, cast on loading)")
    parser.add_argument("--from-checkpoint", default=None,
                        help="benchmark a trained checkpoint (either format) instead of a random model")
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.impl:
        child(opts)
        return

    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from training.llama.checkpoint import load_checkpoint, save_hf_checkpoint
    from training.llama.model import ModelArgs, Transformer

    if opts.from_checkpoint:
        model, args = load_checkpoint(opts.from_checkpoint)
    else:
        args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                         vocab_size=opts.vocab, max_seq_len=2048)
        torch.manual_seed(0)
        model = Transformer(args)
    results: dict[str, list[dict]] = {"ours": [], "hf": []}
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(model, tmp)
        passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(opts).items()
                       if k not in ("impl", "checkpoint", "from_checkpoint") and v is not None]
        for _ in range(opts.rounds):
            for impl in ("ours", "hf"):
                out = subprocess.run([sys.executable, __file__, *passthrough, f"--impl={impl}",
                                      f"--checkpoint={tmp}"], check=True, capture_output=True, text=True).stdout
                results[impl].append(json.loads(out.strip().splitlines()[-1]))

    def summary(runs: list[dict]) -> dict:
        return {
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "seconds": round(statistics.median(r["seconds"] for r in runs), 3),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
            "peak_over_loaded_mib": round(max(r["peak_over_loaded_mib"] for r in runs), 1),
        }

    ours, hf = summary(results["ours"]), summary(results["hf"])
    n_params = sum(p.numel() for p in Transformer(args, device="meta").parameters())
    print(json.dumps({
        "benchmark": "llama_sampling",
        "config": {**{k: v for k, v in vars(opts).items() if k not in ("impl", "checkpoint")
                      and not (opts.from_checkpoint and k in ("dim", "layers", "heads", "kv_heads", "vocab"))},
                   **({"model": args.to_params_json()} if opts.from_checkpoint else {}),
                   "params": n_params, "dtype": opts.dtype, "torch": torch.__version__},
        "ours": ours,
        "transformers": hf,
        "speedup": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
        "memory_ratio_over_loaded": round(ours["peak_over_loaded_mib"] / max(hf["peak_over_loaded_mib"], 1e-9), 3),
    }, indent=2))


if __name__ == "__main__":
    main()
