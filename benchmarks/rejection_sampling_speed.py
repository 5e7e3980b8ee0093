"""Rejection sampling's sampling throughput: training.sampling.sample_answers vs transformers `generate()`.

    .venv/bin/python benchmarks/rejection_sampling_speed.py [--threads 1] [--samples 4 16] [--prompts 4]
        [--new-tokens 64] [--rounds 2]

K samples a prompt, as `training.rejection_sampling` draws them: ours is `sample_answers(samples_per_prompt=K)`
(prompts encoded, every draw of every prompt in one batched, KV-cached `generate` call, answers decoded to
text); theirs `LlamaForCausalLM.generate(num_return_sequences=K)` on the same prompts left-padded with an
attention mask, its answers decoded with the same tokenizer. The same weights (a random Llama of about 58M
parameters as in benchmarks/llama_sampling.py, saved in Hugging Face layout and loaded by both), float32, the
same threads, top-p sampling (temperature 1.0, top-p 0.9, no top-k), the same max_new_tokens and EOS (the
Llama 2 tokenizer's; a random model rarely draws it). Prompts: short story openings in the plain format,
encoded with the Llama 2 tokenizer of ../shared/data. Each implementation runs in its own child process,
alternating for `--rounds` rounds. Prints JSON: samples/s and tokens/s of each and their ratio per K.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
OPENINGS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The robot looked at the broken clock and said",
    "Write a short poem about the rain falling on a quiet city at night.",
    "Explain to a child why the sky is blue.",
    "My grandmother always told me that the secret to a good soup is",
    "The train stopped in the middle of the desert, and nobody knew why until",
    "Give three tips for staying focused while studying.",
    "In the year 3000, people no longer",
]


def child(opts: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.llama_sampling import left_padded, proc_status_bytes, start_peak_window
    from training.llama.tokenizer import Tokenizer
    from training.prompts import PromptRecord, encode_prompt

    torch.set_num_threads(opts.threads)
    tokenizer = Tokenizer(opts.tokenizer)
    records = [PromptRecord.of(OPENINGS[i % len(OPENINGS)]) for i in range(opts.prompts)]
    k = opts.k
    if opts.impl == "ours":
        from training.sampling import SamplingSettings, load_policy, sample_answers

        model = load_policy(opts.checkpoint)
        settings = SamplingSettings(max_new_tokens=opts.new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                                    prompt_format="plain", batch_size=opts.prompts * k)

        def run(seed: int) -> int:
            samples = sample_answers(model, tokenizer, records, settings, samples_per_prompt=k, seed=seed)
            assert len(samples) == opts.prompts * k
            return sum(len(s.response_ids) for s in samples)
    else:
        from transformers import GenerationConfig, LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(opts.checkpoint, attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
        ids = [encode_prompt(tokenizer, r, "plain") for r in records]
        input_ids, attention_mask = left_padded(ids)
        config = GenerationConfig(do_sample=True, temperature=opts.temperature, top_p=opts.top_p, top_k=0,
                                  max_new_tokens=opts.new_tokens, eos_token_id=tokenizer.eos_id, pad_token_id=0,
                                  bos_token_id=tokenizer.bos_id, num_return_sequences=k)

        def run(seed: int) -> int:
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            assert out.shape[0] == opts.prompts * k
            n_tokens = 0
            for row in out[:, input_ids.shape[1]:].tolist():  # cut at EOS, as ours returns its answers
                answer = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
                tokenizer.decode(answer)
                n_tokens += len(answer)
            return n_tokens

    rss_loaded = start_peak_window(model)
    for i in range(opts.warmup):
        run(seed=100 + i)
    times, tokens = [], []
    for i in range(opts.repeats):
        t0 = time.perf_counter()
        tokens.append(run(seed=i))
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    print(json.dumps({
        "seconds": seconds,
        "samples_per_s": opts.prompts * k / seconds,
        "tokens_per_s": statistics.fmean(tokens) / seconds,
        "tokens_per_sample": statistics.fmean(tokens) / (opts.prompts * k),
        "peak_over_loaded_mib": (proc_status_bytes("VmHWM") - rss_loaded) / 2**20,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 16], help="K values")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokenizer", default=str(SHARED_DATA / "llama2-tokenizer" / "tokenizer.model"))
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
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
                     vocab_size=opts.vocab, max_seq_len=2048)
    torch.manual_seed(0)
    model = Transformer(args)
    n_params = sum(p.numel() for p in model.parameters())
    results: dict[int, dict[str, list[dict]]] = {k: {"ours": [], "hf": []} for k in opts.samples}
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(model, tmp)
        del model
        passthrough = [f"--{name}={getattr(opts, name.replace('-', '_'))}"
                       for name in ("prompts", "new-tokens", "temperature", "top-p", "repeats", "warmup", "threads",
                                    "tokenizer")]
        for _ in range(opts.rounds):
            for k in opts.samples:
                for impl in ("ours", "hf"):
                    out = subprocess.run([sys.executable, __file__, *passthrough, f"--impl={impl}", f"--k={k}",
                                          f"--checkpoint={tmp}"], check=True, capture_output=True, text=True).stdout
                    results[k][impl].append(json.loads(out.strip().splitlines()[-1]))

    def summary(runs: list[dict]) -> dict:
        return {
            "samples_per_s": round(statistics.median(r["samples_per_s"] for r in runs), 2),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "tokens_per_sample": round(statistics.fmean(r["tokens_per_sample"] for r in runs), 1),
            "seconds": round(statistics.median(r["seconds"] for r in runs), 3),
            "peak_over_loaded_mib": round(max(r["peak_over_loaded_mib"] for r in runs), 1),
        }

    by_k = {}
    for k in opts.samples:
        ours, hf = summary(results[k]["ours"]), summary(results[k]["hf"])
        by_k[f"K={k}"] = {"ours": ours, "transformers": hf,
                          "speedup_samples_per_s": round(ours["samples_per_s"] / hf["samples_per_s"], 3)}
    print(json.dumps({
        "benchmark": "rejection_sampling_speed",
        "config": {k: v for k, v in vars(opts).items() if k not in ("impl", "k", "checkpoint")}
        | {"params": n_params, "dtype": "float32", "torch": torch.__version__},
        "results": by_k,
    }, indent=2))


if __name__ == "__main__":
    main()
