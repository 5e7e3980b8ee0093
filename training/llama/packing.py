"""Packed rows: several training examples side by side in one row, each attending only to itself.

Fine-tuning examples (a dialogue and its answers) are a few hundred tokens; padding each to the longest wastes
the rest of the row. Packing fills rows of `seq_len` tokens with whole examples. Each example keeps its own
rotary positions (0, 1, 2, ... from its first token) and attention stays inside it, so the model computes for
every example exactly what it computes for that example alone.

The rows are described as Hugging Face's padding-free collators describe them: by `position_ids`, where a new
example starts wherever a token's position does not follow the previous one's. `transformers.LlamaForCausalLM`
given the same `position_ids` builds a block-diagonal mask from them, and the two models' logits agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from training.llama.attention import attention


@dataclass(frozen=True)
class PackedDocuments:
    """Where the documents of each row lie: `bounds[row]` = ((start, end), ...) covering 0..seqlen in order."""

    bounds: tuple[tuple[tuple[int, int], ...], ...]

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> PackedDocuments:
        """The documents of position_ids (bsz, seqlen): one starts wherever position != previous position + 1."""
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be (bsz, seqlen), got shape {tuple(position_ids.shape)}")
        seqlen = position_ids.shape[1]
        starts = torch.ones_like(position_ids, dtype=torch.bool)
        starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
        bounds = []
        for row in starts.cpu():
            edges = [*row.nonzero().squeeze(1).tolist(), seqlen]
            bounds.append(tuple(zip(edges[:-1], edges[1:], strict=True)))
        return cls(tuple(bounds))

    @property
    def n_documents(self) -> int:
        return sum(len(row) for row in self.bounds)

    def dense_mask(self, seqlen: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The same attention as a boolean SDPA mask (bsz, 1, seqlen, seqlen): causal and block-diagonal."""
        document = torch.empty(len(self.bounds), seqlen, dtype=torch.long)
        for row, bounds in enumerate(self.bounds):
            for index, (start, end) in enumerate(bounds):
                document[row, start:end] = index
        document = document.to(device)
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril()
        return (causal & (document[:, :, None] == document[:, None, :]))[:, None]


def packed_attention(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, documents: PackedDocuments) -> torch.Tensor:
    """Causal attention within each document of each row; q (bsz, n_heads, seqlen, head_dim), k/v likewise
    (bsz, n_kv_heads, seqlen, head_dim).

    One causal SDPA call per document: what lies between documents (and above each diagonal) is never computed,
    where a block-diagonal mask would make the kernel visit the whole seqlen x seqlen square. The pieces are
    taken with `split`, whose backward concatenates their gradients (slicing's would zero-fill and add a
    full-size gradient per piece).
    """
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, is_causal=True)

    rows = []
    for q, k, v, bounds in zip(xq.split(1), xk.split(1), xv.split(1), documents.bounds, strict=True):
        if len(bounds) == 1:
            rows.append(attend(q, k, v))
            continue
        lengths = [end - start for start, end in bounds]
        pieces = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
        rows.append(torch.cat([attend(*piece) for piece in pieces], dim=2))
    return torch.cat(rows, dim=0)


@dataclass(frozen=True)
class PackedBatch:
    """Rows of packed examples: tokens, next-token targets (-100 where no loss) and position ids, (rows, seq_len)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    n_examples: int
    n_truncated: int  # examples longer than a row, cut to seq_len
    fill: float  # the fraction of the rows' tokens that belong to an example (the rest is padding)


def pack_examples(
    examples: Sequence[tuple[Sequence[int], Sequence[bool]]],
    seq_len: int,
    *,
    pad_id: int = 0,
    ignore_index: int = -100,
) -> PackedBatch:
    """Pack (token ids, loss mask) examples into rows of `seq_len` tokens.

    Each example's targets are its next tokens where the loss mask is True (an answer's tokens and the EOS that
    closes it, as `Tokenizer.encode_dialog` marks them) and `ignore_index` elsewhere, never across examples.
    Rows are filled first-fit, longest example first (deterministic); the space left in a row is padding, a
    document of its own with no targets. An example longer than a row is cut to `seq_len` tokens.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    cut = []
    n_truncated = 0
    for i, (ids, mask) in enumerate(examples):
        if len(ids) != len(mask):
            raise ValueError(f"example {i}: {len(ids)} token ids but a loss mask of {len(mask)}")
        if not ids:
            raise ValueError(f"example {i} has no tokens")
        if len(ids) > seq_len:
            n_truncated += 1
        cut.append((list(ids[:seq_len]), list(mask[:seq_len])))

    order = sorted(range(len(cut)), key=lambda i: (-len(cut[i][0]), i))
    rows: list[list[int]] = []  # example indices per row
    space: list[int] = []
    for i in order:
        n = len(cut[i][0])
        row = next((r for r, free in enumerate(space) if free >= n), None)
        if row is None:
            rows.append([])
            space.append(seq_len)
            row = len(rows) - 1
        rows[row].append(i)
        space[row] -= n

    tokens = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), ignore_index, dtype=torch.long)
    position_ids = torch.empty((len(rows), seq_len), dtype=torch.long)
    n_real = 0
    for r, members in enumerate(rows):
        at = 0
        for i in sorted(members):  # within a row, in the order given
            ids, mask = cut[i]
            n = len(ids)
            tokens[r, at:at + n] = torch.tensor(ids)
            position_ids[r, at:at + n] = torch.arange(n)
            next_ids = torch.tensor(ids[1:], dtype=torch.long)
            wanted = torch.tensor(mask[1:], dtype=torch.bool)
            targets[r, at:at + n - 1] = torch.where(wanted, next_ids, ignore_index)
            at += n
            n_real += n
        position_ids[r, at:] = torch.arange(seq_len - at)  # the padding: one document of its own
    fill = n_real / tokens.numel() if tokens.numel() else 0.0
    return PackedBatch(tokens, targets, position_ids, len(cut), n_truncated, fill)
