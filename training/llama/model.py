"""The Llama 2 transformer, after meta-llama/llama `llama/model.py`, made trainable and device-agnostic.

Differences from Meta's file, all behaviour-preserving:
- no fairscale model parallelism: plain `nn.Linear` / `nn.Embedding`, device and dtype passed in;
- no `inference_mode` on `forward` (it must train); the KV cache is an explicit `KVCache` argument;
- the rotary table is computed in float32/complex64 on first use on each device rather than kept as a
  buffer, so `model.to(torch.bfloat16)` cannot round it;
- attention through `F.scaled_dot_product_attention` with grouped-query attention done by the kernel
  (`enable_gqa`) wherever a fused kernel takes it, rather than by copying the key/value heads (`repeat_kv`,
  kept as the definition; see `attention.py`);
- an optional per-token `attention_mask` for padded batches, and `position_ids` for packed rows (several
  examples in a row, each attending only to itself; see `packing.py`);
- an optional `targets` argument that returns the training loss without materialising the logits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.llama.attention import attention
from training.llama.linear import decode_linear
from training.llama.loss import linear_cross_entropy
from training.llama.packing import PackedDocuments, packed_attention


@dataclass
class ModelArgs:
    """Hyper-parameters of a Llama 2 model; the field names are those of Meta's `params.json`."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256  # make the SwiGLU hidden size a multiple of this
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelArgs.{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim (dim / n_heads = {self.head_dim}) must be even for rotary embeddings")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads != 0):
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads (`n_kv_heads`, or `n_heads` without grouped-query attention)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """The SwiGLU hidden size, computed exactly as Meta's `FeedForward.__init__` does."""
        hidden_dim = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden_dim = int(self.ffn_dim_multiplier * hidden_dim)
        return self.multiple_of * ((hidden_dim + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelArgs:
        """The published Llama 2 sizes ("7B", "13B", "70B") or "tiny" (a few-layer GQA model for tests)."""
        presets = {
            "7B": dict(dim=4096, n_layers=32, n_heads=32),
            "13B": dict(dim=5120, n_layers=40, n_heads=40),
            "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096),
            "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=16, max_seq_len=128),
        }
        if name not in presets:
            raise ValueError(f"Unknown ModelArgs preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

    @classmethod
    def from_params_json(cls, params: dict[str, Any], *, vocab_size: int | None = None) -> ModelArgs:
        """Build from Meta's `params.json`; `vocab_size` fills in Meta's placeholder `-1`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"Unknown key(s) {unknown} in params.json; expected a subset of {sorted(known)}")
        kwargs = dict(params)
        if kwargs.get("vocab_size", -1) in (-1, None):
            if vocab_size is None:
                raise ValueError("params.json has no vocab_size (or -1) and none was given")
            kwargs["vocab_size"] = vocab_size
        return cls(**kwargs)

    def to_params_json(self) -> dict[str, Any]:
        """The `params.json` dictionary Meta's code reads (None fields are left out, as Meta does)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x ** 2) + eps), Meta's formula, as one fused kernel
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float()).type_as(x)
        return output * self.weight


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0, *,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """exp(i * t * theta ** (-2j / dim)) for positions t < end: complex64 (end, dim // 2), as in Meta's code."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # (end, dim // 2)
    return torch.polar(torch.ones_like(freqs), freqs)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor,
                     freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate consecutive pairs of q and k (bsz, n_heads, seqlen, head_dim) by freqs_cis (seqlen, head_dim // 2).

    freqs_cis may also be (bsz, 1, seqlen, head_dim // 2): each row's own positions (packed rows).

    Meta's formulation: each pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1], multiplied by
    exp(i * pos * theta_i), in float32. One complex product is also much faster, forward and backward, than
    the same rotation written with real cos/sin and a stack of the even/odd halves.
    """
    if torch.compiler.is_compiling():
        return _apply_rotary_emb_real(xq, freqs_cis), _apply_rotary_emb_real(xk, freqs_cis)
    xq_ = torch.view_as_complex(xq.float().unflatten(-1, (-1, 2)))  # (bsz, n_heads, seqlen, head_dim // 2)
    xk_ = torch.view_as_complex(xk.float().unflatten(-1, (-1, 2)))
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(-2)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(-2)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def _apply_rotary_emb_real(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The same rotation as `apply_rotary_emb`'s complex product, in real arithmetic, for torch.compile.

    Inductor generates no code for complex operators (it falls back to eager kernels), but fuses this into one
    loop, forward and backward.
    """
    cos_sin = torch.view_as_real(freqs_cis)  # (seqlen, head_dim // 2, 2)
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))  # (bsz, n_heads, seqlen, head_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """torch.repeat_interleave(x, dim=2, repeats=n_rep) for x (bs, seqlen, n_kv_heads, head_dim), as in Meta's code.

    The model itself lets SDPA's `enable_gqa` share the key/value heads without this copy; this function is
    the definition of what that computes.
    """
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (
        x[:, :, :, None, :]
        .expand(bs, slen, n_kv_heads, n_rep, head_dim)
        .reshape(bs, slen, n_kv_heads * n_rep, head_dim)
    )


class KVCache:
    """Keys and values of every layer for `max_seq_len` slots, allocated once per generation.

    Kept in the layout SDPA reads, (n_layers, bsz, n_kv_heads, max_seq_len, head_dim), so that a decoding
    step writes one slot and reads a slice with no copy. `key_mask` records which slots hold real tokens, for
    batches that were padded. In a padded batch each row's rotary positions count its own real tokens
    (`next_position`), so a left-padded row's positions are those of its prompt alone; the cache may then
    hold up to twice the model's max_seq_len slots, while each row's positions stay below max_seq_len.
    """

    def __init__(self, args: ModelArgs, bsz: int, max_seq_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if max_seq_len > 2 * args.max_seq_len:
            raise ValueError(f"KV cache length {max_seq_len} exceeds twice the model's max_seq_len "
                             f"{args.max_seq_len}")
        shape = (args.n_layers, bsz, args.kv_heads, max_seq_len, args.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.ones(bsz, max_seq_len, device=device, dtype=torch.bool)
        self.has_padding = False
        self.next_position: torch.Tensor | None = None  # (bsz,) once the batch has padding
        self.max_next_position = 0  # its largest value, kept in Python: no device sync a decoding step

    @property
    def bsz(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer_id: int, start_pos: int, xk: torch.Tensor,
               xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store xk/xv (bsz, n_kv_heads, seqlen, head_dim) at start_pos; return all keys/values up to there."""
        end = start_pos + xk.shape[2]
        self.k[layer_id, :, :, start_pos:end] = xk
        self.v[layer_id, :, :, start_pos:end] = xv
        return self.k[layer_id, :, :, :end], self.v[layer_id, :, :, :end]


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query attention and rotary embeddings."""

    def __init__(self, args: ModelArgs, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.kv_heads
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.head_dim
        factory = dict(bias=False, device=device, dtype=dtype)
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, **factory)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, **factory)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, **factory)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, **factory)

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor | PackedDocuments | None,
        *,
        layer_id: int = 0,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # (bsz, seqlen, n_heads * head_dim) -> (bsz, n_heads, seqlen, head_dim), the layout SDPA reads
        xq = decode_linear(self.wq, x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        xk = decode_linear(self.wk, x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        xv = decode_linear(self.wv, x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)

        if kv_cache is not None:
            # (bsz, n_kv_heads, start_pos + seqlen, head_dim)
            xk, xv = kv_cache.update(layer_id, start_pos, xk, xv)

        if isinstance(mask, PackedDocuments):
            output = packed_attention(xq, xk, xv, mask)
        else:
            # Without an explicit mask the block is causal from position 0 (training, prefill) or a single
            # query that sees every cached key (decoding); SDPA's own causal path is the fastest for the first.
            output = attention(xq, xk, xv, attn_mask=mask, is_causal=mask is None and seqlen > 1)
            # (bsz, n_heads, seqlen, head_dim)
        output = output.transpose(1, 2).reshape(bsz, seqlen, -1)
        return decode_linear(self.wo, output)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1(x)) * w3(x))."""

    def __init__(self, dim: int, hidden_dim: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        factory = dict(bias=False, device=device, dtype=dtype)
        self.w1 = nn.Linear(dim, hidden_dim, **factory)
        self.w2 = nn.Linear(hidden_dim, dim, **factory)
        self.w3 = nn.Linear(dim, hidden_dim, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_linear(self.w2, F.silu(decode_linear(self.w1, x)) * decode_linear(self.w3, x))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(self, layer_id: int, args: ModelArgs, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, device=device, dtype=dtype)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, device=device, dtype=dtype)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps, device=device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        mask: torch.Tensor | PackedDocuments | None,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        h = x + self.attention(
            self.attention_norm(x), freqs_cis, mask, layer_id=self.layer_id, start_pos=start_pos, kv_cache=kv_cache
        )
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The Llama 2 decoder: token embeddings, `n_layers` blocks, a final RMSNorm and an untied output head."""

    def __init__(self, args: ModelArgs, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.activation_checkpointing = False
        self._compiled_layers: list[Any] | None = None  # see compile_blocks

        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(
            TransformerBlock(layer_id, args, device=device, dtype=dtype) for layer_id in range(args.n_layers)
        )
        self.norm = RMSNorm(args.dim, eps=args.norm_eps, device=device, dtype=dtype)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False, device=device, dtype=dtype)

        # complex64 (max_seq_len, head_dim // 2) per device, computed on first use. Not a buffer: `.to(bf16)`
        # would round the angles (by whole radians at long positions) and drop a complex table's imaginary
        # part; nor a checkpoint entry (Meta's optional `rope.freqs` is ignored on load).
        self._freqs_cis: dict[torch.device, torch.Tensor] = {}
        self.init_weights()

    def freqs_cis(self, device: torch.device) -> torch.Tensor:
        """The rotary table for every position, complex64 (max_seq_len, head_dim // 2), on `device`."""
        if device not in self._freqs_cis:
            # A normal tensor even when first needed under `generate`'s inference_mode, so training can use it.
            with torch.inference_mode(False):
                self._freqs_cis[device] = precompute_freqs_cis(
                    self.args.head_dim, self.args.max_seq_len, self.args.rope_theta, device=device
                )
        return self._freqs_cis[device]

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random initialisation for training from scratch and tests: N(0, std) weights, unit norm gains.

        The residual output projections (wo, w2) are scaled by 1/sqrt(2 * n_layers), as in GPT-2.
        """
        for name, param in self.named_parameters():
            if param.device.type == "meta":
                continue
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                param.normal_(0.0, std / math.sqrt(2 * self.n_layers), generator=generator)
            else:
                param.normal_(0.0, std, generator=generator)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.activation_checkpointing = enabled

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """Run each `TransformerBlock` through `torch.compile` (with `compile_kwargs`) where there is no KV cache.

        For training: inductor fuses what lies between the matrix products (RMSNorm, the rotary embedding,
        SwiGLU's silu * w3, the residual adds), forward and backward. Every block has the same code and shapes,
        so one compilation serves them all; it happens on the first call (~50 s for an 8-layer model on one
        CPU core). Calls with a KV cache (generation) stay eager, so decoding's changing lengths cause no
        recompilation. The compiled wrappers share the blocks' parameters: `state_dict` and checkpoints are
        unchanged.
        """
        self._compiled_layers = [torch.compile(layer, **compile_kwargs) for layer in self.layers]

    def new_kv_cache(self, bsz: int, max_seq_len: int | None = None) -> KVCache:
        """An empty cache on this model's device and dtype for `bsz` sequences of up to `max_seq_len` tokens."""
        weight = self.tok_embeddings.weight
        return KVCache(self.args, bsz, max_seq_len or self.args.max_seq_len, device=weight.device,
                       dtype=weight.dtype)

    def _attention_mask(self, bsz: int, seqlen: int, start_pos: int, kv_cache: KVCache | None,
                        attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The boolean SDPA mask (bsz or 1, 1, seqlen, kv_len), or None where SDPA needs none.

        None means: causal from position 0 (`is_causal`), or one query that sees all cached keys.
        """
        device = self.tok_embeddings.weight.device
        kv_len = start_pos + seqlen
        real = None  # (bsz, seqlen) bool: which of these tokens are real, when some are padding
        if attention_mask is not None:
            if attention_mask.shape != (bsz, seqlen):
                raise ValueError(f"attention_mask must have shape (bsz, seqlen) = {(bsz, seqlen)}, "
                                 f"got {tuple(attention_mask.shape)}")
            real = attention_mask.to(device=device, dtype=torch.bool)
            if bool(real.all()):
                real = None
        if kv_cache is not None:
            kv_cache.key_mask[:, start_pos:kv_len] = True if real is None else real
            kv_cache.has_padding = kv_cache.has_padding or real is not None
            key_real = kv_cache.key_mask[:, :kv_len] if kv_cache.has_padding else None  # (bsz, kv_len)
        else:
            key_real = real
        if key_real is None and (start_pos == 0 or seqlen == 1):
            return None

        query_pos = torch.arange(start_pos, kv_len, device=device)[:, None]  # (seqlen, 1)
        key_pos = torch.arange(kv_len, device=device)[None, :]  # (1, kv_len)
        mask = (key_pos <= query_pos)[None, None]  # (1, 1, seqlen, kv_len)
        if key_real is not None:
            # A padding query keeps its own key so that no row is fully masked (SDPA would return NaN);
            # real queries never see padding keys.
            mask = mask & (key_real[:, None, None, :] | (key_pos == query_pos)[None, None])
        return mask

    def forward_hidden(
        self,
        tokens: torch.Tensor,
        *,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (bsz, seqlen, dim) of tokens (bsz, seqlen) at positions start_pos...

        `attention_mask` (bsz, seqlen), bool or 0/1, marks the real tokens of a padded batch: no real token
        attends to a padding token. With a `kv_cache` the keys of positions < start_pos come from the cache.
        `position_ids` (bsz, seqlen) gives packed rows (`packing.py`): each token's rotary position, a new
        document starting wherever a position does not follow the previous token's; tokens attend only within
        their document, as Hugging Face's models read the same `position_ids`.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (bsz, seqlen), got shape {tuple(tokens.shape)}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens must hold at least one token, got shape {tuple(tokens.shape)}")
        bsz, seqlen = tokens.shape
        end = start_pos + seqlen
        limit = self.args.max_seq_len if kv_cache is None else kv_cache.max_seq_len  # positions, or cache slots
        if start_pos < 0 or end > limit:
            raise ValueError(f"positions {start_pos}..{end - 1} exceed the maximum sequence length {limit}")
        if kv_cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs the kv_cache holding the earlier positions")
        if kv_cache is not None and kv_cache.bsz != bsz:
            raise ValueError(f"kv_cache was made for batch size {kv_cache.bsz}, got {bsz}")

        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        layers = self.layers if self._compiled_layers is None or kv_cache is not None else self._compiled_layers
        if position_ids is None:
            mask = self._attention_mask(bsz, seqlen, start_pos, kv_cache, attention_mask)
            if kv_cache is not None and kv_cache.has_padding:
                positions = self._padded_positions(kv_cache, start_pos, seqlen, attention_mask)
                freqs_cis = self.freqs_cis(h.device)[positions][:, None]  # (bsz, 1, seqlen, head_dim // 2)
            else:
                if end > self.args.max_seq_len:
                    raise ValueError(f"positions {start_pos}..{end - 1} exceed the maximum sequence length "
                                     f"{self.args.max_seq_len}")
                freqs_cis = self.freqs_cis(h.device)[start_pos:end]  # (seqlen, head_dim // 2)
        else:
            mask, freqs_cis = self._packed_rows(position_ids, tokens, kv_cache, attention_mask,
                                                compiled=layers is not self.layers)
        for layer in layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(layer, h, freqs_cis, mask, start_pos, kv_cache, use_reentrant=False)
            else:
                h = layer(h, freqs_cis, mask, start_pos, kv_cache)
        return self.norm(h)

    def _padded_positions(self, kv_cache: KVCache, start_pos: int, seqlen: int,
                          attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Each row's rotary positions (bsz, seqlen) in a padded batch: its real tokens counted from 0.

        A padding token takes its row's next position (its output is never read: no real token sees it), at
        most the last one: a row that is full takes only padding.
        """
        device = kv_cache.key_mask.device
        base = kv_cache.next_position
        if base is None:  # the batch's first padding: the slots before were every row's positions
            base = torch.full((kv_cache.bsz,), start_pos, dtype=torch.long, device=device)
            kv_cache.max_next_position = start_pos
        if attention_mask is None:  # every row's next tokens are real
            positions = base[:, None] + torch.arange(seqlen, device=device)
            kv_cache.next_position = base + seqlen
            kv_cache.max_next_position += seqlen
        else:
            counts = attention_mask.to(device=device, dtype=torch.long).cumsum(-1)  # real tokens so far
            positions = (base[:, None] + (counts - 1).clamp(min=0)).clamp(max=self.args.max_seq_len - 1)
            kv_cache.next_position = base + counts[:, -1]
            kv_cache.max_next_position = int(kv_cache.next_position.max())
        if kv_cache.max_next_position > self.args.max_seq_len:
            raise ValueError(f"a row of the batch reaches {kv_cache.max_next_position} tokens, more than the "
                             f"maximum sequence length {self.args.max_seq_len}")
        return positions

    def _packed_rows(self, position_ids: torch.Tensor, tokens: torch.Tensor, kv_cache: KVCache | None,
                     attention_mask: torch.Tensor | None, *,
                     compiled: bool) -> tuple[PackedDocuments | torch.Tensor | None, torch.Tensor]:
        """The attention layout and the rotary table (bsz, 1, seqlen, head_dim // 2) of packed rows."""
        if kv_cache is not None or attention_mask is not None:
            raise ValueError("position_ids (packed rows) cannot be combined with a kv_cache or an attention_mask; "
                             "padding in a packed row is a document of its own")
        if position_ids.shape != tokens.shape:
            raise ValueError(f"position_ids must have the shape of tokens {tuple(tokens.shape)}, "
                             f"got {tuple(position_ids.shape)}")
        low, high = position_ids.aminmax() if position_ids.numel() else (0, 0)
        if int(low) < 0 or int(high) >= self.args.max_seq_len:
            raise ValueError(f"position_ids must lie in 0..{self.args.max_seq_len - 1} (max_seq_len)")
        device = self.tok_embeddings.weight.device
        freqs_cis = self.freqs_cis(device)[position_ids.to(device)][:, None]
        documents = PackedDocuments.from_position_ids(position_ids)
        if documents.n_documents == len(documents.bounds):
            return None, freqs_cis  # one document a row: plain causal attention
        if compiled:
            # compiled blocks would recompile for every new set of document bounds; a mask tensor keeps one graph
            # (compiling the whole model instead of its blocks would recompile for every new layout of documents)
            return documents.dense_mask(tokens.shape[1], device), freqs_cis
        return documents, freqs_cis

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        start_pos: int = 0,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        ignore_index: int = -100,
    ) -> torch.Tensor:
        """Logits (bsz, seqlen, vocab_size) of tokens (bsz, seqlen); see `forward_hidden` for the arguments.

        With `targets` (bsz, seqlen), the token each position should predict (`ignore_index` for none), the
        mean cross-entropy instead, a float32 scalar equal to `F.cross_entropy` of the logits, computed a
        chunk of tokens at a time so that the (bsz, seqlen, vocab_size) logits never exist (see `loss.py`).
        """
        h = self.forward_hidden(tokens, start_pos=start_pos, kv_cache=kv_cache, attention_mask=attention_mask,
                                position_ids=position_ids)
        if targets is None:
            return self.output(h)
        if targets.shape != tokens.shape:
            raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {tuple(targets.shape)}")
        return linear_cross_entropy(h.reshape(-1, h.shape[-1]), self.output.weight, targets.reshape(-1),
                                    ignore_index=ignore_index)


def fsdp_wrap_policy() -> Any:
    """An FSDP `auto_wrap_policy` that shards each `TransformerBlock` as its own unit."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={TransformerBlock})
