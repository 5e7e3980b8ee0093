"""Reward-model training: pairwise ranking loss, AdamW + cosine schedule, DDP, atomic checkpoints, exact resume.

python -m rewards.train --kind helpfulness|safety --data PATH... --format native|trl|hh-rlhf \
    (--init CHECKPOINT | --config tiny|tiny-ensemble|small --tokenizer PATH) [--ensemble N] [--max-minutes M] --out DIR
Several processes: torchrun --nproc-per-node N -m rewards.train ... (gloo on CPU, NCCL on GPU).

The layers: `rewards.trainer` trains one model on the shared engine (`training.engine`); `rewards.members` trains
several in turn, for `rewards.ensemble` and `rewards.soup`; this module chooses among them and is the CLI.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rewards.configs import CONFIG_NAMES
from rewards.data import FORMATS, PreferencePair
from rewards.ensemble import train_reward_ensemble
from rewards.losses import MARGIN_SCHEMES
from rewards.model import KINDS
from rewards.soup import train_reward_soup
from rewards.trainer import (  # noqa: F401  (the names reward-model users import from here)
    REPORT_FILE,
    TRAIN_STATE_FILE,
    RewardTrainConfig,
    RewardTrainResult,
    TrainProgress,
    drop_tokens,
    load_pairs,
    share_rare_tokens,
    tie_rare_embeddings,
    train_single_reward_model,
)
from training.engine import cosine_schedule, run_command, run_main, warmup_steps_for, without_history  # noqa: F401


def train_reward_model(
    config: RewardTrainConfig,
    *,
    pairs: Sequence[PreferencePair] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> RewardTrainResult:
    """Train a reward model as configured (one model, an ensemble or a soup); resumable, the same under torchrun.

    `pairs` (e.g. from the platform's database selector) replace config.data; pairs with a split keep it, the
    others get the fixed test_fraction split. `progress` is called on rank 0 after every optimizer step.
    """
    config = config.resolved(has_pairs=pairs is not None)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if config.ensemble and config.ensemble > 1:  # members may be soups themselves
        return train_reward_ensemble(config, pairs=pairs, progress=progress, train_member=_train_part)
    if config.soup_size and config.soup_size > 1:
        return train_reward_soup(config, pairs=pairs, progress=progress, train_ingredient=_train_part)
    return train_single_reward_model(config, pairs=pairs, progress=progress)


def _train_part(config: RewardTrainConfig, **kwargs: object) -> RewardTrainResult:
    """An ensemble's member or a soup's ingredient, itself possibly a soup: through this module's entry point."""
    return train_reward_model(config, **kwargs)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rewards.train", description="Train a helpfulness or safety reward model.")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--data", required=True, nargs="+", help="preference file(s), .jsonl or .jsonl.gz")
    parser.add_argument("--format", required=True, choices=FORMATS)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--init", help="chat/policy checkpoint directory (Meta or Hugging Face format)")
    source.add_argument("--config", choices=CONFIG_NAMES, help="train a named config from scratch")
    parser.add_argument("--tokenizer", help="tokenizer.model (required with --config)")
    parser.add_argument("--out", required=True, help="output directory (model/, train_state.pt, eval_report.json)")
    parser.add_argument("--max-minutes", type=float, default=None)
    parser.add_argument("--domain", dest="data_domain", choices=("helpfulness", "safety"),
                        help="domain of pairs whose format has none")
    parser.add_argument("--margin", default="none", choices=sorted(MARGIN_SCHEMES))
    parser.add_argument("--no-mix", dest="mix", action="store_false", help="train on the data as it is")
    parser.add_argument("--other-ratio", type=float, default=1.0)
    parser.add_argument("--helpfulness-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    for name, kind in (("max-seq-len", int), ("global-batch-size", int), ("micro-batch-size", int),
                       ("learning-rate", float), ("epochs", int), ("max-steps", int), ("validation-fraction", float),
                       ("eval-every", int), ("early-stopping-patience", int), ("stop-after-steps", int),
                       ("soup-size", int), ("context-turns", int)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--ensemble", type=int, default=None,
                        help="train this many models from their own initialisations, saved as one ensemble that "
                             "scores with their mean")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--no-resume", dest="resume", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--threads", dest="num_threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> RewardTrainConfig:
    values = vars(args).copy()
    values.pop("quiet")
    values["out_dir"] = values.pop("out")
    return RewardTrainConfig(**values)


class _RewardBar:
    """The command's tqdm bar: one for each ensemble member or soup ingredient, with accuracy beside the loss."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._part = 0

    def __call__(self, p: TrainProgress) -> None:
        if self._bar is None or p.part != self._part:
            from tqdm import tqdm

            self.close()
            desc = f"part {p.part + 1}/{p.parts}" if p.parts > 1 else None
            self._bar = tqdm(total=p.total_steps, initial=p.step - 1, unit="step", desc=desc, file=sys.stderr)
            self._part = p.part
        postfix = {"loss": f"{p.loss:.3f}", "acc": f"{p.accuracy:.2f}", "lr": f"{p.learning_rate:.1e}"}
        if p.validation_accuracy is not None:
            postfix["val"] = f"{p.validation_accuracy:.3f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    return run_command(lambda bar: train_reward_model(config, progress=bar), bar=None if args.quiet else _RewardBar(),
                       device=args.device, summary=without_history)

if __name__ == "__main__":
    run_main(main)
