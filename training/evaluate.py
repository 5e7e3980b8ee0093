"""Evaluate a policy on a prompts file by a reward model or a reward function, optionally against a baseline.

python -m training.evaluate --policy CKPT --tokenizer PATH --prompts PATH
    (--reward-model DIR [--safety-reward-model DIR] | --reward-fn M:F) [--baseline CKPT]
    [--samples-per-prompt S] [--samples-out PATH]

Prints one JSON object: `reward_mean` (helpfulness, or the function's), `safety_reward_mean` with a safety model,
`combined_reward_mean` (the report's piecewise reward before whitening), and with a baseline its means and the
policy's `win_rate` / `tie_rate` / `loss_rate` against it, judged sample by sample on the combined reward (the
report's Figure 11). Both policies answer the same prompts with the same seed and settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from training.llama.tokenizer import Tokenizer
from training.prompts import PROMPT_FORMATS, PromptRecord, read_prompts
from training.reward_sources import (
    RewardScores,
    RewardSource,
    add_reward_arguments,
    combined_reward,
    reward_source,
)
from training.sampling import (
    Sample,
    SamplingSettings,
    check_vocabulary,
    find_tokenizer,
    load_policy,
    sample_answers,
)


@dataclass
class EvaluateConfig:
    policy: str
    prompts: str
    tokenizer: str | None = None
    baseline: str | None = None
    samples_per_prompt: int = 1
    samples_out: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.6
    top_p: float = 0.9
    prompt_format: str = "chat"
    batch_size: int = 16
    tie_margin: float = 0.0  # |policy - baseline| <= tie_margin on the combined reward is a tie
    seed: int = 0
    device: str | None = None
    num_threads: int | None = None

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                prompt_format=self.prompt_format, batch_size=self.batch_size)


@dataclass(frozen=True)
class ScoredSamples:
    samples: list[Sample]
    scores: RewardScores
    combined: torch.Tensor  # (n,) logit(R_c), not whitened


def sample_and_score(checkpoint: str, tokenizer: Tokenizer, records: Sequence[PromptRecord], source: RewardSource,
                     config: EvaluateConfig, progress: Callable[[int, int], None] | None = None) -> ScoredSamples:
    """Sample the policy's answers and score them (the policy is freed before scoring)."""
    model = load_policy(checkpoint, device=config.device)
    check_vocabulary(model, tokenizer)
    samples = sample_answers(model, tokenizer, records, config.sampling, samples_per_prompt=config.samples_per_prompt,
                             seed=config.seed, progress=progress)
    del model
    answered = [records[s.prompt_index] for s in samples]
    scores = source.score(answered, [s.response for s in samples])
    return ScoredSamples(samples, scores, combined_reward(scores, answered, whitened=False))


def _mean(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.float().mean())


def _summary(scored: ScoredSamples, prefix: str = "") -> dict[str, Any]:
    return {
        f"{prefix}reward_mean": _mean(scored.scores.helpfulness if scored.scores.helpfulness is not None
                                      else scored.scores.safety),
        f"{prefix}safety_reward_mean": _mean(scored.scores.safety) if scored.scores.helpfulness is not None else None,
        f"{prefix}combined_reward_mean": _mean(scored.combined),
        f"{prefix}finished_rate": sum(s.finished for s in scored.samples) / max(1, len(scored.samples)),
        f"{prefix}response_length_mean": sum(len(s.response_ids) for s in scored.samples) / max(1, len(scored.samples)),
    }


def win_tie_loss(policy: torch.Tensor, baseline: torch.Tensor, tie_margin: float = 0.0) -> dict[str, float]:
    """Shares of paired samples where the policy's reward is above, within tie_margin of, or below the baseline's."""
    if policy.shape != baseline.shape or policy.numel() == 0:
        raise ValueError("win rates need the same, non-zero number of samples on both sides")
    diff = policy.float() - baseline.float()
    n = diff.numel()
    wins, losses = int((diff > tie_margin).sum()), int((diff < -tie_margin).sum())
    return {"win_rate": wins / n, "tie_rate": (n - wins - losses) / n, "loss_rate": losses / n}


def write_samples(path: str | Path, records: Sequence[PromptRecord], scored: ScoredSamples) -> None:
    """One JSON line a sample: the prompt (or dialogue), its response and reward, as a prompts file with answers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, sample in enumerate(scored.samples):
            line = records[sample.prompt_index].with_response(sample.response).to_json()
            line.update(reward=float(scored.combined[i]), sample=sample.sample_index, finished=sample.finished)
            if scored.scores.helpfulness is not None:
                line["helpfulness_reward"] = float(scored.scores.helpfulness[i])
            if scored.scores.safety is not None:
                line["safety_reward"] = float(scored.scores.safety[i])
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def evaluate_policy(config: EvaluateConfig, source: RewardSource, *,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The evaluation's figures (see the module docstring); writes the samples where config.samples_out says."""
    if config.samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {config.samples_per_prompt}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    records = read_prompts(config.prompts)
    tokenizer = Tokenizer(find_tokenizer(config.policy, config.tokenizer))
    policy = sample_and_score(config.policy, tokenizer, records, source, config, progress)
    report: dict[str, Any] = {"n_prompts": len(records), "samples_per_prompt": config.samples_per_prompt,
                              "n_samples": len(policy.samples), **_summary(policy),
                              "sampling": config.sampling.as_dict(), "seed": config.seed}
    if config.samples_out:
        write_samples(config.samples_out, records, policy)
    if config.baseline:
        baseline = sample_and_score(config.baseline, tokenizer, records, source, config, progress)
        report.update(_summary(baseline, "baseline_"))
        report.update(win_tie_loss(policy.combined, baseline.combined, config.tie_margin))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="policy checkpoint directory (Meta or Hugging Face)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: in or beside --policy)")
    parser.add_argument("--prompts", required=True, help="prompts file (JSONL)")
    add_reward_arguments(parser)
    parser.add_argument("--baseline", help="a second policy checkpoint to compare against")
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--samples-out", help="write every sample as JSONL (prompt, response, reward)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--prompt-format", default="chat", choices=PROMPT_FORMATS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tie-margin", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", dest="num_threads", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("reward_model", "safety_reward_model", "reward_fn")}
    config = EvaluateConfig(**values)
    try:
        source = reward_source(reward_model=args.reward_model, safety_reward_model=args.safety_reward_model,
                               reward_fn=args.reward_fn, device=args.device)
        report = evaluate_policy(config, source)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["config"] = asdict(config)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
