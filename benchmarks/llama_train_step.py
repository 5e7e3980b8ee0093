"""Training-step throughput and peak memory: training.llama vs transformers.LlamaForCausalLM, same weights.

    .venv/bin/python benchmarks/llama_train_step.py [--threads 2] [--rounds 3]

A step is forward + next-token cross-entropy + backward on a batch of packed rows (random-token documents,
each BOS ... EOS, concatenated and cut to seq_len + 1; no document-boundary masking, as Llama 2 trains).
Each implementation runs in its own child process, alternating for `--rounds` rounds, so that the peak
resident memory is measured per implementation and machine noise hits both alike. Prints JSON.
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


def packed_batch(batch: int, seq_len: int, vocab_size: int, seed: int):
    """(inputs, targets), each (batch, seq_len): documents of 32-512 random tokens, BOS/EOS-delimited, packed."""
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        row: list[int] = []
        while len(row) < seq_len + 1:
            n = int(torch.randint(32, 512, (1,), generator=g))
            row += [1, *torch.randint(3, vocab_size, (n,), generator=g).tolist(), 2]
        rows.append(row[: seq_len + 1])
    data = torch.tensor(rows)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


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
    import torch.nn.functional as F

    torch.set_num_threads(opts.threads)
    if opts.impl == "ours":
        sys.path.insert(0, str(REPO_ROOT))
        from training.llama.checkpoint import load_checkpoint

        model, args = load_checkpoint(opts.checkpoint)
        vocab_size = args.vocab_size

        def logits_of(x):
            return model(x)
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(opts.checkpoint, attn_implementation="sdpa")
        vocab_size = model.config.vocab_size

        def logits_of(x):
            return model(input_ids=x, use_cache=False).logits

    model.train()
    if opts.activation_checkpointing:
        if opts.impl == "ours":
            model.set_activation_checkpointing(True)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs, targets = packed_batch(opts.batch, opts.seq_len, vocab_size, seed=0)

    def step() -> float:
        logits = logits_of(inputs)
        loss = F.cross_entropy(logits.view(-1, vocab_size).float(), targets.view(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    rss_loaded = start_peak_window(model)
    losses = [step() for _ in range(opts.warmup)]
    times = []
    for _ in range(opts.steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    peak = proc_status_bytes("VmHWM")
    print(json.dumps({
        "step_s": statistics.median(times),
        "tokens_per_s": opts.batch * opts.seq_len / statistics.median(times),
        "first_loss": losses[0],
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
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.impl:
        child(opts)
        return

    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from training.llama.checkpoint import save_hf_checkpoint
    from training.llama.model import ModelArgs, Transformer

    args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                     vocab_size=opts.vocab, max_seq_len=max(2048, opts.seq_len))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(Transformer(args), tmp)
        n_params = sum(p.numel() for p in Transformer(args, device="meta").parameters())
        results: dict[str, list[dict]] = {"ours": [], "hf": []}
        passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(opts).items()
                       if k not in ("impl", "checkpoint", "activation_checkpointing") and v is not None]
        if opts.activation_checkpointing:
            passthrough.append("--activation-checkpointing")
        for _ in range(opts.rounds):
            for impl in ("ours", "hf"):
                out = subprocess.run([sys.executable, __file__, *passthrough, f"--impl={impl}",
                                      f"--checkpoint={tmp}"], check=True, capture_output=True, text=True).stdout
                results[impl].append(json.loads(out.strip().splitlines()[-1]))

    def summary(runs: list[dict]) -> dict:
        return {
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "step_s": round(statistics.median(r["step_s"] for r in runs), 4),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
            "peak_over_loaded_mib": round(max(r["peak_over_loaded_mib"] for r in runs), 1),
            "first_loss": round(runs[0]["first_loss"], 5),
        }

    ours, hf = summary(results["ours"]), summary(results["hf"])
    print(json.dumps({
        "benchmark": "llama_train_step",
        "config": {**{k: v for k, v in vars(opts).items() if k not in ("impl", "checkpoint")},
                   "params": n_params, "dtype": "float32", "torch": torch.__version__},
        "ours": ours,
        "transformers": hf,
        "speedup": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
        "memory_ratio_over_loaded": round(ours["peak_over_loaded_mib"] / hf["peak_over_loaded_mib"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
