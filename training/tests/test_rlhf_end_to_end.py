"""RLHF working end to end on a real trained model: the reward model is learned, the judge is a hidden rule.

stories260K (../shared/data) writes story continuations; pairs of them are labelled by a rule of this test's own
(more letter "e" is better), a reward model initialised from the policy is trained on those pairs with
rewards.train, PPO optimises the policy against that reward model, and the rule's score on fresh samples, which
PPO never saw, rises over the starting policy's.
"""

from pathlib import Path

import pytest
import torch

from rewards.data import PreferencePair, write_trl_jsonl
from rewards.train import RewardTrainConfig, train_reward_model
from training.evaluate import EvaluateConfig, evaluate_policy
from training.llama.tokenizer import Tokenizer
from training.ppo import PPOConfig, train_ppo
from training.prompts import PromptRecord, write_prompts
from training.reward_sources import RewardFunctionSource
from training.sampling import SamplingSettings, load_policy, sample_answers

STARTS = ["Once upon a time", "The little dog", "Lily was", "One day", "Tom and Sam", "The sun", "A big bird",
          "Mom said", "In the park", "The cat", "Ben had a", "The girl", "Sue wanted", "It was a", "The boy"]


def hidden_rule(text: str) -> float:
    return text.count("e") / max(1, len(text)) * 10


@pytest.mark.slow
def test_ppo_against_a_learned_reward_model_raises_the_hidden_rule(tmp_path, shared_data):
    stories = shared_data / "stories260k"
    checkpoint, tokenizer_path = stories / "meta", stories / "tokenizer.model"
    torch.set_num_threads(1)
    records = [PromptRecord.of(p) for p in STARTS]
    settings = SamplingSettings(max_new_tokens=24, temperature=1.0, top_p=1.0, prompt_format="plain", batch_size=64)
    samples = sample_answers(load_policy(checkpoint), Tokenizer(tokenizer_path), records, settings,
                             samples_per_prompt=16, seed=1)
    by_prompt: dict[int, list[str]] = {}
    for s in samples:
        by_prompt.setdefault(s.prompt_index, []).append(s.response)
    pairs = []
    for i, responses in by_prompt.items():
        for a, b in zip(responses[0::2], responses[1::2], strict=True):
            if hidden_rule(a) != hidden_rule(b):
                chosen, rejected = (a, b) if hidden_rule(a) > hidden_rule(b) else (b, a)
                pairs.append(PreferencePair(dialogue=[{"role": "user", "content": STARTS[i]}], chosen=chosen,
                                            rejected=rejected))
    assert len(pairs) > 100
    rm = train_reward_model(RewardTrainConfig(
        kind="helpfulness", data=[str(write_trl_jsonl(pairs, tmp_path / "pairs.jsonl"))], format="trl",
        init=str(checkpoint), tokenizer=str(tokenizer_path), out_dir=str(tmp_path / "rm"), mix=False,
        test_fraction=0.2, max_seq_len=96, global_batch_size=16, micro_batch_size=16, learning_rate=3e-3, epochs=3,
    ))
    assert rm.test_report["accuracy"] > 0.6  # the reward model learned the rule, imperfectly

    prompts = write_prompts(records, tmp_path / "prompts.jsonl")
    ppo = train_ppo(PPOConfig(
        policy=str(checkpoint), tokenizer=str(tokenizer_path), prompts=str(prompts), out_dir=str(tmp_path / "ppo"),
        reward_model=str(tmp_path / "rm"), prompt_format="plain", iterations=25, batch_size=16, minibatch_size=4,
        max_new_tokens=24, kl_coef=0.05, learning_rate=3e-4, eval_every=0,
    ))
    assert ppo.value_init.startswith("reward model")

    judge = RewardFunctionSource(lambda _prompts, responses: [hidden_rule(r) for r in responses])
    report = evaluate_policy(EvaluateConfig(
        policy=ppo.policy_dir, baseline=str(checkpoint), prompts=str(prompts), tokenizer=str(tokenizer_path),
        prompt_format="plain", samples_per_prompt=8, max_new_tokens=24, temperature=1.0, top_p=1.0, seed=99,
    ), judge)
    assert report["reward_mean"] > report["baseline_reward_mean"] + 0.1
    assert report["win_rate"] > 0.55
    assert Path(ppo.policy_dir, "params.json").is_file()
