"""Reward-model ensembles: independently trained members saved as one directory, scored with their mean."""

import json
import os
from pathlib import Path

import pytest
import torch

from rewards.ensemble import MEMBERS_RUN_DIR, member_config
from rewards.evaluate import evaluate_reward_model_dir
from rewards.evaluate import main as evaluate_main
from rewards.model import (
    EnsembleRewardModel,
    RewardModel,
    load_reward_model,
    read_reward_model_info,
    save_reward_ensemble,
    save_reward_model,
)
from rewards.scoring import RewardScorer
from rewards.tests.test_scoring import DIALOGUES, RESPONSES
from rewards.train import main, train_reward_model


@pytest.fixture
def saved_member(tmp_path, tiny_args, stories_tokenizer):
    def make(seed: int, **kwargs):
        torch.manual_seed(seed)
        options = {"kind": "safety", "tokenizer_path": stories_tokenizer, "max_seq_len": 64, **kwargs}
        return save_reward_model(RewardModel.from_args(tiny_args), tmp_path / f"member-{seed}", **options)

    return make


def test_an_ensemble_directory_loads_back_with_its_members_weights(saved_member, tmp_path):
    members = [saved_member(seed) for seed in (0, 1, 2)]
    path = save_reward_ensemble(members, tmp_path / "ensemble", metadata={"note": "x"})
    model, info = load_reward_model(path)
    assert isinstance(model, EnsembleRewardModel)
    assert len(model.members) == 3
    assert info.members == ["members/0", "members/1", "members/2"]
    assert info.kind == "safety"
    assert info.max_seq_len == 64
    assert info.metadata == {"note": "x"}
    for member, member_dir in zip(model.members, members, strict=True):
        single, _ = load_reward_model(member_dir)
        for key, value in single.state_dict().items():
            assert torch.equal(member.state_dict()[key], value), key
    # a training output directory (model/ inside) resolves as for a single model
    save_reward_ensemble(members, tmp_path / "run" / "model")
    assert read_reward_model_info(tmp_path / "run").members == info.members


