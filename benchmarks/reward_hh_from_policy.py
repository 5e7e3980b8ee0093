"""Issue 12: the HH-RLHF harmless safety reward model initialised from a policy, as the report does, against the
from-scratch `tiny` model in the same run. Prints JSON.

    .venv/bin/python benchmarks/reward_hh_from_policy.py --threads 2

(b), the policy route, within one wall-clock budget (--budget-minutes, 12) that this script enforces by giving
each stage a --max-minutes share of what is left:
  0. a SentencePiece tokenizer fitted to the text of the training split's pairs (rewards.tokenizer_training;
     --vocab 0: the Llama 2 tokenizer instead) and a random tiny Llama (seeded), saved in Meta's layout;
  1. language modelling (`training.sft`, --loss-on all --both-replies) on the training split's dialogues with
     both replies;
  2. SFT (`training.sft`, loss on the answers) on the training split's chosen replies;
  3. the safety reward model initialised from that policy (`rewards.train --init`), tested on the fixed 20%
     test split (rewards.data.assign_splits(pairs, 0.2), what rewards.train holds out).
The test split's text is read by none of 0-2. (a) is `--config tiny` from scratch, as
benchmarks/reward_hh_from_scratch.py runs it; the length rule (shorter reply wins) is scored on the same split.

--validate chooses settings without the test split: the rewards' validation cut (rewards.data.hold_out, 20% of the
training split) is held out of every stage, including the tokenizer and the SFT data (the chosen replies are
labels), and both reward models are scored on it instead of the test split.

The same stages by hand (DIR a work directory, PAIRS the HH file, LINES the training split's pairs in HH-RLHF
format with their context cut to the last user turn (policy_lines), INIT a random checkpoint with its tokenizer):
    python -m training.sft --init INIT --data LINES --format hh-rlhf --both-replies --loss-on all --seq-len 256 \
        --global-batch-rows 16 --micro-batch-rows 16 --learning-rate 2e-3 --epochs 6 --no-resume --out DIR/lm
    python -m training.sft --init DIR/lm/policy --data LINES --format hh-rlhf --seq-len 256 \
        --global-batch-rows 16 --micro-batch-rows 16 --learning-rate 1e-3 --epochs 2 --no-resume --out DIR/sft
    python -m rewards.train --kind safety --data PAIRS --format hh-rlhf --domain safety --no-mix --init DIR/sft/policy \
        --max-seq-len 256 --context-turns 1 --learning-rate 3e-4 --epochs 2 --global-batch-size 32 \
        --micro-batch-size 16 --out DIR/rm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO.parent / "shared" / "data"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, default=12.0, help="wall clock for (b), all stages together")
    p.add_argument("--validate", action="store_true", help="score on a validation cut of the training split instead of the test split")
    p.add_argument("--validation-fraction", type=float, default=0.2)
    p.add_argument("--skip-scratch", action="store_true", help="leave out (a), the from-scratch `tiny` model")
    p.add_argument("--data", type=Path, default=DATA / "hh-rlhf-harmless" / "pairs.jsonl.gz")
    p.add_argument("--llama-tokenizer", type=Path, default=DATA / "llama2-tokenizer" / "tokenizer.model")
    # the policy
    p.add_argument("--vocab", type=int, default=4096, help="pieces of the fitted tokenizer (0: the Llama 2 tokenizer)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256, help="tokens a packed row (and the model's context)")
    p.add_argument("--policy-context-turns", type=int, default=1,
                   help="the policy's examples keep this many newest context turns (odd; 0: all; see policy_lines)")
    # stage 1, language modelling
    p.add_argument("--lm-epochs", type=int, default=6)
    p.add_argument("--lm-lr", type=float, default=2e-3)
    p.add_argument("--lm-batch-rows", type=int, default=16)
    p.add_argument("--lm-share", type=float, default=0.7, help="at most this share of the budget")
    # stage 2, SFT
    p.add_argument("--sft-epochs", type=int, default=2, help="0: no SFT stage")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-batch-rows", type=int, default=16)
    p.add_argument("--sft-share", type=float, default=0.25, help="at most this share of the budget")
    # stage 3, the reward model
    p.add_argument("--rm-lr", type=float, default=3e-4)
    p.add_argument("--rm-epochs", type=int, default=2)
    p.add_argument("--rm-max-seq-len", type=int, default=256)
    p.add_argument("--rm-context-turns", type=int, default=1, help="0: the whole context")
    p.add_argument("--rm-batch", type=int, default=32)
    p.add_argument("--rm-micro-batch", type=int, default=16)
    p.add_argument("--rm-weight-decay", type=float, default=0.1)
    p.add_argument("--rm-ensemble", type=int, default=1,
                   help="this many reward models from the one policy (own head and batch order), scored with their mean")
    p.add_argument("--reserve-s", type=float, default=20.0, help="seconds of the budget kept for the final test pass")
    p.add_argument("--out", type=Path, default=None, help="keep the work directory here (default: a temp dir)")
    return p


class Budget:
    """What is left of (b)'s wall clock; each stage gets at most its share of it."""

    def __init__(self, minutes: float, reserve_s: float):
        self.total_s, self.reserve_s, self.start = minutes * 60.0, reserve_s, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def minutes_for(self, share: float | None) -> float:
        left = self.total_s - self.reserve_s - self.elapsed()
        if left <= 1.0:
            raise RuntimeError(f"the {self.total_s / 60:.0f}-minute budget is spent before this stage")
        return min(left, share * self.total_s if share is not None else left) / 60.0


