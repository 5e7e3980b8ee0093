"""Packed rows: each example in a row computes exactly what it computes alone, as transformers reads them."""

import pytest
import torch
import torch.nn.functional as F

from training.llama.checkpoint import save_hf_checkpoint
from training.llama.model import ModelArgs, Transformer
from training.llama.packing import PackedDocuments, pack_examples, packed_attention
from training.tests.llama.test_model import PARITY_STD


def tiny_model(seed: int = 0, std: float = 0.2, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=97, **overrides))
    model.init_weights(std=std)
    return model


def random_examples(lengths, vocab_size=97, seed=0):
    """(ids, loss mask) examples: a prompt, then an answer that carries the loss."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(3, vocab_size, (n,), generator=g).tolist()
        n_prompt = n // 2
        examples.append((ids, [False] * n_prompt + [True] * (n - n_prompt)))
    return examples


def test_pack_examples_fills_rows_longest_first_with_targets_inside_each_example():
    examples = random_examples([5, 9, 3, 7, 4])
    batch = pack_examples(examples, 12, pad_id=0)
    # first-fit by length: [9, 3], [7, 5], [4] (+ padding); within a row the examples keep their given order
    assert batch.tokens.shape == (3, 12)
    assert batch.n_examples == 5
    assert batch.n_truncated == 0
    assert batch.fill == pytest.approx(28 / 36)
    assert batch.tokens[0, :9].tolist() == examples[1][0]
    assert batch.tokens[0, 9:].tolist() == examples[2][0]
    assert batch.tokens[1, :5].tolist() == examples[0][0]
    assert batch.tokens[1, 5:].tolist() == examples[3][0]
    assert batch.position_ids[0].tolist() == [*range(9), *range(3)]
    assert batch.position_ids[2].tolist() == [*range(4), *range(8)]  # the padding is a document of its own
    assert batch.tokens[2, 4:].eq(0).all()
    assert batch.targets[2, 3:].eq(-100).all()
    ids, mask = examples[1]
    expected = [ids[t + 1] if mask[t + 1] else -100 for t in range(8)] + [-100]  # no target past the example
    assert batch.targets[0, :9].tolist() == expected


def test_pack_examples_cuts_long_examples_and_refuses_bad_ones():
    batch = pack_examples(random_examples([20, 4]), 8)
    assert batch.n_truncated == 1
    assert batch.tokens.shape == (2, 8)
    with pytest.raises(ValueError, match="example 1: 3 token ids but a loss mask of 2"):
        pack_examples([([1, 2], [True, True]), ([1, 2, 3], [True, False])], 8)
    with pytest.raises(ValueError, match="example 0 has no tokens"):
        pack_examples([([], [])], 8)


def test_documents_are_read_from_position_ids_as_transformers_does():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0], [3, 4, 5, 6, 7, 8]])
    documents = PackedDocuments.from_position_ids(position_ids)
    assert documents.bounds == (((0, 3), (3, 5), (5, 6)), ((0, 6),))
    mask = documents.dense_mask(6)[:, 0]
    assert mask[0, 4].tolist() == [False, False, False, True, True, False]
    assert mask[1].equal(torch.ones(6, 6, dtype=torch.bool).tril())


def test_packed_attention_equals_sdpa_with_the_block_diagonal_mask():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 10, 8, generator=g)
    k, v = torch.randn(2, 2, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)
    documents = PackedDocuments.from_position_ids(torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0], list(range(10))]))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=documents.dense_mask(10), enable_gqa=True)
    torch.testing.assert_close(packed_attention(q, k, v, documents), dense)


def test_each_packed_example_gets_the_logits_it_gets_alone():
    model = tiny_model().eval()
    examples = random_examples([11, 6, 17, 9, 5], seed=1)
    batch = pack_examples(examples, 24)
    with torch.no_grad():
        packed = model(batch.tokens, position_ids=batch.position_ids)
        plain = model(batch.tokens)  # without position_ids the examples would see each other
        for r in range(batch.tokens.shape[0]):
            for start, end in PackedDocuments.from_position_ids(batch.position_ids[r:r + 1]).bounds[0]:
                alone = model(batch.tokens[r:r + 1, start:end])
                torch.testing.assert_close(packed[r:r + 1, start:end], alone, atol=1e-5, rtol=1e-5)
    assert (packed - plain).abs().max() > 1e-2


def test_packed_logits_match_transformers_given_the_same_position_ids(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_model(std=PARITY_STD, n_kv_heads=2, n_heads=4).eval()
    save_hf_checkpoint(model, tmp_path)
    batch = pack_examples(random_examples([13, 7, 20, 4, 9], seed=2), 32)
    for implementation in ("eager", "sdpa"):
        reference = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        with torch.no_grad():
            # no cache: transformers reads packed rows from position_ids only without past_key_values (training)
            theirs = reference(input_ids=batch.tokens, position_ids=batch.position_ids, use_cache=False).logits
            ours = model(batch.tokens, position_ids=batch.position_ids)
        assert float(theirs.abs().max()) > 2.0
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=implementation)


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_packed_training_gives_the_gradients_of_the_examples_trained_alone(activation_checkpointing):
    """The packed loss is the mean over every answer token of every example; so are its gradients."""
    model = tiny_model().train()
    model.set_activation_checkpointing(activation_checkpointing)
    examples = random_examples([10, 7, 13, 5], seed=3)
    batch = pack_examples(examples, 20)
    loss = model(batch.tokens, position_ids=batch.position_ids, targets=batch.targets)
    loss.backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    n_targets = int((batch.targets != -100).sum())
    total = 0.0
    for ids, mask in examples:
        tokens = torch.tensor([ids[:-1]])
        targets = torch.tensor([[t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]])
        logits = model(tokens)
        total = total + F.cross_entropy(logits[0], targets[0], reduction="sum")
    (total / n_targets).backward()
    torch.testing.assert_close(loss.detach(), (total / n_targets).detach(), atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_position_ids_are_checked():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 8))
    positions = torch.arange(8).repeat(2, 1)
    with pytest.raises(ValueError, match="shape of tokens"):
        model(tokens, position_ids=positions[:, :5])
    with pytest.raises(ValueError, match="must lie in 0..127"):
        model(tokens, position_ids=positions + 125)
    with pytest.raises(ValueError, match="cannot be combined"):
        model(tokens, position_ids=positions, attention_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match="cannot be combined"):
        model(tokens, position_ids=positions, kv_cache=model.new_kv_cache(2, 8))
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one token"):
        model(empty, position_ids=empty)
    with pytest.raises(ValueError, match="at least one token"):
        model(empty, targets=empty)
