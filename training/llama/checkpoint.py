"""Load and save Llama 2 checkpoints in Meta's format and in Hugging Face's.

Meta's format is a directory with `params.json` and `consolidated.NN.pth`, one file per model-parallel rank.
fairscale splits each weight across the ranks along the dimension its layer parallelises:
`ColumnParallelLinear` (wq, wk, wv, w1, w3, output) along the output features (dim 0), `RowParallelLinear`
(wo, w2) along the input features (dim 1), and `ParallelEmbedding` (tok_embeddings) along the embedding
dimension (dim 1); the norms are replicated. Our parameter names are Meta's, so a one-rank checkpoint is
our state dict as is.

Hugging Face's format is a directory with `config.json` and `*.safetensors` (sharded with
`model.safetensors.index.json` for large models). Its rotary embedding rotates the two halves of each head
instead of Meta's interleaved pairs, so its converter permutes the rows of the q and k projections; loading
undoes that permutation, saving applies it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from training.llama.model import ModelArgs, Transformer

META_PARAMS = "params.json"
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
_META_SHARD = re.compile(r"consolidated\.(\d+)\.pth")

# Keys some checkpoints carry that hold no weights of ours: Meta's precomputed rotary frequencies and the
# rotary buffers old transformers versions saved.
_IGNORED_KEY = re.compile(r"^rope\.freqs$|\.rotary_emb\.inv_freq$")

# Meta model-parallel layout: the dimension each parameter is split along (absent: replicated).
_COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                    "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")

# Meta name <-> Hugging Face name, per layer and global.
_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_TO_META_LAYER = {hf: meta for meta, hf in _HF_LAYER_NAMES.items()}
_HF_TO_META_GLOBAL = {hf: meta for meta, hf in _HF_GLOBAL_NAMES.items()}
_HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_META_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def meta_split_dim(key: str) -> int | None:
    """The dimension Meta's model parallelism splits `key` along, or None for a replicated tensor."""
    if key.endswith(_COLUMN_PARALLEL):
        return 0
    if key.endswith(_ROW_PARALLEL):
        return 1
    return None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from Meta's interleaved rotary pairs to HF's halves (HF's `convert_llama_weights_to_hf`)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_to_hf`: HF's rotary halves back to Meta's interleaved pairs."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ---------------------------------------------------------------------------------------------------------
# Model arguments


def detect_format(path: str | os.PathLike[str]) -> str:
    """"meta" or "hf" for a checkpoint directory; FileNotFoundError when it is neither."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {path} does not exist")
    if (path / META_PARAMS).is_file():
        return "meta"
    if (path / HF_CONFIG).is_file():
        return "hf"
    raise FileNotFoundError(
        f"{path} is not a Llama checkpoint: expected {META_PARAMS} with consolidated.NN.pth (Meta) "
        f"or {HF_CONFIG} with *.safetensors (Hugging Face)"
    )


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    """A Meta shard's state dict, memory-mapped; a file torch cannot read is a ValueError naming it."""
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"{file} is not a readable PyTorch checkpoint: {e}") from e
    if not isinstance(state, dict):
        raise ValueError(f"{file} must hold a state dict, got {type(state).__name__}")
    return state


def _meta_shards(path: Path) -> list[Path]:
    shards = sorted((p for p in path.iterdir() if _META_SHARD.fullmatch(p.name)),
                    key=lambda p: int(_META_SHARD.fullmatch(p.name).group(1)))
    if not shards:
        raise FileNotFoundError(f"No consolidated.NN.pth weight file in Meta checkpoint {path}")
    ranks = [int(_META_SHARD.fullmatch(p.name).group(1)) for p in shards]
    if ranks != list(range(len(shards))):
        raise FileNotFoundError(f"Model-parallel shards of {path} are not numbered 00..{len(shards) - 1:02d}: "
                                f"found {[p.name for p in shards]}")
    return shards


def _ffn_args_for_hidden_dim(dim: int, hidden_dim: int) -> dict:
    """multiple_of / ffn_dim_multiplier that make Meta's formula give `hidden_dim` (HF stores only the result)."""
    # Prefer the values Meta used: no multiplier (7B, 13B) or 1.3 (70B); multiple_of 256, else the largest
    # power of two that fits (4096 for 70B).
    candidates = [256] + [2**k for k in range(13, -1, -1) if k != 8]
    for multiplier in (None, 1.3):
        for multiple_of in candidates:
            args = ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
            if args.ffn_hidden_dim == hidden_dim:
                return dict(multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    base = int(2 * (4 * dim) / 3)
    if hidden_dim >= base:
        return dict(multiple_of=hidden_dim, ffn_dim_multiplier=None)
    return dict(multiple_of=1, ffn_dim_multiplier=(hidden_dim + 0.5) / base)


def model_args_from_hf_config(config: dict, *, source: str = HF_CONFIG) -> ModelArgs:
    """ModelArgs of a Hugging Face `LlamaConfig` dictionary; ValueError for what Llama 2 does not have."""
    model_type = config.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"{source}: model_type {model_type!r} is not supported, only 'llama'")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key not in config:
            raise ValueError(f"{source}: missing key {key!r}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {config['hidden_act']!r} is not supported, only 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{source}: {flag}=true is not supported (Llama 2 has no biases)")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ValueError(f"{source}: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{source}: rope_type {rope_type!r} is not supported, only 'default'")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    n_kv_heads = config.get("num_key_value_heads") or n_heads
    return ModelArgs(
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv_heads == n_heads else n_kv_heads,
        vocab_size=config["vocab_size"],
        norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=float(rope_theta),
        max_seq_len=config.get("max_position_embeddings", 4096),
        **_ffn_args_for_hidden_dim(dim, config["intermediate_size"]),
    )


