"""Rejection-sampling fine-tuning with pooling (Llama 2, section 3.2.3): K samples a prompt, the best kept, SFT on it.

python -m training.rejection_sampling --policy CKPT --tokenizer PATH --prompts PATH
    (--reward-model DIR [--safety-reward-model DIR] | --reward-fn M:F) --samples K [--temperature T]
    [--pool DIR...] [--uncertainty-coef C] --out DIR  [SFT options: --learning-rate, --epochs | --max-steps, ...]
Several processes: torchrun --nproc-per-node N -m training.rejection_sampling ... (rank 0 samples and scores on
its device, then all fine-tune with DDP).

One iteration: the policy draws K answers to every prompt (batched and KV-cached, `training.sampling`), each is
scored with the report's combined reward (`training.reward_sources`), and per prompt the highest-scoring answer is
kept. The kept answers are pooled with the best of earlier iterations (`--pool`: earlier output directories of
this command): the report found that training on the last iteration's samples only caused regressions. Per
prompt the highest-scoring answer of all iterations wins; the earlier answers are scored again with the current
reward source, so that all candidates are compared by one judge. The policy is then fine-tuned on the pool
(`training.sft`, from the policy given).

Writes into DIR: samples.jsonl (every sample with its reward), best.jsonl (the pool: a prompts file with the
kept `response`s, their `reward` and `iteration`), policy/ (the new checkpoint, in the layout of --policy),
sft_report.json and rejection_sampling_report.json (counts, timings, the SFT result and the report's Figure 7:
mean max and median reward against N = 1..K). Running the same command again resumes: a finished sampling stage
(sampling.json) is not redone and SFT continues from its train_state.pt.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.engine import run_main
from training.llama.tokenizer import Tokenizer
from training.prompts import PromptFormatError, PromptRecord, prompt_lines, read_prompts
from training.reward_sources import (
    RewardScores,
    RewardSource,
    add_reward_arguments,
    combined_reward,
    reward_source,
)
from training.sampling import SamplingSettings, check_vocabulary, find_tokenizer, load_policy, sample_answers
from training.stages import (
    FineTuneOptions,
    StageProgress,
    add_finetune_arguments,
    config_values,
    emit,
    run_stage,
    stage_main,
    write_json_atomic,
    write_jsonl_atomic,
)

SAMPLES_FILE = "samples.jsonl"
BEST_FILE = "best.jsonl"
MARKER_FILE = "sampling.json"
REPORT_FILE = "rejection_sampling_report.json"


@dataclass(kw_only=True)
class RejectionSamplingConfig(FineTuneOptions):
    """One rejection-sampling iteration: sample, keep the best, pool, fine-tune."""

    policy: str
    prompts: str
    out_dir: str
    samples: int = 4  # K answers a prompt
    temperature: float = 1.0  # the report's best temperature rises with iterations (1.2-1.3 for 10-100 samples)
    pool: list[str] = field(default_factory=list)  # earlier output directories of this command
    uncertainty_coef: float = 0.0  # subtract this multiple of an ensemble's spread from the reward
    # the reward source, when run_rejection_sampling is not given one
    reward_model: str | None = None
    safety_reward_model: str | None = None
    reward_fn: str | None = None

    def check(self) -> None:
        self.check_finetune()
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if self.uncertainty_coef < 0:
            raise ValueError(f"uncertainty_coef must be non-negative, got {self.uncertainty_coef}")
        if any(Path(p).resolve() == Path(self.out_dir).resolve() for p in self.pool):
            raise ValueError(f"--pool {self.out_dir} is the output directory itself: give a new --out each iteration")

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                prompt_format=self.prompt_format, batch_size=self.batch_size)

    @property
    def signature(self) -> dict[str, Any]:
        """What decides the sampling stage's outputs: a finished stage with other values is not reused."""
        return {"policy": str(Path(self.policy).resolve()), "prompts": str(Path(self.prompts).resolve()),
                "samples": self.samples, **self.sampling.as_dict(), "seed": self.seed,
                "pool": [str(Path(p).resolve()) for p in self.pool], "uncertainty_coef": self.uncertainty_coef,
                "reward": [self.reward_model, self.safety_reward_model, self.reward_fn]}


@dataclass(frozen=True)
class Candidate:
    """An answer to a prompt, its reward under the current source and the iteration that sampled it."""

    record: PromptRecord
    response: str
    reward: float
    iteration: int
    helpfulness_reward: float | None = None
    safety_reward: float | None = None

    def to_json(self) -> dict[str, Any]:
        line = self.record.with_response(self.response).to_json()
        line.update(reward=self.reward, iteration=self.iteration)
        if self.helpfulness_reward is not None:
            line["helpfulness_reward"] = self.helpfulness_reward
        if self.safety_reward is not None:
            line["safety_reward"] = self.safety_reward
        return line


