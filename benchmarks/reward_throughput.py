"""Reward-model training throughput and peak memory: rewards.train against TRL's RewardTrainer, in one run.

Both trainers start from the same randomly initialised Llama (saved in Meta's format for ours and in Hugging
Face's for TRL's LlamaForSequenceClassification), train on the same HH-RLHF harmless pairs rendered to the same
token ids, with the same batch, steps, optimiser, schedule and threads, one after the other in fresh processes.
Prints one JSON object with both sides and the ratio.

    .venv/bin/python benchmarks/reward_throughput.py --trl-python var/bench-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _prepare(args: argparse.Namespace, work: Path) -> Path:
    import torch

    from rewards.data import assign_splits, read_pairs, tokenize_pairs
    from training.llama.checkpoint import save_hf_checkpoint, save_meta_checkpoint
    from training.llama.model import ModelArgs, Transformer
    from training.llama.tokenizer import Tokenizer

    pairs = assign_splits(read_pairs(args.data, "hh-rlhf"), 0.2)
    tokenizer = Tokenizer(args.tokenizer)
    render = lambda split: [  # noqa: E731
        [list(p.chosen_ids), list(p.rejected_ids)]
        for p in tokenize_pairs(tokenizer, [q for q in pairs if q.split == split], max_seq_len=args.max_seq_len)
    ]
    model_args = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                           vocab_size=tokenizer.n_words, multiple_of=32, max_seq_len=args.max_seq_len)
    torch.manual_seed(args.seed)
    base = Transformer(model_args)
    save_meta_checkpoint(base, work / "init-meta")
    save_hf_checkpoint(base, work / "init-hf")
    payload = {
        "train": render("train"), "test": render("test"), "threads": args.threads, "seed": args.seed,
        "hf_init": str(work / "init-hf"), "meta_init": str(work / "init-meta"), "tokenizer": str(args.tokenizer),
        "data": str(args.data), "trl_out": str(work / "trl-out"), "ours_out": str(work / "ours-out"),
        "max_seq_len": args.max_seq_len,
        "hparams": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": 5},
        "model_args": model_args.to_params_json(),
    }
    path = work / "payload.json"
    path.write_text(json.dumps(payload))
    return path


def _ours(payload_path: str) -> None:
    payload = json.loads(Path(payload_path).read_text())
    import torch

    torch.set_num_threads(payload["threads"])
    from rewards.train import RewardTrainConfig, train_reward_model

    h = payload["hparams"]
    config = RewardTrainConfig(
        kind="safety", data=[payload["data"]], format="hh-rlhf", init=payload["meta_init"],
        tokenizer=payload["tokenizer"], out_dir=payload["ours_out"], mix=False, test_fraction=0.2,
        max_seq_len=payload["max_seq_len"], global_batch_size=h["batch"], micro_batch_size=h["batch"],
        learning_rate=h["lr"], epochs=1000, max_steps=h["steps"], validation_fraction=0.0, seed=payload["seed"],
        num_threads=payload["threads"], resume=False,
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = train_reward_model(config)
    wall = time.perf_counter() - t0
    print(json.dumps({
        "trainer": "rewards.train", "steps": result.steps, "seconds": h["steps"] * h["batch"] / result.pairs_per_s,
        "pairs_per_s": result.pairs_per_s, "wall_s_with_data_and_eval": wall,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_train_mib": rss_before / 1024, "test_accuracy": result.test_report["accuracy"],
        "final_loss": result.final_loss,
    }))


def _run(cmd: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(json.loads(Path(cmd[-1]).read_text())["threads"]))
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-python", default=str(REPO / "var" / "bench-venv" / "bin" / "python"))
    parser.add_argument("--data", type=Path, default=DATA / "hh-rlhf-harmless" / "pairs.jsonl.gz")
    parser.add_argument("--tokenizer", type=Path, default=DATA / "llama2-tokenizer" / "tokenizer.model")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("ours",), help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "ours":
        _ours(args.payload)
        return
    with tempfile.TemporaryDirectory(prefix="reward-throughput-") as tmp:
        payload = _prepare(args, Path(tmp))
        ours = _run([sys.executable, str(Path(__file__).resolve()), "--worker", "ours", "--payload", str(payload)])
        trl = _run([args.trl_python, str(REPO / "benchmarks" / "reward_throughput_trl.py"), "--payload", str(payload)])
    print(json.dumps({
        "benchmark": "reward_throughput",
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "payload")} | {"data": str(args.data), "tokenizer": str(args.tokenizer)},
        "ours": ours, "trl": trl,
        "speedup_pairs_per_s": ours["pairs_per_s"] / trl["pairs_per_s"],
        "peak_rss_ratio_ours_over_trl": ours["peak_rss_mib"] / trl["peak_rss_mib"],
        "accuracy_difference_ours_minus_trl": ours["test_accuracy"] - trl["test_accuracy"],
    }, indent=2, default=str))


if __name__ == "__main__":
    main()
