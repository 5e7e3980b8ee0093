"""Preference pairs: plain records, file readers, splits, mixing recipes, chat rendering and batching.

Importing this module does not import torch (only collate_pairs needs it), so that the platform's selector can
build PreferencePair records in a process that never loads torch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rewards.margins import STRENGTHS, strength_margin

if TYPE_CHECKING:
    import torch

ROLES = ("user", "assistant")
DOMAINS = ("helpfulness", "safety")
SAFETY_LABELS = ("chosen_safe_other_unsafe", "both_safe", "both_unsafe")
FORMATS = ("native", "trl", "hh-rlhf", "pandalm", "oasst")


class PairFormatError(ValueError):
    """A preference file line that cannot be read; the message names the file, the line and what to fix."""


def _message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def check_dialogue(dialogue: Sequence[Mapping[str, str]]) -> tuple[dict[str, str], ...]:
    """Validate a context (user first, turns alternating, ending with a user turn) and return it as a tuple."""
    messages = tuple(_message(str(m["role"]), str(m["content"])) for m in dialogue)
    if not messages:
        raise ValueError("a dialogue needs at least one user turn")
    for i, m in enumerate(messages):
        expected = ROLES[i % 2]
        if m["role"] != expected:
            raise ValueError(f"turn {i} of the dialogue has role {m['role']!r}, expected {expected!r}")
    if messages[-1]["role"] != "user":
        raise ValueError("a dialogue given as context must end with a user turn")
    return messages


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: a context, the chosen and the rejected reply, and what the annotator said about them."""

    dialogue: tuple[dict[str, str], ...]  # the context, alternating user/assistant, ending with a user turn
    chosen: str
    rejected: str
    strength: str | None = None  # one of STRENGTHS
    domain: str | None = None  # "helpfulness" | "safety"
    batch: str | None = None
    split: str | None = None  # "train" | "test"
    safety_label: str | None = None
    margin: float | None = None  # an explicit margin (TRL files); overrides the strength's margin
    source: str | None = None  # where the pair came from, e.g. "hh-rlhf" or "pandalm"
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dialogue", check_dialogue(self.dialogue))
        if not isinstance(self.chosen, str) or not isinstance(self.rejected, str):
            raise ValueError("chosen and rejected must be strings")
        if self.strength is not None and self.strength not in STRENGTHS:
            raise ValueError(f"unknown strength {self.strength!r}; expected one of {STRENGTHS}")
        if self.domain is not None and self.domain not in DOMAINS:
            raise ValueError(f"unknown domain {self.domain!r}; expected one of {DOMAINS}")
        if self.split is not None and self.split not in ("train", "test"):
            raise ValueError(f"unknown split {self.split!r}; expected 'train' or 'test'")
        if self.safety_label is not None and self.safety_label not in SAFETY_LABELS:
            raise ValueError(f"unknown safety label {self.safety_label!r}; expected one of {SAFETY_LABELS}")

    def key(self) -> str:
        """A stable content hash, used for the fixed splits."""
        payload = json.dumps([self.dialogue, self.chosen, self.rejected], ensure_ascii=False)
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- readers


