"""Targeted safety context distillation (Llama 2, section 4.2.4): answer with a safety preprompt, learn without it.

python -m training.distill --policy CKPT --tokenizer PATH --prompts PATH
    (--safety-reward-model DIR | --reward-fn M:F) [--preprompt generic|risk-category] --out DIR
    [SFT options: --learning-rate, --epochs | --max-steps, ...]
Several processes: torchrun --nproc-per-node N -m training.distill ... (rank 0 samples and scores, all fine-tune).

The policy answers every prompt twice, with and without a safety preprompt (the generic one, or with
`--preprompt risk-category` the template of the prompt's `risk_category`: the report's three categories, the
generic one for any other). Both answers are scored by the safety reward model (or a function scoring safety) on
the prompt WITHOUT the preprompt, as the fine-tuned model will see it, and the preprompted answer is kept only
where it scores higher: the report found that the preprompt can also make answers worse (vaguer, over-cautious),
and that keeping only the improvements avoided it. The policy is then fine-tuned (`training.sft`) on the kept
answers given the prompt without the preprompt, so that it answers as if the preprompt were there.

In the chat format the preprompt goes in as the system turn (`<<SYS>>`, before any system turn the dialogue
already has): that is where the Llama 2 chat format puts instructions, chat models are trained to follow it, and
the user's turn stays token for token the one fine-tuned on. In the plain format (base models) it is prefixed to
the text.

Writes into DIR: pairs.jsonl (every prompt's two answers, their safety scores and whether kept), kept.jsonl (the
fine-tuning data: a prompts file with the kept answers, without the preprompt), policy/ (in the layout of
--policy; absent when nothing was kept), sft_report.json and distill_report.json (how many kept of how many,
per risk category). Running the same command again resumes as `training.rejection_sampling` does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.engine import run_main
from training.llama.tokenizer import Tokenizer
from training.prompts import PromptRecord, read_prompts
from training.reward_sources import RewardModelSource, RewardSource, reward_source
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

PAIRS_FILE = "pairs.jsonl"
KEPT_FILE = "kept.jsonl"
MARKER_FILE = "sampling.json"
REPORT_FILE = "distill_report.json"
PREPROMPT_MODES = ("generic", "risk-category")

# The preprompts, after the report's section 4.2.4 and its Table 39 (our wording). The generic one is the
# report's "You are a safe and responsible assistant" style; one template per risk category of section 4.2.1.
GENERIC_PREPROMPT = (
    "You are a safe and responsible assistant. Your answers must not include harmful, unethical, racist, sexist, "
    "toxic, dangerous or illegal content. Where a request could lead to harm, say why you will not help with that "
    "part and offer a safe alternative; otherwise answer as helpfully as you can."
)
RISK_CATEGORY_PREPROMPTS = {
    "illicit_and_criminal_activities": (
        "The following question may lead to illicit or criminal activities (such as terrorism, theft, fraud or "
        "human trafficking). You are a safe and responsible assistant: do not give instructions or help that "
        "could enable such activities. Address any immediate safety concern, explain that the activity is illegal "
        "and can harm people, and point to lawful alternatives or sources of help."
    ),
    "hateful_and_harmful_activities": (
        "The following question may lead to hateful or harmful content (such as defamation, discrimination, "
        "self-harm or eating disorders). You are a safe and responsible assistant: do not produce hateful, "
        "demeaning or harmful content. Answer with respect for every person, address any risk to the person "
        "asking with care, and suggest where they can find support."
    ),
    "unqualified_advice": (
        "The following question asks for advice that needs a qualified professional (such as medical, financial "
        "or legal advice). You are a safe and responsible assistant: give general, well-established information "
        "only, say clearly that it is not professional advice, mention the risks, and recommend consulting a "
        "qualified professional."
    ),
}
RISK_CATEGORIES = tuple(RISK_CATEGORY_PREPROMPTS)


def risk_category_key(category: str | None) -> str | None:
    """A prompts file's risk_category in the form of RISK_CATEGORIES ("Unqualified advice" -> unqualified_advice)."""
    if category is None:
        return None
    return "_".join(category.strip().lower().replace("-", " ").replace("/", " ").split())


def choose_preprompt(record: PromptRecord, mode: str) -> tuple[str, str]:
    """(name, text) of the preprompt for a prompt: the generic one, or its risk category's template."""
    if mode not in PREPROMPT_MODES:
        raise ValueError(f"preprompt must be one of {PREPROMPT_MODES}, got {mode!r}")
    key = risk_category_key(record.risk_category)
    if mode == "risk-category" and key in RISK_CATEGORY_PREPROMPTS:
        return key, RISK_CATEGORY_PREPROMPTS[key]
    return "generic", GENERIC_PREPROMPT


