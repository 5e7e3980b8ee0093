"""The Llama 2 transformer: parity with transformers' LlamaForCausalLM, KV cache, masking, training."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.llama.checkpoint import save_hf_checkpoint, save_meta_checkpoint
from training.llama.model import (
    Attention,
    ModelArgs,
    Transformer,
    TransformerBlock,
    apply_rotary_emb,
    fsdp_wrap_policy,
    precompute_freqs_cis,
    repeat_kv,
)

# Random tiny configurations: grouped-query (n_rep 2 and 4), multi-query, plain multi-head, odd
# ffn_dim_multiplier and rope_theta, a vocabulary that is not a power of two.
TINY_CONFIGS = {
    "gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16),
    "gqa4-theta": dict(dim=96, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=128, multiple_of=32,
                       ffn_dim_multiplier=1.3, rope_theta=500000.0, norm_eps=1e-6),
    "mqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=64, multiple_of=8),
    "mha": dict(dim=48, n_layers=2, n_heads=3, n_kv_heads=None, vocab_size=50, multiple_of=4),
}


# Weights for comparisons with transformers: five times the training init, so that every layer changes the
# logits noticeably (they reach 3-4), yet not so large that float32 rounding, amplified through the layers,
# approaches the 1e-5 being tested (at std 0.2 the logits reach ~8 and two correct implementations differ by up
# to 1.8e-5; at 0.1 by under 4e-6).
PARITY_STD = 0.1


def tiny_model(seed: int = 0, std: float = 0.2, **overrides) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs.preset("tiny", **overrides)
    # Larger than the training init so that every layer changes the logits noticeably.
    model = Transformer(args)
    model.init_weights(std=std)
    return model.eval()


def hf_model(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("fmt", ["hf", "meta"])
@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(tmp_path, name, fmt):
    """Our logits equal LlamaForCausalLM's within 1e-5 in fp32 when the weights travel through either format."""
    model = tiny_model(std=PARITY_STD, **TINY_CONFIGS[name])
    hf_dir = tmp_path / "hf"
    if fmt == "hf":
        save_hf_checkpoint(model, hf_dir)
    else:
        # Meta -> our loader -> HF writer: the HF model sees weights that went through the Meta format.
        from training.llama.checkpoint import load_checkpoint

        save_meta_checkpoint(model, tmp_path / "meta")
        reloaded, _ = load_checkpoint(tmp_path / "meta")
        save_hf_checkpoint(reloaded, hf_dir)
    reference = hf_model(hf_dir)
    tokens = torch.randint(0, model.args.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens)
        theirs = reference(tokens).logits
    assert ours.shape == (3, 37, model.args.vocab_size)
    assert float(theirs.abs().max()) > 2.0  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_hidden_states_match_transformers(tmp_path):
    """forward_hidden is the final-norm output: HF's last hidden state."""
    model = tiny_model(std=PARITY_STD, **TINY_CONFIGS["gqa"])
    save_hf_checkpoint(model, tmp_path)
    reference = hf_model(tmp_path)
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        hidden = model.forward_hidden(tokens)
        theirs = reference.model(tokens).last_hidden_state
    torch.testing.assert_close(hidden, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.output(hidden), model(tokens))


@pytest.mark.parametrize("name", ["gqa", "mha"])
def test_cached_incremental_decoding_equals_full_forward(name):
    model = tiny_model(**TINY_CONFIGS[name])
    tokens = torch.randint(0, model.args.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(bsz=2, max_seq_len=24)
        # a multi-token prefill, a multi-token chunk at an offset (needs the causal mask), then single tokens
        chunks = [model(tokens[:, :10], kv_cache=cache), model(tokens[:, 10:15], start_pos=10, kv_cache=cache)]
        chunks += [model(tokens[:, t : t + 1], start_pos=t, kv_cache=cache) for t in range(15, 24)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


def test_right_padding_does_not_change_real_tokens():
    model = tiny_model(**TINY_CONFIGS["gqa"])
    short = torch.randint(3, 97, (1, 9))
    long = torch.randint(3, 97, (1, 16))
    batch = torch.zeros(2, 16, dtype=torch.long)
    batch[0, :9] = short
    batch[1] = long
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :9] = True
    mask[1] = True
    with torch.no_grad():
        padded = model.forward_hidden(batch, attention_mask=mask)
        alone = model.forward_hidden(short)
        alone_long = model.forward_hidden(long)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[0, :9], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], alone_long[0], atol=1e-5, rtol=1e-5)


def test_left_padding_with_mask_matches_unpadded():
    """Rotary attention only sees relative positions, so masked left padding leaves real tokens unchanged."""
    model = tiny_model(**TINY_CONFIGS["gqa"])
    tokens = torch.randint(3, 97, (1, 7))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), tokens], dim=1)
    mask = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        ours = model.forward_hidden(padded, attention_mask=mask)[:, 5:]
        unmasked = model.forward_hidden(padded)[:, 5:]
        alone = model.forward_hidden(tokens)
    torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked, alone, atol=1e-3)  # the mask is what makes them equal


