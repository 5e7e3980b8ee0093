"""Checkpoints: Meta and Hugging Face formats, shards, round trips and error messages."""

import json

import pytest
import torch

from training.llama.checkpoint import (
    hf_config_from_model_args,
    load_checkpoint,
    model_args_from_hf_config,
    permute_from_hf,
    permute_to_hf,
    read_model_args,
    save_hf_checkpoint,
    save_meta_checkpoint,
)
from training.llama.model import ModelArgs, Transformer

# fairscale's layout in Meta's model.py, written out independently of the code under test:
# ColumnParallelLinear splits the output features (dim 0), RowParallelLinear and ParallelEmbedding the input /
# embedding features (dim 1); RMSNorm weights are replicated on every rank.
META_MP_DIM = {
    "tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0,
}


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", **overrides))
    model.init_weights(std=0.2)
    return model.eval()


def logits(model: Transformer) -> torch.Tensor:
    tokens = torch.arange(30).reshape(2, 15) % model.args.vocab_size
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_round_trip_gives_identical_logits(tmp_path, fmt):
    model = tiny_model()
    save = save_meta_checkpoint if fmt == "meta" else save_hf_checkpoint
    save(model, tmp_path / "ckpt")
    loaded, args = load_checkpoint(tmp_path / "ckpt")
    assert args == model.args
    assert torch.equal(logits(loaded), logits(model))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left behind


def test_load_casts_dtype_and_reads_args_without_weights(tmp_path):
    model = tiny_model()
    save_hf_checkpoint(model, tmp_path)
    assert read_model_args(tmp_path) == model.args
    loaded, _ = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.freqs_cis(torch.device("cpu")).dtype == torch.complex64


def test_meta_model_parallel_shards_are_merged(tmp_path):
    """Shards cut by hand the way fairscale cuts them load into the unsharded model."""
    model = tiny_model()
    state = model.state_dict()
    n_ranks = 2
    for rank in range(n_ranks):
        shard = {}
        for key, tensor in state.items():
            dim = META_MP_DIM.get(key.split(".")[-2])
            shard[key] = tensor.clone() if dim is None else tensor.chunk(n_ranks, dim=dim)[rank].clone()
        shard["rope.freqs"] = torch.randn(8)  # Meta's checkpoints carry it; it is not a weight
        torch.save(shard, tmp_path / f"consolidated.{rank:02d}.pth")
    params = model.args.to_params_json()
    params["vocab_size"] = -1  # as in Meta's own params.json: read off the embedding
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded, args = load_checkpoint(tmp_path)
    assert args == model.args
    assert torch.equal(logits(loaded), logits(model))


