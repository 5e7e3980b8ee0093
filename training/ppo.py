"""PPO on the report's combined reward, with a frozen reference, a separate value model and exact resume.

python -m training.ppo --policy CKPT --tokenizer PATH --prompts PATH
    (--reward-model DIR [--safety-reward-model DIR] | --reward-fn M:F) --iterations N [--batch-size B]
    [--minibatch-size M] [--max-new-tokens T] [--kl-coef BETA] [--learning-rate LR] [--resume] --out DIR
Several processes: torchrun --nproc-per-node N -m training.ppo ... (DDP; gloo on CPU, NCCL on GPU).

One iteration (Llama 2, section 3.2.3; the details after Huang et al. 2024, "The N+ Implementation Details of
RLHF with PPO"):
1. Rollout: B prompts, one answer each at temperature 1 (batched, KV-cached), cut at EOS, which stays the last
   response token. Each process samples its share of every minibatch in one batch, every sequence from a random
   stream seeded by its place in the global batch, so the answers do not depend on the number of processes.
2. Scoring: R = whiten(logit(R_c)) over the global batch (training.reward_sources), an answer that never reached
   EOS optionally penalised; the policy's, the reference's and the value model's view of every response token.
3. Rewards and advantages: per token -beta * (log pi - log pi_0), the score added on the last response token;
   GAE with gamma 1, lambda 0.95; advantages whitened over the batch's response tokens.
4. Optimisation: one gradient step per minibatch (B / M steps), clipped policy loss (0.2) and clipped value loss,
   AdamW (0.9, 0.95, eps 1e-5), weight decay 0.1, clipping 1.0, constant learning rate (1e-6 in the report).

The value model is its own transformer with a scalar head, initialised from the (helpfulness, else safety)
reward model, or from the policy with a zero head when the reward is a function or the reward model reads another
vocabulary. Early stopping on held-out prompts keeps the best policy. Writes DIR/policy (the layout of --policy),
DIR/ppo_report.json, and DIR/train_state.pt every 10 minutes (`--checkpoint-minutes`; or every N iterations,
`--checkpoint-every`; a stopped run goes on from there).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.engine import (
    Distributed,
    Engine,
    OptimizerSettings,
    run_main,
    seed_everything,
    setup_distributed,
)
from training.llama.checkpoint import load_checkpoint
from training.llama.generation import generate
from training.llama.loss import token_logprobs
from training.llama.model import Transformer
from training.llama.tokenizer import Tokenizer
from training.prompts import PROMPT_FORMATS, encode_prompt, read_prompts
from training.reward_sources import RewardSource, add_reward_arguments, combined_reward, reward_source
from training.sampling import check_vocabulary, find_tokenizer
from training.sft import save_policy

TRAIN_STATE_FILE = "train_state.pt"
REPORT_FILE = "ppo_report.json"
POLICY_DIR = "policy"
_STOP_REASONS = ("max_minutes", "early_stopping", "stop_after_iterations")


@dataclass
class PPOConfig:
    """One PPO run. Defaults are the report's (batch 512, minibatch 64, beta 0.01, lr 1e-6 constant)."""

    policy: str = ""
    prompts: str = ""
    out_dir: str = "var/ppo"
    tokenizer: str | None = None
    reward_model: str | None = None
    safety_reward_model: str | None = None
    reward_fn: str | None = None
    prompt_format: str = "chat"
    iterations: int = 200
    batch_size: int = 512  # sequences an iteration, over all processes
    minibatch_size: int = 64  # sequences a gradient step, over all processes
    rollout_batch_size: int | None = None  # sequences a generate() call; default: all of a process's share
    max_new_tokens: int = 128
    temperature: float = 1.0  # rollouts, and the log-probs of training (the same temperature)
    top_p: float = 1.0
    kl_coef: float = 0.01  # beta: 0.01 for 7B/13B, 0.005 for 34B/70B
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    missing_eos_penalty: float | None = None  # subtracted from the score of an answer that never reached EOS
    uncertainty_coef: float = 0.0  # ensembles: subtract this times the members' spread (off by default)
    learning_rate: float = 1e-6
    schedule: str = "constant"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_fraction: float = 0.1  # prompts held out for early stopping (at least one)
    eval_every: int = 10  # iterations between evaluations on the held-out prompts (0: never)
    early_stopping_patience: int | None = 3  # evaluations without improvement before stopping
    max_minutes: float | None = None
    checkpoint_every: int = 0  # iterations between checkpoints (0: by time only)
    checkpoint_minutes: float | None = 10.0  # also checkpoint once this long has passed since the last (0/None: not)
    stop_after_iterations: int | None = None  # stop (checkpointed) here, the plan unchanged
    resume: bool = True
    seed: int = 0
    device: str | None = None
    bf16: bool = True
    sharding: str = "ddp"  # under torchrun: ddp (a full copy a process) or fsdp (weights, gradients, optimizer sharded)
    num_threads: int | None = None

    def check(self, world_size: int = 1) -> None:
        if self.sharding not in ("ddp", "fsdp"):
            raise ValueError(f"sharding must be ddp or fsdp, got {self.sharding!r}")
        if not self.policy or not self.prompts:
            raise ValueError("give the policy checkpoint (--policy) and a prompts file (--prompts)")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if self.iterations < 1 or self.batch_size < 1 or self.minibatch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("iterations, batch size, minibatch size and max_new_tokens must be positive")
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch size {self.batch_size} is not a multiple of the minibatch size {self.minibatch_size}")
        if self.minibatch_size % world_size:
            raise ValueError(f"minibatch size {self.minibatch_size} does not divide over {world_size} processes")
        if self.rollout_batch_size is not None and self.rollout_batch_size < 1:
            raise ValueError(f"rollout_batch_size must be positive, got {self.rollout_batch_size}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be 0 or more, got {self.checkpoint_every}")
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes >= 0:
            raise ValueError(f"checkpoint_minutes must be 0 (none by time) or more, got {self.checkpoint_minutes}")
        if not 0 < self.temperature:
            raise ValueError(f"temperature must be positive for PPO rollouts, got {self.temperature}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class PPOResult:
    out_dir: str
    policy_dir: str
    iterations: int
    stopped: str  # completed | max_minutes | early_stopping | stop_after_iterations
    best_iteration: int | None
    best_eval_reward: float | None
    elapsed_s: float
    value_init: str
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------------- maths


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """(b, R) rewards: -kl_coef * (log pi - log pi_0) on every response token, the score (b,) on the last one."""
    rewards = -kl_coef * (logprobs - ref_logprobs) * mask
    last = mask.sum(dim=1).long() - 1  # (b,) index of each response's last token
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (b, R), by generalised advantage estimation over each masked response."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        # beyond a response's end nothing follows: padding positions pass zeros back
        next_value = torch.where(m > 0, values[:, t], torch.zeros_like(next_value))
        next_advantage = torch.where(m > 0, advantage, torch.zeros_like(next_advantage))
    return advantages, advantages + values * mask


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, dist: Distributed, *, shift_mean: bool = True) -> torch.Tensor:
    """Whiten x over its masked entries on all processes (population variance)."""
    n, total = dist.all_sum([float(mask.sum()), float((x.double() * mask).sum())])
    mean = total / max(n, 1.0)
    # the variance about the mean (not E[x^2] - mean^2, which loses the digits of scores far from 0), in float64
    (squares,) = dist.all_sum([float((((x.double() - mean) ** 2) * mask).sum())])
    var = squares / max(n, 1.0)
    out = ((x.double() - mean) / (var + 1e-8) ** 0.5).to(x.dtype)
    return (out if shift_mean else out + mean) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed clipped surrogate loss over masked tokens, clipped-token count)."""
    ratio = torch.exp(logprobs - old_logprobs)
    losses = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))
    clipped = ((ratio - 1).abs() > clip_range).float()
    return (losses * mask).sum(), (clipped * mask).sum()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> torch.Tensor:
    """The summed clipped value loss over masked tokens: 0.5 * max((v - R)^2, (v_clipped - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip_range_value, clip_range_value)
    return (0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2) * mask).sum()


