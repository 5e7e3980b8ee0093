"""The prompts file (the input of every sampling stage) and how prompts and answers become token ids.

A prompts file is JSONL, one object a line:

    {"prompt": "Write a haiku about rain."}
    {"dialogue": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, {"role": "user", "content": "..."}],
     "domain": "safety", "risk_category": "illicit_and_criminal_activities"}

`prompt` is a string, or `dialogue` a list of turns ending with a user turn (an optional first system turn);
`domain` (helpfulness | safety) and `risk_category` are optional. A `response` string may follow: the answer
to fine-tune on (`training.sft --format prompts`) and what `training.evaluate --samples-out` writes.

Two prompt formats: `chat`, the Llama 2 chat format (`[INST] ... [/INST]`, the default, for chat models), and
`plain`, where the prompt text is continued as it is (base models such as the shared stories260K).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PROMPT_FORMATS = ("chat", "plain")
DOMAINS = ("helpfulness", "safety")
_ROLES = ("system", "user", "assistant")


class PromptFormatError(ValueError):
    """A line of a prompts file that cannot be read: the message names the file, the line and the field."""


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: the dialogue to answer (ending with a user turn), its domain and risk category."""

    dialogue: tuple[Mapping[str, str], ...]
    domain: str | None = None
    risk_category: str | None = None
    response: str | None = None  # an answer given with the prompt (fine-tuning data), if any
    source: str = ""  # file:line, for messages

    @classmethod
    def of(cls, prompt: str, **kwargs: Any) -> PromptRecord:
        return cls(dialogue=({"role": "user", "content": prompt},), **kwargs)

    @property
    def text(self) -> str:
        """The prompt as a reward function receives it: the last user turn's text."""
        return self.dialogue[-1]["content"]

    @property
    def is_safety(self) -> bool:
        return self.domain == "safety"

    def with_response(self, response: str) -> PromptRecord:
        return PromptRecord(self.dialogue, self.domain, self.risk_category, response, self.source)

    def to_json(self) -> dict[str, Any]:
        """The record as a prompts-file line (a single user turn is written as `prompt`)."""
        out: dict[str, Any] = (
            {"prompt": self.text} if len(self.dialogue) == 1 else {"dialogue": [dict(m) for m in self.dialogue]}
        )
        if self.domain is not None:
            out["domain"] = self.domain
        if self.risk_category is not None:
            out["risk_category"] = self.risk_category
        if self.response is not None:
            out["response"] = self.response
        return out