def test_saved_meta_shards_follow_metas_layout(tmp_path):
    model = tiny_model()
    save_meta_checkpoint(model, tmp_path, num_shards=2)
    rank1 = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
    assert torch.equal(rank1["tok_embeddings.weight"], model.tok_embeddings.weight[:, 32:])
    assert torch.equal(rank1["layers.0.attention.wq.weight"], model.layers[0].attention.wq.weight[32:])
    assert torch.equal(rank1["layers.0.feed_forward.w2.weight"], model.layers[0].feed_forward.w2.weight[:, 88:])
    assert torch.equal(rank1["norm.weight"], model.norm.weight)
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_sharded_hf_checkpoint_with_index(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_model()
    save_hf_checkpoint(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(logits(loaded), logits(model))
    reference = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(torch.arange(30).reshape(2, 15)).logits, logits(model),
                                   atol=1e-5, rtol=1e-5)


def test_loads_a_checkpoint_written_by_transformers(tmp_path):
    """A model built and saved by transformers itself (its own q/k layout) loads to the same logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    for p in reference.parameters():
        p.data.normal_(0, 0.2)
    reference.save_pretrained(tmp_path)
    loaded, args = load_checkpoint(tmp_path)
    assert (args.dim, args.n_kv_heads, args.ffn_hidden_dim, args.max_seq_len) == (64, 2, 176, 64)
    tokens = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), reference(tokens).logits, atol=1e-5, rtol=1e-5)


def test_permutation_round_trip_and_hf_rotary_layout():
    w = torch.arange(8 * 3).reshape(8, 3).float()
    assert torch.equal(permute_from_hf(permute_to_hf(w, 2), 2), w)
    # head 0 rows in Meta order are the pairs (0,1), (2,3); HF puts the evens first, then the odds.
    assert permute_to_hf(w, 2)[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]


@pytest.mark.parametrize("preset", ["7B", "13B", "70B"])
def test_hf_config_maps_back_to_the_preset(preset):
    args = ModelArgs.preset(preset)
    assert model_args_from_hf_config(hf_config_from_model_args(args)) == args


def test_hf_config_with_arbitrary_intermediate_size():
    for intermediate in (100, 176, 300, 1000):
        config = hf_config_from_model_args(ModelArgs.preset("tiny"))
        config["intermediate_size"] = intermediate
        assert model_args_from_hf_config(config).ffn_hidden_dim == intermediate


def test_unsupported_hf_config_is_rejected():
    config = hf_config_from_model_args(ModelArgs.preset("tiny"))
    with pytest.raises(ValueError, match="rope_type 'linear' is not supported"):
        model_args_from_hf_config({**config, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type 'mistral'"):
        model_args_from_hf_config({**config, "model_type": "mistral"})


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not a Llama checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps(ModelArgs.preset("tiny").to_params_json()))
    with pytest.raises(FileNotFoundError, match=r"No consolidated\.NN\.pth"):
        load_checkpoint(tmp_path)
    torch.save({}, tmp_path / "consolidated.01.pth")
    with pytest.raises(FileNotFoundError, match="not numbered"):
        load_checkpoint(tmp_path)


def test_missing_hf_weight_file(tmp_path):
    save_hf_checkpoint(tiny_model(), tmp_path, max_shard_bytes=40_000)
    victim = sorted(tmp_path.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_checkpoint(tmp_path)


def _edit_meta_state(path, edit):
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    edit(state)
    torch.save(state, path / "consolidated.00.pth")


def test_unknown_key_is_named_with_its_file(tmp_path):
    save_meta_checkpoint(tiny_model(), tmp_path)
    _edit_meta_state(tmp_path, lambda s: s.update({"layers.0.attention.bias": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"Unknown key 'layers\.0\.attention\.bias' in .*consolidated\.00\.pth"):
        load_checkpoint(tmp_path)


def test_unknown_hf_key_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_checkpoint(tiny_model(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"Unknown key 'model\.layers\.0\.self_attn\.q_norm\.weight' in model"):
        load_checkpoint(tmp_path)


def test_missing_key_is_named(tmp_path):
    save_meta_checkpoint(tiny_model(), tmp_path)
    _edit_meta_state(tmp_path, lambda s: s.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(ValueError, match=r"Missing key 'layers\.1\.ffn_norm\.weight'"):
        load_checkpoint(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    save_meta_checkpoint(tiny_model(), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_kv_heads": 4}))
    with pytest.raises(ValueError, match=r"Shape mismatch for 'layers\.0\.attention\.wk\.weight' in .*consolidated"):
        load_checkpoint(tmp_path)


def test_invalid_params_json_names_the_file(tmp_path):
    save_meta_checkpoint(tiny_model(), tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 5}))
    with pytest.raises(ValueError, match="params.json"):
        load_checkpoint(tmp_path)


def test_saving_over_an_existing_checkpoint_replaces_it_whole(tmp_path):
    target = tmp_path / "ckpt"
    save_meta_checkpoint(tiny_model(), target, num_shards=2)
    other = tiny_model(n_layers=1)
    save_meta_checkpoint(other, target)
    assert sorted(p.name for p in target.iterdir()) == ["consolidated.00.pth", "params.json"]
    loaded, _ = load_checkpoint(target)
    assert torch.equal(logits(loaded), logits(other))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_failed_save_leaves_the_old_checkpoint(tmp_path):
    model = tiny_model()
    save_meta_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="cannot be split"):
        save_meta_checkpoint(model, tmp_path / "ckpt", num_shards=3)
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(logits(loaded), logits(model))


def two_meta_shards(model, tmp_path):
    """The model saved by hand as two model-parallel shards (as `test_meta_model_parallel_shards_are_merged`)."""
    shards = [{}, {}]
    for key, tensor in model.state_dict().items():
        dim = META_MP_DIM.get(key.split(".")[-2])
        for rank in range(2):
            shards[rank][key] = tensor.clone() if dim is None else tensor.chunk(2, dim=dim)[rank].clone()
    (tmp_path / "params.json").write_text(json.dumps(model.args.to_params_json()))
    return shards


def test_shards_that_are_not_one_models_are_refused(tmp_path):
    model = tiny_model()
    shards = two_meta_shards(model, tmp_path)
    shards[1]["norm.weight"] = shards[1]["norm.weight"] + 1.0  # a replicated weight that differs
    for rank, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{rank:02d}.pth")
    with pytest.raises(ValueError, match=r"'norm\.weight' is replicated across shards but differs"):
        load_checkpoint(tmp_path)
    shards = two_meta_shards(model, tmp_path)
    shards[1]["output.weight"] = shards[1]["output.weight"][:, :-1].clone()  # split rows, but one column short
    for rank, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.{rank:02d}.pth")
    with pytest.raises(ValueError, match=r"Shape mismatch for 'output\.weight' across the shards"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_unreadable_weight_files_and_json_that_is_not_an_object_are_named(tmp_path, fmt):
    save = save_meta_checkpoint if fmt == "meta" else save_hf_checkpoint
    save(tiny_model(), tmp_path)
    weights = next(tmp_path.glob("*.pth" if fmt == "meta" else "*.safetensors"))
    weights.write_bytes(b"truncated")
    with pytest.raises(ValueError, match=f"{weights.name} is not a readable"):
        load_checkpoint(tmp_path)
    config = tmp_path / ("params.json" if fmt == "meta" else "config.json")
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{config.name} must hold a JSON object"):
        load_checkpoint(tmp_path)
