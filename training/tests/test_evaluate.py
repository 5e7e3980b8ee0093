import json
import math

import pytest
import torch

from training.evaluate import EvaluateConfig, evaluate_policy, main, win_tie_loss
from training.prompts import PromptRecord, read_prompts, write_prompts
from training.reward_sources import (
    RewardFunctionSource,
    RewardScores,
    combined_reward,
    load_reward_function,
    piecewise_reward,
    whiten,
)
from training.sft import SFTConfig, train_sft

CAT_FN = "training.tests.reward_functions:says_the_cat_sat"


def test_the_piecewise_reward_takes_safety_for_safety_prompts_and_below_0_15():
    # raw scores are logits: sigmoid(-2) = 0.119 < 0.15, sigmoid(-1) = 0.269, sigmoid(1) = 0.731
    scores = RewardScores(helpfulness=torch.tensor([2.0, 0.5, 3.0, -1.0]), safety=torch.tensor([-2.0, 1.0, -1.0, 1.0]))
    safety_prompt = torch.tensor([False, True, False, False])
    got = piecewise_reward(scores, safety_prompt)
    # row 0: R_s 0.119 < 0.15 -> safety; row 1: a safety prompt -> safety; rows 2-3: helpfulness
    torch.testing.assert_close(got, torch.tensor([-2.0, 1.0, 3.0, -1.0]), atol=1e-5, rtol=0)
    # the threshold is on the probability: just above it, helpfulness again
    above = RewardScores(helpfulness=torch.tensor([0.3]), safety=torch.tensor([math.log(0.16 / 0.84)]))
    torch.testing.assert_close(piecewise_reward(above, torch.tensor([False])), torch.tensor([0.3]))


def test_whitening_against_hand_computed_values_and_scores_taken_as_they_are():
    # a reward model's score (the logit of its probability) is R_c's logit as it is, even far from 0: no round trip
    # through a probability clamps a large rule-based reward
    scores = torch.tensor([-40.0, -3.0, 0.25, 12.0, 30.0])
    torch.testing.assert_close(piecewise_reward(RewardScores(helpfulness=scores), torch.zeros(5, dtype=torch.bool)),
                               scores)
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population variance 3.5
    torch.testing.assert_close(whiten(x), (x - 3.0) / math.sqrt(3.5))
    torch.testing.assert_close(whiten(x, shift_mean=False), (x - 3.0) / math.sqrt(3.5) + 3.0)