def _open_text(path: Path) -> Any:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PairFormatError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise PairFormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _require(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise PairFormatError(f"{where}: missing field {key!r}")
    return obj[key]


def read_native(path: str | Path) -> list[PreferencePair]:
    """Read the platform's `native` export (one comparison a line, with its choice and strength)."""
    path = Path(path)
    pairs = []
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        try:
            pairs.append(
                PreferencePair(
                    dialogue=_require(obj, "dialogue", where),
                    chosen=_require(obj, "chosen", where),
                    rejected=_require(obj, "rejected", where),
                    strength=obj.get("strength"),
                    domain=obj.get("domain"),
                    batch=None if obj.get("batch") is None else str(obj["batch"]),
                    split=obj.get("split"),
                    safety_label=obj.get("safety_label"),
                    source="native",
                    meta={k: obj[k] for k in ("task_id", "annotator", "is_gold", "risk_category") if k in obj},
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PairFormatError):
                raise
            raise PairFormatError(f"{where}: {exc}") from exc
    return pairs


def _trl_reply(value: Any, where: str, name: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) >= 1 and all(isinstance(m, dict) for m in value):
        if value[-1].get("role") != "assistant":
            raise PairFormatError(f"{where}: {name!r} must end with an assistant message")
        return str(value[-1]["content"])
    raise PairFormatError(f"{where}: {name!r} must be a string or a list of messages")


def read_trl(path: str | Path) -> list[PreferencePair]:
    """Read TRL's preference format, conversational (lists of messages) or plain strings."""
    path = Path(path)
    pairs = []
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        prompt = _require(obj, "prompt", where)
        dialogue = [_message("user", prompt)] if isinstance(prompt, str) else prompt
        if not isinstance(dialogue, list):
            raise PairFormatError(f"{where}: 'prompt' must be a string or a list of messages")
        margin = obj.get("margin")
        try:
            pairs.append(
                PreferencePair(
                    dialogue=dialogue,
                    chosen=_trl_reply(_require(obj, "chosen", where), where, "chosen"),
                    rejected=_trl_reply(_require(obj, "rejected", where), where, "rejected"),
                    strength=obj.get("strength"),
                    domain=obj.get("domain"),
                    batch=None if obj.get("batch") is None else str(obj["batch"]),
                    split=obj.get("split"),
                    margin=None if margin is None else float(margin),
                    source="trl",
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PairFormatError):
                raise
            raise PairFormatError(f"{where}: {exc}") from exc
    return pairs


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
_HH_ASSISTANT = "\n\nAssistant: "


def parse_hh_transcript(transcript: str) -> list[dict[str, str]]:
    """Split an Anthropic transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise ValueError("an HH-RLHF transcript must start with '\\n\\nHuman: '")
    messages: list[dict[str, str]] = []
    for role, text in zip(parts[1::2], parts[2::2], strict=True):
        if messages and messages[-1]["role"] == _HH_ROLES[role]:
            # A few transcripts have two turns of one speaker in a row; the chat format alternates, so they
            # become one message.
            messages[-1]["content"] += "\n\n" + text
        else:
            messages.append(_message(_HH_ROLES[role], text))
    return messages


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """The shared context and the two final replies of an HH-RLHF pair.

    The two transcripts share everything up to the last "Assistant:" marker they have in common. Splitting
    there (rather than turn by turn) keeps replies that themselves contain "Human:" in one piece.
    """
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(_HH_ASSISTANT, 0, common)
    if cut < 0:
        raise ValueError("the two transcripts share no 'Assistant:' turn")
    context = parse_hh_transcript(chosen[:cut])
    start = cut + len(_HH_ASSISTANT)
    return context, chosen[start:].strip(), rejected[start:].strip()


def read_hh_rlhf(path: str | Path, *, domain: str | None = None) -> list[PreferencePair]:
    """Read Anthropic HH-RLHF pairs ({"chosen": transcript, "rejected": transcript})."""
    path = Path(path)
    pairs = []
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        try:
            context, chosen, rejected = split_hh_pair(_require(obj, "chosen", where), _require(obj, "rejected", where))
            pairs.append(PreferencePair(dialogue=context, chosen=chosen, rejected=rejected, domain=domain, source="hh-rlhf"))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PairFormatError):
                raise
            raise PairFormatError(f"{where}: {exc}") from exc
    return pairs


def pandalm_strength(votes: Sequence[int]) -> tuple[int, str] | None:
    """Winner (1 or 2) and strength from PandaLM's three annotator votes (1, 2, or 0 for a tie).

    (for, against, tie) = (3, 0, 0): significantly better; (2, 0, 1): better; (2, 1, 0): slightly better;
    (1, 0, 2): negligibly better. Votes without a majority for one side, e.g. (1, 1, 1), give no pair.
    """
    ones, twos = sum(v == 1 for v in votes), sum(v == 2 for v in votes)
    if ones == twos:
        return None
    winner, n_for, n_against = (1, ones, twos) if ones > twos else (2, twos, ones)
    ties = len(votes) - n_for - n_against
    table = {(3, 0, 0): "significantly_better", (2, 0, 1): "better", (2, 1, 0): "slightly_better", (1, 0, 2): "negligibly_better"}
    strength = table.get((n_for, n_against, ties))
    return None if strength is None else (winner, strength)


def read_pandalm(path: str | Path) -> list[PreferencePair]:
    """Read PandaLM's test set (instruction, input, two responses, three annotators) into helpfulness pairs."""
    path = Path(path)
    with _open_text(path) as f:
        items = json.load(f)
    pairs = []
    for item in items:
        verdict = pandalm_strength([item["annotator1"], item["annotator2"], item["annotator3"]])
        if verdict is None:
            continue
        winner, strength = verdict
        prompt = item["instruction"] if not item.get("input") else f"{item['instruction']}\n\n{item['input']}"
        # A few responses in the file are JSON literals (true, numbers): they are read as the text they show.
        first, second = str(item["response1"]), str(item["response2"])
        good, bad = (first, second) if winner == 1 else (second, first)
        pairs.append(
            PreferencePair(
                dialogue=[_message("user", prompt)],
                chosen=good,
                rejected=bad,
                strength=strength,
                domain="helpfulness",
                source="pandalm",
                meta={"idx": item.get("idx")},
            )
        )
    return pairs


def oasst_strength(rank_gap: int) -> str:
    """Strength from the rank gap of two ranked Open-Assistant siblings: 1 slightly, 2 better, 3+ significantly.

    Open-Assistant rankings have no ties, so no pair is "negligibly better".
    """
    if rank_gap < 1:
        raise ValueError(f"a rank gap must be at least 1, got {rank_gap}")
    return {1: "slightly_better", 2: "better"}.get(rank_gap, "significantly_better")


def read_oasst_trees(path: str | Path) -> list[PreferencePair]:
    """Pairs of ranked sibling assistant replies from Open-Assistant message trees, with their context."""
    path = Path(path)
    pairs: list[PreferencePair] = []

    def walk(node: Mapping[str, Any], context: list[dict[str, str]]) -> None:
        role = "user" if node["role"] == "prompter" else "assistant"
        here = [*context, _message(role, node["text"])]
        replies = [r for r in node.get("replies", []) if not r.get("deleted")]
        ranked = sorted((r for r in replies if r.get("rank") is not None and r["role"] == "assistant"), key=lambda r: r["rank"])
        if role == "user":
            for i, better in enumerate(ranked):
                for worse in ranked[i + 1 :]:
                    pairs.append(
                        PreferencePair(
                            dialogue=here,
                            chosen=better["text"],
                            rejected=worse["text"],
                            strength=oasst_strength(worse["rank"] - better["rank"]),
                            domain="helpfulness",
                            source="oasst",
                            meta={"tree": node.get("message_id")},
                        )
                    )
        for reply in replies:
            walk(reply, here)

    for _, obj in _jsonl(path):
        walk(obj["prompt"], [])
    return pairs


def read_pairs(path: str | Path, fmt: str, *, domain: str | None = None) -> list[PreferencePair]:
    """Read a preference file in one of FORMATS; `domain` labels the pairs of formats that carry none."""
    if fmt == "native":
        pairs = read_native(path)
    elif fmt == "trl":
        pairs = read_trl(path)
    elif fmt == "hh-rlhf":
        pairs = read_hh_rlhf(path)
    elif fmt == "pandalm":
        pairs = read_pandalm(path)
    elif fmt == "oasst":
        pairs = read_oasst_trees(path)
    else:
        raise ValueError(f"unknown pair format {fmt!r}; expected one of {FORMATS}")
    if domain is not None:
        pairs = [p if p.domain is not None else replace(p, domain=domain) for p in pairs]
    return pairs


# ----------------------------------------------------------------------------------------------- splits


def _ranked_by_hash(pairs: Sequence[PreferencePair], salt: str) -> list[int]:
    return sorted(range(len(pairs)), key=lambda i: hashlib.sha1((salt + pairs[i].key()).encode()).hexdigest())


def assign_splits(pairs: Sequence[PreferencePair], test_fraction: float, *, salt: str = "split") -> list[PreferencePair]:
    """Give pairs without a split a fixed one: the round(test_fraction * n) pairs first by content hash are test.

    The split depends only on the pairs' content, so it is the same on every run and every machine.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    unassigned = [i for i, p in enumerate(pairs) if p.split is None]
    n_test = round(test_fraction * len(unassigned))
    order = _ranked_by_hash([pairs[i] for i in unassigned], salt)
    test = {unassigned[j] for j in order[:n_test]}
    return [p if p.split is not None else replace(p, split="test" if i in test else "train") for i, p in enumerate(pairs)]


def hold_out(pairs: Sequence[PreferencePair], fraction: float, *, salt: str = "validation") -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Split pairs into (kept, held out) by content hash, e.g. a validation set carved from the train split."""
    order = _ranked_by_hash(pairs, salt)
    n_out = round(fraction * len(pairs))
    out = set(order[:n_out])
    return [p for i, p in enumerate(pairs) if i not in out], [p for i, p in enumerate(pairs) if i in out]


# ------------------------------------------------------------------------------------------ mixing recipes


def mix_helpfulness(
    helpfulness: Sequence[PreferencePair], others: Sequence[PreferencePair], *, other_ratio: float = 1.0, seed: int = 0
) -> list[PreferencePair]:
    """Llama 2's helpfulness mix: all helpfulness pairs plus other_ratio times as many drawn from the rest."""
    rng = random.Random(seed)
    n_other = min(len(others), round(other_ratio * len(helpfulness)))
    mixed = list(helpfulness) + rng.sample(list(others), n_other)
    rng.shuffle(mixed)
    return mixed


def mix_safety(
    safety: Sequence[PreferencePair],
    helpfulness: Sequence[PreferencePair],
    *,
    helpfulness_fraction: float = 0.1,
    seed: int = 0,
) -> list[PreferencePair]:
    """Llama 2's safety mix: all safety (and Anthropic harmless) pairs, with helpfulness pairs making up
    helpfulness_fraction of the result (90/10 in the report)."""
    if not 0.0 <= helpfulness_fraction < 1.0:
        raise ValueError(f"helpfulness_fraction must be in [0, 1), got {helpfulness_fraction}")
    rng = random.Random(seed)
    n_help = min(len(helpfulness), round(len(safety) * helpfulness_fraction / (1.0 - helpfulness_fraction)))
    mixed = list(safety) + rng.sample(list(helpfulness), n_help)
    rng.shuffle(mixed)
    return mixed


def mix_for_kind(
    pairs: Sequence[PreferencePair],
    kind: str,
    *,
    other_ratio: float = 1.0,
    helpfulness_fraction: float = 0.1,
    seed: int = 0,
) -> list[PreferencePair]:
    """Apply the recipe of one reward model to a pool of pairs, split by their domain.

    Pairs without a domain are "open-source" data: for the helpfulness model they join the drawn share; for
    the safety model, pairs from Anthropic's harmless set (source "hh-rlhf") count as safety data. When the pool
    has nothing of the model's own domain (e.g. only an HH file), the pool is used as it is.
    """
    if kind == "helpfulness":
        own = [p for p in pairs if p.domain == "helpfulness"]
        rest = [p for p in pairs if p.domain != "helpfulness"]
        return mix_helpfulness(own, rest, other_ratio=other_ratio, seed=seed) if own else list(pairs)
    if kind == "safety":
        own = [p for p in pairs if p.domain == "safety" or (p.domain is None and p.source == "hh-rlhf")]
        helpful = [p for p in pairs if p.domain == "helpfulness"]
        return mix_safety(own, helpful, helpfulness_fraction=helpfulness_fraction, seed=seed) if own else list(pairs)
    raise ValueError(f"unknown reward model kind {kind!r}; expected 'helpfulness' or 'safety'")


# -------------------------------------------------------------------------------------------- rendering


class DialogTokenizer(Protocol):
    """What rendering needs of training.llama.tokenizer.Tokenizer."""

    bos_id: int
    eos_id: int

    def encode_dialog(
        self, messages: list[dict[str, str]], *, system: str | None = None, allow_special_tags: bool = False
    ) -> tuple[list[int], list[bool]]: ...


def render_reply(
    tokenizer: DialogTokenizer, dialogue: Sequence[Mapping[str, str]], reply: str, max_seq_len: int,
    *, context_turns: int | None = None,
) -> list[int]:
    """Token ids of context + reply in the Llama 2 chat format, at most max_seq_len long.

    context_turns (odd: 1 is the last user turn alone, 3 adds the exchange before it) keeps only the newest
    turns of the context; None keeps them all. Too long a conversation loses its oldest exchanges (user +
    assistant turns) first; if the last user turn and the reply alone are still too long, the oldest tokens
    go, so the final answer, whose last token carries the score, is always kept.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if context_turns is not None:
        if context_turns < 1 or context_turns % 2 == 0:
            raise ValueError(f"context_turns must be odd and positive (the context ends with a user turn), got {context_turns}")
        dialogue = list(dialogue)[-context_turns:]
    messages = [_message(m["role"], m["content"]) for m in dialogue] + [_message("assistant", reply)]
    while True:
        ids, _ = tokenizer.encode_dialog(messages, allow_special_tags=True)
        if len(ids) <= max_seq_len or len(messages) <= 2:
            break
        messages = messages[2:]
    if len(ids) > max_seq_len:
        ids = [ids[0], *ids[len(ids) - (max_seq_len - 1) :]]  # keep BOS and the newest tokens
    return list(ids)


@dataclass(frozen=True)
class TokenizedPair:
    """A pair rendered to token ids, with what the loss and the report need."""

    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    margin: float
    strength: str | None = None
    domain: str | None = None
    batch: str | None = None

    @property
    def length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


def tokenize_pairs(
    tokenizer: DialogTokenizer, pairs: Iterable[PreferencePair], *, max_seq_len: int, margin_scheme: str = "none",
    context_turns: int | None = None,
) -> list[TokenizedPair]:
    """Render every pair's two conversations; the margin comes from the pair's strength (or its own margin)."""
    out = []
    for p in pairs:
        margin = p.margin if p.margin is not None and margin_scheme != "none" else strength_margin(p.strength, margin_scheme)
        out.append(
            TokenizedPair(
                chosen_ids=tuple(render_reply(tokenizer, p.dialogue, p.chosen, max_seq_len, context_turns=context_turns)),
                rejected_ids=tuple(render_reply(tokenizer, p.dialogue, p.rejected, max_seq_len, context_turns=context_turns)),
                margin=float(margin),
                strength=p.strength,
                domain=p.domain,
                batch=p.batch,
            )
        )
    return out


# -------------------------------------------------------------------------------------------- batching


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, bucket_batches: int = 8, drop_last: bool = True
) -> list[list[int]]:
    """One epoch of batches of indices, each drawn from pairs of similar length, in a seeded random order.

    The indices are shuffled, cut into chunks of bucket_batches * batch_size, sorted by length inside each
    chunk and cut into batches, whose order is shuffled again: little padding, and still a random epoch.
    The result depends only on (lengths, batch_size, seed, epoch), which is what makes resume exact.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * max(1, bucket_batches)
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    rng.shuffle(batches)
    return batches


def collate_pairs(items: Sequence[TokenizedPair], *, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected of a batch in one right-padded tensor for a single forward pass.

    Returns tokens (2 * bsz, seqlen) with the chosen conversations first, their lengths (2 * bsz,), and the
    margins (bsz,). The pad id is only a filler: scores are read at lengths - 1, never at a pad token.
    """
    import torch

    seqs = [p.chosen_ids for p in items] + [p.rejected_ids for p in items]
    seqlen = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), seqlen), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    margins = torch.tensor([p.margin for p in items], dtype=torch.float32)
    return tokens, lengths, margins


# ------------------------------------------------------------------------------------------------ writing


def pair_to_trl(pair: PreferencePair) -> dict[str, Any]:
    """One pair as a line of TRL's conversational preference format, with its strength and domain (and its batch
    and split where it has them: extra keys that TRL ignores and read_trl reads)."""
    record: dict[str, Any] = {
        "prompt": [dict(m) for m in pair.dialogue],
        "chosen": [_message("assistant", pair.chosen)],
        "rejected": [_message("assistant", pair.rejected)],
        "strength": pair.strength,
        "domain": pair.domain,
    }
    if pair.margin is not None:
        record["margin"] = pair.margin
    for key in ("batch", "split"):
        if getattr(pair, key) is not None:
            record[key] = getattr(pair, key)
    return record


def write_trl_jsonl(pairs: Iterable[PreferencePair], path: str | Path) -> Path:
    """Write pairs as TRL conversational JSONL (tests, benchmarks, conversions of PandaLM/OASST)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair_to_trl(pair), ensure_ascii=False) + "\n")
    return path