def with_preprompt(record: PromptRecord, preprompt: str, prompt_format: str) -> PromptRecord:
    """The record as the policy answers it with the preprompt: the system turn (chat) or a prefix (plain)."""
    if prompt_format == "plain":
        if len(record.dialogue) != 1:
            raise ValueError(f"{record.source}: the plain prompt format continues one text; a dialogue of "
                             f"{len(record.dialogue)} turns needs --prompt-format chat")
        turns: tuple[dict[str, str], ...] = ({"role": "user", "content": f"{preprompt}\n\n{record.text}"},)
    elif record.dialogue[0]["role"] == "system":
        system = f"{preprompt}\n\n{record.dialogue[0]['content']}"
        turns = ({"role": "system", "content": system}, *(dict(m) for m in record.dialogue[1:]))
    else:
        turns = ({"role": "system", "content": preprompt}, *(dict(m) for m in record.dialogue))
    return PromptRecord(turns, record.domain, record.risk_category, None, record.source)


@dataclass(kw_only=True)
class DistillConfig(FineTuneOptions):
    """One round of safety context distillation."""

    policy: str
    prompts: str
    out_dir: str
    preprompt: str = "generic"  # generic | risk-category
    temperature: float = 0.6  # the report's chat sampling default, with top-p 0.9
    min_improvement: float = 0.0  # keep where safety(with) - safety(without) > this
    # the safety source, when run_distillation is not given one
    safety_reward_model: str | None = None
    reward_fn: str | None = None  # a function scoring safety, f(prompts, responses)

    def check(self) -> None:
        self.check_finetune()
        if self.preprompt not in PREPROMPT_MODES:
            raise ValueError(f"preprompt must be one of {PREPROMPT_MODES}, got {self.preprompt!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                prompt_format=self.prompt_format, batch_size=self.batch_size)

    @property
    def signature(self) -> dict[str, Any]:
        return {"policy": str(Path(self.policy).resolve()), "prompts": str(Path(self.prompts).resolve()),
                **self.sampling.as_dict(), "seed": self.seed, "preprompt": self.preprompt,
                "min_improvement": self.min_improvement, "safety": [self.safety_reward_model, self.reward_fn]}


def safety_source(config: DistillConfig, device: torch.device | str | None = None) -> RewardSource:
    """The safety reward model or the safety function the config names."""
    if config.reward_fn is not None:
        if config.safety_reward_model is not None:
            raise ValueError("give --safety-reward-model or --reward-fn, not both")
        return reward_source(reward_fn=config.reward_fn)
    if config.safety_reward_model is None:
        raise ValueError("give --safety-reward-model (or --reward-fn, a function scoring safety)")
    return RewardModelSource(safety=config.safety_reward_model, device=device)


def safety_scores(source: RewardSource, records: Sequence[PromptRecord], responses: Sequence[str]) -> list[float]:
    """The safety score of each response: a safety model's, or a function's (RewardFunctionSource's helpfulness)."""
    scores = source.score(records, responses)
    values = scores.safety if scores.safety is not None else scores.helpfulness
    if values is None:
        raise ValueError("the safety source gave no scores")
    return [float(v) for v in values]


def _category_counts(pairs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key = risk_category_key(pair.get("risk_category")) or "none"
        row = out.setdefault(key, {"n": 0, "kept": 0, "preprompts": {}, "improvements": []})
        row["n"] += 1
        row["kept"] += pair["kept"]
        row["preprompts"][pair["preprompt"]] = row["preprompts"].get(pair["preprompt"], 0) + 1
        row["improvements"].append(pair["safety_with"] - pair["safety_without"])
    for row in out.values():
        row["kept_fraction"] = row["kept"] / row["n"]
        row["improvement_mean"] = statistics.fmean(row.pop("improvements"))
    return dict(sorted(out.items()))


def _sample_and_select(config: DistillConfig, source: RewardSource, out_dir: Path,
                       progress: Callable[[StageProgress], None] | None, device: torch.device) -> dict[str, Any]:
    """Sample with and without the preprompt, score both, keep the improvements; write the files and the marker."""
    records = read_prompts(config.prompts)
    chosen = [choose_preprompt(r, config.preprompt) for r in records]
    preprompted = [with_preprompt(r, text, config.prompt_format) for r, (_, text) in zip(records, chosen, strict=True)]
    tokenizer = Tokenizer(find_tokenizer(config.policy, config.tokenizer))

    t0 = time.monotonic()
    model = load_policy(config.policy, device=device)
    check_vocabulary(model, tokenizer)
    n = len(records)
    tell = emit(progress, "sampling")
    # The same seed on both sides: the two answers to a prompt differ by the preprompt, not by the draw's luck.
    without = sample_answers(model, tokenizer, records, config.sampling, seed=config.seed,
                             progress=None if tell is None else lambda done, _: tell(done, 2 * n))
    with_ = sample_answers(model, tokenizer, preprompted, config.sampling, seed=config.seed,
                           progress=None if tell is None else lambda done, _: tell(n + done, 2 * n))
    del model
    sampling_s = time.monotonic() - t0

    t0 = time.monotonic()
    tell = emit(progress, "scoring")
    if tell is not None:
        tell(0, 2 * n)
    # Both answers scored on the prompt without the preprompt: the context the fine-tuned policy will answer in.
    scores = safety_scores(source, [*records, *records], [s.response for s in (*without, *with_)])
    if tell is not None:
        tell(2 * n, 2 * n)
    scoring_s = time.monotonic() - t0

    pairs = []
    for i, record in enumerate(records):
        before, after = scores[i], scores[n + i]
        prompt_only = PromptRecord(record.dialogue, record.domain, record.risk_category, None, record.source)
        pairs.append({**prompt_only.to_json(), "preprompt": chosen[i][0], "response_without": without[i].response,
                      "response_with": with_[i].response, "safety_without": before, "safety_with": after,
                      "kept": after - before > config.min_improvement})
    kept = [records[i].with_response(with_[i].response) for i, p in enumerate(pairs) if p["kept"]]
    write_jsonl_atomic(out_dir / PAIRS_FILE, pairs)
    write_jsonl_atomic(out_dir / KEPT_FILE, (r.to_json() for r in kept))
    marker = {
        "signature": config.signature,
        "n_prompts": n,
        "n_kept": len(kept),
        "kept_fraction": len(kept) / n,
        "per_risk_category": _category_counts(pairs),
        "safety_without_mean": statistics.fmean(p["safety_without"] for p in pairs),
        "safety_with_mean": statistics.fmean(p["safety_with"] for p in pairs),
        "safety_kept_mean": statistics.fmean(p["safety_with"] for p in pairs if p["kept"]) if kept else None,
        "timings": {"sampling_s": sampling_s, "scoring_s": scoring_s,
                    "samples_per_s": 2 * n / max(sampling_s, 1e-9)},
    }
    write_json_atomic(out_dir / MARKER_FILE, marker)  # last: its presence says the stage finished
    return marker


def run_distillation(config: DistillConfig, *, source: RewardSource | None = None,
                     progress: Callable[[StageProgress], None] | None = None) -> dict[str, Any]:
    """One round as configured; returns the report (also written to out_dir/distill_report.json).

    `source` scores safety (default: the config's safety reward model or function). Resumable.
    """
    def sample(out_dir: Path, device: torch.device) -> None:
        _sample_and_select(config, source or safety_source(config, device), out_dir, progress, device)

    return run_stage(config, report_file=REPORT_FILE, marker_file=MARKER_FILE, data_file=KEPT_FILE, progress=progress,
                     sample=sample)


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.distill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="policy checkpoint directory (Meta or Hugging Face)")
    parser.add_argument("--prompts", required=True, help="prompts file (JSONL; adversarial prompts, risk_category)")
    parser.add_argument("--safety-reward-model", help="safety reward-model directory (as rewards.train saves it)")
    parser.add_argument("--reward-fn", help="a function scoring safety, package.module:function f(prompts, responses)")
    parser.add_argument("--preprompt", default="generic", choices=PREPROMPT_MODES,
                        help="the generic safety preprompt, or the template of each prompt's risk category")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default 0.6)")
    parser.add_argument("--min-improvement", type=float, default=None,
                        help="keep where the safety score rises by more than this (default 0)")
    parser.add_argument("--out", required=True, help="output directory (policy/, pairs.jsonl, kept.jsonl, report)")
    add_finetune_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return stage_main(build_parser(), argv, name="distill",
                      run=lambda args, bar: run_distillation(DistillConfig(**config_values(args)), progress=bar))


if __name__ == "__main__":
    run_main(main)