def test_combined_reward_whitens_the_piecewise_logits_and_can_subtract_the_spread():
    records = [PromptRecord.of("a"), PromptRecord.of("b", domain="safety"), PromptRecord.of("c")]
    scores = RewardScores(helpfulness=torch.tensor([1.0, 1.0, 2.0]), safety=torch.tensor([0.0, 3.0, 0.0]),
                          helpfulness_spread=torch.tensor([0.5, 0.5, 0.0]), safety_spread=torch.tensor([0.0, 1.0, 0.0]))
    raw = combined_reward(scores, records, whitened=False)
    torch.testing.assert_close(raw, torch.tensor([1.0, 3.0, 2.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(combined_reward(scores, records), whiten(torch.tensor([1.0, 3.0, 2.0])), atol=1e-5, rtol=0)
    penalised = combined_reward(scores, records, whitened=False, uncertainty_coef=2.0)
    # each row loses twice the spread of the model whose score it took: h, s, h
    torch.testing.assert_close(penalised, torch.tensor([0.0, 1.0, 2.0]), atol=1e-5, rtol=0)


def test_reward_functions_are_loaded_and_checked():
    source = RewardFunctionSource.load(CAT_FN)
    scores = source.score([PromptRecord.of("x")] * 2, ["The cat sat down.", "A dog."])
    assert scores.helpfulness.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="package.module:function"):
        load_reward_function("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_reward_function("no.such.module:f")
    with pytest.raises(ValueError, match="no function 'nope'"):
        load_reward_function("training.tests.reward_functions:nope")
    with pytest.raises(ValueError, match="returned 1 rewards for 2"):
        RewardFunctionSource.load("training.tests.reward_functions:wrong_length").score([PromptRecord.of("x")] * 2, ["a", "b"])
    with pytest.raises(ValueError, match="expected a finite number"):
        RewardFunctionSource.load("training.tests.reward_functions:not_a_number").score([PromptRecord.of("x")], ["a"])


def test_win_tie_loss_counts_pairs():
    got = win_tie_loss(torch.tensor([1.0, 0.0, 0.5, 2.0]), torch.tensor([0.0, 0.0, 1.0, 1.95]), tie_margin=0.1)
    assert got == {"win_rate": 0.25, "tie_rate": 0.5, "loss_rate": 0.25}


@pytest.fixture(scope="module")
def cat_policy(tmp_path_factory, tiny_policy, stories_tokenizer):
    """The tiny policy fine-tuned to answer every prompt with "The cat sat on the mat."."""
    prompts = ["Tell me a story.", "What happened next?", "Who came home?", "Say something."]
    data = write_prompts([PromptRecord.of(p).with_response("The cat sat on the mat.") for p in prompts],
                         tmp_path_factory.mktemp("cat") / "cat.jsonl")
    out = tmp_path_factory.mktemp("cat-sft")
    train_sft(SFTConfig(init=str(tiny_policy), tokenizer=str(stories_tokenizer), data=[str(data)], format="prompts",
                        prompt_format="plain", out_dir=str(out), seq_len=64, global_batch_rows=2, micro_batch_rows=2,
                        learning_rate=1e-2, schedule="constant", min_warmup_steps=1, epochs=None, max_steps=60,
                        checkpoint_every=0))
    return out / "policy"


@pytest.fixture
def eval_prompts(tmp_path):
    return write_prompts([PromptRecord.of(p) for p in ("Tell me a story.", "Who came home?", "Say something.")],
                         tmp_path / "eval.jsonl")


def test_a_policy_that_emits_the_rewarded_text_wins_against_one_that_never_does(
        tmp_path, cat_policy, tiny_policy, stories_tokenizer, eval_prompts):
    config = EvaluateConfig(policy=str(cat_policy), baseline=str(tiny_policy), prompts=str(eval_prompts),
                            tokenizer=str(stories_tokenizer), prompt_format="plain", samples_per_prompt=4,
                            max_new_tokens=16, samples_out=str(tmp_path / "samples.jsonl"))
    report = evaluate_policy(config, RewardFunctionSource.load(CAT_FN))
    assert report["n_samples"] == 12
    assert report["reward_mean"] >= 0.9
    assert report["baseline_reward_mean"] == 0.0
    assert report["win_rate"] >= 0.9
    assert report["loss_rate"] == 0.0
    samples = read_prompts(tmp_path / "samples.jsonl", require_response=True)  # a prompts file with answers
    assert len(samples) == 12
    assert sum(s.response.startswith("The cat sat") for s in samples) >= 11
    again = evaluate_policy(config, RewardFunctionSource.load(CAT_FN))
    assert again == report  # same seed, same prompts: the same figures
    reversed_ = evaluate_policy(EvaluateConfig(**{**config.__dict__, "policy": str(tiny_policy),
                                                  "baseline": str(cat_policy), "samples_out": None}),
                                RewardFunctionSource.load(CAT_FN))
    assert reversed_["loss_rate"] == report["win_rate"]


def test_the_cli_prints_one_json_object_and_refuses_bad_input(cat_policy, stories_tokenizer, eval_prompts, tmp_path,
                                                              capsys):
    args = ["--policy", str(cat_policy), "--tokenizer", str(stories_tokenizer), "--prompts", str(eval_prompts),
            "--prompt-format", "plain", "--max-new-tokens", "8"]
    assert main([*args, "--reward-fn", CAT_FN]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_prompts"] == 3
    assert report["safety_reward_mean"] is None
    assert main(args) == 2
    assert "--reward-fn" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"dialogue": [{"role": "assistant", "content": "hi"}]}\n')
    assert main([*args[:4], "--prompts", str(bad), "--reward-fn", CAT_FN]) == 2
    assert "bad.jsonl:2: dialogue" in capsys.readouterr().err


def test_reward_models_score_helpfulness_and_safety(tmp_path, cat_policy, stories_tokenizer, eval_prompts, policy_args,
                                                    capsys):
    from rewards.model import RewardModel, save_reward_model
    from rewards.scoring import RewardScorer

    dirs = {}
    for seed, kind in enumerate(("helpfulness", "safety")):
        torch.manual_seed(seed)
        dirs[kind] = save_reward_model(RewardModel.from_args(policy_args), tmp_path / kind, kind=kind,
                                       tokenizer_path=stories_tokenizer, max_seq_len=128)
    args = ["--policy", str(cat_policy), "--tokenizer", str(stories_tokenizer), "--prompts", str(eval_prompts),
            "--prompt-format", "plain", "--max-new-tokens", "8", "--samples-out", str(tmp_path / "s.jsonl")]
    assert main([*args, "--reward-model", str(dirs["helpfulness"]), "--safety-reward-model", str(dirs["safety"])]) == 0
    report = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    dialogues = [[{"role": "user", "content": line["prompt"]}] for line in lines]
    responses = [line["response"] for line in lines]
    for kind, key in (("helpfulness", "reward_mean"), ("safety", "safety_reward_mean")):
        expected = RewardScorer.load(dirs[kind]).score(dialogues, responses)
        assert report[key] == pytest.approx(float(expected.mean()), abs=1e-5)
        assert [line[f"{kind}_reward"] for line in lines] == pytest.approx(expected.tolist(), abs=1e-5)
    # the two kinds in the wrong slots are refused
    assert main([*args, "--reward-model", str(dirs["safety"])]) == 2
    assert "is a safety reward model" in capsys.readouterr().err