def policy_lines(pairs, context_turns: int) -> list[str]:  # type: ignore[no-untyped-def]
    """HH-RLHF lines of the pairs with only their newest context turns (0: all of them).

    training.sft cuts an example longer than a row at its end (it keeps the first seq_len tokens), so in a long
    dialogue the final answer, which SFT learns and the reward model scores, would be lost; rewards.data.render_reply
    drops the oldest exchanges instead. Cutting the context here does the same for the policy's stages.
    """
    names = {"user": "Human", "assistant": "Assistant"}
    lines = []
    for p in pairs:
        dialogue = list(p.dialogue)[-context_turns:] if context_turns else list(p.dialogue)
        context = "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in dialogue) + "\n\nAssistant: "
        lines.append(json.dumps({"chosen": context + p.chosen, "rejected": context + p.rejected}) + "\n")
    return lines


def select_pairs(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """(training pairs the policy and RM learn from, pairs the RMs are scored on, hh-rlhf lines of the first)."""
    from rewards.data import assign_splits, hold_out, read_pairs

    pairs = assign_splits(read_pairs(args.data, "hh-rlhf"), 0.2)
    train = [p for p in pairs if p.split == "train"]
    scored = [p for p in pairs if p.split == "test"]
    if args.validate:
        train, scored = hold_out(train, args.validation_fraction)
    return train, scored, policy_lines(train, args.policy_context_turns)


def with_splits(train, scored):  # type: ignore[no-untyped-def]
    """The pairs as the reward trainer takes them: every pair's split given (train, or test = scored)."""
    return ([dataclasses.replace(p, split="train") for p in train]
            + [dataclasses.replace(p, split="test") for p in scored])


def random_policy(args: argparse.Namespace, tokenizer_path: Path, out: Path) -> Path:
    import torch

    from training.llama.checkpoint import save_meta_checkpoint
    from training.llama.model import ModelArgs, Transformer
    from training.llama.tokenizer import Tokenizer

    torch.manual_seed(args.seed)
    model = Transformer(ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                                  vocab_size=Tokenizer(tokenizer_path).n_words, multiple_of=32, max_seq_len=args.seq_len))
    save_meta_checkpoint(model, out)
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    return out


