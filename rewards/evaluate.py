"""Reward-model evaluation: accuracy overall, by strength (Table 8), by domain and batch; margin; calibration.

python -m rewards.evaluate --model DIR --data PATH --format native|trl|hh-rlhf|pandalm|oasst [--split test]
prints the JSON report (its `accuracy` is between 0 and 1); --markdown prints the Table 8 layout instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rewards.data import (
    FORMATS,
    PreferencePair,
    TokenizedPair,
    assign_splits,
    collate_pairs,
    read_pairs,
    tokenize_pairs,
)
from rewards.losses import STRENGTHS
from rewards.model import AnyRewardModel, EnsembleRewardModel, RewardModelInfo, member_scores

STRENGTH_TITLES = {
    "significantly_better": "Significantly Better",
    "better": "Better",
    "slightly_better": "Slightly Better",
    "negligibly_better": "Negligibly Better / Unsure",
}
CALIBRATION_BINS = 5


@torch.no_grad()
def score_pairs_by_member(
    model: AnyRewardModel, items: Sequence[TokenizedPair], *, batch_size: int = 16, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (n_members, n) of the chosen and of the rejected conversations, in the order of items: every
    member's of an ensemble, one row for a single model."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_members = len(model.members) if isinstance(model, EnsembleRewardModel) else 1
    chosen = torch.empty(n_members, len(items))
    rejected = torch.empty(n_members, len(items))
    order = sorted(range(len(items)), key=lambda i: items[i].length)  # similar lengths: little padding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        tokens, lengths, _ = collate_pairs([items[i] for i in idx])
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            scores = member_scores(model, tokens.to(device), lengths=lengths.to(device)).float().cpu()
        chosen[:, idx] = scores[:, : len(idx)]
        rejected[:, idx] = scores[:, len(idx) :]
    model.train(was_training)
    return chosen, rejected


def score_pairs(
    model: AnyRewardModel, items: Sequence[TokenizedPair], *, batch_size: int = 16, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores (n,) of the chosen and of the rejected conversations, in the order of items (an ensemble's: the
    members' mean, as it scores)."""
    chosen, rejected = score_pairs_by_member(model, items, batch_size=batch_size, device=device)
    return chosen.mean(dim=0), rejected.mean(dim=0)


def member_margins(model: AnyRewardModel, items: Sequence[TokenizedPair], *, batch_size: int = 16) -> torch.Tensor:
    """Chosen minus rejected score (n_members, n) of every member of an ensemble (one row for a single model)."""
    return torch.sub(*score_pairs_by_member(model, items, batch_size=batch_size))


def _accuracy(correct: torch.Tensor) -> float | None:
    return None if correct.numel() == 0 else float(correct.float().mean())


def _group(correct: torch.Tensor, keys: Sequence[str | None], order: Sequence[str] | None = None) -> dict[str, Any]:
    names = list(order) if order is not None else sorted({k for k in keys if k is not None})
    if any(k is None for k in keys):
        names.append("unknown")
    out = {}
    for name in names:
        mask = torch.tensor([(k if k is not None else "unknown") == name for k in keys], dtype=torch.bool)
        out[name] = {"n": int(mask.sum()), "accuracy": _accuracy(correct[mask])}
    return out


