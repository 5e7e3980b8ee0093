"""Batched sampling: the stories260k oracle, ragged batches, log-probs, seeds, EOS and the CLI."""

import json

import pytest
import torch

from training.llama.checkpoint import load_checkpoint, save_meta_checkpoint
from training.llama.generate import main as generate_main
from training.llama.generation import (
    RowGenerators,
    _mass_above,
    _output_head,
    generate,
    sample_next_token,
    sample_top_p,
    sample_top_p_sorted,
)
from training.llama.model import ModelArgs, Transformer
from training.llama.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def stories(shared_data):
    model, args = load_checkpoint(shared_data / "stories260k" / "meta")
    oracle = json.loads((shared_data / "stories260k" / "oracle.json").read_text())
    return model.eval(), args, oracle


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=64))
    model.init_weights(std=0.3)  # peaked enough that greedy choices are not near-ties
    return model.eval()


def test_stories260k_reproduces_the_oracle_greedily(stories, shared_data):
    model, args, oracle = stories
    assert (args.n_heads, args.n_kv_heads, args.ffn_hidden_dim) == (8, 4, 172)
    result = generate(model, [oracle["prompt_ids"]], max_new_tokens=len(oracle["expected_ids"]), temperature=0.0,
                      eos_id=None)
    assert result.tokens[0] == oracle["expected_ids"]
    tokenizer = Tokenizer(shared_data / "stories260k" / "tokenizer.model")
    assert tokenizer.decode(result.tokens[0]) == oracle["expected_text"]


def test_stories260k_ragged_batch_equals_each_prompt_alone(stories):
    """Left padding + the attention mask must not change a prompt's continuation."""
    model, _, oracle = stories
    ids = oracle["expected_ids"]
    prompts = [[1], [1, *ids[:7]], [1, *ids[:30]], [1, *ids[100:103]]]
    batch = generate(model, prompts, max_new_tokens=40, temperature=0.0, eos_id=None)
    for prompt, tokens, logprobs in zip(prompts, batch.tokens, batch.logprobs, strict=True):
        alone = generate(model, [prompt], max_new_tokens=40, temperature=0.0, eos_id=None)
        assert tokens == alone.tokens[0]
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(alone.logprobs[0]), atol=1e-4, rtol=0)
    assert batch.tokens[1] == ids[7:47]  # the oracle continues its own prefix


def test_a_long_prompt_does_not_shorten_the_others_near_max_seq_len(tiny):
    """Each sequence stops at max_seq_len tokens of its own (tiny: 128), as in Meta's code, and equals itself alone."""
    g = torch.Generator().manual_seed(5)
    prompts = [[1, *torch.randint(3, 64, (99,), generator=g).tolist()], [1, 7, 8, 9, 10]]
    batch = generate(tiny, prompts, max_new_tokens=50, temperature=0.0, eos_id=None)
    assert [len(t) for t in batch.tokens] == [28, 50]
    for prompt, tokens, logprobs in zip(prompts, batch.tokens, batch.logprobs, strict=True):
        alone = generate(tiny, [prompt], max_new_tokens=50, temperature=0.0, eos_id=None)
        assert tokens == alone.tokens[0]
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(alone.logprobs[0]), atol=1e-5, rtol=0)


def test_cached_sampling_equals_recomputing_the_full_sequence(tiny):
    """KV-cache decoding picks the same tokens, with the same log-probs, as full forward passes."""
    prompts = [[1, 5, 9, 3], [1, 7]]
    result = generate(tiny, prompts, max_new_tokens=12, temperature=0.0, eos_id=None)
    for prompt, tokens, logprobs in zip(prompts, result.tokens, result.logprobs, strict=True):
        seq = list(prompt)
        expected_lp = []
        with torch.no_grad():
            for _ in range(12):
                logits = tiny(torch.tensor([seq]))[0, -1]
                seq.append(int(logits.argmax()))
                expected_lp.append(float(torch.log_softmax(logits, -1)[seq[-1]]))
        assert tokens == seq[len(prompt):]
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_lp), atol=1e-5, rtol=0)