def run_policy_route(args: argparse.Namespace, train, scored, train_lines, work: Path) -> dict:  # type: ignore[no-untyped-def]
    from rewards.tokenizer_training import train_pair_tokenizer
    from rewards.train import RewardTrainConfig, train_reward_model
    from training.sft import SFTConfig, train_sft

    budget = Budget(args.budget_minutes, args.reserve_s)
    stages: dict[str, dict] = {}
    # The policy's data: the training pairs' own lines (the test split's, and in --validate the validation cut's,
    # are left out of the file; --split all keeps every line of it).
    sft_file = work / "train_pairs.jsonl"
    sft_file.write_text("".join(train_lines))

    t0 = time.monotonic()
    if args.vocab:
        tokenizer = train_pair_tokenizer(train, work / "tokenizer" / "tokenizer.model", vocab_size=args.vocab)
    else:
        tokenizer = args.llama_tokenizer
    init = random_policy(args, Path(tokenizer), work / "init")
    stages["tokenizer_and_init"] = {"wall_s": time.monotonic() - t0}

    common = dict(data=[str(sft_file)], format="hh-rlhf", split="all", seq_len=args.seq_len, resume=False,
                  num_threads=args.threads, seed=args.seed, checkpoint_every=0, micro_batch_rows=args.lm_batch_rows)
    policy = init
    for name, epochs, share, extra in (
        ("lm", args.lm_epochs, args.lm_share,
         dict(both_replies=True, loss_on="all", learning_rate=args.lm_lr, global_batch_rows=args.lm_batch_rows)),
        ("sft", args.sft_epochs, args.sft_share,
         dict(loss_on="answers", learning_rate=args.sft_lr, global_batch_rows=args.sft_batch_rows,
              micro_batch_rows=args.sft_batch_rows)),
    ):
        if not epochs:
            continue
        t0 = time.monotonic()
        config = SFTConfig(**{**common, **extra}, init=str(policy), epochs=epochs, out_dir=str(work / name),
                           max_minutes=budget.minutes_for(share))
        result = train_sft(config)
        policy = Path(result.policy_dir)
        stages[name] = {"wall_s": time.monotonic() - t0, "max_minutes": config.max_minutes, "steps": result.steps,
                        "total_steps": result.total_steps, "stopped": result.stopped, "n_rows": result.n_rows,
                        "n_truncated": result.n_truncated, "tokens_per_s": result.tokens_per_s,
                        "first_loss": result.history[0]["loss"] if result.history else None,
                        "final_loss": result.final_loss}

    t0 = time.monotonic()
    config = RewardTrainConfig(
        kind="safety", data=[str(args.data)], format="hh-rlhf", data_domain="safety", mix=False, init=str(policy),
        out_dir=str(work / "rm"),
        max_seq_len=args.rm_max_seq_len, global_batch_size=args.rm_batch, micro_batch_size=args.rm_micro_batch,
        learning_rate=args.rm_lr, epochs=args.rm_epochs, weight_decay=args.rm_weight_decay,
        context_turns=args.rm_context_turns or None, ensemble=args.rm_ensemble,
        max_minutes=budget.minutes_for(None), num_threads=args.threads,
        seed=args.seed, resume=False,
    )
    # Without --validate: the file itself, split by rewards.train (the same as `rewards.train --init`).
    result = train_reward_model(config, pairs=with_splits(train, scored) if args.validate else None)
    report = result.test_report or {}
    stages["rm"] = {"wall_s": time.monotonic() - t0, "max_minutes": config.max_minutes, "steps": result.steps,
                    "total_steps": result.total_steps, "stopped": result.stopped, "final_train_loss": result.final_loss,
                    "pairs_per_s": result.pairs_per_s, "ece": report.get("calibration", {}).get("ece"),
                    "ensemble_members": report.get("ensemble")}
    wall = budget.elapsed()
    return {"accuracy": report.get("accuracy"), "wall_s": wall, "within_budget": wall <= budget.total_s,
            "n_train": result.n_train_pairs, "n_scored": result.n_test_pairs, "stages": stages}


def run_from_scratch(args: argparse.Namespace, train, scored, work: Path) -> dict:  # type: ignore[no-untyped-def]
    from rewards.train import RewardTrainConfig, train_reward_model

    config = RewardTrainConfig(
        kind="safety", data=[str(args.data)], format="hh-rlhf", config="tiny", tokenizer=str(args.llama_tokenizer),
        out_dir=str(work / "scratch"), max_minutes=args.budget_minutes, num_threads=args.threads, seed=args.seed,
        resume=False,
    )
    t0 = time.monotonic()
    # --validate: the pairs with their splits given, the validation cut as the scored split.
    result = train_reward_model(config, pairs=with_splits(train, scored) if args.validate else None)
    report = result.test_report or {}
    return {"accuracy": report.get("accuracy"), "wall_s": time.monotonic() - t0, "steps": result.steps,
            "n_train": result.n_train_pairs, "n_scored": result.n_test_pairs,
            "ece": report.get("calibration", {}).get("ece")}


def main() -> None:
    args = build_parser().parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from reward_baselines import shorter_reply_accuracy

    train, scored, train_lines = select_pairs(args)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="reward-hh-policy-") as tmp:
        work = args.out or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        scratch = None if args.skip_scratch else run_from_scratch(args, train, scored, work)
        policy = run_policy_route(args, train, scored, train_lines, work)
    split = "validation" if args.validate else "test"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(json.dumps({
        "benchmark": "reward_hh_from_policy",
        "command": " ".join(sys.argv),
        "scored_split": split, "n_train": len(train), f"n_{split}": len(scored),
        f"{split}_accuracy": {
            "from_policy": policy["accuracy"],
            "from_scratch_tiny": scratch and scratch["accuracy"],
            "shorter_reply_wins": shorter_reply_accuracy(scored),
        },
        "goal": 0.62,
        "goal_met": (None if args.validate else
                     bool(policy["accuracy"] is not None and policy["accuracy"] >= 0.62 and policy["within_budget"])),
        "from_policy": policy,
        "from_scratch_tiny": scratch,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "settings": settings,
    }, indent=2))


if __name__ == "__main__":
    main()