def calibration(diff: torch.Tensor, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """How well sigmoid(score difference) predicts that the model orders a pair as the annotator did.

    The confidence of a pair is sigmoid(|diff|), in [0.5, 1]; pairs are binned on it and each bin's mean
    confidence is set against its accuracy. ECE is the pair-weighted mean gap.
    """
    confidence = torch.sigmoid(diff.abs())
    correct = (diff > 0).float()
    edges = torch.linspace(0.5, 1.0, bins + 1)
    table = []
    ece = 0.0
    for b in range(bins):
        upper = confidence <= edges[b + 1] if b == bins - 1 else confidence < edges[b + 1]
        mask = (confidence >= edges[b]) & upper
        n = int(mask.sum())
        if n == 0:
            table.append({"bin": [float(edges[b]), float(edges[b + 1])], "n": 0, "confidence": None, "accuracy": None})
            continue
        conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
        ece += n / max(1, diff.numel()) * abs(conf - acc)
        table.append({"bin": [round(float(edges[b]), 3), round(float(edges[b + 1]), 3)], "n": n, "confidence": conf, "accuracy": acc})
    log_loss = float(-F.logsigmoid(diff).mean()) if diff.numel() else None
    return {"ece": ece, "log_loss": log_loss, "bins": table}


def build_report(chosen: torch.Tensor, rejected: torch.Tensor, items: Sequence[TokenizedPair]) -> dict[str, Any]:
    """The evaluation report of scored pairs as a JSON-ready dict."""
    diff = chosen - rejected  # (n,)
    correct = diff > 0  # a tie counts as wrong: the model has not ordered the pair
    by_strength = _group(correct, [p.strength for p in items], STRENGTHS)
    return {
        "n_pairs": len(items),
        "accuracy": _accuracy(correct),
        "mean_margin": float(diff.mean()) if diff.numel() else None,
        "by_strength": by_strength,
        "by_domain": _group(correct, [p.domain for p in items]),
        "by_batch": _group(correct, [p.batch for p in items]),
        "calibration": calibration(diff),
        "length_rule_accuracy": _accuracy(
            torch.tensor([len(p.chosen_ids) < len(p.rejected_ids) for p in items], dtype=torch.bool)
        ),
    }


def evaluate_items(model: AnyRewardModel, items: Sequence[TokenizedPair], *, batch_size: int = 16) -> dict[str, Any]:
    """Score tokenized pairs and build their report; an ensemble's also gives each member's accuracy and margin."""
    by_member = score_pairs_by_member(model, items, batch_size=batch_size)  # each member runs once
    report = build_report(*(scores.mean(dim=0) for scores in by_member), items)
    if isinstance(model, EnsembleRewardModel):
        members = [
            {"accuracy": _accuracy(diff > 0), "mean_margin": float(diff.mean()) if diff.numel() else None}
            for diff in torch.sub(*by_member)
        ]
        accuracies = [m["accuracy"] for m in members if m["accuracy"] is not None]
        report["ensemble"] = {
            "size": len(members),
            "mean_member_accuracy": sum(accuracies) / len(accuracies) if accuracies else None,
            "members": members,
        }
    return report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_markdown(reports: dict[str, dict[str, Any]]) -> str:
    """Reports of one or more test sets as a Markdown table in the layout of Table 8 of the Llama 2 report."""
    header = "| Test set | " + " | ".join(STRENGTH_TITLES[s] for s in STRENGTHS) + " | Avg | Pairs |"
    lines = [header, "|" + "---|" * (len(STRENGTHS) + 3)]
    for name, report in reports.items():
        cells = []
        for s in STRENGTHS:
            bucket = report["by_strength"].get(s, {"n": 0, "accuracy": None})
            cells.append(f"{_pct(bucket['accuracy'])} (n={bucket['n']})" if bucket["n"] else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pct(report['accuracy'])} | {report['n_pairs']} |")
    return "\n".join(lines)


def evaluate_reward_model(
    model_dir: str | Path, pairs: Sequence[PreferencePair], *, batch_size: int = 16, device: str | None = None
) -> dict[str, Any]:
    """The report of a saved reward model on preference pairs (e.g. a batch's held-out split from the database)."""
    from rewards.model import resolve_reward_model_dir

    if not pairs:
        raise ValueError("no pairs to evaluate")
    model_dir = resolve_reward_model_dir(model_dir)
    model, info, items = load_for_pairs(model_dir, pairs, device=device)
    report = evaluate_items(model, items, batch_size=batch_size)
    report.update({"model": str(model_dir), "kind": info.kind})
    return report


def load_for_pairs(
    model_dir: str | Path, pairs: Sequence[PreferencePair], *, device: str | None = None
) -> tuple[AnyRewardModel, RewardModelInfo, list[TokenizedPair]]:
    """A saved reward model (or ensemble), its info, and the pairs tokenized as it reads them."""
    from rewards.model import load_reward_model, resolve_reward_model_dir
    from training.llama.tokenizer import Tokenizer

    model_dir = resolve_reward_model_dir(model_dir)
    model, info = load_reward_model(model_dir, device=device)
    tokenizer = Tokenizer(str(model_dir / info.tokenizer_file))
    return model, info, tokenize_pairs(tokenizer, pairs, max_seq_len=info.max_seq_len, context_turns=info.context_turns)


def evaluate_reward_model_dir(
    model_dir: str | Path,
    data: Sequence[str | Path],
    fmt: str,
    *,
    split: str = "all",
    test_fraction: float = 0.2,
    domain: str | None = None,
    batch_size: int = 16,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate a saved reward model on preference files (the whole files, or one split of them)."""
    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    pairs = [p for path in data for p in read_pairs(path, fmt, domain=domain)]
    if split != "all":
        pairs = [p for p in assign_splits(pairs, test_fraction) if p.split == split]
    report = evaluate_reward_model(model_dir, pairs, batch_size=batch_size, device=device)
    report.update({"data": [str(p) for p in data], "format": fmt, "split": split})
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="reward model directory (or the --out of rewards.train)")
    parser.add_argument("--data", required=True, nargs="+", help="preference file(s) (.jsonl or .jsonl.gz)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--split", default="all", choices=("all", "train", "test"),
                        help="pairs without a split get the fixed --test-fraction split by content hash")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--domain", choices=("helpfulness", "safety"), help="domain of pairs whose format has none")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--markdown", action="store_true", help="print the Table 8 layout instead of JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate_reward_model_dir(
            args.model, args.data, args.format, split=args.split, test_fraction=args.test_fraction,
            domain=args.domain, batch_size=args.batch_size, device=args.device,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.markdown:
        print(format_markdown({Path(args.data[0]).name: report}))
    else:
        print(json.dumps(report, indent=2, default=_json_default))
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
