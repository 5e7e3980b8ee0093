"""Decoding-step products: packed weights (oneDNN's blocked layout) and the weight-first order."""

import pytest
import torch
from torch.profiler import profile

import training.llama.linear as linear
from training.llama.generation import generate
from training.llama.linear import decode_linear, packed_weights
from training.llama.model import ModelArgs, Transformer

pytestmark = pytest.mark.skipif(not linear.onednn_available(), reason="this PyTorch build has no oneDNN")

_PACKING_PAYS = linear.packing_pays


@pytest.fixture(autouse=True)
def any_cpu_packs(monkeypatch):
    """The mechanism is tested on any CPU with oneDNN, not only on the AVX-512 ones where `generate` uses it."""
    monkeypatch.setattr(linear, "packing_pays", linear.onednn_available)


def _ran_packed(fn) -> tuple[torch.Tensor, bool]:
    """fn()'s result, and whether oneDNN's packed-weight product computed it."""
    with profile() as prof:
        result = fn()
    return result, any("_linear_pointwise" in event.key for event in prof.key_averages())


def big_layer() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(256, 384, bias=False)  # 98,304 weights: enough to be packed


@pytest.mark.parametrize("rows", [3, 8, 64])
def test_packed_product_equals_the_layer_and_is_what_runs(rows):
    layer, model = big_layer(), torch.nn.Sequential()
    model.add_module("proj", layer)
    x = torch.randn(rows, 1, 256)
    with torch.inference_mode(), packed_weights(model, rows) as packed:
        assert packed
        out, ran_packed = _ran_packed(lambda: decode_linear(layer, x))
    assert ran_packed
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    assert layer not in linear._PACKED  # the copy is released with the block


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no oneDNN bf16 kernels on this CPU")
def test_bfloat16_weights_are_packed_and_give_the_same_numbers():
    layer = big_layer().to(torch.bfloat16)
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    with torch.inference_mode(), packed_weights(layer, 8) as packed:
        assert packed
        out, ran_packed = _ran_packed(lambda: decode_linear(layer, x))
        assert ran_packed
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


def test_under_autocast_the_layer_follows_autocast():
    layer = big_layer()  # float32 weights, packed as float32
    x = torch.randn(8, 256)
    with torch.inference_mode(), packed_weights(layer, 8), torch.autocast("cpu", dtype=torch.bfloat16):
        out, ran_packed = _ran_packed(lambda: decode_linear(layer, x))
        assert not ran_packed
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


def test_a_weight_changed_inside_the_block_is_not_read_from_its_stale_copy():
    layer = big_layer()
    x = torch.randn(8, 256)
    with packed_weights(layer, 8):
        with torch.no_grad():
            assert _ran_packed(lambda: decode_linear(layer, x))[1]
            layer.weight.add_(1.0)  # in place, through an op that bumps the version counter
            out, ran_packed = _ran_packed(lambda: decode_linear(layer, x))
        assert not ran_packed
        torch.testing.assert_close(out, x @ layer.weight.t(), rtol=1e-5, atol=1e-4)
        layer.weight.data = torch.randn(384, 256)  # new data under the same parameter
        with torch.no_grad():
            torch.testing.assert_close(decode_linear(layer, x), x @ layer.weight.t(), rtol=1e-5, atol=1e-4)
        layer.weight = torch.nn.Parameter(torch.randn(384, 256))  # a new weight altogether
        with torch.no_grad():
            torch.testing.assert_close(decode_linear(layer, x), x @ layer.weight.t(), rtol=1e-5, atol=1e-4)


def test_weights_made_under_inference_mode_are_packed_too():
    with torch.inference_mode():  # a serving process may load its model this way: no version counters
        layer = big_layer()
        x = torch.randn(8, 256)
        with packed_weights(layer, 8) as packed:
            assert packed
            out, ran_packed = _ran_packed(lambda: decode_linear(layer, x))
        assert ran_packed
        torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)


def test_the_model_can_be_copied_and_saved_inside_the_block(tmp_path):
    import copy

    layer = big_layer()
    with packed_weights(layer, 8) as packed:
        assert packed
        twin = copy.deepcopy(layer)
        torch.save(layer, tmp_path / "layer.pt")
    torch.testing.assert_close(twin.weight, layer.weight)


def test_a_failing_pack_leaves_the_usual_products(monkeypatch):
    layer = big_layer()

    def refuse(weight, rows):
        raise RuntimeError("no kernel for this CPU")

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    with packed_weights(layer, 8) as packed, torch.no_grad():
        assert not packed
        assert layer not in linear._PACKED
        out, ran_packed = _ran_packed(lambda: decode_linear(layer, torch.randn(8, 256)))
    assert not ran_packed


def test_nothing_is_packed_without_room_for_more_rows_or_for_small_matrices(monkeypatch):
    layer = big_layer()
    with packed_weights(layer, linear.MAX_PACKED_ROWS + 1) as packed:
        assert not packed
    for rows in range(1, linear.MIN_PACKED_ROWS):  # one or two rows: MKL's products are as fast
        with packed_weights(layer, rows) as packed:
            assert not packed
    with packed_weights(torch.nn.Linear(64, 96, bias=False), 8) as packed:
        assert not packed
    monkeypatch.setattr(linear, "available_memory", lambda: 2 * layer.weight.numel() * 4 - 1)
    with packed_weights(layer, 8) as packed:
        assert not packed  # the copy would take more than half of the memory left