def test_logprobs_are_under_the_temperature_scaled_untruncated_distribution(tiny):
    prompt = [1, 2, 3]
    result = generate(tiny, [prompt], max_new_tokens=6, temperature=0.7, top_p=0.5, seed=3, eos_id=None)
    seq = prompt + result.tokens[0]
    with torch.no_grad():
        logits = tiny(torch.tensor([seq]))[0, len(prompt) - 1 : -1]  # the logits that chose each new token
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, torch.tensor(result.tokens[0])[:, None])
    torch.testing.assert_close(torch.tensor(result.logprobs[0]), expected.squeeze(-1), atol=1e-5, rtol=0)


def test_seed_makes_sampling_reproducible(tiny):
    prompts = [[1, 4], [1, 8, 9, 10]]
    kwargs = dict(max_new_tokens=20, temperature=1.5, top_p=1.0, eos_id=None)
    a = generate(tiny, prompts, seed=7, **kwargs)
    b = generate(tiny, prompts, seed=7, **kwargs)
    c = generate(tiny, prompts, seed=8, **kwargs)
    assert a == b
    assert a.tokens != c.tokens


def test_top_k_1_and_tiny_top_p_are_greedy(tiny):
    prompts = [[1, 4], [1, 8, 9, 10]]
    greedy = generate(tiny, prompts, max_new_tokens=10, temperature=0.0, eos_id=None).tokens
    assert generate(tiny, prompts, max_new_tokens=10, temperature=1.0, top_k=1, seed=0, eos_id=None).tokens == greedy
    assert generate(tiny, prompts, max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=0, eos_id=None).tokens == greedy


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens, _ = sample_next_token(logits, temperature=1.0, top_p=1.0, top_k=2, generator=generator)
    assert set(tokens.tolist()) == {0, 1}
    # softmax is about [0.64, 0.24, 0.09, ...]: the nucleus for p=0.8 is {0, 1} (0.64 < 0.8 <= 0.88)
    tokens, _ = sample_next_token(logits, temperature=1.0, top_p=0.8, top_k=None, generator=generator)
    assert set(tokens.tolist()) == {0, 1}
    tokens, _ = sample_next_token(logits, temperature=1.0, top_p=1.0, top_k=None, generator=generator)
    assert set(tokens.tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("p", [0.3, 0.75, 0.9])
def test_rejection_top_p_samples_metas_nucleus_distribution(p):
    """The sort-free sampler and Meta's sort-based one draw from the same renormalised nucleus."""
    probs = torch.tensor([0.05, 0.3, 0.02, 0.25, 0.15, 0.13, 0.1])
    n = 40_000
    batch = probs.repeat(n, 1)
    ours = sample_top_p(batch, p, torch.Generator().manual_seed(0)).squeeze(-1)
    metas = sample_top_p_sorted(batch.clone(), p, torch.Generator().manual_seed(1)).squeeze(-1)
    # the nucleus written out: sorted 0.3, 0.25, 0.15, 0.13, 0.1, 0.05, 0.02 with exclusive cumsums
    # 0, 0.3, 0.55, 0.7, 0.83, 0.93, 0.98; a token stays when its exclusive cumsum is <= p
    nucleus = {0.3: [1, 3], 0.75: [1, 3, 4, 5], 0.9: [1, 3, 4, 5, 6]}[p]
    expected = torch.zeros(7)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    for draws in (ours, metas):
        freq = torch.bincount(draws, minlength=7).float() / n
        torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


@pytest.mark.parametrize(("rows", "vocab_size"), [(1, 20_000), (8, 20_000), (65, 20_000), (8, 3000)])
def test_nucleus_mass_above_a_draw_is_the_masked_sum(rows, vocab_size):
    probs = torch.softmax(torch.randn(rows, vocab_size, generator=torch.Generator().manual_seed(rows)), dim=-1)
    threshold = probs[:, 7:8]
    expected = torch.where(probs > threshold, probs, 0.0).sum(-1, keepdim=True)
    assert torch.equal(_mass_above(probs, threshold), expected)


@pytest.mark.parametrize("rows", [1, 3, 8, 9])
def test_decoding_head_gives_the_output_layers_logits(rows):
    torch.manual_seed(0)
    model = Transformer(ModelArgs.preset("tiny", vocab_size=4096)).eval()  # a head big enough to take the path
    h = torch.randn(rows, model.args.dim)
    with torch.inference_mode():  # as in generate: training takes the module's own path
        logits = _output_head(model, h)
    torch.testing.assert_close(logits, model.output(h), rtol=1e-5, atol=1e-5)
    assert logits.is_contiguous()
    weight_first = torch.mm(model.output.weight, h.t()).t()
    assert torch.equal(logits, weight_first if rows <= 8 else model.output(h))  # which order computed it
    # a hook on the head (or an adapter in its place) is honoured: the head is then called
    handle = model.output.register_forward_hook(lambda module, args, out: out + 1.0)
    with torch.inference_mode():
        hooked = _output_head(model, h)
    torch.testing.assert_close(hooked, logits + 1.0, rtol=1e-5, atol=1e-5)
    handle.remove()


def test_top_p_falls_back_to_the_sort_when_rejection_keeps_failing():
    probs = torch.softmax(torch.randn(4, 1000) * 0.1, dim=-1)  # flat: the top token alone is a tiny nucleus
    tokens = sample_top_p(probs, 1e-9, torch.Generator().manual_seed(0), max_rounds=1)
    assert tokens.squeeze(-1).tolist() == probs.argmax(-1).tolist()


def test_each_sequence_stops_at_eos(tiny):
    prompts = [[1, 4], [1, 8, 9, 10], [1, 2]]
    free = generate(tiny, prompts, max_new_tokens=15, temperature=0.0, eos_id=None).tokens
    eos = free[0][4]  # make the first sequence's 5th token the EOS
    stopped = generate(tiny, prompts, max_new_tokens=15, temperature=0.0, eos_id=eos)
    for full, cut, lps in zip(free, stopped.tokens, stopped.logprobs, strict=True):
        expected = full[: full.index(eos)] if eos in full else full
        assert cut == expected
        assert len(lps) == len(cut)
    lengths = [len(t) for t in stopped.tokens]
    assert 0 < lengths[0] <= 4
    assert 15 in lengths  # a sequence without EOS runs on after the others stopped


def test_generation_stops_at_max_seq_len_and_validates_input(tiny):
    result = generate(tiny, [[1] * 120], max_new_tokens=50, temperature=0.0, eos_id=None)
    assert len(result.tokens[0]) == 8  # tiny max_seq_len is 128, like Meta's total_len clipping
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, [[1], []], max_new_tokens=2, eos_id=None)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, [[1]], max_new_tokens=2, top_p=0.0, eos_id=None)
    with pytest.raises(ValueError, match="token ids"):
        generate(tiny, [[64]], max_new_tokens=2, eos_id=None)
    for temperature in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            generate(tiny, [[1]], max_new_tokens=2, temperature=temperature, eos_id=None)
    assert generate(tiny, [[1]], max_new_tokens=3, eos_id=None, return_logprobs=False).logprobs is None


