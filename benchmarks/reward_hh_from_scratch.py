"""From-scratch reward model on the HH-RLHF harmless pairs: accuracy on the fixed 20% test split, within a
time budget, beside the length rule and a bag-of-words linear model on the same split. Prints JSON.

    .venv/bin/python benchmarks/reward_hh_from_scratch.py --config tiny --max-minutes 12 --threads 2
(the same run as: python -m rewards.train --kind safety --data PAIRS --format hh-rlhf --config tiny
 --tokenizer llama2-tokenizer/tokenizer.model --max-minutes 12 --out DIR)
    .venv/bin/python benchmarks/reward_hh_from_scratch.py --config tiny --dim 64 --soup-size 8 --seed 0
(the recipe chosen by benchmarks/reward_hh_validation.py: 8 runs of a wider `tiny`, their weights averaged)
    .venv/bin/python benchmarks/reward_hh_from_scratch.py --config tiny --ensemble 8 --seed 0 --threads 1
(an ensemble: 8 `tiny` runs of their own initialisations, scored with their mean; rewards.ensemble)
    .venv/bin/python benchmarks/reward_hh_from_scratch.py --config tiny-ensemble --max-minutes 12 --threads 1 --seed 0
(the ensemble chosen by cross-validation: 16 models that read the last user turn, 128 tokens, lr 1e-3)
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
    parser.add_argument("--max-minutes", type=float, default=12.0)
    parser.add_argument("--dim", type=int, default=None, help="another model width (as reward_hh_validation.py)")
    parser.add_argument("--soup-size", type=int, default=None, help="average this many runs (rewards.soup)")
    parser.add_argument("--ensemble", type=int, default=None,
                        help="this many independently trained runs, scored with their mean (rewards.ensemble)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="another window (model and recipe)")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--context-turns", type=int, default=None, help="read only the newest context turns (1: the last user turn)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA / "hh-rlhf-harmless" / "pairs.jsonl.gz")
    parser.add_argument("--tokenizer", type=Path, default=DATA / "llama2-tokenizer" / "tokenizer.model")
    parser.add_argument("--out", type=Path, default=None, help="keep the trained model here (default: a temp dir)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from reward_baselines import bag_of_words_accuracy, shorter_reply_accuracy
    from reward_hh_validation import register_variant

    from rewards.data import assign_splits, read_pairs
    from rewards.evaluate import format_markdown
    from rewards.train import RewardTrainConfig, train_reward_model

    pairs = assign_splits(read_pairs(args.data, "hh-rlhf"), 0.2)
    train = [p for p in pairs if p.split == "train"]
    test = [p for p in pairs if p.split == "test"]
    bow = bag_of_words_accuracy(train, test)

    with tempfile.TemporaryDirectory(prefix="reward-hh-") as tmp:
        out = args.out or Path(tmp) / "run"
        config = RewardTrainConfig(
            kind="safety", data=[str(args.data)], format="hh-rlhf",
            config=register_variant(args.config, dim=args.dim, max_seq_len=args.max_seq_len), tokenizer=str(args.tokenizer),
            out_dir=str(out), max_minutes=args.max_minutes, num_threads=args.threads, seed=args.seed, resume=False,
            soup_size=args.soup_size, learning_rate=args.learning_rate, context_turns=args.context_turns,
            ensemble=args.ensemble,
        )
        t0 = time.perf_counter()
        result = train_reward_model(config)
        wall = time.perf_counter() - t0
    report = result.test_report or {}
    print(json.dumps({
        "benchmark": "reward_hh_from_scratch",
        "command": " ".join(sys.argv),
        "config": config.config, "soup_size": args.soup_size, "ensemble": args.ensemble, "learning_rate": args.learning_rate,
        "context_turns": args.context_turns, "threads": args.threads, "max_minutes": args.max_minutes,
        "n_train": result.n_train_pairs, "n_validation": result.n_validation_pairs, "n_test": result.n_test_pairs,
        "test_accuracy": report.get("accuracy"),
        "best_validation_accuracy": result.best_validation_accuracy, "best_step": result.best_step,
        "steps": result.steps, "total_steps": result.total_steps, "stopped": result.stopped,
        "wall_s": wall, "pairs_per_s": result.pairs_per_s,
        "final_train_loss": result.final_loss,
        "baselines": {
            "shorter_reply_wins": shorter_reply_accuracy(test),
            "bag_of_words_linear": bow["test_accuracy"], "bag_of_words_train": bow["train_accuracy"],
        },
        "calibration_ece": report.get("calibration", {}).get("ece"),
        "ensemble_members": report.get("ensemble"),
        "markdown": format_markdown({"HH harmless (20% test)": report}) if report else None,
        "validation_curve": [(h["step"], h["validation_accuracy"]) for h in result.history if "validation_accuracy" in h],
    }, indent=2))


if __name__ == "__main__":
    main()
