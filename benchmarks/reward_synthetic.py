"""From-scratch reward model on synthetic, clearly separable pairs (rewards.synthetic): the sanity floor.

    .venv/bin/python benchmarks/reward_synthetic.py --config tiny --threads 2
Prints JSON with the test accuracy (goal: at least 0.95).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
from rewards.configs import CONFIG_NAMES  # noqa: E402 (torch-free)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=CONFIG_NAMES)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=DATA / "llama2-tokenizer" / "tokenizer.model")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rewards.data import write_trl_jsonl
    from rewards.synthetic import synthetic_pairs
    from rewards.train import RewardTrainConfig, train_reward_model

    with tempfile.TemporaryDirectory(prefix="reward-synthetic-") as tmp:
        data = write_trl_jsonl(synthetic_pairs(args.pairs, seed=0), Path(tmp) / "synthetic.jsonl")
        config = RewardTrainConfig(
            kind="helpfulness", data=[str(data)], format="trl", config=args.config, tokenizer=str(args.tokenizer),
            out_dir=str(Path(tmp) / "run"), epochs=args.epochs, num_threads=args.threads, resume=False, mix=False,
        )
        t0 = time.perf_counter()
        result = train_reward_model(config)
        wall = time.perf_counter() - t0
    print(json.dumps({
        "benchmark": "reward_synthetic", "command": " ".join(sys.argv), "config": args.config,
        "n_train": result.n_train_pairs, "n_test": result.n_test_pairs, "steps": result.steps,
        "test_accuracy": result.test_report["accuracy"] if result.test_report else None,
        "wall_s": wall, "pairs_per_s": result.pairs_per_s,
    }, indent=2))


if __name__ == "__main__":
    main()
