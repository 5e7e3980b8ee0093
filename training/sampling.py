"""Sampling a policy on a prompts file: batched, KV-cached (training.llama.generation), reproducible by seed.

What evaluation, rejection sampling, PPO and the platform's model worker share: load a policy checkpoint and
its tokenizer, turn prompt records into ids, sample `samples_per_prompt` answers each, decode them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from training.llama.checkpoint import load_checkpoint
from training.llama.generation import generate
from training.llama.model import Transformer
from training.llama.tokenizer import Tokenizer
from training.prompts import PromptRecord, encode_prompt


@dataclass(frozen=True)
class SamplingSettings:
    """How answers are drawn. The report's chat default is temperature 0.6, top-p 0.9."""

    max_new_tokens: int = 128
    temperature: float = 0.6
    top_p: float = 0.9
    prompt_format: str = "chat"
    batch_size: int = 16  # sequences per generate() call

    def as_dict(self) -> dict[str, float | int | str]:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "prompt_format": self.prompt_format}


@dataclass(frozen=True)
class Sample:
    """One sampled answer: which prompt, which draw, its tokens (EOS excluded) and text."""

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    response: str
    finished: bool  # the model ended it with EOS (else it ran out of tokens)


def default_device() -> torch.device:
    """The GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(path: str | Path, *, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> Transformer:
    """A policy checkpoint (Meta or Hugging Face directory) in eval mode, on `device` (default: default_device())."""
    device = device or default_device()
    model, _ = load_checkpoint(path, device=device, dtype=dtype)
    return model.eval()


def find_tokenizer(checkpoint: str | Path, tokenizer: str | Path | None = None) -> Path:
    """The tokenizer given, else tokenizer.model in or beside the checkpoint directory."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer {path} does not exist")
        return path
    checkpoint = Path(checkpoint)
    for candidate in (checkpoint / "tokenizer.model", checkpoint.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no tokenizer.model in or beside {checkpoint}; pass --tokenizer")


def check_vocabulary(model: Transformer, tokenizer: Tokenizer) -> None:
    if tokenizer.n_words > model.args.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.n_words} pieces, more than the model's vocabulary "
                         f"{model.args.vocab_size}: not this model's tokenizer")


def sample_answers(
    model: Transformer,
    tokenizer: Tokenizer,
    records: Sequence[PromptRecord],
    settings: SamplingSettings,
    *,
    samples_per_prompt: int = 1,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    temperatures: Sequence[float] | None = None,
) -> list[Sample]:
    """`samples_per_prompt` answers to every record, prompt-major (all of prompt 0's draws first).

    `temperatures`, one a record (each > 0), replaces `settings.temperature` record by record: records sampled at
    different temperatures share the batches.

    Sequences go to `generate` `settings.batch_size` at a time, the draws of one prompt side by side; batch b
    samples with seed `seed + b`, so the same seed, prompts and settings give the same answers. `progress(done,
    total)` is told after each batch.
    """
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be at least 1, got {samples_per_prompt}")
    prompt_ids = [encode_prompt(tokenizer, r, settings.prompt_format) for r in records]
    for record, ids in zip(records, prompt_ids, strict=True):
        if len(ids) >= model.args.max_seq_len:
            raise ValueError(f"{record.source or 'a prompt'}: {len(ids)} tokens leave no room to answer within "
                             f"the model's {model.args.max_seq_len}")
    if temperatures is not None and len(temperatures) != len(records):
        raise ValueError(f"{len(temperatures)} temperatures for {len(records)} records")
    jobs = [(p, s) for p in range(len(records)) for s in range(samples_per_prompt)]
    out: list[Sample] = []
    for batch_index, start in enumerate(range(0, len(jobs), settings.batch_size)):
        batch = jobs[start:start + settings.batch_size]
        temperature = settings.temperature if temperatures is None else [temperatures[p] for p, _ in batch]
        result = generate(model, [prompt_ids[p] for p, _ in batch], max_new_tokens=settings.max_new_tokens,
                          temperature=temperature, top_p=settings.top_p, eos_id=tokenizer.eos_id,
                          seed=seed + batch_index, return_logprobs=False)
        assert result.finished is not None
        for (p, s), tokens, done in zip(batch, result.tokens, result.finished, strict=True):
            out.append(Sample(p, s, prompt_ids[p], tokens, tokenizer.decode(tokens), finished=done))
        if progress is not None:
            progress(len(out), len(jobs))
    return out