def test_the_ensemble_scores_with_the_mean_of_its_members(saved_member, tmp_path):
    members = [saved_member(seed) for seed in (0, 1, 2)]
    scorer = RewardScorer.load(save_reward_ensemble(members, tmp_path / "ensemble"))
    assert scorer.n_members == 3
    separately = torch.stack([RewardScorer.load(m).score(DIALOGUES, RESPONSES) for m in members])  # (3, n)
    assert not torch.allclose(separately[0], separately[1])
    torch.testing.assert_close(scorer.score(DIALOGUES, RESPONSES, batch_size=2), separately.mean(dim=0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scorer.score_ids_by_member(scorer.tokenize(DIALOGUES, RESPONSES)), separately,
                               rtol=1e-5, atol=1e-6)
    mean, std = scorer.score_with_spread(DIALOGUES, RESPONSES)
    torch.testing.assert_close(mean, separately.mean(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std, separately.std(dim=0, correction=0), rtol=1e-5, atol=1e-6)
    assert bool((std > 0).all())


def test_identical_members_have_no_spread(saved_member, tmp_path):
    member = saved_member(0)
    scorer = RewardScorer.load(save_reward_ensemble([member, member], tmp_path / "ensemble"))
    mean, std = scorer.score_with_spread(DIALOGUES, RESPONSES)
    assert torch.equal(std, torch.zeros(3))
    torch.testing.assert_close(mean, RewardScorer.load(member).score(DIALOGUES, RESPONSES), rtol=1e-5, atol=1e-6)
    single_mean, single_std = RewardScorer.load(member).score_with_spread(DIALOGUES, RESPONSES)
    assert torch.equal(single_std, torch.zeros(3))
    torch.testing.assert_close(single_mean, mean, rtol=1e-5, atol=1e-6)


def test_members_must_read_the_same_tokens(saved_member, tmp_path):
    with pytest.raises(ValueError, match="reading 64 tokens"):
        save_reward_ensemble([saved_member(0, max_seq_len=32), saved_member(1)], tmp_path / "e1")
    with pytest.raises(ValueError, match="context_turns"):
        save_reward_ensemble([saved_member(2), saved_member(3, context_turns=1)], tmp_path / "e2")
    with pytest.raises(ValueError, match="at least one member"):
        save_reward_ensemble([], tmp_path / "e3")
    ensemble = save_reward_ensemble([saved_member(4)], tmp_path / "e4")
    with pytest.raises(ValueError, match="not ensembles"):
        save_reward_ensemble([ensemble], tmp_path / "e5")


def test_members_differ_in_seed_and_initialisation(train_config):
    config = train_config(config="tiny", init=None, max_seq_len=None, seed=2, ensemble=4).resolved()
    members = [member_config(config, i, max_minutes=None) for i in range(4)]
    assert [c.seed for c in members] == [8, 9, 10, 11]
    assert {c.init_seed for c in members} == {None}  # the initial weights follow each member's own seed
    assert all(c.ensemble == 1 for c in members)
    assert len({c.out_dir for c in members}) == 4


def test_a_trained_ensemble_is_evaluated_as_the_mean_of_its_members(train_config, synthetic_file):
    result = train_reward_model(train_config(ensemble=3, max_steps=6))
    out = Path(result.out_dir)
    model, info = load_reward_model(out)
    assert isinstance(model, EnsembleRewardModel)
    assert len(info.members) == 3
    assert info.metadata["stopped"] == "completed"
    assert result.stopped == "completed"
    assert result.steps == 3 * 6
    report = result.test_report
    assert report["ensemble"]["size"] == 3
    heads = [m.score_head.weight for m in model.members]
    assert not torch.equal(heads[0], heads[1])  # each member its own initial head (and batch order)
    margins = []
    for i in range(3):
        member = json.loads((out / MEMBERS_RUN_DIR / str(i) / "eval_report.json").read_text())
        assert report["ensemble"]["members"][i]["accuracy"] == pytest.approx(member["accuracy"])
        margins.append(member["mean_margin"])
    assert report["mean_margin"] == pytest.approx(sum(margins) / 3, abs=1e-5)  # linear in the scores
    again = evaluate_reward_model_dir(out, [synthetic_file], "trl", split="test", test_fraction=0.25)
    assert again["accuracy"] == pytest.approx(report["accuracy"])


class _Stop(Exception):
    pass


def test_a_stopped_ensemble_resumes_without_retraining_its_finished_members(train_config):
    starts = []

    def crash_in_the_second_member(p):
        if p.step == 1:
            starts.append(p)
            if len(starts) == 2:
                raise _Stop

    config = train_config(ensemble=3, max_steps=4)
    with pytest.raises(_Stop):
        train_reward_model(config, progress=crash_in_the_second_member)
    first = Path(config.out_dir) / MEMBERS_RUN_DIR / "0" / "model" / "reward_model.json"
    stamp = os.stat(first).st_ino, os.stat(first).st_mtime_ns
    trained = []
    result = train_reward_model(config, progress=lambda p: trained.append(p.step))
    assert (os.stat(first).st_ino, os.stat(first).st_mtime_ns) == stamp  # member 0 was not saved again
    assert trained == [1, 2, 3, 4] * 2  # members 1 and 2 only
    assert result.stopped == "completed"
    assert len(read_reward_model_info(Path(config.out_dir) / "model").members) == 3
    # nothing is left to train: the ensemble is only saved and evaluated again
    assert train_reward_model(config).steps == 0


def test_each_member_gets_a_fair_share_of_the_time_left(train_config, monkeypatch):
    import rewards.train

    budgets = []
    real = rewards.train.train_reward_model

    def spy(config, **kwargs):
        budgets.append(config.max_minutes)
        return real(config, **kwargs)

    monkeypatch.setattr(rewards.train, "train_reward_model", spy)
    real(train_config(ensemble=4, max_steps=2, max_minutes=8.0))
    # what is left over the members still to train: 8 / 4, then (8 - the seconds spent) / 3, ...
    assert budgets == pytest.approx([8 / 4, 8 / 3, 8 / 2, 8 / 1], abs=0.05)


def test_a_budget_too_small_for_any_member_is_an_error(train_config):
    with pytest.raises(ValueError, match="no member of the ensemble finished"):
        train_reward_model(train_config(ensemble=2, max_minutes=1e-4))


def test_cli_trains_and_evaluates_an_ensemble(tmp_path, tiny_checkpoint, stories_tokenizer, synthetic_file, capsys):
    out = tmp_path / "cli"
    code = main([
        "--kind", "helpfulness", "--data", str(synthetic_file), "--format", "trl", "--init", str(tiny_checkpoint),
        "--tokenizer", str(stories_tokenizer), "--out", str(out), "--no-mix", "--test-fraction", "0.25",
        "--max-seq-len", "64", "--global-batch-size", "8", "--micro-batch-size", "8", "--learning-rate", "3e-3",
        "--max-steps", "5", "--ensemble", "2", "--threads", "1",
    ])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    # a progress bar for each member, each to its own 5 steps (not one bar running to 10 of 5)
    assert "part 1/2" in captured.err
    assert "part 2/2" in captured.err
    assert "5/5" in captured.err
    assert "10/5" not in captured.err
    assert summary["steps"] == 10
    assert summary["test_report"]["ensemble"]["size"] == 2
    assert evaluate_main(["--model", str(out), "--data", str(synthetic_file), "--format", "trl", "--split", "test",
                          "--test-fraction", "0.25"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(summary["test_report"]["accuracy"])
    assert len(report["ensemble"]["members"]) == 2
    assert RewardScorer.load(out).n_members == 2


@pytest.mark.django_db
def test_the_platform_registers_an_ensemble(shared_data, settings, tmp_path):
    from django.core.management import call_command

    from annotation.models import RewardModelVersion
    from annotation.services.batches import batch_close
    from annotation.services.imports import ComparisonRecord, ResponseRecord, VoteRecord, comparisons_store
    from annotation.tests.factories import BatchFactory, PolicyFactory

    batch = BatchFactory(name="rm-ensemble", test_size=8)
    PolicyFactory(name="SFT")
    comparisons_store(batch=batch, records=[
        ComparisonRecord(
            turns=(("user", f"Tell me a short story about a cat number {i}."),),
            response_a=ResponseRecord(f"Once upon a time there was a cat called Tom {i}.", "SFT"),
            response_b=ResponseRecord("No.", "SFT"), domain="helpfulness",
            votes=(VoteRecord("ext:rater", "a" if i % 2 else "b", "better"),),
        )
        for i in range(40)
    ])  # fmt: skip
    batch_close(batch_id=batch.id)
    settings.ARTIFACTS_DIR = tmp_path
    call_command("train_reward_model", kind="helpfulness", batch=["rm-ensemble"], name="RM-ens", config="tiny",
                 tokenizer=str(shared_data / "stories260k/tokenizer.model"), max_steps=2, ensemble=2)
    version = RewardModelVersion.objects.get(name="RM-ens")
    assert version.metrics["ensemble"]["size"] == 2
    assert RewardScorer.load(version.checkpoint_uri).n_members == 2


def test_the_tiny_ensemble_recipe_is_sixteen_tiny_models_reading_the_last_user_turn(train_config):
    config = train_config(config="tiny-ensemble", init=None, max_seq_len=None, learning_rate=None, epochs=None,
                          global_batch_size=None, micro_batch_size=None).resolved()
    assert config.ensemble == 16
    assert config.context_turns == 1
    assert config.max_seq_len == 128
    assert config.learning_rate == pytest.approx(1e-3)
    assert config.soup_size == 1
    assert train_config(config="tiny-ensemble", init=None, ensemble=2).resolved().ensemble == 2  # the CLI overrides it


def test_progress_covers_the_whole_ensemble_not_each_member_anew(train_config):
    seen = []
    train_reward_model(train_config(ensemble=3, max_steps=4), progress=seen.append)
    assert [(p.part, p.step) for p in seen] == [(part, step) for part in range(3) for step in range(1, 5)]
    assert {p.parts for p in seen} == {3}
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions)
    assert fractions[3] == pytest.approx(1 / 3)  # the first member done: a third of the whole
    assert fractions[-1] == pytest.approx(1.0)


def test_progress_of_an_ensemble_of_soups_counts_every_ingredient_once(train_config):
    seen = []
    train_reward_model(train_config(ensemble=2, soup_size=2, max_steps=3), progress=seen.append)
    assert [(p.part, p.step) for p in seen] == [(part, step) for part in range(4) for step in range(1, 4)]
    assert {p.parts for p in seen} == {4}
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