def hf_config_from_model_args(args: ModelArgs, *, dtype: torch.dtype = torch.float32) -> dict:
    """The `config.json` of `transformers.LlamaForCausalLM` for these arguments."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "rope_theta": args.rope_theta,  # what transformers before 5.0 reads (it has no rope_parameters)
        "max_position_embeddings": args.max_seq_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),  # the same, under its name before transformers 5.0
    }


def read_model_args(path: str | os.PathLike[str]) -> ModelArgs:
    """The ModelArgs of a checkpoint directory in either format, without loading its weights."""
    path = Path(path)
    if detect_format(path) == "hf":
        return model_args_from_hf_config(_read_json(path / HF_CONFIG), source=str(path / HF_CONFIG))
    params = _read_json(path / META_PARAMS)
    vocab_size = None
    if params.get("vocab_size", -1) in (-1, None):
        # Meta's own params.json says -1 and leaves the size to the tokenizer: read it off the embedding.
        first = _meta_shards(path)[0]
        state = _torch_load(first)
        if "tok_embeddings.weight" not in state:
            raise ValueError(f"{first}: missing key 'tok_embeddings.weight' (needed for vocab_size -1)")
        vocab_size = state["tok_embeddings.weight"].shape[0]
    try:
        return ModelArgs.from_params_json(params, vocab_size=vocab_size)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / META_PARAMS}: {e}") from e


# ---------------------------------------------------------------------------------------------------------
# Loading


def _read_meta_state(path: Path) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(Meta key, merged tensor, file name) for each weight of a Meta checkpoint, shards concatenated."""
    shards = _meta_shards(path)
    states = [_torch_load(p) for p in shards]
    for key in states[0]:
        missing = [shards[i].name for i, s in enumerate(states) if key not in s]
        if missing:
            raise ValueError(f"Key {key!r} of {shards[0].name} is missing from shard(s) {missing} in {path}")
        dim = meta_split_dim(key)
        if len(states) == 1 or _IGNORED_KEY.search(key):
            yield key, states[0][key], shards[0].name
        elif dim is None:
            # replicated in every shard (the norms): they must agree, or the shards are not one model's
            for shard, state in zip(shards[1:], states[1:], strict=True):
                if not torch.equal(state[key], states[0][key]):
                    raise ValueError(f"{key!r} is replicated across shards but differs between {shards[0].name} "
                                     f"and {shard.name} in {path}")
            yield key, states[0][key], shards[0].name
        else:
            shapes = [tuple(s[key].shape) for s in states]
            if any(len(shape) != len(shapes[0]) or shape[:dim] + shape[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:]
                   for shape in shapes):
                raise ValueError(f"Shape mismatch for {key!r} across the shards of {path}: {shapes} cannot be "
                                 f"joined along dimension {dim}")
            yield key, torch.cat([s[key] for s in states], dim=dim), f"{shards[0].name}..{shards[-1].name}"
    for shard, state in zip(shards[1:], states[1:], strict=True):
        extra = sorted(set(state) - set(states[0]))
        if extra:
            raise ValueError(f"Unknown key {extra[0]!r} in {path / shard.name} (absent from {shards[0].name})")


def _hf_files(path: Path) -> list[Path]:
    index = path / HF_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weight file in Hugging Face checkpoint {path}")
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"Weight file {file} listed in {index.name} does not exist")
    return files


