"""A SentencePiece tokenizer trained on the training pairs' own text, for reward models trained from scratch.

With a few thousand pairs, most of the Llama 2 tokenizer's 32,000 pieces are seen once or twice, and a model
trained from scratch learns little about them. A vocabulary of one to a few thousand pieces fitted to the
training text gives every piece many examples. The result is an ordinary SentencePiece model that
training.llama.tokenizer.Tokenizer loads: unk 0, BOS 1, EOS 2 (as Llama 2), then a control piece `<rare>` (id 3,
never produced by encoding; the shared embedding of rare pieces, see rewards.train.share_rare_tokens) and the
chat markup `[INST]`, `[/INST]` as single pieces. Training is deterministic: one thread, every sentence, in the
order given.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from rewards.data import PreferencePair

MODEL_TYPES = ("unigram", "bpe", "word")
RARE_PIECE = "<rare>"
CHAT_PIECES = ("[INST]", "[/INST]")


def pair_texts(pairs: Sequence[PreferencePair]) -> Iterator[str]:
    """Every message of the pairs, once: each context turn (deduplicated in order) and both final replies."""
    seen: set[str] = set()
    for p in pairs:
        for text in (*(m["content"] for m in p.dialogue), p.chosen, p.rejected):
            text = text.strip()
            if text and text not in seen:
                seen.add(text)
                yield text


def train_tokenizer(
    texts: Iterable[str], out_path: str | Path, *, vocab_size: int, model_type: str = "unigram",
    lowercase: bool = False,
) -> Path:
    """Train a SentencePiece model on `texts` (one sentence each) and write it to out_path (tokenizer.model).

    vocab_size is an upper bound: a small corpus may support fewer pieces (hard_vocab_limit off).
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    sentences = [t.replace("\n", " ") for t in texts if t.strip()]
    if not sentences:
        raise ValueError("no text to train a tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=[RARE_PIECE],
        user_defined_symbols=list(CHAT_PIECES),
        character_coverage=0.9995,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        max_sentence_length=1 << 20,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return out_path


def train_pair_tokenizer(
    pairs: Sequence[PreferencePair], out_path: str | Path, *, vocab_size: int, model_type: str = "unigram",
    lowercase: bool = False,
) -> Path:
    """A tokenizer trained on the text of these (training) pairs only."""
    return train_tokenizer(pair_texts(pairs), out_path, vocab_size=vocab_size, model_type=model_type, lowercase=lowercase)