def test_attention_mask_shape_is_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))


def test_positions_beyond_max_seq_len_raise():
    model = tiny_model(max_seq_len=8)
    with pytest.raises(ValueError, match="maximum sequence length 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_rotary_rotates_interleaved_pairs():
    """Pair (x[2i], x[2i+1]) at position t turns by t * theta ** (-2i / head_dim), written out in reals."""
    head_dim, seqlen = 16, 11
    freqs_cis = precompute_freqs_cis(head_dim, seqlen, theta=10000.0)
    angles = torch.arange(seqlen).float()[:, None] * 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    torch.testing.assert_close(freqs_cis.angle()[1:4], angles[1:4])
    cos, sin = angles.cos(), angles.sin()
    xq = torch.randn(2, 4, seqlen, head_dim)  # (bsz, n_heads, seqlen, head_dim)
    xk = torch.randn(2, 2, seqlen, head_dim)

    def rotate(x):
        even, odd = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    q_ours, k_ours = apply_rotary_emb(xq, xk, freqs_cis)
    torch.testing.assert_close(q_ours, rotate(xq))
    torch.testing.assert_close(k_ours, rotate(xk))
    # the layout the model passes in: a transposed view of the projection output
    q_view = xq.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(apply_rotary_emb(q_view, xk, freqs_cis)[0], rotate(xq))


def test_repeat_kv_is_repeat_interleave_and_gqa_attention_uses_it():
    x = torch.randn(2, 5, 3, 8)
    torch.testing.assert_close(repeat_kv(x, 4), torch.repeat_interleave(x, dim=2, repeats=4))
    # The model's SDPA(enable_gqa) attention equals attention over explicitly repeated heads.
    args = ModelArgs.preset("tiny")
    attention = Attention(args)
    h = torch.randn(2, 6, args.dim)
    freqs_cis = precompute_freqs_cis(args.head_dim, 6)
    xq = attention.wq(h).view(2, 6, args.n_heads, args.head_dim).transpose(1, 2)
    xk = attention.wk(h).view(2, 6, args.kv_heads, args.head_dim).transpose(1, 2)
    xv = attention.wv(h).view(2, 6, args.kv_heads, args.head_dim)
    xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
    n_rep = args.n_heads // args.kv_heads
    keys = repeat_kv(xk.transpose(1, 2), n_rep).transpose(1, 2)
    values = repeat_kv(xv, n_rep).transpose(1, 2)
    expected = F.scaled_dot_product_attention(xq, keys, values, is_causal=True)
    expected = attention.wo(expected.transpose(1, 2).reshape(2, 6, -1))
    torch.testing.assert_close(attention(h, freqs_cis, None), expected)


@pytest.mark.parametrize(
    ("name", "n_params", "hidden"),
    [("7B", 6_738_415_616, 11008), ("13B", 13_015_864_320, 13824), ("70B", 68_976_648_192, 28672)],
)
def test_presets_have_the_published_sizes(name, n_params, hidden):
    args = ModelArgs.preset(name)
    assert args.ffn_hidden_dim == hidden
    model = Transformer(args, device="meta")
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_model_args_validation_and_params_json():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelArgs(dim=65, n_heads=4)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelArgs(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="Unknown ModelArgs preset"):
        ModelArgs.preset("7b-chat-typo")
    with pytest.raises(ValueError, match="Unknown key"):
        ModelArgs.from_params_json({"dim": 64, "n_heads": 4, "n_layers": 1, "vocab_size": 8, "bias": True})
    meta_7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    with pytest.raises(ValueError, match="vocab_size"):
        ModelArgs.from_params_json(meta_7b)
    args = ModelArgs.from_params_json(meta_7b, vocab_size=32000)
    assert args == ModelArgs.preset("7B")
    assert ModelArgs.from_params_json(args.to_params_json()) == args
    assert "n_kv_heads" not in args.to_params_json()


def test_training_step_updates_every_parameter():
    model = tiny_model(**TINY_CONFIGS["gqa"]).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 97, (2, 16))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 97), tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()
    for key, value in model.state_dict().items():
        assert not torch.equal(value, before[key]), f"{key} did not change"


