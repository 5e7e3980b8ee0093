"""The model worker's generation: responses/s of training.sampling.sample_answers vs transformers `generate()`.

    .venv/bin/python benchmarks/model_worker_generation.py [--threads 1] [--prompts 32] [--new-tokens 64]
        [--rounds 2] [--models stories260k random]

What training.model_worker does for one batch of comparisons awaiting responses: N prompts, each answered at
temperature 0.6 and at 1.0 (top-p 0.9, no top-k, plain prompt format), i.e. 2N responses decoded to text. The worker
draws both variants in the same batches (`sample_answers` with a temperature a row, `generate` taking one a
prompt); `--separate` times the earlier way, one `sample_answers` call a temperature.
Theirs: `LlamaForCausalLM.generate(do_sample=True, temperature=t, top_p=0.9, top_k=0)` on the same prompts,
left-padded with an attention mask, at the same two temperatures, answers cut at EOS and decoded with the same
tokenizer. Float32, the same threads, the same max_new_tokens. Two models:

* `stories260k`: the shared trained stories260K (../shared/data/stories260k/meta, its tokenizer beside it); ours
  loads the Meta checkpoint as the worker does, transformers a Hugging Face copy written by save_hf_checkpoint.
  A trained model draws EOS, so answer lengths differ run to run: tokens/s is printed beside responses/s.
* `random`: a random tiny Llama of the tests' `policy_args` shape (dim 48, 2 layers, vocab 512, stories260K's
  tokenizer), both sides loading the same Hugging Face checkpoint.

Each implementation runs in its own child process (structure and prompts of benchmarks/rejection_sampling_speed.py),
alternating for `--rounds` rounds. Prints JSON: responses/s and tokens/s of each and the ratio per model.
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
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.rejection_sampling_speed import OPENINGS, SHARED_DATA  # noqa: E402

STORIES = SHARED_DATA / "stories260k"


def child(opts: argparse.Namespace) -> None:
    import torch

    from benchmarks.llama_sampling import left_padded, proc_status_bytes, start_peak_window
    from training.llama.tokenizer import Tokenizer
    from training.prompts import PromptRecord, encode_prompt

    torch.set_num_threads(opts.threads)
    tokenizer = Tokenizer(opts.tokenizer)
    records = [PromptRecord.of(OPENINGS[i % len(OPENINGS)]) for i in range(opts.prompts)]
    temperatures = opts.temperatures
    if opts.impl == "ours":
        from training.sampling import SamplingSettings, load_policy, sample_answers

        model = load_policy(opts.checkpoint, device="cpu", dtype=torch.float32)

        def run(seed: int) -> int:
            if not opts.separate:  # as model_worker.sample_variants: both temperatures in the same batches
                settings = SamplingSettings(max_new_tokens=opts.new_tokens, temperature=temperatures[0],
                                            top_p=opts.top_p, prompt_format="plain",
                                            batch_size=opts.batch_size * len(temperatures))  # fmt: skip
                samples = sample_answers(model, tokenizer, records * len(temperatures), settings, seed=seed,
                                         temperatures=[t for t in temperatures for _ in records])  # fmt: skip
                assert len(samples) == opts.prompts * len(temperatures)
                return sum(len(s.response_ids) for s in samples)
            n_tokens = 0
            for j, t in enumerate(temperatures):  # one call a temperature, seeds seed and seed + 1
                settings = SamplingSettings(max_new_tokens=opts.new_tokens, temperature=t, top_p=opts.top_p,
                                            prompt_format="plain", batch_size=opts.batch_size)
                samples = sample_answers(model, tokenizer, records, settings, seed=seed + j)
                assert len(samples) == opts.prompts
                n_tokens += sum(len(s.response_ids) for s in samples)
            return n_tokens
    else:
        from transformers import GenerationConfig, LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(opts.hf_checkpoint, attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
        ids = [encode_prompt(tokenizer, r, "plain") for r in records]
        input_ids, attention_mask = left_padded(ids)
        configs = [GenerationConfig(do_sample=True, temperature=t, top_p=opts.top_p, top_k=0,
                                    max_new_tokens=opts.new_tokens, eos_token_id=tokenizer.eos_id, pad_token_id=0,
                                    bos_token_id=tokenizer.bos_id) for t in temperatures]

        def run(seed: int) -> int:
            n_tokens = 0
            for j, config in enumerate(configs):
                torch.manual_seed(seed + j)
                with torch.inference_mode():
                    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
                assert out.shape[0] == opts.prompts
                for row in out[:, input_ids.shape[1]:].tolist():  # cut at EOS, as ours returns its answers
                    answer = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
                    tokenizer.decode(answer).strip()
                    n_tokens += len(answer)
            return n_tokens

    rss_loaded = start_peak_window(model)
    for i in range(opts.warmup):
        run(seed=100 + 2 * i)
    times, tokens = [], []
    for i in range(opts.repeats):
        t0 = time.perf_counter()
        tokens.append(run(seed=2 * i))
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    responses = opts.prompts * len(temperatures)
    print(json.dumps({
        "seconds": seconds,
        "responses_per_s": responses / seconds,
        "tokens_per_s": statistics.fmean(tokens) / seconds,
        "tokens_per_response": statistics.fmean(tokens) / responses,
        "peak_over_loaded_mib": (proc_status_bytes("VmHWM") - rss_loaded) / 2**20,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["stories260k", "random"], default=["stories260k", "random"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="the worker's ResponderSettings.batch_size")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperatures", type=float, nargs=2, default=[0.6, 1.0])
    parser.add_argument("--separate", action="store_true", help="ours: one sample_answers call a temperature")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--hf-checkpoint", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.impl:
        child(opts)
        return

    import torch

    from training.llama.checkpoint import load_checkpoint, save_hf_checkpoint
    from training.llama.model import ModelArgs, Transformer

    tokenizer = str(STORIES / "tokenizer.model")
    passthrough = [f"--{name}={getattr(opts, name.replace('-', '_'))}"
                   for name in ("prompts", "batch-size", "new-tokens", "top-p", "repeats", "warmup", "threads")]
    passthrough += ["--temperatures", *map(str, opts.temperatures), f"--tokenizer={tokenizer}"]
    passthrough += ["--separate"] if opts.separate else []
    results: dict[str, dict] = {}
    params: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths: dict[str, tuple[str, str]] = {}
        for name in opts.models:
            hf = str(Path(tmp) / name)
            if name == "stories260k":
                model, _ = load_checkpoint(STORIES / "meta", dtype=torch.float32)
                save_hf_checkpoint(model, hf)
                paths[name] = (str(STORIES / "meta"), hf)
            else:  # training/tests/conftest.py's policy_args
                args = ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16,
                                 max_seq_len=128)
                torch.manual_seed(4321)
                model = Transformer(args)
                save_hf_checkpoint(model, hf)
                paths[name] = (hf, hf)
            params[name] = sum(p.numel() for p in model.parameters())
            del model
            results[name] = {"ours": [], "hf": []}
        for _ in range(opts.rounds):
            for name in opts.models:
                for impl in ("ours", "hf"):
                    ours_path, hf_path = paths[name]
                    out = subprocess.run([sys.executable, __file__, *passthrough, f"--impl={impl}",
                                          f"--checkpoint={ours_path}", f"--hf-checkpoint={hf_path}"],
                                         check=True, capture_output=True, text=True).stdout
                    results[name][impl].append(json.loads(out.strip().splitlines()[-1]))

    def summary(runs: list[dict]) -> dict:
        return {
            "responses_per_s": round(statistics.median(r["responses_per_s"] for r in runs), 2),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "tokens_per_response": round(statistics.fmean(r["tokens_per_response"] for r in runs), 1),
            "seconds": round(statistics.median(r["seconds"] for r in runs), 3),
            "peak_over_loaded_mib": round(max(r["peak_over_loaded_mib"] for r in runs), 1),
            "rounds_responses_per_s": [round(r["responses_per_s"], 2) for r in runs],
        }

    by_model = {}
    for name in opts.models:
        ours, hf = summary(results[name]["ours"]), summary(results[name]["hf"])
        by_model[name] = {"params": params[name], "ours": ours, "transformers": hf,
                          "ratio_responses_per_s": round(ours["responses_per_s"] / hf["responses_per_s"], 3),
                          "ratio_tokens_per_s": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3)}
    print(json.dumps({
        "benchmark": "model_worker_generation",
        "config": {k: v for k, v in vars(opts).items() if k not in ("impl", "checkpoint", "hf_checkpoint", "tokenizer")}
        | {"dtype": "float32", "torch": torch.__version__},
        "results": by_model,
    }, indent=2))


if __name__ == "__main__":
    main()
