"""Accuracy by preference strength (Table 8 layout) on data that carries strengths: PandaLM (three annotators)
and Open-Assistant (rank gaps), mapped onto the four-level scale by rewards.data.pandalm_strength and
rewards.data.oasst_strength. A reward model trained on the 80% split is evaluated on the fixed 20%; the
length rule and a bag-of-words linear model are broken down the same way, to show the shape is the data's.

    .venv/bin/python benchmarks/reward_strength_buckets.py --config small --max-minutes 8 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
from rewards.configs import CONFIG_NAMES  # noqa: E402 (torch-free)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", type=Path, default=None, help="a Llama checkpoint to start from (default: --config)")
    parser.add_argument("--config", default="small", choices=CONFIG_NAMES)
    parser.add_argument("--tokenizer", type=Path, default=DATA / "llama2-tokenizer" / "tokenizer.model")
    parser.add_argument("--max-minutes", type=float, default=5.0)
    parser.add_argument("--margin", default="small", choices=("none", "small", "large"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from reward_baselines import bag_of_words_accuracy

    from rewards.data import TokenizedPair, assign_splits, read_oasst_trees, read_pandalm, write_trl_jsonl
    from rewards.evaluate import build_report, format_markdown
    from rewards.train import RewardTrainConfig, train_reward_model

    pairs = read_pandalm(DATA / "pandalm" / "testset-v1.json") + read_oasst_trees(DATA / "oasst-trees" / "en_100_tree.jsonl")
    # A fixed 80/20 split within each (source, strength) group, so that every bucket is in the test set; the
    # source is kept as the pair's batch, so the report also breaks accuracy down by source.
    split = []
    for key in sorted({(p.source, p.strength) for p in pairs}, key=str):
        group = [dataclasses.replace(p, batch=p.source) for p in pairs if (p.source, p.strength) == key]
        split += assign_splits(group, 0.2)
    train = [p for p in split if p.split == "train"]
    test = [p for p in split if p.split == "test"]

    def rule_report(correct: list[bool]) -> dict:
        # a report of a rule's decisions: +1/-1 scores give the same by-strength breakdown as a model's
        items = [TokenizedPair((1,), (1,), 0.0, p.strength, p.domain, p.source) for p in test]
        scores = torch.tensor([1.0 if c else -1.0 for c in correct])
        return build_report(scores, torch.zeros(len(test)), items)

    bow = bag_of_words_accuracy(train, test)
    with tempfile.TemporaryDirectory(prefix="reward-strength-") as tmp:
        data = write_trl_jsonl(split, Path(tmp) / "pandalm_oasst.jsonl")
        source = {"init": str(args.init)} if args.init else {"config": args.config}
        config = RewardTrainConfig(
            kind="helpfulness", data=[str(data)], format="trl", tokenizer=str(args.tokenizer), out_dir=str(Path(tmp) / "run"),
            max_minutes=args.max_minutes, margin=args.margin, num_threads=args.threads, resume=False, mix=False, **source,
        )
        result = train_reward_model(config)
    reports = {
        "reward model": result.test_report,
        "shorter reply wins": rule_report([len(p.chosen) < len(p.rejected) for p in test]),
        "longer reply wins": rule_report([len(p.chosen) > len(p.rejected) for p in test]),
        "bag-of-words linear": rule_report(bow["test_correct"]),
    }
    print(json.dumps({
        "benchmark": "reward_strength_buckets", "command": " ".join(sys.argv),
        "n_train": result.n_train_pairs, "n_test": len(test), "steps": result.steps, "stopped": result.stopped,
        "by_strength": {name: r["by_strength"] for name, r in reports.items()},
        "by_source": {name: r["by_batch"] for name, r in reports.items()},
        "markdown": format_markdown(reports),
    }, indent=2))


if __name__ == "__main__":
    main()