def test_activation_checkpointing_gives_the_same_gradients_and_recomputes_each_block():
    model = tiny_model(**TINY_CONFIGS["gqa"]).train()
    tokens = torch.randint(0, 97, (2, 16))
    calls = []
    for layer in model.layers:  # counts the block's runs, the backward pass's recomputation included
        layer.forward = (lambda f, i: lambda *a, **k: calls.append(i) or f(*a, **k))(layer.forward, layer.layer_id)

    def grads():
        model.zero_grad()
        calls.clear()
        model(tokens).logsumexp(-1).mean().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads()
    assert len(calls) == model.n_layers  # once each, in the forward pass
    model.set_activation_checkpointing(True)
    checkpointed = grads()
    assert len(calls) == 2 * model.n_layers  # and again in the backward pass: the activations were not kept
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key])


def test_bfloat16_model_keeps_an_exact_rotary_table():
    model = tiny_model()
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        reference = model(tokens)
        model.to(torch.bfloat16)
        logits = model(tokens)
    assert model.output.weight.dtype == torch.bfloat16
    assert model.freqs_cis(tokens.device).dtype == torch.complex64
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, atol=0.15, rtol=0.05)
    assert Transformer(ModelArgs.preset("tiny"), dtype=torch.bfloat16).norm.weight.dtype == torch.bfloat16


def test_fsdp_wrap_policy_wraps_each_transformer_block():
    policy = fsdp_wrap_policy()
    assert isinstance(policy, functools.partial)
    model = Transformer(ModelArgs.preset("tiny"), device="meta")
    assert policy(module=model.layers[0], recurse=False, nonwrapped_numel=0)
    assert not policy(module=model.norm, recurse=False, nonwrapped_numel=0)
    assert policy.keywords["transformer_layer_cls"] == {TransformerBlock}


def test_real_rotary_for_compile_equals_the_complex_product():
    from training.llama.model import _apply_rotary_emb_real

    freqs_cis = precompute_freqs_cis(16, 11, theta=10000.0)
    xq = torch.randn(2, 4, 11, 16)
    xk = torch.randn(2, 2, 11, 16).transpose(1, 2).contiguous().transpose(1, 2)  # the model's strided layout
    q_complex, k_complex = apply_rotary_emb(xq, xk, freqs_cis)
    torch.testing.assert_close(_apply_rotary_emb_real(xq, freqs_cis), q_complex, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_apply_rotary_emb_real(xk, freqs_cis), k_complex, atol=1e-6, rtol=1e-6)


def test_compiled_blocks_give_the_eager_loss_gradients_and_cached_decoding():
    """compile_blocks changes no number: the loss and every gradient within 1e-5; generation stays eager."""
    torch._dynamo.reset()
    model = tiny_model(**{**TINY_CONFIGS["gqa"], "n_layers": 2}).train()
    data = torch.randint(0, 97, (2, 25), generator=torch.Generator().manual_seed(3))
    tokens, targets = data[:, :-1], data[:, 1:]

    # packed rows too: two examples in the first row, where the compiled blocks take a block-diagonal mask
    position_ids = torch.tensor([[*range(10), *range(14)], [*range(24)]])

    def loss_and_grads(**kwargs):
        model.zero_grad(set_to_none=True)
        loss = model(tokens, targets=targets, **kwargs)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    eager = [loss_and_grads(), loss_and_grads(position_ids=position_ids)]
    assert abs(eager[0][0] - eager[1][0]) > 1e-4  # the packed rows are a different computation
    model.compile_blocks()
    compiled = [loss_and_grads(), loss_and_grads(position_ids=position_ids)]
    for (eager_loss, eager_grads), (compiled_loss, compiled_grads) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-5, rtol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)
    assert set(model.state_dict()) == set(tiny_model(**TINY_CONFIGS["gqa"]).state_dict())
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(bsz=2, max_seq_len=24)
        chunks = [model(tokens[:, :20], kv_cache=cache)]
        chunks += [model(tokens[:, t : t + 1], start_pos=t, kv_cache=cache) for t in range(20, 24)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


_HUGE_PAGES_OF_A_16MB_TENSOR = """
import re, sys, training.llama, torch
def huge_kb():
    return int(re.search(r"AnonHugePages:\\s+(\\d+) kB", open("/proc/self/smaps_rollup").read()).group(1))
before = huge_kb()
tensor = torch.ones(4 << 20)  # 16 MB, every page written
print(huge_kb() - before)
"""


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0]


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="the kernel gives no transparent huge pages")
def test_importing_the_package_gives_large_cpu_tensors_huge_pages_unless_turned_off():
    def huge_kb(setting: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        if setting is not None:
            env["THP_MEM_ALLOC_ENABLE"] = setting
        out = subprocess.run([sys.executable, "-c", _HUGE_PAGES_OF_A_16MB_TENSOR], env=env, capture_output=True,
                             text=True, check=True, cwd=Path(__file__).resolve().parents[3])
        return int(out.stdout.split()[-1])

    assert huge_kb(None) >= 8 * 1024  # most of the 16 MB in 2 MB pages
    if _thp_mode() == "madvise":  # only what PyTorch asks for gets them
        assert huge_kb("0") == 0
