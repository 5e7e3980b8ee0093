"""GPU figures for training.llama: bf16 training-step MFU on a 7B-shaped layer stack, and sampling tokens/s.

    .venv/bin/python benchmarks/llama_gpu_mfu.py                 # on a machine with one CUDA GPU
    .venv/bin/python benchmarks/llama_gpu_mfu.py --device cpu --dim 128 --layers 2 --heads 4 --seq-len 64 \\
        --batch 2 --vocab 512 --new-tokens 8 --peak-tflops 1      # smoke test of the script itself

Training step: forward + next-token cross-entropy + backward, bf16 weights and activations, packed rows of
random tokens, no optimizer. MFU = model FLOPs per second / peak dense bf16 FLOPs, with model FLOPs per token
= 6 * (matmul parameters) + 6 * n_layers * seq_len * dim (causal attention scores and values, forward and
backward), the PaLM accounting without recomputation. Sampling: 8 ragged prompts, 128 new tokens, top-p 0.9,
EOS disabled; transformers' `generate()` on the same weights in the same run when --compare-hf. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.llama_sampling import left_padded  # noqa: E402
from training.llama.generation import generate  # noqa: E402
from training.llama.model import ModelArgs, Transformer  # noqa: E402

# Dense bf16 peak (no sparsity), from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device, override: float | None) -> float:
    if override is not None:
        return override
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if all(part in name for part in key.split()):
            return value
    if "H100" in name:
        return PEAK_BF16_TFLOPS["H100 SXM"]
    raise SystemExit(f"Unknown GPU {name!r}: pass --peak-tflops")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_figures(model: Transformer, opts: argparse.Namespace, device: torch.device, peak: float) -> dict:
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.seq_len + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model.train()

    def step() -> None:
        logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(opts.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(opts.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    matmul_params = sum(p.numel() for name, p in model.named_parameters()
                        if p.dim() == 2 and not name.startswith("tok_embeddings"))
    flops_per_token = 6 * matmul_params + 6 * args.n_layers * opts.seq_len * args.dim
    n_tokens = opts.batch * opts.seq_len
    achieved = flops_per_token * n_tokens / seconds
    return {
        "step_s": round(seconds, 4),
        "tokens_per_s": round(n_tokens / seconds, 1),
        "tflops": round(achieved / 1e12, 1),
        "mfu": round(achieved / (peak * 1e12), 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def sampling_prompts(n: int, vocab_size: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 65, (n,), generator=g).tolist()
    return [[1, *torch.randint(3, vocab_size, (k - 1,), generator=g).tolist()] for k in lengths]


def sampling_figures(model: Transformer, opts: argparse.Namespace, device: torch.device) -> dict:
    model.eval()
    prompts = sampling_prompts(opts.prompts, model.args.vocab_size)
    expected = opts.prompts * opts.new_tokens

    def run() -> int:
        result = generate(model, prompts, max_new_tokens=opts.new_tokens, temperature=0.6, top_p=0.9,
                          eos_id=None, seed=0)
        return sum(len(t) for t in result.tokens)

    run()
    sync(device)
    times = []
    for _ in range(opts.repeats):
        t0 = time.perf_counter()
        n = run()
        sync(device)
        times.append(time.perf_counter() - t0)
        if n != expected:
            raise SystemExit(f"generated {n} tokens, expected {expected}")
    return {"tokens_per_s": round(expected / statistics.median(times), 1), "seconds": round(statistics.median(times), 3)}


def hf_figures(model: Transformer, opts: argparse.Namespace, device: torch.device, peak: float) -> dict:
    """The same two measurements on transformers' LlamaForCausalLM with the same weights."""
    import tempfile

    from transformers import GenerationConfig, LlamaForCausalLM

    from training.llama.checkpoint import save_hf_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(model, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (opts.batch, opts.seq_len + 1), device=device)
    hf.train()

    def step() -> None:
        logits = hf(input_ids=tokens[:, :-1], use_cache=False).logits
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        hf.zero_grad(set_to_none=True)

    for _ in range(opts.warmup):
        step()
    sync(device)
    times = []
    for _ in range(opts.steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    train_tokens_per_s = opts.batch * opts.seq_len / statistics.median(times)

    hf.eval()
    prompts = sampling_prompts(opts.prompts, args.vocab_size)
    input_ids, attention_mask = left_padded(prompts, device)
    config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=0, max_new_tokens=opts.new_tokens,
                              eos_token_id=None, pad_token_id=0)
    hf.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    sync(device)
    times = []
    for _ in range(opts.repeats):
        t0 = time.perf_counter()
        out = hf.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        sync(device)
        times.append(time.perf_counter() - t0)
    sample_tokens_per_s = (out.shape[1] - input_ids.shape[1]) * out.shape[0] / statistics.median(times)
    return {"train_tokens_per_s": round(train_tokens_per_s, 1), "sampling_tokens_per_s": round(sample_tokens_per_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8, help="7B has 32; 8 fit with room for activations")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile each TransformerBlock for training")
    parser.add_argument("--compare-hf", action="store_true", help="also measure transformers on the same weights")
    parser.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU's name")
    opts = parser.parse_args()

    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device; run with --device cpu for a smoke test")
    peak = peak_tflops(device, opts.peak_tflops) if device.type == "cuda" else (opts.peak_tflops or 1.0)
    torch.backends.cuda.matmul.allow_tf32 = True
    args = ModelArgs(dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
                     vocab_size=opts.vocab, max_seq_len=max(4096, opts.seq_len))
    torch.manual_seed(0)
    model = Transformer(args, device=device, dtype=torch.bfloat16)
    model.set_activation_checkpointing(opts.activation_checkpointing)
    if opts.compile:
        for layer in model.layers:
            layer.compile()

    result = {
        "benchmark": "llama_gpu_mfu",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": {k: v for k, v in vars(opts).items()},
        "peak_bf16_tflops": peak,
        "train_step": train_step_figures(model, opts, device, peak),
        "sampling": sampling_figures(model, opts, device),
    }
    if opts.compare_hf:
        result["transformers"] = hf_figures(model, opts, device, peak)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
