import pytest
import torch

from rewards.data import render_reply
from rewards.model import RewardModel, save_reward_model
from rewards.scoring import RewardModels, RewardScorer

DIALOGUES = [
    [{"role": "user", "content": "Tell me a story."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "What is a cat?"}],
]
RESPONSES = ["Once upon a time there was a little dog.", "Goodbye.", "A small animal that likes to play."]


@pytest.fixture
def saved(tmp_path, tiny_args, stories_tokenizer):
    def make(kind: str, seed: int):
        torch.manual_seed(seed)
        return save_reward_model(RewardModel.from_args(tiny_args), tmp_path / kind, kind=kind,
                                 tokenizer_path=stories_tokenizer, max_seq_len=64)

    return make


def test_score_matches_the_model_on_rendered_conversations_in_order(saved):
    scorer = RewardScorer.load(saved("helpfulness", 0))
    scores = scorer.score(DIALOGUES, RESPONSES, batch_size=2)
    assert scores.shape == (3,)
    for i, (dialogue, response) in enumerate(zip(DIALOGUES, RESPONSES, strict=True)):
        ids = render_reply(scorer.tokenizer, dialogue, response, 64)
        expected = scorer.model(torch.tensor([ids]), lengths=torch.tensor([len(ids)]))
        torch.testing.assert_close(scores[i], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scorer.score(DIALOGUES, RESPONSES, batch_size=1), scores, rtol=1e-5, atol=1e-5)


def test_helpfulness_and_safety_side_by_side(saved):
    models = RewardModels.load(saved("helpfulness", 0), saved("safety", 1))
    scores = models.score(DIALOGUES, RESPONSES)
    assert set(scores) == {"helpfulness", "safety"}
    assert not torch.allclose(scores["helpfulness"], scores["safety"])
    with pytest.raises(ValueError, match="safety slot holds a helpfulness"):
        RewardModels(models.helpfulness, models.helpfulness)


def test_mismatched_inputs_are_errors(saved):
    scorer = RewardScorer.load(saved("helpfulness", 0))
    with pytest.raises(ValueError, match="3 dialogues but 2 responses"):
        scorer.score(DIALOGUES, RESPONSES[:2])
    with pytest.raises(ValueError, match="end with a user turn"):
        scorer.score([[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]], ["c"])


def test_a_model_that_reads_the_last_user_turn_is_scored_so(tmp_path, tiny_args, stories_tokenizer):
    torch.manual_seed(0)
    path = save_reward_model(RewardModel.from_args(tiny_args), tmp_path / "m", kind="safety",
                             tokenizer_path=stories_tokenizer, max_seq_len=64, context_turns=1)
    scorer = RewardScorer.load(path)
    assert scorer.context_turns == 1
    scores = scorer.score(DIALOGUES, RESPONSES)
    ids = render_reply(scorer.tokenizer, DIALOGUES[1][-1:], RESPONSES[1], 64)
    torch.testing.assert_close(scores[1], scorer.model(torch.tensor([ids]), lengths=torch.tensor([len(ids)]))[0],
                               rtol=1e-5, atol=1e-5)