def test_generate_is_not_training_and_model_still_trains_afterwards(tiny):
    generate(tiny, [[1, 2]], max_new_tokens=3, eos_id=None)
    loss = tiny(torch.tensor([[1, 2, 3]])).sum()
    loss.backward()
    assert tiny.output.weight.grad is not None


def test_cli_prints_the_greedy_completion(shared_data, capsys, tmp_path):
    oracle = json.loads((shared_data / "stories260k" / "oracle.json").read_text())
    tokenizer = shared_data / "stories260k" / "tokenizer.model"
    # through a re-saved copy too, so the CLI's auto-detection sees a checkpoint we wrote
    model, _ = load_checkpoint(shared_data / "stories260k" / "meta")
    save_meta_checkpoint(model, tmp_path / "copy")
    code = generate_main(["--checkpoint", str(tmp_path / "copy"), "--tokenizer", str(tokenizer),
                          "--prompt", "", "--max-new-tokens", "40", "--temperature", "0"])
    assert code == 0
    expected = Tokenizer(tokenizer).decode(oracle["expected_ids"][:40])
    assert capsys.readouterr().out == expected + "\n"


def test_cli_reports_a_missing_checkpoint(shared_data, capsys, tmp_path):
    code = generate_main(["--checkpoint", str(tmp_path / "none"), "--tokenizer",
                          str(shared_data / "stories260k" / "tokenizer.model"), "--prompt", "hi", "--chat"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(("probs", "p", "share"), [
    ([0.5, 0.25, 0.25], 0.6, [2 / 3, 1 / 6, 1 / 6]),  # Meta keeps one of the two tied 0.25s: 1/3 between them
    ([0.25, 0.25, 0.25, 0.25], 0.6, [0.25] * 4),  # Meta keeps three of four: the same total, 1
    ([0.5, 0.25, 0.25], 0.8, [0.5, 0.25, 0.25]),  # both tied tokens fit: the whole distribution
])
def test_tokens_tied_at_the_nucleus_boundary_get_the_share_metas_sort_gives_them(probs, p, share):
    probs = torch.tensor(probs)
    n = 60_000
    ours = sample_top_p(probs.repeat(n, 1), p, torch.Generator().manual_seed(0)).squeeze(-1)
    metas = sample_top_p_sorted(probs.repeat(n, 1), p, torch.Generator().manual_seed(1)).squeeze(-1)
    freq = torch.bincount(ours, minlength=len(probs)).float() / n
    torch.testing.assert_close(freq, torch.tensor(share), atol=0.01, rtol=0)
    # Meta's picks among tied tokens follow its sort; each group of equal probability gets the same share
    meta_freq = torch.bincount(metas, minlength=len(probs)).float() / n
    for value in probs.unique():
        group = probs == value
        torch.testing.assert_close(meta_freq[group].sum(), freq[group].sum(), atol=0.015, rtol=0)


def test_cli_chat_prompt_is_the_llama2_dialog_with_its_system_prompt(shared_data, capsys, monkeypatch):
    """--chat --system sends exactly `encode_dialog`'s ids (stories260k's own tokenizer: a model it fits)."""
    import training.llama.generate as cli

    seen = {}

    def fake_generate(model, prompts, **kwargs):
        seen["prompts"] = prompts
        return generate(model, prompts, **{**kwargs, "max_new_tokens": 2})

    monkeypatch.setattr(cli, "generate", fake_generate)
    tokenizer_path = shared_data / "stories260k" / "tokenizer.model"
    code = generate_main(["--checkpoint", str(shared_data / "stories260k" / "meta"), "--tokenizer",
                          str(tokenizer_path), "--prompt", "Tell a story", "--chat", "--system", "Be brief",
                          "--temperature", "0"])
    assert code == 0
    expected, _ = Tokenizer(tokenizer_path).encode_dialog([{"role": "user", "content": "Tell a story"}],
                                                           system="Be brief")
    assert seen["prompts"] == [expected]
    plain, _ = Tokenizer(tokenizer_path).encode_dialog([{"role": "user", "content": "Tell a story"}])
    assert expected != plain  # the system prompt is in it


def test_cli_refuses_a_tokenizer_that_is_not_the_models(shared_data, capsys, tmp_path):
    code = generate_main(["--checkpoint", str(shared_data / "stories260k" / "meta"), "--tokenizer",
                          str(shared_data / "llama2-tokenizer" / "tokenizer.model"), "--prompt", "hi"])
    assert code == 2
    assert "not this checkpoint's tokenizer" in capsys.readouterr().err
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    code = generate_main(["--checkpoint", str(shared_data / "stories260k" / "meta"), "--tokenizer",
                          str(tmp_path / "bad.model"), "--prompt", "hi"])
    assert code == 2
    assert "is not a SentencePiece model" in capsys.readouterr().err


def test_ties_in_a_large_vocabulary_decoding_batch_are_counted():
    """The same tie rule on the path of a decoding batch with a large vocabulary (the tie count estimated)."""
    probs = torch.zeros(20_000)
    probs[[3, 11_000, 19_999]] = torch.tensor([0.5, 0.25, 0.25])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_top_p(probs.repeat(50, 1), 0.6, generator).squeeze(-1) for _ in range(300)])
    assert set(draws.tolist()) <= {3, 11_000, 19_999}
    assert abs((draws == 3).float().mean().item() - 2 / 3) < 0.015  # Meta's nucleus: 0.5 and one 0.25


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_row_seeds_sample_a_sequence_alike_whatever_shares_its_batch(top_p):
    """With a seed per row, a prompt's completion does not depend on the other prompts of its batch."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                  max_seq_len=64)).eval()
    prompts = [[1, 5, 9], [1, 7], [1, 3, 4, 8, 2], [1, 6, 6]]
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=top_p, eos_id=None)
    together = generate(model, prompts, row_seeds=[10, 11, 12, 13], **kwargs).tokens
    alone = [generate(model, [p], row_seeds=[10 + i], **kwargs).tokens[0] for i, p in enumerate(prompts)]
    pairs = generate(model, prompts[2:], row_seeds=[12, 13], **kwargs).tokens
    assert together == alone
    assert together[2:] == pairs
    shared = generate(model, prompts, seed=10, **kwargs).tokens
    assert shared != together  # one stream for the batch is another draw
    with pytest.raises(ValueError, match="seed or row_seeds"):
        generate(model, prompts, seed=1, row_seeds=[1, 2, 3, 4], **kwargs)


def test_a_temperature_a_row_samples_each_row_as_alone_at_its_temperature():
    """The model worker draws a comparison's two variants (two temperatures) in one batch: each row as if sampled
    alone at its own temperature; one temperature for every row is the scalar's draw; greedy rows refused."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                                  max_seq_len=64)).eval()
    prompts = [[1, 5, 9], [1, 7], [1, 5, 9], [1, 7]]
    temperatures = [0.6, 0.6, 1.3, 1.3]
    kwargs = dict(max_new_tokens=12, top_p=0.9, eos_id=None)
    together = generate(model, prompts, temperature=temperatures, row_seeds=[1, 2, 3, 4], **kwargs)
    alone = [generate(model, [p], temperature=t, row_seeds=[s], **kwargs)
             for p, t, s in zip(prompts, temperatures, [1, 2, 3, 4], strict=True)]  # fmt: skip
    assert together.tokens == [a.tokens[0] for a in alone]
    for row, a in zip(together.logprobs, alone, strict=True):
        assert row == pytest.approx(a.logprobs[0], abs=1e-5)
    same = generate(model, prompts, temperature=[0.8] * 4, seed=5, **kwargs).tokens
    assert same == generate(model, prompts, temperature=0.8, seed=5, **kwargs).tokens
    with pytest.raises(ValueError, match="temperatures, one a prompt"):
        generate(model, prompts, temperature=[0.0, 1.0, 1.0, 1.0], seed=1, **kwargs)
    with pytest.raises(ValueError, match="temperatures, one a prompt"):
        generate(model, prompts, temperature=[1.0, 1.0], seed=1, **kwargs)


