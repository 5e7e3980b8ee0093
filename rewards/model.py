"""RewardModel: the Llama 2 transformer with its next-token head replaced by a scalar score head.

EnsembleRewardModel: several independently trained reward models whose scores are averaged (rewards.ensemble).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training.llama.model import ModelArgs, Transformer

REWARD_MODEL_FILE = "reward_model.json"
HEAD_FILE = "score_head.safetensors"
LLAMA_DIR = "llama"
TOKENIZER_FILE = "tokenizer.model"
MEMBERS_DIR = "members"  # an ensemble's members, each a reward-model directory
KINDS = ("helpfulness", "safety")


class RewardModel(nn.Module):
    """Scores a conversation with one number, read at its last real token.

    The transformer's `output` (vocabulary) head is kept so that the base still saves as a Llama checkpoint,
    but it is frozen and never runs.
    """

    def __init__(self, transformer: Transformer, *, head_std: float = 0.02):
        super().__init__()
        self.transformer = transformer
        self.args: ModelArgs = transformer.args
        weight = transformer.tok_embeddings.weight
        self.score_head = nn.Linear(self.args.dim, 1, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if weight.device.type != "meta":
                self.score_head.weight.normal_(0.0, head_std)
        transformer.output.requires_grad_(False)

    @classmethod
    def from_args(cls, args: ModelArgs, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RewardModel:
        """A randomly initialised reward model (training from scratch, tests)."""
        return cls(Transformer(args, device=device, dtype=dtype))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RewardModel:
        """A reward model initialised from a chat or policy checkpoint (Meta or Hugging Face directory)."""
        from training.llama.checkpoint import load_checkpoint

        transformer, _ = load_checkpoint(path, device=device, dtype=dtype)
        return cls(transformer)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        lengths: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores (bsz,) in float32 of right-padded tokens (bsz, seqlen).

        The score is read at index lengths - 1, the last real token. Give `lengths`, or an `attention_mask`
        (bsz, seqlen) of 1 for real tokens followed by 0 for padding; never infer them from a pad id, which
        for Llama 2 would equal EOS and pick the wrong token. Right padding needs no mask inside the
        transformer: under causal attention a real token never sees the padding after it.
        """
        bsz, seqlen = tokens.shape
        if lengths is None:
            if attention_mask is None:
                raise ValueError("give lengths or attention_mask: the score is read at the last real token")
            lengths = lengths_from_attention_mask(attention_mask)
        lengths = lengths.to(tokens.device)
        if lengths.shape != (bsz,) or bool((lengths < 1).any()) or bool((lengths > seqlen).any()):
            raise ValueError(f"lengths must be (bsz,) = ({bsz},) with values in 1..{seqlen}")
        hidden = self.transformer.forward_hidden(tokens)  # (bsz, seqlen, dim)
        last = hidden[torch.arange(bsz, device=tokens.device), lengths - 1]  # (bsz, dim)
        return self.score_head(last).squeeze(-1).float()  # (bsz,)


