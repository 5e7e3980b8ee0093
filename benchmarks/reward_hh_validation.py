"""Choosing a from-scratch recipe for HH-RLHF harmless without touching its test split: k-fold cross-validation
over the fixed 80% train split (1,440 pairs), so every train pair is scored once by a model that did not see it.
Prints JSON: the accuracy of each fold and seed, and their mean over all 1,440 held-out predictions.

    .venv/bin/python benchmarks/reward_hh_validation.py --config tiny --folds 4 --seeds 0 1 --threads 1
    .venv/bin/python benchmarks/reward_hh_validation.py --config tiny --dim 64 --soup-size 8
    .venv/bin/python benchmarks/reward_hh_validation.py --config tiny --mix-helpfulness 0.1
    .venv/bin/python benchmarks/reward_hh_validation.py --config tiny --tokenizer-vocab 2000 --tokenizer-type bpe
    .venv/bin/python benchmarks/reward_hh_validation.py --config tiny --context-turns 1 --max-seq-len 128 \
        --learning-rate 1e-3 --seeds 0 1 2 3 4 5
    .venv/bin/python benchmarks/reward_hh_validation.py --config tiny --ensemble 8 --seeds 0 1 2
    .venv/bin/python benchmarks/reward_hh_validation.py --config tiny-ensemble --seeds 0 1 2
(tiny-ensemble: 16 members of the line above's recipe, the same as --config tiny --context-turns 1 --max-seq-len 128
 --learning-rate 1e-3 --ensemble 16)
(--ensemble N trains N members of their own initialisation per fold and seed and scores with their mean; each
run also reports its members' mean accuracy, and --dump-margins writes every member's held-out margins, from which
ensembles of any subset of the members can be scored. --tokenizer-vocab fits a SentencePiece tokenizer to each fold's training pairs; --context last-user|none cuts the
pairs themselves, --context-turns is the training recipe's option that the saved model keeps; the folds are the
same for every variant.)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
from rewards.configs import CONFIG_NAMES  # noqa: E402 (torch-free)


def register_variant(base_name: str, *, dim: int | None, max_seq_len: int | None) -> str:
    """The name of a named config with another width or window, registered for this process only."""
    from rewards.configs import FROM_SCRATCH_CONFIGS

    if dim is None and max_seq_len is None:
        return base_name
    base = FROM_SCRATCH_CONFIGS[base_name]
    model, training = dict(base.model), dict(base.training)
    if dim is not None:
        model.update(dim=dim, n_heads=max(1, dim // 16), n_kv_heads=max(1, dim // 16))
    if max_seq_len is not None:
        model["max_seq_len"] = training["max_seq_len"] = max_seq_len
    name = f"{base_name}-dim{model['dim']}-len{model['max_seq_len']}"
    FROM_SCRATCH_CONFIGS[name] = dataclasses.replace(base, name=name, model=model, training=training)
    return name


def focus_context(pair, context: str):  # type: ignore[no-untyped-def]
    """The pair with its context cut to the last user turn ("last-user") or to one empty user turn ("none")."""
    import dataclasses

    last = pair.dialogue[-1]
    dialogue = [last] if context == "last-user" else [{"role": "user", "content": ""}]
    return dataclasses.replace(pair, dialogue=dialogue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", choices=CONFIG_NAMES)
    parser.add_argument("--dim", type=int, default=None, help="another model width (heads: dim // 16)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="another window (model and recipe)")
    parser.add_argument("--soup-size", type=int, default=None)
    parser.add_argument("--ensemble", type=int, default=None, help="members of independently trained models (mean score)")
    parser.add_argument("--dump-margins", type=Path, default=None,
                        help="write each member's chosen-minus-rejected score on each held-out pair here (JSON)")
    parser.add_argument("--mix-helpfulness", type=float, default=None,
                        help="add PandaLM and Open-Assistant pairs as this share of the training mix (safety recipe)")
    parser.add_argument("--tokenizer-vocab", type=int, default=None,
                        help="train a SentencePiece tokenizer of this size on each fold's training pairs (not Llama 2's)")
    parser.add_argument("--tokenizer-type", default="unigram", choices=("unigram", "bpe", "word"))
    parser.add_argument("--lowercase", action="store_true", help="the trained tokenizer folds case")
    for name, kind in (("epochs", int), ("learning-rate", float), ("weight-decay", float), ("token-dropout", float),
                       ("min-token-count", int)):
        parser.add_argument(f"--{name}", type=kind, default=None, help="override the config's recipe")
    parser.add_argument("--context", default="full", choices=("full", "last-user", "none"),
                        help="what of the shared context the model reads: all of it (up to the window), only the last "
                             "user turn, or nothing (an empty user turn)")
    parser.add_argument("--context-turns", type=int, default=None,
                        help="the recipe's context_turns (1: the last user turn; 0: all), as the trained model reads it")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rewards.configs import FROM_SCRATCH_CONFIGS
    from rewards.data import assign_splits, read_pairs
    from rewards.tokenizer_training import train_pair_tokenizer
    from rewards.train import RewardTrainConfig, train_reward_model

    config_name = register_variant(args.config, dim=args.dim, max_seq_len=args.max_seq_len)
    pairs = assign_splits(read_pairs(DATA / "hh-rlhf-harmless" / "pairs.jsonl.gz", "hh-rlhf"), 0.2)
    train = [p for p in pairs if p.split == "train"]  # the fixed test split is never read
    # Folds by content hash (as the fixed split): the same on every machine, and for every variant of the input.
    order = sorted(range(len(train)), key=lambda i: hashlib.sha1(("cv" + train[i].key()).encode()).hexdigest())
    if args.context != "full":
        train = [focus_context(p, args.context) for p in train]
    helpfulness = []
    if args.mix_helpfulness is not None:
        helpfulness = [dataclasses.replace(p, split="train") for p in
                       read_pairs(DATA / "pandalm" / "testset-v1.json", "pandalm")
                       + read_pairs(DATA / "oasst-trees" / "en_100_tree.jsonl", "oasst")]

    from rewards.evaluate import load_for_pairs, member_margins

    runs, t0 = [], time.perf_counter()
    margins: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="reward-hh-cv-") as tmp:
        for fold in range(args.folds):
            held = set(order[fold :: args.folds])
            # The held-out fold plays the test split; everything else trains.
            fold_pairs = [dataclasses.replace(p, split="test" if i in held else "train") for i, p in enumerate(train)]
            tokenizer = DATA / "llama2-tokenizer" / "tokenizer.model"
            if args.tokenizer_vocab:  # fitted to this fold's training pairs only
                tokenizer = train_pair_tokenizer(
                    [p for p in fold_pairs if p.split == "train"], Path(tmp) / f"tokenizer-{fold}.model",
                    vocab_size=args.tokenizer_vocab, model_type=args.tokenizer_type, lowercase=args.lowercase)
            for seed in args.seeds:
                config = RewardTrainConfig(
                    kind="safety", data=[], format="hh-rlhf", config=config_name,
                    tokenizer=str(tokenizer), out_dir=str(Path(tmp) / "run"),
                    resume=False, seed=seed, num_threads=args.threads, soup_size=args.soup_size,
                    helpfulness_fraction=args.mix_helpfulness or 0.1, epochs=args.epochs,
                    learning_rate=args.learning_rate, weight_decay=args.weight_decay, token_dropout=args.token_dropout,
                    min_token_count=args.min_token_count, label_smoothing=args.label_smoothing,
                    context_turns=args.context_turns, ensemble=args.ensemble,
                )
                t_run = time.perf_counter()
                result = train_reward_model(config, pairs=fold_pairs + helpfulness)
                assert result.test_report is not None
                run = {"fold": fold, "seed": seed, "accuracy": result.test_report["accuracy"],
                       "n_train": result.n_train_pairs, "n_held_out": result.n_test_pairs,
                       "wall_s": time.perf_counter() - t_run}
                if "ensemble" in result.test_report:
                    run["mean_member_accuracy"] = result.test_report["ensemble"]["mean_member_accuracy"]
                runs.append(run)
                if args.dump_margins:
                    held_out = [p for p in fold_pairs if p.split == "test"]
                    model, _, items = load_for_pairs(Path(config.out_dir) / "model", held_out)
                    margins.append({"fold": fold, "seed": seed, "keys": [p.key() for p in held_out],
                                    "margins": member_margins(model, items, batch_size=64).tolist()})
    if args.dump_margins:
        args.dump_margins.write_text(json.dumps({"command": " ".join(sys.argv), "runs": margins}))
    print(json.dumps({
        "benchmark": "reward_hh_validation",
        "command": " ".join(sys.argv),
        "config": config_name, "model": FROM_SCRATCH_CONFIGS[config_name].model, "soup_size": args.soup_size,
        "ensemble": args.ensemble, "mix_helpfulness": args.mix_helpfulness, "context": args.context, "context_turns": args.context_turns, "label_smoothing": args.label_smoothing,
        "tokenizer": {"vocab": args.tokenizer_vocab, "type": args.tokenizer_type, "lowercase": args.lowercase}
        if args.tokenizer_vocab else "llama2",
        "overrides": {k: getattr(args, k) for k in ("epochs", "learning_rate", "weight_decay", "token_dropout",
                                                    "min_token_count") if getattr(args, k) is not None},
        "mean_accuracy": sum(r["accuracy"] for r in runs) / len(runs),
        "runs": runs, "wall_s": time.perf_counter() - t0,
    }, indent=2))


if __name__ == "__main__":
    main()