def test_an_enclosing_block_keeps_its_copies():
    layer = big_layer()
    with packed_weights(layer, 8) as outer:
        copy = linear._PACKED[layer]
        with packed_weights(layer, 8) as inner:
            assert outer
            assert not inner
        assert linear._PACKED[layer] is copy
    assert layer not in linear._PACKED


def test_generation_with_packed_weights_gives_the_same_tokens(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", dim=256, n_heads=4, n_kv_heads=2, vocab_size=512)).eval()
    model.init_weights(std=0.1)
    prompts = [[1, 5, 9, 13], [1, 7], [1, 2, 3, 4, 5, 6, 7]]

    def sample(**kwargs):
        return generate(model, prompts, max_new_tokens=12, eos_id=None, **kwargs)

    greedy, ran_packed = _ran_packed(lambda: sample(temperature=0.0))
    assert ran_packed
    sampled = sample(temperature=0.8, top_p=0.9, seed=3)
    monkeypatch.setattr(linear, "MAX_PACKED_ROWS", 0)  # nothing packed: MKL's products
    plain_greedy, ran_packed = _ran_packed(lambda: sample(temperature=0.0))
    assert not ran_packed
    assert greedy.tokens == plain_greedy.tokens
    for ours, plain in zip(greedy.logprobs, plain_greedy.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(plain), rtol=1e-4, atol=1e-5)
    assert sample(temperature=0.8, top_p=0.9, seed=3).tokens == sampled.tokens


@pytest.mark.parametrize("rows", [1, 8, 9])
def test_decode_linear_gives_the_layers_output_and_calls_hooked_layers(rows):
    layer = big_layer()
    x = torch.randn(rows, 1, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # without packed weights, the weight-first order runs with several threads only
    try:
        with torch.inference_mode():
            out = decode_linear(layer, x)
            torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
            assert out.is_contiguous()
            weight_first = torch.mm(layer.weight, x.reshape(rows, -1).t()).t()
            assert torch.equal(out.reshape(rows, -1), weight_first if rows <= 8 else layer(x).reshape(rows, -1))
            handle = layer.register_forward_hook(lambda module, args, result: result * 2.0)
            with packed_weights(layer, rows):  # a hooked layer is neither packed nor bypassed
                torch.testing.assert_close(decode_linear(layer, x), 2.0 * out, rtol=1e-5, atol=1e-5)
            handle.remove()
            # nor is any layer while a global module hook is registered
            handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, result: result * 3.0)
            try:
                torch.testing.assert_close(decode_linear(layer, x), 3.0 * out, rtol=1e-5, atol=1e-5)
            finally:
                handle.remove()
        y = decode_linear(layer, x.requires_grad_())  # training: the module itself, gradients flow
        y.sum().backward()
        assert x.grad is not None
    finally:
        torch.set_num_threads(threads)


def test_an_interrupt_while_packing_leaves_no_copy_behind(monkeypatch):
    model = torch.nn.Sequential(big_layer(), big_layer())
    pack = torch.ops.mkldnn._reorder_linear_weight
    calls = []

    def interrupted(weight, rows):
        calls.append(rows)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return pack(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", interrupted)
    with pytest.raises(KeyboardInterrupt), packed_weights(model, 8):
        pass
    assert len(calls) == 2
    assert not any(layer in linear._PACKED for layer in model)


def test_the_memory_left_under_a_containers_cgroup_limits(tmp_path):
    """cgroup v1 and v2 trees as the kernel shows them: the least room under the cgroup or its ancestors,
    the reclaimable page cache not counted as used."""
    v2 = tmp_path / "v2"
    job = v2 / "batch.slice" / "job-7"
    job.mkdir(parents=True)
    (v2 / "batch.slice" / "memory.max").write_text("8000\n")
    (v2 / "batch.slice" / "memory.current").write_text("5000\n")
    (v2 / "batch.slice" / "memory.stat").write_text("anon 3000\ninactive_file 1000\n")
    (job / "memory.max").write_text("max\n")
    (job / "memory.current").write_text("4000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/batch.slice/job-7\n")
    assert linear._cgroup_memory_left(proc, v2) == 8000 - (5000 - 1000)
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("10000\n")
    (v1 / "memory" / "docker" / "abc" / "memory.usage_in_bytes").write_text("7000\n")
    (v1 / "memory" / "docker" / "abc" / "memory.stat").write_text("inactive_file 50\ntotal_inactive_file 500\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    (v1 / "memory" / "memory.usage_in_bytes").write_text("123456\n")
    proc.write_text("5:devices:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    assert linear._cgroup_memory_left(proc, v1) == 10000 - (7000 - 500)
    proc.write_text("4:memory:/\n")
    assert linear._cgroup_memory_left(proc, v1) is None  # no limit anywhere


def test_only_avx512_cpus_pack(monkeypatch):
    """Held to AVX2 the packed products gained 1.0-1.2x at 8 rows, too little for the weights' memory twice."""
    layer = big_layer()
    monkeypatch.setattr(linear, "packing_pays", _PACKING_PAYS)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with packed_weights(layer, 8) as packed:
        assert not packed
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with packed_weights(layer, 8) as packed:
        assert packed
