"""Training-step throughput and peak memory: training.llama vs transformers.LlamaForCausalLM, same weights.

    .venv/bin/python benchmarks/llama_train_step.py [--threads 2] [--rounds 3] [--fused-loss] [--malloc-tuned] [--compile]
        [--data random|hh-sft] [--autocast-bf16] [--engine]

A step is forward + next-token cross-entropy + backward on a batch of packed rows. `--data random` (pretraining):
random-token documents, each BOS ... EOS, concatenated and cut to seq_len + 1, a target at every position and
no document-boundary masking, as Llama 2 pretrains. `--data hh-sft` (supervised fine-tuning, the step of the
platform's SFT and rejection-sampling fine-tuning): the HH-RLHF dialogues of ../shared/data with their chosen
answers, in the Llama 2 chat format (Llama 2 tokenizer), packed whole into rows (`training.llama.packing`), each
dialogue attending only to itself, the loss on the answers only as Llama 2's SFT zeroes it on the prompts.
Both models get the same tokens and `position_ids` (transformers builds its block-diagonal mask from them).
`--engine` makes a step a whole optimizer step: ours is `training.sft`'s step on the shared training engine
(forward with the chunked loss, backward, clipping, AdamW with the report's settings); transformers' the same
forward/backward followed by `clip_grad_norm_` and `torch.optim.AdamW` with the same settings (both fused).
Each implementation runs in its own child process, alternating for `--rounds` rounds, so that the peak
resident memory is measured per implementation and machine noise hits both alike. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from benchmarks.llama_sampling import proc_status_bytes, start_peak_window  # noqa: E402

SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))


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


def hh_sft_batch(batch: int, seq_len: int):
    """(inputs, targets, position_ids), each (batch, seq_len): HH-RLHF dialogues with their chosen answers, packed.

    Every dialogue is packed (first fit, longest first) and `batch` rows are taken evenly spaced through the
    rows, so that long and short dialogues are both represented. Also returns what the rows hold.
    """
    sys.path.insert(0, str(REPO_ROOT))
    from rewards.data import read_hh_rlhf
    from training.llama.packing import PackedDocuments, pack_examples
    from training.llama.tokenizer import Tokenizer

    pairs_path = SHARED_DATA / "hh-rlhf-harmless" / "pairs.jsonl.gz"
    tokenizer_path = SHARED_DATA / "llama2-tokenizer" / "tokenizer.model"
    for path in (pairs_path, tokenizer_path):
        if not path.is_file():
            raise SystemExit(f"{path} is missing: --data hh-sft reads the shared reference data "
                             f"(set SHARED_DATA_DIR to its folder)")
    tokenizer = Tokenizer(tokenizer_path)
    examples = []
    for pair in read_hh_rlhf(pairs_path):
        messages = [*pair.dialogue, {"role": "assistant", "content": pair.chosen}]
        examples.append(tokenizer.encode_dialog(messages, allow_special_tags=True))
    packed = pack_examples(examples, seq_len + 1, pad_id=0)
    n_rows = packed.tokens.shape[0]
    rows = [i * n_rows // batch for i in range(batch)]
    tokens, targets, positions = packed.tokens[rows], packed.targets[rows], packed.position_ids[rows]
    # dialogues in the chosen rows (the padding at a row's end is a document too, with no targets)
    n_docs = sum(len([b for b in bounds if bool((targets[r, b[0]:b[1]] != -100).any())])
                 for r, bounds in enumerate(PackedDocuments.from_position_ids(positions).bounds))
    about = {"dialogues": len(examples), "rows_packed": n_rows, "fill": round(packed.fill, 3),
             "truncated": packed.n_truncated, "dialogues_in_batch": n_docs,
             "target_fraction": round(float((targets[:, :-1] != -100).float().mean()), 3)}
    # a row of seq_len + 1 packed tokens: the inputs are its first seq_len, each with its own target already
    return tokens[:, :-1].contiguous(), targets[:, :-1].contiguous(), positions[:, :-1].contiguous(), about


def engine_step(opts, model, inputs, targets, position_ids):
    """A whole optimizer step: ours through training.sft on the shared engine, transformers' by hand alike."""
    import torch

    if opts.impl == "ours":
        from training.engine import Engine, OptimizerSettings, setup_distributed
        from training.llama.packing import PackedBatch
        from training.sft import SFTConfig, _SFTRun

        rows = PackedBatch(inputs, targets, position_ids, n_examples=0, n_truncated=0, fill=1.0)
        config = SFTConfig(init="-", data=["-"], global_batch_rows=opts.batch, micro_batch_rows=opts.batch)
        engine = Engine(model, OptimizerSettings(learning_rate=2e-5), total_steps=10_000,
                        dist=setup_distributed("cpu"))
        run = _SFTRun(config, rows, engine)
        return lambda: run.train_step()["loss"]

    import torch.nn.functional as F

    # fused, as ours (training.engine) and as transformers' Trainer defaults to ("adamw_torch_fused")
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1,
                                  fused=True)

    def step() -> float:
        logits = model(input_ids=inputs, position_ids=position_ids, use_cache=False).logits
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def plain_step(opts, model, logits_of, vocab_size, inputs, targets, position_ids):
    """Forward, loss and backward only (no optimizer), as the issue-3 measurements."""
    import torch
    import torch.nn.functional as F

    def step() -> float:
        # --autocast-bf16: the forward pass under CPU bf16 autocast on both sides (backward follows it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.autocast_bf16):
            if opts.fused_loss and opts.impl == "ours":
                # the loss without the (batch, seq_len, vocab) logits, and only where there are targets:
                # training.llama.loss.linear_cross_entropy
                loss = model(inputs, position_ids=position_ids, targets=targets)
            else:
                logits = logits_of(inputs, position_ids)
                loss = F.cross_entropy(logits.view(-1, vocab_size).float(), targets.view(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    return step


def child(opts: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(opts.threads)
    if opts.impl == "ours":
        sys.path.insert(0, str(REPO_ROOT))
        from training.llama.checkpoint import load_checkpoint

        model, args = load_checkpoint(opts.checkpoint)
        vocab_size = args.vocab_size

        def logits_of(x, position_ids=None):
            return model(x, position_ids=position_ids)
    else:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(opts.checkpoint, attn_implementation="sdpa")
        vocab_size = model.config.vocab_size

        def logits_of(x, position_ids=None):
            # without a cache transformers reads packed rows from position_ids (a block-diagonal mask)
            return model(input_ids=x, position_ids=position_ids, use_cache=False).logits

    model.train()
    if opts.activation_checkpointing:
        if opts.impl == "ours":
            model.set_activation_checkpointing(True)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if opts.compile:
        # the same granularity on both sides: each decoder block through torch.compile (inductor)
        if opts.impl == "ours":
            model.compile_blocks()
        else:
            for layer in model.model.layers:
                layer.compile()
    if opts.data == "hh-sft":
        inputs, targets, position_ids, batch_about = hh_sft_batch(opts.batch, opts.seq_len)
    else:
        (inputs, targets), position_ids, batch_about = packed_batch(opts.batch, opts.seq_len, vocab_size, seed=0), None, None

    if opts.engine:
        step = engine_step(opts, model, inputs, targets, position_ids)
    else:
        step = plain_step(opts, model, logits_of, vocab_size, inputs, targets, position_ids)

    rss_loaded = start_peak_window(model)
    t0 = time.perf_counter()
    losses = [step()]  # with --compile, the compilation happens here, forward and backward
    first_step_s = time.perf_counter() - t0
    losses += [step() for _ in range(opts.warmup - 1)]
    times, user, system = [], [], []
    for _ in range(opts.steps):
        c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        losses.append(step())
        c1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        times.append(t1 - t0)
        user.append(c1.ru_utime - c0.ru_utime)
        system.append(c1.ru_stime - c0.ru_stime)
    peak = proc_status_bytes("VmHWM")
    print(json.dumps({
        "first_step_s": first_step_s,
        "step_s": statistics.median(times),
        "tokens_per_s": opts.batch * opts.seq_len / statistics.median(times),
        # CPU seconds of this process per step (all threads), user and kernel (page faults of fresh memory);
        # less disturbed than wall time when other jobs share the cores
        "user_s": statistics.median(user),
        "sys_s": statistics.median(system),
        "first_loss": losses[0],
        "peak_rss_mib": peak / 2**20,
        "peak_over_loaded_mib": (peak - rss_loaded) / 2**20,
        "batch": batch_about,
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
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (at least 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--data", choices=["random", "hh-sft"], default="random",
                        help="random: pretraining rows, every position a target, no document masking; hh-sft: "
                             "HH-RLHF dialogues packed whole, each attending to itself, loss on the answers only")
    parser.add_argument("--fused-loss", action="store_true",
                        help="ours computes the loss with model(inputs, targets=...), chunked, without the logits; "
                             "transformers keeps F.cross_entropy on its logits (it has no CPU equivalent)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder block on both sides (ours: model.compile_blocks())")
    parser.add_argument("--autocast-bf16", action="store_true",
                        help="both sides' forward pass under torch.autocast('cpu', dtype=torch.bfloat16)")
    parser.add_argument("--malloc-tuned", action="store_true",
                        help="both children run with glibc's malloc keeping freed memory (MALLOC_MMAP_THRESHOLD_, "
                             "MALLOC_TRIM_THRESHOLD_), so big tensors reuse pages instead of faulting in fresh ones")
    parser.add_argument("--engine", action="store_true",
                        help="whole optimizer steps: ours training.sft's on the shared engine, transformers' with "
                             "clip_grad_norm_ and torch AdamW (same settings)")
    parser.add_argument("--impl", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.data == "hh-sft" and opts.vocab != 32000:
        parser.error("--data hh-sft uses the Llama 2 tokenizer: --vocab must be 32000")
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
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(Transformer(args), tmp)
        n_params = sum(p.numel() for p in Transformer(args, device="meta").parameters())
        results: dict[str, list[dict]] = {"ours": [], "hf": []}
        flags = ("activation_checkpointing", "fused_loss", "malloc_tuned", "compile", "autocast_bf16", "engine")
        passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(opts).items()
                       if k not in ("impl", "checkpoint", *flags) and v is not None]
        passthrough += [f"--{k.replace('_', '-')}" for k in flags if getattr(opts, k)]
        env = dict(os.environ)
        if opts.malloc_tuned:
            # Every allocation from the heap, none handed back: the same setting for both implementations.
            env.update(MALLOC_MMAP_THRESHOLD_=str(2**40), MALLOC_TRIM_THRESHOLD_=str(2**40))
        for _ in range(opts.rounds):
            for impl in ("ours", "hf"):
                out = subprocess.run([sys.executable, __file__, *passthrough, f"--impl={impl}",
                                      f"--checkpoint={tmp}"], check=True, capture_output=True, text=True,
                                     env=env).stdout
                results[impl].append(json.loads(out.strip().splitlines()[-1]))

    def summary(runs: list[dict]) -> dict:
        return {
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
            "step_s": round(statistics.median(r["step_s"] for r in runs), 4),
            # the first child's first step: with --compile, a cold compilation (later children hit
            # inductor's on-disk cache)
            "first_step_s": [round(r["first_step_s"], 2) for r in runs],
            "user_s": round(statistics.median(r["user_s"] for r in runs), 3),
            "sys_s": round(statistics.median(r["sys_s"] for r in runs), 3),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
            "peak_over_loaded_mib": round(max(r["peak_over_loaded_mib"] for r in runs), 1),
            "first_loss": round(runs[0]["first_loss"], 5),
        }

    ours, hf = summary(results["ours"]), summary(results["hf"])
    print(json.dumps({
        "benchmark": "llama_train_step",
        "config": {**{k: v for k, v in vars(opts).items() if k not in ("impl", "checkpoint")},
                   "params": n_params, "dtype": "float32 weights" + (", bf16 autocast" if opts.autocast_bf16 else ""),
                   "torch": torch.__version__,
                   "batch": results["ours"][0]["batch"]},  # what the rows hold, as a child packed them
        "ours": ours,
        "transformers": hf,
        "speedup": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
        # ours over transformers within each round (the two runs next to each other in time): steadier than
        # the ratio of medians when the machine's load changes between rounds
        "round_speedups": [round(o["tokens_per_s"] / h["tokens_per_s"], 3)
                           for o, h in zip(results["ours"], results["hf"], strict=True)],
        "cpu_time_ratio": round((hf["user_s"] + hf["sys_s"]) / max(ours["user_s"] + ours["sys_s"], 1e-9), 3),
        # 1/5/15-minute load averages before and after (the machine has other users)
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "memory_ratio_over_loaded": round(ours["peak_over_loaded_mib"] / hf["peak_over_loaded_mib"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
