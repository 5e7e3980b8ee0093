import json

import pytest
import torch

from rewards.model import RewardModel, lengths_from_attention_mask, load_reward_model, save_reward_model
from training.llama.checkpoint import save_hf_checkpoint
from training.llama.model import Transformer


@pytest.fixture
def model(tiny_args):
    torch.manual_seed(0)
    return RewardModel.from_args(tiny_args)


def test_score_is_read_at_the_last_real_token_whatever_the_padding(model):
    seq = torch.tensor([[1, 17, 42, 99, 2]])  # ends with EOS, as a rendered conversation does
    alone = model(seq, lengths=torch.tensor([5]))
    # pad with EOS (the pad = EOS trap) and with another id: the score must not move
    for pad in (2, 0, 300):
        padded = torch.cat([seq, torch.full((1, 6), pad)], dim=1)
        batch = torch.cat([padded, torch.randint(3, 500, (1, 11))])
        scores = model(batch, lengths=torch.tensor([5, 11]))
        torch.testing.assert_close(scores[0], alone[0])
    assert scores.shape == (2,)
    assert scores.dtype == torch.float32


def test_attention_mask_gives_the_same_scores_as_lengths(model):
    tokens = torch.randint(3, 500, (3, 9))
    lengths = torch.tensor([9, 4, 1])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
    torch.testing.assert_close(model(tokens, attention_mask=mask), model(tokens, lengths=lengths))
    torch.testing.assert_close(lengths_from_attention_mask(mask), lengths)


def test_bad_lengths_or_masks_are_errors(model):
    tokens = torch.randint(3, 500, (2, 6))
    with pytest.raises(ValueError, match="lengths or attention_mask"):
        model(tokens)
    with pytest.raises(ValueError, match="values in 1..6"):
        model(tokens, lengths=torch.tensor([7, 3]))
    with pytest.raises(ValueError, match="right-padded"):
        model(tokens, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))


def test_output_head_is_frozen_and_every_trained_parameter_gets_a_gradient(model):
    assert not model.transformer.output.weight.requires_grad
    scores = model(torch.randint(3, 500, (2, 7)), lengths=torch.tensor([7, 5]))
    scores.sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_init_from_a_checkpoint_in_either_format(tmp_path, tiny_args, fmt):
    torch.manual_seed(3)
    base = Transformer(tiny_args)
    path = tmp_path / fmt
    if fmt == "meta":
        from training.llama.checkpoint import save_meta_checkpoint

        save_meta_checkpoint(base, path)
    else:
        save_hf_checkpoint(base, path)
    model = RewardModel.from_pretrained(path)
    tokens = torch.randint(3, 500, (2, 8))
    torch.testing.assert_close(model.transformer.forward_hidden(tokens), base.forward_hidden(tokens))


def test_init_from_the_real_stories260k_checkpoint(shared_data):
    model = RewardModel.from_pretrained(shared_data / "stories260k" / "meta")
    assert model.args.n_kv_heads == 4
    assert model.args.dim == 64
    assert model(torch.tensor([[1, 400, 2]]), lengths=torch.tensor([3])).shape == (1,)


def test_save_and_load_round_trip(tmp_path, model, stories_tokenizer):
    out = save_reward_model(model, tmp_path / "rm", kind="safety", tokenizer_path=stories_tokenizer, max_seq_len=64,
                            metadata={"steps": 3})
    loaded, info = load_reward_model(out)
    tokens = torch.randint(3, 500, (3, 10))
    lengths = torch.tensor([10, 3, 7])
    torch.testing.assert_close(loaded(tokens, lengths=lengths), model(tokens, lengths=lengths))
    assert (info.kind, info.max_seq_len, info.metadata) == ("safety", 64, {"steps": 3})
    assert (out / "tokenizer.model").read_bytes() == stories_tokenizer.read_bytes()
    assert json.loads((out / "reward_model.json").read_text())["model_args"]["dim"] == 32
    # saving again replaces the directory whole and leaves no temporary files beside it
    save_reward_model(model, out, kind="safety", tokenizer_path=stories_tokenizer, max_seq_len=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]
    with pytest.raises(ValueError, match="kind"):
        save_reward_model(model, tmp_path / "x", kind="honesty", tokenizer_path=stories_tokenizer, max_seq_len=64)