def test_generation_says_which_sequences_ended_with_eos():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, multiple_of=16,
                                  max_seq_len=64)).eval()
    out = generate(model, [[1, 5]] * 8, max_new_tokens=6, temperature=1.0, top_p=1.0, eos_id=3, seed=0)
    assert out.finished == [3 in seq for seq in generate(model, [[1, 5]] * 8, max_new_tokens=6, temperature=1.0,
                                                         top_p=1.0, eos_id=None, seed=0).tokens[:8]]
    assert any(out.finished)
    assert not all(out.finished)
    assert all(len(t) < 6 for t, done in zip(out.tokens, out.finished, strict=True) if done)


def test_untruncated_sampling_draws_the_softmax_and_gives_its_log_probs():
    """Top-p 1 without top-k: the unnormalised inverse CDF (`_sample_untruncated`) draws softmax(logits / T),
    from one generator or from one stream a row, and the log-probs are log_softmax's."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.2, 0.0, -3.0, 0.7]])
    n = 200_000
    for temperature, generator in ((1.0, torch.Generator().manual_seed(0)), (0.7, RowGenerators(range(n)))):
        tokens, logprobs = sample_next_token(logits.repeat(n, 1), temperature=temperature, top_p=1.0, top_k=None,
                                             generator=generator)
        expected = torch.softmax(logits[0] / temperature, dim=-1)
        torch.testing.assert_close(torch.bincount(tokens, minlength=7) / n, expected, atol=4e-3, rtol=0)
        torch.testing.assert_close(logprobs, torch.log_softmax(logits[0] / temperature, dim=-1)[tokens])