class EnsembleRewardModel(nn.Module):
    """Reward models that read the same tokens, scored together: the score is the mean of the members' scores.

    The members are trained independently (their own initial weights and batch order, see rewards.ensemble), so
    their errors are less correlated than a soup's ingredients'. `forward_members` gives every member's score, whose
    spread over the members is an uncertainty estimate (Coste et al., 2023: an uncertainty-penalised reward for PPO).
    Called like a RewardModel, it fits everywhere one is scored (evaluation, RewardScorer).
    """

    def __init__(self, members: Sequence[RewardModel]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.args: ModelArgs = members[0].args

    def forward_members(
        self, tokens: torch.Tensor, *, lengths: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores (n_members, bsz) in float32, one row a member (see RewardModel.forward)."""
        return torch.stack([m(tokens, lengths=lengths, attention_mask=attention_mask) for m in self.members])

    def forward(
        self, tokens: torch.Tensor, *, lengths: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The members' mean score (bsz,) in float32."""
        return self.forward_members(tokens, lengths=lengths, attention_mask=attention_mask).mean(dim=0)


AnyRewardModel = RewardModel | EnsembleRewardModel


def member_scores(model: AnyRewardModel, tokens: torch.Tensor, *, lengths: torch.Tensor) -> torch.Tensor:
    """Scores (n_members, bsz): every member's of an ensemble, one row for a single model."""
    if isinstance(model, EnsembleRewardModel):
        return model.forward_members(tokens, lengths=lengths)
    return model(tokens, lengths=lengths)[None]


def lengths_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Lengths (bsz,) of a right-padded batch's mask (bsz, seqlen); left or inner padding is an error."""
    mask = attention_mask.to(torch.long)
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
    if not torch.equal(mask, (positions < lengths[:, None]).to(torch.long)):
        raise ValueError("attention_mask must be right-padded: ones for the real tokens, then zeros")
    return lengths


@dataclass
class RewardModelInfo:
    """What a saved reward model says about itself (reward_model.json)."""

    kind: str
    model_args: dict[str, Any]
    max_seq_len: int
    tokenizer_file: str = TOKENIZER_FILE
    metadata: dict[str, Any] = field(default_factory=dict)
    context_turns: int | None = None  # the newest context turns the model reads (None: all), see render_reply
    members: list[str] | None = None  # an ensemble: its members' directories, relative to its own


def _write_directory(out_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a temporary directory beside out_dir and put it in out_dir's place once all is written."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is shared with the workers
    try:
        fill(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def save_reward_model(
    model: RewardModel,
    out_dir: str | Path,
    *,
    kind: str,
    tokenizer_path: str | Path,
    max_seq_len: int,
    metadata: dict[str, Any] | None = None,
    context_turns: int | None = None,
) -> Path:
    """Write a reward-model directory atomically: the Llama weights in Meta's format (llama/), the score head,
    a copy of the tokenizer and reward_model.json. An existing directory is replaced only once all is written."""
    from training.llama.checkpoint import save_meta_checkpoint

    if kind not in KINDS:
        raise ValueError(f"unknown reward model kind {kind!r}; expected one of {KINDS}")

    def fill(tmp: Path) -> None:
        save_meta_checkpoint(model.transformer, tmp / LLAMA_DIR)
        save_file({"weight": model.score_head.weight.detach().to("cpu").contiguous()}, str(tmp / HEAD_FILE))
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        info = {
            "format_version": 1,
            "kind": kind,
            "model_args": model.args.to_params_json(),
            "max_seq_len": max_seq_len,
            "tokenizer_file": TOKENIZER_FILE,
            "metadata": metadata or {},
        }
        if context_turns is not None:
            info["context_turns"] = context_turns
        (tmp / REWARD_MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n")

    return _write_directory(Path(out_dir), fill)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link where the file system allows one (saved weights are replaced, never written in place)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def save_reward_ensemble(
    member_dirs: Sequence[str | Path], out_dir: str | Path, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write an ensemble directory atomically: each member's reward-model directory in members/<i>/, the shared
    tokenizer and a reward_model.json that lists the members (read by load_reward_model).

    The members must read the same tokens: one kind, tokenizer, window and context cut.
    """
    dirs = [resolve_reward_model_dir(d) for d in member_dirs]
    if not dirs:
        raise ValueError("an ensemble needs at least one member")
    infos = [read_reward_model_info(d) for d in dirs]
    if any(i.members for i in infos):
        raise ValueError("an ensemble's members must be single reward models, not ensembles")
    first = infos[0]
    tokenizer = (dirs[0] / first.tokenizer_file).read_bytes()
    for d, i in zip(dirs, infos, strict=True):
        if (i.kind, i.max_seq_len, i.context_turns) != (first.kind, first.max_seq_len, first.context_turns):
            raise ValueError(f"{d} is a {i.kind} model reading {i.max_seq_len} tokens (context_turns "
                             f"{i.context_turns}); the first member: {first.kind}, {first.max_seq_len}, {first.context_turns}")
        if (d / i.tokenizer_file).read_bytes() != tokenizer:
            raise ValueError(f"{d} has another tokenizer than the first member")

    def fill(tmp: Path) -> None:
        names = []
        for index, d in enumerate(dirs):
            name = f"{MEMBERS_DIR}/{index}"
            shutil.copytree(d, tmp / name, copy_function=_link_or_copy)
            names.append(name)
        shutil.copyfile(dirs[0] / first.tokenizer_file, tmp / TOKENIZER_FILE)
        info: dict[str, Any] = {
            "format_version": 1,
            "kind": first.kind,
            "model_args": first.model_args,
            "max_seq_len": first.max_seq_len,
            "tokenizer_file": TOKENIZER_FILE,
            "metadata": metadata or {},
            "members": names,
        }
        if first.context_turns is not None:
            info["context_turns"] = first.context_turns
        (tmp / REWARD_MODEL_FILE).write_text(json.dumps(info, indent=2) + "\n")

    return _write_directory(Path(out_dir), fill)


def resolve_reward_model_dir(path: str | Path) -> Path:
    """A reward-model directory, or a training output directory holding one in model/."""
    path = Path(path)
    if not (path / REWARD_MODEL_FILE).is_file() and (path / "model" / REWARD_MODEL_FILE).is_file():
        return path / "model"
    return path


def read_reward_model_info(path: str | Path) -> RewardModelInfo:
    """The reward_model.json of a saved reward model."""
    path = resolve_reward_model_dir(path)
    file = path / REWARD_MODEL_FILE
    if not file.is_file():
        raise ValueError(f"{path} is not a reward model directory: {REWARD_MODEL_FILE} is missing")
    raw = json.loads(file.read_text())
    return RewardModelInfo(
        kind=raw["kind"],
        model_args=raw["model_args"],
        max_seq_len=int(raw["max_seq_len"]),
        tokenizer_file=raw.get("tokenizer_file", TOKENIZER_FILE),
        metadata=raw.get("metadata", {}),
        context_turns=raw.get("context_turns"),
        members=raw.get("members"),
    )


def load_reward_model(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> tuple[AnyRewardModel, RewardModelInfo]:
    """Load a directory written by save_reward_model, or an EnsembleRewardModel written by save_reward_ensemble."""
    from training.llama.checkpoint import load_checkpoint

    path = resolve_reward_model_dir(path)
    info = read_reward_model_info(path)
    if info.members:
        members = [load_single_reward_model(path / m, device=device, dtype=dtype) for m in info.members]
        return EnsembleRewardModel(members), info
    transformer, _ = load_checkpoint(path / LLAMA_DIR, device=device, dtype=dtype)
    model = RewardModel(transformer)
    head = load_file(str(path / HEAD_FILE))["weight"]
    with torch.no_grad():
        model.score_head.weight.copy_(head)
    return model, info


def load_single_reward_model(
    path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> RewardModel:
    """Load a directory written by save_reward_model; an ensemble is an error."""
    model, _ = load_reward_model(path, device=device, dtype=dtype)
    if not isinstance(model, RewardModel):
        raise ValueError(f"{path} is an ensemble, not a single reward model")
    return model