def _check_dialogue(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise PromptFormatError(f"{where}: dialogue: expected a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise PromptFormatError(f"{where}: dialogue[{i}]: expected an object with 'role' and 'content'")
        role, content = turn["role"], turn["content"]
        if role not in _ROLES:
            raise PromptFormatError(f"{where}: dialogue[{i}].role: {role!r} is not one of {_ROLES}")
        if not isinstance(content, str) or not content.strip():
            raise PromptFormatError(f"{where}: dialogue[{i}].content: expected non-empty text")
        turns.append({"role": role, "content": content})
    body = turns[1:] if turns[0]["role"] == "system" else turns
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise PromptFormatError(f"{where}: dialogue: turns must alternate user/assistant after an optional "
                                    f"system turn; turn {i + len(turns) - len(body)} is {turn['role']!r}")
    if not body or body[-1]["role"] != "user":
        raise PromptFormatError(f"{where}: dialogue: must end with a user turn")
    return tuple(turns)


def parse_prompt(obj: Any, where: str) -> PromptRecord:
    """One prompts-file object as a PromptRecord; PromptFormatError naming `where` and the field."""
    if not isinstance(obj, dict):
        raise PromptFormatError(f"{where}: expected a JSON object")
    if ("prompt" in obj) == ("dialogue" in obj):
        raise PromptFormatError(f"{where}: give exactly one of 'prompt' and 'dialogue'")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise PromptFormatError(f"{where}: prompt: expected non-empty text")
        dialogue: tuple[Mapping[str, str], ...] = ({"role": "user", "content": obj["prompt"]},)
    else:
        dialogue = _check_dialogue(obj["dialogue"], where)
    domain = obj.get("domain")
    if domain is not None and domain not in DOMAINS:
        raise PromptFormatError(f"{where}: domain: {domain!r} is not one of {DOMAINS}")
    for name in ("risk_category", "response"):
        if obj.get(name) is not None and not isinstance(obj[name], str):
            raise PromptFormatError(f"{where}: {name}: expected text")
    return PromptRecord(dialogue, domain, obj.get("risk_category"), obj.get("response"), where)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            yield from enumerate(f, start=1)
    except (UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise PromptFormatError(f"{path}: cannot be read as UTF-8 JSONL: {exc}") from exc


def prompt_lines(path: str | Path) -> Iterator[tuple[str, Any, PromptRecord]]:
    """(file:line, the line's object, its PromptRecord) of every non-blank line of a prompts file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFormatError(f"{where}: not valid JSON ({exc.msg})") from exc
        yield where, obj, parse_prompt(obj, where)


def read_prompts(path: str | Path, *, require_response: bool = False) -> list[PromptRecord]:
    """Every prompt of a prompts file (.jsonl or .jsonl.gz); blank lines are skipped."""
    path = Path(path)
    records = []
    for where, _obj, record in prompt_lines(path):
        if require_response and record.response is None:
            raise PromptFormatError(f"{where}: response: missing (fine-tuning on prompts needs the answer)")
        records.append(record)
    if not records:
        raise PromptFormatError(f"{path}: no prompts")
    return records


def write_prompts(records: Sequence[PromptRecord], path: str | Path) -> Path:
    """Write records as a prompts file (with their responses, where they have one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
    return path


# --------------------------------------------------------------------------------------------- encoding


class PromptTokenizer(Protocol):
    """What encoding needs of training.llama.tokenizer.Tokenizer."""

    bos_id: int
    eos_id: int

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]: ...

    def encode_dialog(self, messages: Sequence[Mapping[str, str]], *, system: str | None = None,
                      allow_special_tags: bool = False) -> tuple[list[int], list[bool]]: ...


def _check_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")


def _plain_text(dialogue: Sequence[Mapping[str, str]], where: str) -> str:
    if len(dialogue) != 1:
        raise ValueError(f"{where}: the plain prompt format continues one text; a dialogue of "
                         f"{len(dialogue)} turns needs --prompt-format chat")
    return dialogue[0]["content"]


def encode_prompt(tokenizer: PromptTokenizer, record: PromptRecord, prompt_format: str) -> list[int]:
    """The token ids to sample an answer after: `BOS [INST] ... [/INST]` (chat) or BOS + the text (plain)."""
    _check_format(prompt_format)
    if prompt_format == "plain":
        return tokenizer.encode(_plain_text(record.dialogue, record.source), bos=True, eos=False)
    ids, _ = tokenizer.encode_dialog(list(record.dialogue), allow_special_tags=True)
    return ids


def encode_answered(tokenizer: PromptTokenizer, dialogue: Sequence[Mapping[str, str]], answer: str,
                    prompt_format: str, *, where: str = "") -> tuple[list[int], list[bool]]:
    """Token ids of a dialogue and its answer, and the mask of the tokens that carry the loss.

    chat: `Tokenizer.encode_dialog`, whose mask covers every assistant answer and the EOS closing it. plain: BOS,
    the text and the answer encoded as one string (as a model that continues the text reads it), EOS; the mask
    covers the answer's pieces and the EOS.
    """
    _check_format(prompt_format)
    if prompt_format == "chat":
        return tokenizer.encode_dialog([*dialogue, {"role": "assistant", "content": answer}], allow_special_tags=True)
    text = _plain_text(dialogue, where)
    head = tokenizer.encode(text, bos=True, eos=False)
    ids = tokenizer.encode(text + answer, bos=True, eos=True)
    n_head = 0  # SentencePiece may merge the text's last piece with the answer's first: the mask starts there
    while n_head < min(len(head), len(ids) - 1) and ids[n_head] == head[n_head]:
        n_head += 1
    return ids, [False] * n_head + [True] * (len(ids) - n_head)