# ------------------------------------------------------------------------------------------------ models


class ActorCritic(nn.Module):
    """The policy and the value model, trained together by one optimizer (one checkpoint)."""

    def __init__(self, policy: Transformer, value: Transformer, value_head: nn.Linear):
        super().__init__()
        self.policy = policy
        self.value = value
        self.value_head = value_head
        value.output.requires_grad_(False)  # the value model reads hidden states, never the vocabulary head

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, temperature: float, *,
                entropy: bool = True) -> tuple[torch.Tensor, ...]:
        """Log-probs of the tokens that follow `positions` (b, R), their entropies (None without `entropy`) and
        values, each (b, R).

        `tokens` (b, L) are right-padded prompt + response rows; positions[i, t] is the index of the hidden state
        that predicts response token t of row i (its prompt length - 1 + t; padded rows repeat a valid index).
        """
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
        h = self.policy.forward_hidden(tokens)[rows, positions]  # (b, R, dim)
        next_tokens = tokens.gather(1, (positions + 1).clamp(max=tokens.shape[1] - 1))
        logprobs, entropies = token_logprobs(h, self.policy.output.weight, next_tokens, temperature=temperature,
                                             entropy=entropy)
        values = self.value_head(self.value.forward_hidden(tokens)[rows, positions]).squeeze(-1).float()
        return logprobs, entropies, values


