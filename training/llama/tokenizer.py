"""The Llama 2 SentencePiece tokenizer and chat format, after meta-llama/llama `tokenizer.py` and `generation.py`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sentencepiece import SentencePieceProcessor

# The chat markup of Meta's `Llama.chat_completion`.
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]


class Tokenizer:
    """Encodes and decodes text with a SentencePiece model; builds Llama 2 chat dialogues."""

    def __init__(self, model_path: str | os.PathLike[str]):
        if not Path(model_path).is_file():
            raise FileNotFoundError(f"Tokenizer model {model_path} does not exist")
        try:
            self.sp_model = SentencePieceProcessor(model_file=str(model_path))
        except RuntimeError as e:  # sentencepiece: "could not parse ModelProto from ..."
            raise ValueError(f"{model_path} is not a SentencePiece model: {e}") from e
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 for Llama 2: it has no padding token

    def encode(self, s: str, *, bos: bool, eos: bool) -> list[int]:
        """Token ids of `s`, with BOS prepended and/or EOS appended."""
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id, *t]
        if eos:
            t = [*t, self.eos_id]
        return t

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids (BOS/EOS produce no text)."""
        return self.sp_model.decode(list(ids))

    def _encode_turn(self, prompt: str, answer: str | None) -> tuple[list[int], list[bool]]:
        """`BOS [INST] prompt [/INST] answer EOS` (or `BOS [INST] prompt [/INST]`) and its answer mask."""
        if answer is None:
            ids = self.encode(f"{B_INST} {prompt.strip()} {E_INST}", bos=True, eos=False)
            return ids, [False] * len(ids)
        # One string, encoded at once exactly as Meta does. SentencePiece splits pieces where whitespace
        # starts a word, so the pieces of the text up to [/INST] are a prefix of the whole turn's pieces
        # and the answer's pieces (with the "▁" of the space before it) are the rest.
        head = self.encode(f"{B_INST} {prompt.strip()} {E_INST}", bos=True, eos=False)
        ids = self.encode(f"{B_INST} {prompt.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True)
        n_head = 0
        while n_head < len(head) and ids[n_head] == head[n_head]:
            n_head += 1
        mask = [False] * n_head + [True] * (len(ids) - n_head)
        return ids, mask

    def encode_dialog(
        self,
        messages: Sequence[dict[str, str]],
        *,
        system: str | None = None,
        allow_special_tags: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a dialogue in the Llama 2 chat format and a mask of the assistant-answer tokens.

        `messages` alternate {"role": "user"} and {"role": "assistant"}, optionally after a first
        {"role": "system"} message (or pass `system=`). Every user/assistant pair becomes
        `BOS [INST] user [/INST] answer EOS`, with the system prompt `<<SYS>>\\n...\\n<</SYS>>\\n\\n` at the
        start of the first user message; a final user message becomes `BOS [INST] user [/INST]`, the prompt
        to sample an answer from. This is Meta's `chat_completion`, which also allows a dialogue to end with an
        answer (for training). The mask is True on each answer's tokens and the EOS that closes it.

        Meta refuses to answer messages containing the chat markup; so does this, with a ValueError, unless
        `allow_special_tags`.
        """
        dialog = [dict(m) for m in messages]
        if system is not None:
            if dialog and dialog[0].get("role") == "system":
                raise ValueError("Give the system prompt either as system= or as a first 'system' message, not both")
            dialog = [{"role": "system", "content": system}, *dialog]
        for i, message in enumerate(dialog):
            if "role" not in message or "content" not in message:
                raise ValueError(f"Message {i} must have 'role' and 'content' keys, got {sorted(message)}")
            if not allow_special_tags and any(tag in message["content"] for tag in SPECIAL_TAGS):
                raise ValueError(f"Message {i} contains a chat markup tag {SPECIAL_TAGS}, which Meta refuses")
        if dialog and dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise ValueError("A system prompt must be followed by a user message")
            dialog = [
                {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]},
                *dialog[2:],
            ]
        if not dialog:
            raise ValueError("A dialogue needs at least one user message")
        for i, message in enumerate(dialog):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"Roles must alternate user/assistant starting with user (after an optional "
                                 f"system message); turn {i} is {message['role']!r}, expected {expected!r}")

        ids: list[int] = []
        mask: list[bool] = []
        for start in range(0, len(dialog), 2):
            answer = dialog[start + 1]["content"] if start + 1 < len(dialog) else None
            turn_ids, turn_mask = self._encode_turn(dialog[start]["content"], answer)
            ids += turn_ids
            mask += turn_mask
        return ids, mask