def prompt_key(record: PromptRecord) -> str:
    """What identifies a prompt across iterations: its dialogue, domain and risk category."""
    return json.dumps({**record.to_json(), "response": None}, sort_keys=True, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- Figure 7


def expected_max_of_n(rewards: Sequence[float], n: int) -> float:
    """E[max of n drawn without replacement from these K rewards]: the unbiased order-statistics estimator.

    With r_(1) <= ... <= r_(K), the i-th smallest is the maximum of an n-subset in C(i-1, n-1) of the C(K, n)
    subsets, so E = sum_{i=n}^{K} C(i-1, n-1) r_(i) / C(K, n). n = 1 gives the mean, n = K the maximum.
    """
    k = len(rewards)
    if not 1 <= n <= k:
        raise ValueError(f"n must be within 1..{k}, got {n}")
    ordered = sorted(rewards)
    total = math.comb(k, n)
    return sum(math.comb(i - 1, n - 1) * ordered[i - 1] for i in range(n, k + 1)) / total


def reward_curve(rewards_per_prompt: Sequence[Sequence[float]]) -> list[dict[str, float]]:
    """The report's Figure 7: for N = 1..K, the mean over prompts of the expected max of N of the K samples and of
    the median of the first N samples (in the order drawn)."""
    k = min(len(r) for r in rewards_per_prompt)
    return [{"n": n,
             "max_reward": statistics.fmean(expected_max_of_n(r, n) for r in rewards_per_prompt),
             "median_reward": statistics.fmean(statistics.median(r[:n]) for r in rewards_per_prompt)}
            for n in range(1, k + 1)]


# ------------------------------------------------------------------------------------------------- pool


def read_pool(directories: Sequence[str]) -> list[Candidate]:
    """The kept answers of earlier iterations (their best.jsonl), each once; rewards to be recomputed."""
    seen: set[tuple[str, str, int]] = set()
    out: list[Candidate] = []
    for directory in directories:
        path = Path(directory) / BEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--pool {directory}: no {BEST_FILE} (not an output of training.rejection_sampling)")
        for where, obj, record in prompt_lines(path):
            iteration = obj.get("iteration")
            if record.response is None or not isinstance(iteration, int) or isinstance(iteration, bool):
                raise PromptFormatError(f"{where}: expected a 'response' and an integer 'iteration'")
            record = PromptRecord(record.dialogue, record.domain, record.risk_category, None, where)
            key = (prompt_key(record), obj["response"], iteration)
            if key not in seen:
                seen.add(key)
                out.append(Candidate(record, obj["response"], math.nan, iteration))
    return out


def score_candidates(source: RewardSource, records: Sequence[PromptRecord], responses: Sequence[str],
                     uncertainty_coef: float) -> tuple[torch.Tensor, RewardScores]:
    """The combined reward (n,) before whitening, and the raw scores.

    Not whitened: whitening is per batch (mean 0, std 1 over what is scored together), so a whitened reward of
    this iteration could not be compared with one of an earlier iteration, nor a prompt's samples with the same
    prompt's pooled answer scored in another batch. The logit of R_c is comparable everywhere.
    """
    if not responses:
        return torch.zeros(0), RewardScores()
    scores = source.score(records, responses)
    return combined_reward(scores, records, whitened=False, uncertainty_coef=uncertainty_coef), scores


def _value(t: torch.Tensor | None, i: int) -> float | None:
    return None if t is None else float(t[i])


def select_best(current: Sequence[Candidate], earlier: Sequence[Candidate]) -> dict[str, Candidate]:
    """Per prompt, the highest-scoring candidate; ties go to the earlier iteration, then to the earlier sample."""
    best: dict[str, Candidate] = {}
    for candidate in sorted(earlier, key=lambda c: c.iteration):
        key = prompt_key(candidate.record)
        if key not in best or candidate.reward > best[key].reward:
            best[key] = candidate
    for candidate in current:
        key = prompt_key(candidate.record)
        if key not in best or candidate.reward > best[key].reward:
            best[key] = candidate
    return best


# ---------------------------------------------------------------------------------------------- the stage


def _sample_and_select(config: RejectionSamplingConfig, source: RewardSource, out_dir: Path,
                       progress: Callable[[StageProgress], None] | None, device: torch.device) -> dict[str, Any]:
    """Sample, score, select and pool; write samples.jsonl, best.jsonl and the marker. Returns the marker."""
    records = read_prompts(config.prompts)
    earlier = read_pool(config.pool)
    iteration = 1 + max((c.iteration for c in earlier), default=0)
    tokenizer = Tokenizer(find_tokenizer(config.policy, config.tokenizer))

    t0 = time.monotonic()
    model = load_policy(config.policy, device=device)
    check_vocabulary(model, tokenizer)
    samples = sample_answers(model, tokenizer, records, config.sampling, samples_per_prompt=config.samples,
                             seed=config.seed, progress=emit(progress, "sampling"))
    del model
    sampling_s = time.monotonic() - t0

    t0 = time.monotonic()
    tell = emit(progress, "scoring")
    n_scored = len(samples) + len(earlier)
    if tell is not None:
        tell(0, n_scored)
    answered = [records[s.prompt_index] for s in samples]
    rewards, scores = score_candidates(source, answered, [s.response for s in samples], config.uncertainty_coef)
    earlier_rewards, earlier_scores = score_candidates(source, [c.record for c in earlier],
                                                       [c.response for c in earlier], config.uncertainty_coef)
    if tell is not None:
        tell(n_scored, n_scored)
    scoring_s = time.monotonic() - t0

    current = [Candidate(answered[i], s.response, float(rewards[i]), iteration,
                         _value(scores.helpfulness, i), _value(scores.safety, i)) for i, s in enumerate(samples)]
    rescored = [Candidate(c.record, c.response, float(earlier_rewards[i]), c.iteration,
                          _value(earlier_scores.helpfulness, i), _value(earlier_scores.safety, i))
                for i, c in enumerate(earlier)]
    pool = select_best(current, rescored)
    earlier_best = select_best([], rescored)

    write_jsonl_atomic(out_dir / SAMPLES_FILE, (
        {**c.to_json(), "prompt_index": s.prompt_index, "sample": s.sample_index, "finished": s.finished}
        for c, s in zip(current, samples, strict=True)))
    write_jsonl_atomic(out_dir / BEST_FILE, (c.to_json() for c in pool.values()))

    per_prompt = [[float(rewards[p * config.samples + s]) for s in range(config.samples)] for p in range(len(records))]
    n_tokens = sum(len(s.response_ids) for s in samples)
    marker = {
        "signature": config.signature,
        "iteration": iteration,
        "n_prompts": len(records),
        "samples_per_prompt": config.samples,
        "n_samples": len(samples),
        "sample_reward_mean": statistics.fmean(float(r) for r in rewards),
        "iteration_best_reward_mean": statistics.fmean(max(r) for r in per_prompt),
        "figure7": reward_curve(per_prompt),
        "pool": {
            "directories": list(config.pool),
            "n_candidates": len(earlier),
            "n_prompts": len(pool),
            "from_this_iteration": sum(c.iteration == iteration for c in pool.values()),
            "from_earlier_iterations": sum(c.iteration != iteration for c in pool.values()),
            "reward_mean": statistics.fmean(c.reward for c in pool.values()),
            # the earlier iterations' pool under the current reward: the new pool's mean is never below it
            "earlier_reward_mean": statistics.fmean(c.reward for c in earlier_best.values()) if earlier_best else None,
        },
        "timings": {"sampling_s": sampling_s, "scoring_s": scoring_s,
                    "samples_per_s": len(samples) / max(sampling_s, 1e-9),
                    "tokens_per_s": n_tokens / max(sampling_s, 1e-9)},
        "response_length_mean": n_tokens / max(1, len(samples)),
        "finished_rate": sum(s.finished for s in samples) / max(1, len(samples)),
    }
    write_json_atomic(out_dir / MARKER_FILE, marker)  # last: its presence says the stage finished
    return marker


def run_rejection_sampling(config: RejectionSamplingConfig, *, source: RewardSource | None = None,
                           progress: Callable[[StageProgress], None] | None = None) -> dict[str, Any]:
    """One iteration as configured; returns the report (also written to out_dir/rejection_sampling_report.json).

    `source` defaults to the reward model(s) or function the config names. Resumable: run it again after a
    crash and it goes on where it stopped.
    """
    def sample(out_dir: Path, device: torch.device) -> None:
        scorer = source or reward_source(reward_model=config.reward_model, safety_reward_model=config.safety_reward_model,
                                         reward_fn=config.reward_fn, device=device)
        _sample_and_select(config, scorer, out_dir, progress, device)

    return run_stage(config, report_file=REPORT_FILE, marker_file=MARKER_FILE, data_file=BEST_FILE, progress=progress,
                     sample=sample)


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.rejection_sampling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="policy checkpoint directory (Meta or Hugging Face)")
    parser.add_argument("--prompts", required=True, help="prompts file (JSONL)")
    add_reward_arguments(parser)
    parser.add_argument("--samples", required=True, type=int, help="K: answers sampled a prompt")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 1.0)")
    parser.add_argument("--pool", nargs="+", default=[], help="earlier output directories whose best answers to pool")
    parser.add_argument("--uncertainty-coef", type=float, default=None,
                        help="subtract this multiple of a reward-model ensemble's spread (default 0: off)")
    parser.add_argument("--out", required=True, help="output directory (policy/, best.jsonl, samples.jsonl, report)")
    add_finetune_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(build_parser(), argv, name="rejection sampling",
                      run=lambda args, bar: run_rejection_sampling(RejectionSamplingConfig(**config_values(args)), progress=bar))


if __name__ == "__main__":
    run_main(main)