def _read_hf_state(path: Path, args: ModelArgs) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(Meta key, tensor, file name) for each weight of a Hugging Face checkpoint, q/k rows permuted back."""
    from safetensors import SafetensorError, safe_open

    for file in _hf_files(path):
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{file} is not a readable safetensors file: {e}") from e
        with handle as f:
            for hf_key in f.keys():
                if _IGNORED_KEY.search(hf_key):
                    continue
                tensor = f.get_tensor(hf_key)
                yield _hf_to_meta(hf_key, tensor, args, file.name)


def _hf_to_meta(hf_key: str, tensor: torch.Tensor, args: ModelArgs, file: str) -> tuple[str, torch.Tensor, str]:
    if hf_key in _HF_TO_META_GLOBAL:
        return _HF_TO_META_GLOBAL[hf_key], tensor, file
    match = _HF_LAYER_KEY.fullmatch(hf_key)
    if match is None or match.group(2) not in _HF_TO_META_LAYER:
        raise ValueError(f"Unknown key {hf_key!r} in {file}: not a Llama weight")
    key = f"layers.{match.group(1)}.{_HF_TO_META_LAYER[match.group(2)]}"
    n_heads = {"q_proj": args.n_heads, "k_proj": args.kv_heads}.get(match.group(2).split(".")[1])
    if n_heads is not None:
        if tensor.dim() != 2 or tensor.shape[0] % (2 * n_heads) != 0:
            raise ValueError(f"Shape mismatch for {hf_key!r} in {file}: {tuple(tensor.shape)} cannot hold "
                             f"{n_heads} heads")
        tensor = permute_from_hf(tensor, n_heads)
    return key, tensor, file


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Transformer, ModelArgs]:
    """The model and its ModelArgs from a Meta or Hugging Face checkpoint directory (format auto-detected).

    Weights are cast to `dtype` (default: as stored) and placed on `device` (default: CPU). Raises
    FileNotFoundError for a missing directory or file, ValueError for an unknown, missing or misshapen key.
    """
    path = Path(path)
    fmt = detect_format(path)
    args = read_model_args(path)
    records = _read_meta_state(path) if fmt == "meta" else _read_hf_state(path, args)

    # Built on the meta device: no memory and no random init for weights about to be replaced.
    model = Transformer(args, device="meta")
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, tensor, file in records:
        if _IGNORED_KEY.search(key):
            continue
        if key not in expected:
            raise ValueError(f"Unknown key {key!r} in {path / file} for a model with {args.n_layers} layers")
        if tensor.shape != expected[key].shape:
            raise ValueError(f"Shape mismatch for {key!r} in {path / file}: checkpoint has {tuple(tensor.shape)}, "
                             f"ModelArgs give {tuple(expected[key].shape)}")
        state[key] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(f"Missing key {missing[0]!r} in checkpoint {path} ({len(missing)} missing in all)")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:
        raise ValueError(f"Checkpoint {path} mixes dtypes {sorted(map(str, dtypes))}; pass dtype= to cast")

    model.load_state_dict(state, strict=True, assign=True)
    return model, args


# ---------------------------------------------------------------------------------------------------------
# Saving


def _write_dir_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_dir)`, then move tmp_dir to `path`, so that `path` is never a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cpu_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_meta_checkpoint(model: Transformer, path: str | os.PathLike[str], *, num_shards: int = 1) -> None:
    """Write `params.json` + `consolidated.NN.pth` (split into `num_shards` model-parallel ranks as Meta does)."""
    args = model.args
    state = _cpu_state(model)
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, got {num_shards}")
    for key, tensor in state.items():
        dim = meta_split_dim(key)
        if dim is not None and tensor.shape[dim] % num_shards != 0:
            raise ValueError(f"{key!r} ({tuple(tensor.shape)}) cannot be split into {num_shards} shards")

    def write(tmp: Path) -> None:
        (tmp / META_PARAMS).write_text(json.dumps(args.to_params_json(), indent=2) + "\n")
        for rank in range(num_shards):
            shard = {}
            for key, tensor in state.items():
                dim = meta_split_dim(key)
                shard[key] = tensor if dim is None else tensor.chunk(num_shards, dim=dim)[rank].clone()
            torch.save(shard, tmp / f"consolidated.{rank:02d}.pth")

    _write_dir_atomically(Path(path), write)


def save_hf_checkpoint(model: Transformer, path: str | os.PathLike[str], *,
                       max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `config.json` + `model*.safetensors` that `transformers.LlamaForCausalLM.from_pretrained` loads."""
    from safetensors.torch import save_file

    args = model.args
    hf_state: dict[str, torch.Tensor] = {}
    for key, tensor in _cpu_state(model).items():
        if key in _HF_GLOBAL_NAMES:
            hf_state[_HF_GLOBAL_NAMES[key]] = tensor
            continue
        layer, name = _META_LAYER_KEY.fullmatch(key).groups()
        if name == "attention.wq.weight":
            tensor = permute_to_hf(tensor, args.n_heads)
        elif name == "attention.wk.weight":
            tensor = permute_to_hf(tensor, args.kv_heads)
        hf_state[f"model.layers.{layer}.{_HF_LAYER_NAMES[name]}"] = tensor.contiguous()

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in hf_state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    dtype = model.tok_embeddings.weight.dtype

    def write(tmp: Path) -> None:
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config_from_model_args(args, dtype=dtype), indent=2) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    _write_dir_atomically(Path(path), write)