def build_value_model(config: PPOConfig, policy: Transformer, tokenizer_path: Path,
                      device: torch.device) -> tuple[Transformer, nn.Linear, str]:
    """The value model and its head: from the reward model where it reads the policy's tokens (the same tokenizer
    file, a context at least the policy's), else from the policy with a zero head."""
    rm_path = config.reward_model or config.safety_reward_model
    if rm_path is not None and config.reward_fn is None:
        from rewards.model import (
            EnsembleRewardModel,
            load_reward_model,
            read_reward_model_info,
            resolve_reward_model_dir,
        )

        rm_dir = resolve_reward_model_dir(rm_path)
        info = read_reward_model_info(rm_dir)
        same_tokens = (rm_dir / info.tokenizer_file).read_bytes() == Path(tokenizer_path).read_bytes()
        rm, _ = load_reward_model(rm_dir, device=device, dtype=torch.float32)
        if isinstance(rm, EnsembleRewardModel):
            rm = rm.members[0]  # one member's weights start the value model
        if same_tokens and rm.args.max_seq_len >= policy.args.max_seq_len:
            return rm.transformer, rm.score_head, f"reward model {rm_path}"
        reason = "another tokenizer" if not same_tokens else f"a context of {rm.args.max_seq_len} tokens"
        value_init = f"policy (the reward model {rm_path} reads {reason})"
    else:
        value_init = "policy"
    value = copy.deepcopy(policy)
    head = nn.Linear(policy.args.dim, 1, bias=False, device=device)
    nn.init.zeros_(head.weight)
    return value, head, value_init


# ----------------------------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    """This process's sequences of one iteration, as tensors on the device: (b, L) tokens, (b, R) the rest."""

    tokens: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    raw_scores: torch.Tensor  # (b,) the combined reward before whitening
    response_lengths: torch.Tensor  # (b,)
    finished: torch.Tensor  # (b,) reached EOS


