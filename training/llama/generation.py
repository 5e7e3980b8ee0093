"""Batched sampling from a Llama 2 `Transformer` with its KV cache, after meta-llama/llama `generation.py`.

Prompts of different lengths are left-padded and prefilled in one forward pass with an attention mask, then
every step decodes one token for the whole batch. Rotary embeddings make attention depend only on the
distance between positions, so a left-padded prompt gives the same next-token distribution as the prompt
alone. Meta instead left-aligns the prompts and feeds the longer ones token by token; the results are equal.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.llama.linear import decode_linear, packed_weights
from training.llama.model import Transformer


@dataclass
class GenerationResult:
    """Completions (prompt excluded, stopped before EOS) and the log-probability of each sampled token."""

    tokens: list[list[int]]
    logprobs: list[list[float]] | None
    finished: list[bool] | None = None  # each sequence ended with EOS (else it ran out of tokens)


class RowGenerators:
    """One random stream per row of a batch, seeded each by its own seed.

    A row's draws then depend on its seed and its own history only, never on which other rows share its batch:
    the same sequence is sampled whether it is generated alone, in a batch of 4 or of 64 (PPO relies on this to
    give each process of a distributed run the answers one process would draw). A draw is made only for the rows
    that need one (`rows`), so rejection rounds of other rows do not advance a row's stream.

    The streams are Python's (`random.Random`, a Mersenne twister each), not torch.Generators: a step's draws are
    then one list made into one tensor, where a generator a row took a `torch.rand` call a row and a stack (half
    of the sampler's time at a vocabulary of 512). Each uniform has float32's 24 bits, in [0, 1), as torch.rand's.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str | None = None):
        self.streams = [random.Random(int(s)) for s in seeds]
        self.device = device

    def __len__(self) -> int:
        return len(self.streams)

    def uniform(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(n_rows, 1) uniforms in [0, 1): drawn for the rows where `rows` (bool (n_rows, 1)) is True, 0 elsewhere."""
        wanted = [True] * len(self) if rows is None else rows.squeeze(-1).tolist()
        values = [stream.getrandbits(24) * 2.0**-24 if w else 0.0
                  for stream, w in zip(self.streams, wanted, strict=True)]
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]

    def subset(self, indices: Sequence[int]) -> RowGenerators:
        out = RowGenerators([], self.device)
        out.streams = [self.streams[i] for i in indices]
        return out


Generator = torch.Generator | RowGenerators


def _uniform(n: int, generator: Generator | None, device: torch.device, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 1) uniforms: from one stream for the batch, or from each row's own (only where `rows`)."""
    if isinstance(generator, RowGenerators):
        return generator.uniform(rows).to(device)
    return torch.rand(n, 1, generator=generator, device=device)


def sample_top_p_sorted(probs: torch.Tensor, p: float, generator: Generator | None = None) -> torch.Tensor:
    """Meta's `sample_top_p`: sort, keep the smallest set of tokens whose probability reaches p, sample.

    probs: (bsz, vocab_size), rows summing to 1. Returns (bsz, 1) token ids.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    # Drop a token when the tokens ranked above it already reach p (the top token always stays).
    probs_sort[probs_sum - probs_sort > p] = 0.0
    if isinstance(generator, RowGenerators):  # each row from its own stream, by inverse CDF as multinomial draws
        next_token = sample_full(probs_sort, generator)
    else:
        next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)  # multinomial renormalises
    return torch.gather(probs_idx, -1, next_token)


def sample_top_p(probs: torch.Tensor, p: float, generator: Generator | None = None,
                 max_rounds: int = 4) -> torch.Tensor:
    """Nucleus sampling with the distribution of `sample_top_p_sorted`, mostly without sorting the vocabulary.

    A token is in the nucleus when the tokens more probable than it hold at most p of the mass. Drawing from
    the full distribution and keeping the draw only if it lies in the nucleus samples exactly from the
    renormalised nucleus; the nucleus holds more than p of the mass, so a round succeeds with probability
    > p and costs a cumulative sum and two masked passes, O(vocab_size), where the sort costs O(V log V) (a
    third of a CPU decoding step at vocabulary 32,000). Rows still rejected after `max_rounds` (only likely
    for a small p) fall back to the sort.

    Tokens of equal probability (frequent with bf16 logits): of m tokens tied at probability q, with a mass
    M above them, Meta's sort keeps the n = min(m, floor((p - M) / q) + 1) its order puts first (those whose
    cumulative mass before them is at most p). Here a drawn tied token is kept with probability n / m, which
    gives the tie the same share of the nucleus, spread evenly over the tied tokens instead of over the ones
    an unstable sort happens to put first.

    probs: (bsz, vocab_size), rows summing to 1. Returns (bsz, 1) token ids.
    """
    cdf = torch.cumsum(probs, dim=-1)  # (bsz, vocab_size)
    next_token = torch.zeros(probs.shape[0], 1, dtype=torch.long, device=probs.device)
    pending = torch.ones(probs.shape[0], 1, dtype=torch.bool, device=probs.device)
    for _ in range(max_rounds):
        draw = _draw(cdf, generator, pending)  # (bsz, 1)
        drawn = probs.gather(-1, draw)  # (bsz, 1), > 0
        mass_above = _mass_above(probs, drawn)
        tied = _count_tied(probs, drawn, mass_above)  # (bsz, 1), >= 1
        kept = torch.minimum(((p - mass_above) / drawn).floor() + 1, tied).clamp_(min=0)  # of the tied tokens
        keep = _uniform(probs.shape[0], generator, probs.device, pending) * tied < kept
        accept = pending & keep
        next_token = torch.where(accept, draw, next_token)
        pending &= ~accept
        if not bool(pending.any()):
            return next_token
    rows = pending.squeeze(-1).nonzero().squeeze(-1)
    rows_generator = generator.subset(rows.tolist()) if isinstance(generator, RowGenerators) else generator
    next_token[rows] = sample_top_p_sorted(probs[rows], p, rows_generator)
    return next_token


def _mass_above(probs: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Sum of each row's probabilities greater than its threshold: probs (bsz, vocab_size), threshold (bsz, 1).

    On CPU a `threshold` call a row is several times faster than one `torch.where` over the batch (0.09 against
    0.7 ms for 8 x 32,000 floats, once or twice a decoding step); both give the same sums. A Python loop over
    the rows is only worth it for a decoding batch, not for thousands of rows, and for a large vocabulary.
    """
    if probs.device.type != "cpu" or probs.shape[0] > 64 or probs.shape[1] < 16384:
        return torch.where(probs > threshold, probs, 0.0).sum(-1, keepdim=True)
    sums = [F.threshold(row, t, 0.0).sum() for row, t in zip(probs, threshold.squeeze(-1).tolist(), strict=True)]
    return torch.stack(sums)[:, None]


def _count_tied(probs: torch.Tensor, drawn: torch.Tensor, mass_above: torch.Tensor) -> torch.Tensor:
    """How many tokens of each row have exactly the drawn probability: (bsz, 1), at least 1.

    The mass at or above the draw, less the mass above it, is about (tied tokens) x (drawn probability); only
    rows where that says two or more are counted exactly (`==` over the row costs twice a masked sum, and
    with float32 logits ties are rare).
    """
    if probs.shape[1] < 16384:  # a small vocabulary: counting is cheaper than the estimate
        return (probs == drawn).sum(-1, keepdim=True)
    mass_at_or_above = _mass_above(probs, torch.nextafter(drawn, torch.zeros_like(drawn)))
    maybe_tied = ((mass_at_or_above - mass_above) / drawn > 1.5).squeeze(-1)
    tied = torch.ones_like(drawn, dtype=torch.long)
    if bool(maybe_tied.any()):
        rows = maybe_tied.nonzero().squeeze(-1)
        tied[rows] = (probs[rows] == drawn[rows]).sum(-1, keepdim=True)
    return tied


def _draw(cdf: torch.Tensor, generator: Generator | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse CDF: (bsz, 1) ids from cumulative weights (bsz, vocab_size), normalised or not (the uniform is
    scaled by each row's total); only the `rows` (bool (bsz, 1)) draw from a RowGenerators' streams."""
    u = _uniform(cdf.shape[0], generator, cdf.device, rows) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)


def sample_full(probs: torch.Tensor, generator: Generator | None = None) -> torch.Tensor:
    """One token per row of probs (bsz, vocab_size) by inverse CDF: (bsz, 1) ids, as torch.multinomial draws."""
    return _draw(torch.cumsum(probs, dim=-1), generator)


def _sample_untruncated(scaled: torch.Tensor, generator: Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_full` of softmax(scaled) and the drawn tokens' log-probs, from the unnormalised exponentials.

    Inverse CDF needs no normalised distribution (the uniform is scaled by the total), and the log-prob is
    scaled[token] - logsumexp: three passes over the vocabulary (max, exp, cumulative sum) where softmax, the
    sampler and the log take six (PPO's rollouts, the model worker's, rejection sampling's).
    """
    maxes = scaled.amax(dim=-1, keepdim=True)
    cdf = torch.sub(scaled, maxes).exp_().cumsum_(dim=-1)  # (bsz, vocab_size)
    next_token = _draw(cdf, generator)  # (bsz, 1)
    logprobs = scaled.gather(-1, next_token) - maxes - cdf[:, -1:].log()
    return next_token.squeeze(-1), logprobs.squeeze(-1)


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    top_p: float,
    top_k: int | None,
    generator: Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (bsz,) from float32 logits (bsz, vocab_size) and their log-probs (bsz,).

    The log-prob is under the temperature-scaled distribution over the full vocabulary (before top-k/top-p
    truncation), i.e. log softmax(logits / temperature); for greedy decoding (temperature 0) it is under
    softmax(logits). That is the policy PPO's ratio is computed against when it samples at that temperature.
    `temperature` may be a (bsz, 1) tensor of positive temperatures, one a row.
    """
    if isinstance(temperature, torch.Tensor) or temperature > 0:
        scaled = logits if isinstance(temperature, float | int) and temperature == 1 else logits / temperature
        truncated = top_k is not None and top_k < scaled.shape[-1]
        if not truncated and top_p >= 1.0:
            return _sample_untruncated(scaled, generator)
        logprobs = torch.log_softmax(scaled, dim=-1) if truncated else None
        if truncated:
            kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (bsz, 1)
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if top_p < 1.0:
            next_token = sample_top_p(probs, top_p, generator).squeeze(-1)
        else:
            next_token = sample_full(probs, generator).squeeze(-1)
        if logprobs is None:
            # probs is the untruncated distribution: the log of a drawn token's (never 0) probability saves
            # a log-softmax pass over the vocabulary
            return next_token, probs.gather(-1, next_token[:, None]).squeeze(-1).log()
    else:
        logprobs = torch.log_softmax(logits, dim=-1)
        next_token = torch.argmax(logits, dim=-1)
    return next_token, logprobs.gather(-1, next_token[:, None]).squeeze(-1)


def _validate(model: Transformer, prompt_tokens: Sequence[Sequence[int]], max_new_tokens: int,
              temperature: float | Sequence[float], top_p: float, top_k: int | None) -> None:
    if not prompt_tokens:
        raise ValueError("prompt_tokens is empty: give at least one prompt")
    if any(len(p) == 0 for p in prompt_tokens):
        raise ValueError("Every prompt needs at least one token (e.g. BOS)")
    vocab_size = model.args.vocab_size
    if any(not 0 <= t < vocab_size for p in prompt_tokens for t in p):
        raise ValueError(f"Prompt token ids must lie in [0, {vocab_size})")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max(len(p) for p in prompt_tokens) >= model.args.max_seq_len:
        raise ValueError(f"A prompt of {max(len(p) for p in prompt_tokens)} tokens leaves no room in "
                         f"max_seq_len {model.args.max_seq_len}")
    if isinstance(temperature, int | float):
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    elif len(temperature) != len(prompt_tokens) or not all(math.isfinite(t) and t > 0 for t in temperature):
        raise ValueError("temperatures, one a prompt, must be finite and > 0 (greedy rows cannot share a batch "
                         f"with sampled ones), got {list(temperature)[:8]}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def _output_head(model: Transformer, h: torch.Tensor) -> torch.Tensor:
    """float32 logits (bsz, vocab_size) of the last hidden states h (bsz, dim): `model.output(h)`.

    Through `decode_linear`, with `on_one_thread`: without packed weights, for a decoding step's few rows MKL
    runs the head much faster as weight @ h.T on one thread too. Contiguous: the sampler's passes read rows.
    """
    return decode_linear(model.output, h, on_one_thread=True).float()


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float | Sequence[float] = 0.6,
    top_p: float = 0.9,
    top_k: int | None = None,
    eos_id: int | None,
    seed: int | None = None,
    row_seeds: Sequence[int] | None = None,
    return_logprobs: bool = True,
) -> GenerationResult:
    """Sample up to `max_new_tokens` tokens after each prompt, all prompts in one batch.

    Temperature 0 is greedy decoding; a sequence of temperatures (all > 0) gives each prompt its own (what the
    model worker uses to draw a comparison's two variants in one batch). A sequence stops at `eos_id` (excluded from its tokens; None: never)
    and, as in Meta's code, when it holds max_seq_len tokens with its prompt: a long prompt in the batch does
    not shorten the others' completions. `seed` makes the sampling reproducible (it uses
    its own torch.Generator, not the global one); `row_seeds`, one per prompt, gives each sequence a random
    stream of its own (`RowGenerators`), so that it is sampled the same whatever else shares its batch. The
    log-probs are those of `sample_next_token`: the temperature-scaled distribution before top-k/top-p
    truncation.
    """
    _validate(model, prompt_tokens, max_new_tokens, temperature, top_p, top_k)
    if row_seeds is not None and (seed is not None or len(row_seeds) != len(prompt_tokens)):
        raise ValueError("give seed or row_seeds (one per prompt), not both")
    device = model.tok_embeddings.weight.device
    if not isinstance(temperature, int | float):
        temperature = torch.tensor(list(temperature), dtype=torch.float32, device=device)[:, None]
    bsz = len(prompt_tokens)
    prompt_lens = [len(p) for p in prompt_tokens]
    max_prompt_len = max(prompt_lens)
    # Each sequence's own budget; its rotary positions count its own tokens (KVCache), so the cache may have
    # more slots than max_seq_len when a long and a short prompt share the batch.
    budgets = [min(max_new_tokens, model.args.max_seq_len - n) for n in prompt_lens]
    n_steps = max(budgets)
    total_len = max_prompt_len + n_steps

    generator: Generator | None = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    elif row_seeds is not None:
        generator = RowGenerators(row_seeds, device)

    # Left-padded prompts: (bsz, max_prompt_len); padding positions get token 0 and are masked out.
    prompts = torch.zeros(bsz, max_prompt_len, dtype=torch.long)
    real = torch.zeros(bsz, max_prompt_len, dtype=torch.bool)
    for i, p in enumerate(prompt_tokens):
        prompts[i, max_prompt_len - len(p):] = torch.tensor(list(p), dtype=torch.long)
        real[i, max_prompt_len - len(p):] = True
    prompts, real = prompts.to(device), real.to(device)
    ragged = min(prompt_lens) != max_prompt_len

    out_tokens = torch.zeros(bsz, n_steps, dtype=torch.long, device=device)
    out_logprobs = torch.zeros(bsz, n_steps, dtype=torch.float32, device=device)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    out_of_budget = torch.tensor(budgets, device=device)  # the step at which each sequence is full
    # near max_seq_len a long prompt's sequence is full before the others: from then on it is padding
    unequal_budgets = len(set(budgets)) > 1
    n_generated = 0
    if n_steps > 0:
        # On CPU the decoding steps read the weights from copies laid out for bsz-row products (linear.py)
        with packed_weights(model, bsz):
            kv_cache = model.new_kv_cache(bsz, total_len)
            # Only the last position's logits are needed: skip the output head on the rest of the prompt.
            h = model.forward_hidden(prompts, kv_cache=kv_cache, attention_mask=real if ragged else None)
            logits = _output_head(model, h[:, -1])  # (bsz, vocab_size)
            for step in range(n_steps):
                next_token, logprob = sample_next_token(
                    logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
                )
                out_tokens[:, step] = next_token
                out_logprobs[:, step] = logprob
                n_generated = step + 1
                if eos_id is not None or unequal_budgets:
                    if eos_id is not None:
                        done |= next_token == eos_id
                    done |= out_of_budget <= n_generated
                    if bool(done.all()):
                        break
                if step + 1 < n_steps:
                    # a sequence that is full (near max_seq_len, before the others) goes on as padding
                    h = model.forward_hidden(next_token[:, None], start_pos=max_prompt_len + step, kv_cache=kv_cache,
                                             attention_mask=~done[:, None] if unequal_budgets else None)
                    logits = _output_head(model, h[:, -1])

    tokens = out_tokens[:, :n_generated].tolist()
    logprobs = out_logprobs[:, :n_generated].tolist()
    finished = [False] * bsz
    for i, seq in enumerate(tokens):
        tokens[i], logprobs[i] = seq[:budgets[i]], logprobs[i][:budgets[i]]
        seq = tokens[i]
        if eos_id is not None and eos_id in seq:
            stop = seq.index(eos_id)
            tokens[i], logprobs[i] = seq[:stop], logprobs[i][:stop]
            finished[i] = True
    return GenerationResult(tokens=tokens, logprobs=logprobs if return_logprobs else None, finished=finished)