def rollout_tensors(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded prompt + response rows (b, L), the positions predicting each response token (b, R), its mask."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(r) for r in responses)
    tokens = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    positions = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        tokens[i, :lengths[i]] = torch.tensor([*p, *r])
        positions[i] = len(p) - 1 + torch.arange(width).clamp(max=len(r) - 1)
        mask[i, :len(r)] = 1.0
    return tokens.to(device), positions.to(device), mask.to(device)


class _PPORun:
    """The models, prompts and engine of a run, and what one iteration does with them."""

    def __init__(self, config: PPOConfig, dist: Distributed, source: RewardSource):
        self.config, self.dist, self.source = config, dist, source
        device = dist.device
        self.tokenizer_path = find_tokenizer(config.policy, config.tokenizer)
        self.tokenizer = Tokenizer(self.tokenizer_path)
        seed_everything(config.seed)
        policy, self.policy_args = load_checkpoint(config.policy, device=device)
        self.stored_dtype = policy.tok_embeddings.weight.dtype  # saved back in it
        policy.float()  # float32 master weights: lr 1e-6 updates vanish in bf16 weights
        check_vocabulary(policy, self.tokenizer)
        self.reference, _ = load_checkpoint(config.policy, device=device, dtype=torch.float32)
        self.reference.requires_grad_(False).eval()
        value, head, self.value_init = build_value_model(config, policy, self.tokenizer_path, device)
        self.model = ActorCritic(policy, value, head)
        self.steps_per_iteration = config.batch_size // config.minibatch_size
        self.engine = Engine(self.model, OptimizerSettings.of(config),
                             total_steps=config.iterations * self.steps_per_iteration, dist=dist,
                             state_path=Path(config.out_dir) / TRAIN_STATE_FILE, max_minutes=config.max_minutes,
                             sharding=config.sharding)
        if self.engine.sharded:
            # FSDP initialises at its root's first forward; sampling calls the policy's blocks first, and a block
            # called first takes itself for the root. One tiny forward through the root (every process) first.
            with torch.no_grad():
                self.model(torch.zeros(1, 2, dtype=torch.long, device=device), torch.zeros(1, 1, dtype=torch.long,
                                                                                           device=device), 1.0)
        records = read_prompts(config.prompts)
        n_eval = 0 if not config.eval_every else max(1, round(config.eval_fraction * len(records)))
        if n_eval >= len(records):
            raise ValueError(f"{len(records)} prompts leave none to train on after holding out {n_eval} for evaluation")
        order = list(range(len(records)))
        random.Random(f"ppo-holdout:{config.seed}").shuffle(order)
        self.eval_records = [records[i] for i in sorted(order[:n_eval])]
        self.train_records = [records[i] for i in sorted(order[n_eval:])]
        self.train_ids = [encode_prompt(self.tokenizer, r, config.prompt_format) for r in self.train_records]
        self.eval_ids = [encode_prompt(self.tokenizer, r, config.prompt_format) for r in self.eval_records]
        for record, ids in zip([*self.train_records, *self.eval_records], [*self.train_ids, *self.eval_ids], strict=True):
            if len(ids) >= policy.args.max_seq_len:
                raise ValueError(f"{record.source}: {len(ids)} prompt tokens leave no room in {policy.args.max_seq_len}")
        self.iteration = 0
        self._epoch_order: tuple[int, list[int]] = (-1, [])
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"reward": None, "iteration": None, "state": None, "bad_evals": 0}

    # -- state

    @property
    def signature(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint's (the plan, the rollouts and the reward's shape)."""
        c = self.config
        return {"n_prompts": len(self.train_records), "batch_size": c.batch_size, "minibatch_size": c.minibatch_size,
                "seed": c.seed, "kl_coef": c.kl_coef, "temperature": c.temperature, "top_p": c.top_p,
                "max_new_tokens": c.max_new_tokens}

    def checkpoint(self) -> None:
        self.engine.save({"iteration": self.iteration, "history": self.history, "best": self.best,
                          "config": dataclasses.asdict(self.config)}, signature=self.signature)

    def resume(self) -> None:
        state = self.engine.resume(self.signature)
        if state is not None:
            self.iteration, self.history, self.best = state["iteration"], state["history"], state["best"]

    @contextmanager
    def full_weights(self) -> Iterator[None]:
        """Sampling with the full weights: under FSDP every process gathers them once (each block and the root
        stay unsharded until the end) instead of gathering every block at every decoding step, which the report
        found 20x slower. Call on every process; a no-op when the model is not sharded."""
        if not self.engine.sharded:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                # FSDP's defaults: blocks reshard after their forward, the root keeps its few parameters
                unit.set_reshard_after_forward(unit is not self.model, recurse=False)

    def policy_state(self) -> dict[str, torch.Tensor] | None:
        """The policy's full weights on the CPU (every process calls it; under FSDP rank 0 gets them, the others
        None)."""
        if not self.engine.sharded:
            return {k: v.detach().to("cpu", copy=True) for k, v in self.model.policy.state_dict().items()}
        state = self.engine.full_model_state()
        if not self.dist.is_main:
            return None
        return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}

    # -- the global batch and this process's share

    def prompt_of(self, iteration: int, index: int) -> int:
        """The training prompt of sequence `index` of an iteration's global batch: a seeded pass over the prompts."""
        position = iteration * self.config.batch_size + index
        epoch, offset = divmod(position, len(self.train_records))
        if self._epoch_order[0] != epoch:
            order = list(range(len(self.train_records)))
            random.Random(f"ppo:{self.config.seed}:{epoch}").shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1][offset]

    def local_indices(self) -> list[int]:
        """The places in the global batch of this process's sequences: its share of every minibatch."""
        config = self.config
        share = config.minibatch_size // self.dist.world_size
        return [start + self.dist.rank * share + k
                for start in range(0, config.batch_size, config.minibatch_size) for k in range(share)]

    # -- one iteration

    @torch.no_grad()
    def rollout(self, iteration: int) -> tuple[list[int], list[list[int]], list[bool]]:
        """Sample this process's sequences: (prompt indices, responses ending with EOS where reached, finished)."""
        config = self.config
        policy = self.model.policy
        policy.eval()
        prompts, responses, finished = [], [], []
        eos = self.tokenizer.eos_id
        places = self.local_indices()
        size = config.rollout_batch_size or len(places)
        for start in range(0, len(places), size):
            batch = places[start:start + size]
            indices = [self.prompt_of(iteration, g) for g in batch]
            ids = [self.train_ids[i] for i in indices]
            row_seeds = [(config.seed * 1_000_003 + iteration) * 100_003 + g for g in batch]
            out = generate(policy, ids, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                           top_p=config.top_p, eos_id=eos, row_seeds=row_seeds, return_logprobs=False)
            assert out.finished is not None
            for i, tokens, done in zip(indices, out.tokens, out.finished, strict=True):
                prompts.append(i)
                responses.append([*tokens, eos] if done else list(tokens) or [eos])
                finished.append(done)
        policy.train()
        return prompts, responses, finished

    def score(self, prompt_indices: list[int], responses: list[list[int]], finished: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """(whitened rewards, raw combined rewards), each (b,), whitened over the global batch."""
        records = [self.train_records[i] for i in prompt_indices]
        texts = [self.tokenizer.decode([t for t in r if t != self.tokenizer.eos_id]) for r in responses]
        raw = combined_reward(self.source.score(records, texts), records, whitened=False,
                              uncertainty_coef=self.config.uncertainty_coef)
        if self.config.missing_eos_penalty is not None:
            raw = raw - self.config.missing_eos_penalty * (~torch.tensor(finished)).float()
        ones = torch.ones_like(raw)
        return masked_whiten(raw, ones, self.dist), raw

    @torch.no_grad()
    def prepare(self, iteration: int) -> tuple[Rollout, dict[str, float]]:
        """Rollout, scoring, log-probs, values, rewards and advantages of one iteration; the phase times."""
        config, device = self.config, self.dist.device
        t0 = time.monotonic()
        with self.full_weights():
            prompt_indices, responses, finished = self.rollout(iteration)
        t1 = time.monotonic()
        scores, raw = self.score(prompt_indices, responses, finished)
        tokens, positions, mask = rollout_tensors([self.train_ids[i] for i in prompt_indices], responses, device)
        with self.autocast():  # as in optimise: the ratio is exactly 1 before the first update
            logprobs, _, values = self.model(tokens, positions, config.temperature, entropy=False)
            ref_logprobs = self.reference_logprobs(tokens, positions)
        t2 = time.monotonic()
        rewards = per_token_rewards(scores.to(device), logprobs, ref_logprobs, mask, config.kl_coef)
        advantages, returns = gae(rewards, values, mask, gamma=config.gamma, lam=config.lam)
        advantages = masked_whiten(advantages, mask, self.dist)
        rollout = Rollout(tokens, positions, mask, logprobs, ref_logprobs, values, advantages, returns, raw,
                          mask.sum(1), torch.tensor(finished))
        return rollout, {"rollout_s": t1 - t0, "scoring_s": t2 - t1}

    def autocast(self) -> Any:
        """bf16 autocast on a GPU (config.bf16), nothing on the CPU."""
        if self.dist.device.type == "cuda" and self.config.bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def reference_logprobs(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None]
        h = self.reference.forward_hidden(tokens)[rows, positions]
        next_tokens = tokens.gather(1, (positions + 1).clamp(max=tokens.shape[1] - 1))
        return token_logprobs(h, self.reference.output.weight, next_tokens, temperature=self.config.temperature)[0]

    def optimise(self, r: Rollout) -> dict[str, float]:
        """One gradient step a minibatch; the losses and statistics over the whole batch."""
        config, engine = self.config, self.engine
        share = config.minibatch_size // self.dist.world_size
        autocast = self.autocast()
        sums = dict.fromkeys(("pg_loss", "vf_loss", "clipped", "entropy", "approx_kl", "tokens"), 0.0)
        for start in range(0, r.tokens.shape[0], share):
            sl = slice(start, start + share)
            mask = r.mask[sl]
            (global_tokens,) = self.dist.all_sum([float(mask.sum())])
            with engine.accumulating(last=True), autocast:
                logprobs, entropy, values = engine.module(r.tokens[sl], r.positions[sl], config.temperature)
                pg, clipped = policy_loss(logprobs, r.logprobs[sl], r.advantages[sl], mask, config.clip_range)
                vf = value_loss(values, r.values[sl], r.returns[sl], mask, config.clip_range_value)
                engine.backward(engine.scale_for_global(pg + config.vf_coef * vf, global_tokens))
            engine.optimizer_step()
            with torch.no_grad():
                sums["pg_loss"] += float(pg)
                sums["vf_loss"] += float(vf)
                sums["clipped"] += float(clipped)
                sums["entropy"] += float((entropy * mask).sum())
                sums["approx_kl"] += float((0.5 * (logprobs.detach() - r.logprobs[sl]) ** 2 * mask).sum())
                sums["tokens"] += float(mask.sum())
        total = dict(zip(sums, self.dist.all_sum(list(sums.values())), strict=True))
        n = max(total["tokens"], 1.0)
        return {"policy_loss": total["pg_loss"] / n, "value_loss": total["vf_loss"] / n,
                "clip_fraction": total["clipped"] / n, "entropy": total["entropy"] / n,
                "approx_kl": total["approx_kl"] / n}

    def batch_statistics(self, r: Rollout) -> dict[str, float]:
        """Means over the global batch: reward, KL to the reference (the penalty's and k3), response length."""
        log_ratio = (r.logprobs - r.ref_logprobs) * r.mask  # log pi - log pi_0
        k3 = ((torch.exp(-log_ratio) - 1) + log_ratio) * r.mask  # (ratio - 1) - log ratio, ratio = pi_0 / pi
        n = float(r.tokens.shape[0])
        sums = self.dist.all_sum([n, float(r.raw_scores.sum()), float(log_ratio.sum()), float(k3.sum()),
                                  float(r.response_lengths.sum()), float(r.finished.float().sum())])
        count = max(sums[0], 1.0)
        return {"reward_mean": sums[1] / count, "kl": sums[2] / count, "kl_k3": sums[3] / count,
                "response_length": sums[4] / count, "finished_rate": sums[5] / count}

    def iterate(self) -> dict[str, Any]:
        rollout, times = self.prepare(self.iteration)
        t0 = time.monotonic()
        losses = self.optimise(rollout)
        times["optimisation_s"] = time.monotonic() - t0
        self.iteration += 1
        record = {"iteration": self.iteration, **self.batch_statistics(rollout), **losses,
                  "lr": self.engine.learning_rate, **{k: round(v, 4) for k, v in times.items()}}
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean raw combined reward of one answer to each held-out prompt (seeded: the same draws every time)."""
        policy = self.model.policy
        policy.eval()
        texts = []
        for start in range(0, len(self.eval_ids), 64):
            out = generate(policy, self.eval_ids[start:start + 64], max_new_tokens=self.config.max_new_tokens,
                           temperature=self.config.temperature, top_p=self.config.top_p,
                           eos_id=self.tokenizer.eos_id, seed=self.config.seed + start, return_logprobs=False)
            texts += [self.tokenizer.decode(t) for t in out.tokens]
        policy.train()
        raw = combined_reward(self.source.score(self.eval_records, texts), self.eval_records, whitened=False)
        return float(raw.mean())

    def evaluate_into(self, record: dict[str, Any]) -> str | None:
        """Evaluate on the held-out prompts (rank 0 samples; every process calls this), keep the best policy; the
        stop reason where patience ran out (rank 0's)."""
        with self.full_weights():
            reward = self.evaluate() if self.dist.is_main else 0.0
        best = self.best
        improved = self.dist.broadcast_int(int(self.dist.is_main and (best["reward"] is None or reward > best["reward"])))
        if improved:
            state = self.policy_state()  # every process: under FSDP it is gathered
            best.update(reward=reward, iteration=self.iteration, bad_evals=0, state=state)
        if not self.dist.is_main:
            return None
        record["eval_reward_mean"] = reward
        if improved:
            return None
        best["bad_evals"] += 1
        patience = self.config.early_stopping_patience
        return "early_stopping" if patience is not None and best["bad_evals"] >= patience else None


def train_ppo(config: PPOConfig, *, source: RewardSource | None = None,
              on_iteration: Callable[[dict[str, Any]], None] | None = None) -> PPOResult:
    """Run PPO as configured; resumable, and the same function under torchrun. `on_iteration` gets each
    iteration's record on rank 0 (what the CLI prints as a JSON line)."""
    dist_ = setup_distributed(config.device)
    config.check(dist_.world_size)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if source is None:
        source = reward_source(reward_model=config.reward_model, safety_reward_model=config.safety_reward_model,
                               reward_fn=config.reward_fn, device=dist_.device)
    run = _PPORun(config, dist_, source)
    if config.resume:
        run.resume()
    stopped = "completed"
    while run.iteration < config.iterations:
        record = run.iterate()
        reason = "max_minutes" if run.engine.out_of_time() else None
        if config.stop_after_iterations is not None and config.stop_after_iterations <= run.iteration < config.iterations:
            reason = "stop_after_iterations"
        if config.eval_every and (run.iteration % config.eval_every == 0 or run.iteration == config.iterations):
            reason = run.evaluate_into(record) or reason
        run.history.append(record)
        if on_iteration is not None and dist_.is_main:
            on_iteration(record)
        reason = run.engine.decide(reason, _STOP_REASONS)
        if reason is not None:
            stopped = reason
            break
        if run.iteration < config.iterations and run.engine.checkpoint_due(
                run.iteration, every=config.checkpoint_every, minutes=config.checkpoint_minutes):
            run.checkpoint()
    if stopped in ("max_minutes", "stop_after_iterations"):
        run.checkpoint()  # an interrupted run goes on from here
    out_dir = Path(config.out_dir)
    use_best = run.best["iteration"] is not None and stopped != "stop_after_iterations"
    state = None if use_best else run.policy_state()  # every process: under FSDP it is gathered
    if dist_.is_main:
        policy = Transformer(run.policy_args) if run.engine.sharded else run.model.policy
        # the best policy on the held-out prompts, else the last
        policy.load_state_dict(run.best["state"] if use_best else state)
        save_policy(policy.to(run.stored_dtype), out_dir / POLICY_DIR, like=config.policy, tokenizer=run.tokenizer_path)
    result = PPOResult(out_dir=str(out_dir), policy_dir=str(out_dir / POLICY_DIR), iterations=run.iteration,
                       stopped=stopped, best_iteration=run.best["iteration"], best_eval_reward=run.best["reward"],
                       elapsed_s=run.engine.elapsed(), value_init=run.value_init, history=run.history)
    if dist_.is_main:
        report = {**result.to_dict(), "config": dataclasses.asdict(config)}
        (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    dist_.barrier()
    return result


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.ppo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", required=True, help="policy checkpoint (Meta or Hugging Face directory)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: in or beside --policy)")
    parser.add_argument("--prompts", required=True, help="prompts file (JSONL)")
    add_reward_arguments(parser)
    parser.add_argument("--out", required=True, help="output directory (policy/, ppo_report.json, train_state.pt)")
    parser.add_argument("--prompt-format", default="chat", choices=PROMPT_FORMATS)
    for name, kind in (("iterations", int), ("batch-size", int), ("minibatch-size", int), ("rollout-batch-size", int),
                       ("max-new-tokens", int), ("temperature", float), ("top-p", float), ("kl-coef", float),
                       ("learning-rate", float), ("vf-coef", float), ("clip-range", float), ("missing-eos-penalty", float),
                       ("uncertainty-coef", float), ("eval-fraction", float), ("eval-every", int),
                       ("early-stopping-patience", int), ("max-minutes", float), ("checkpoint-every", int), ("checkpoint-minutes", float), ("stop-after-iterations", int),
                       ("seed", int)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="go on from DIR/train_state.pt when there is one (the default)")
    resume.add_argument("--no-resume", dest="resume", action="store_false")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--fsdp", dest="sharding", action="store_const", const="fsdp", default=None,
                        help="under torchrun: shard weights, gradients and optimizer state (FSDP2; sampling gathers "
                             "the full weights once an iteration)")
    parser.add_argument("--threads", dest="num_threads", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    values = {k: v for k, v in vars(args).items() if v is not None}
    values["out_dir"] = values.pop("out")

    def print_line(record: dict[str, Any]) -> None:
        print(json.dumps(record), flush=True)

    try:
        result = train_ppo(PPOConfig(**values), on_iteration=print_line)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if setup_distributed(args.device).is_main:
        summary = result.to_dict()
        summary.pop("history")
        print(json.dumps({"result": summary}), flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
