import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewards.evaluate import main as evaluate_main
from rewards.model import load_reward_model
from rewards.train import (
    TRAIN_STATE_FILE,
    cosine_schedule,
    main,
    train_reward_model,
    warmup_steps_for,
)
from training.engine import load_train_state
from training.llama.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _weights(out_dir: str | Path) -> dict[str, torch.Tensor]:
    model, _ = load_reward_model(Path(out_dir) / "model")
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_schedule_warms_up_then_decays_to_ten_percent():
    assert warmup_steps_for(100, 0.03, 5) == 5  # 3% of 100 is 3: at least 5
    assert warmup_steps_for(1000, 0.03, 5) == 30
    assert warmup_steps_for(3, 0.03, 5) == 3  # never longer than the run
    factors = [cosine_schedule(s, total_steps=100, warmup_steps=5, min_lr_ratio=0.1) for s in range(101)]
    assert factors[0] == pytest.approx(0.2)
    assert factors[4] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))


def test_learns_clearly_separable_pairs(train_config):
    result = train_reward_model(train_config(epochs=4))
    assert result.stopped == "completed"
    assert result.steps == result.total_steps == 4 * (192 // 8)
    assert result.test_report["accuracy"] >= 0.95
    assert result.history[-1]["loss"] < 0.3
    assert json.loads((Path(result.out_dir) / "eval_report.json").read_text())["n_pairs"] == 64


def test_one_step_changes_every_trained_parameter(train_config, tiny_checkpoint):
    result = train_reward_model(train_config(max_steps=1))
    before, _ = load_checkpoint(tiny_checkpoint)
    after = _weights(result.out_dir)
    for name, value in before.state_dict().items():
        if name == "output.weight":  # the vocabulary head is frozen in a reward model
            torch.testing.assert_close(after[f"transformer.{name}"], value)
        else:
            assert not torch.equal(after[f"transformer.{name}"], value), name


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(train_config, tmp_path):
    common = dict(max_steps=7, checkpoint_every=2, token_dropout=0.1, margin="large", ema_decay=0.9,
                  validation_fraction=0.1, eval_every=2)
    full = train_reward_model(train_config(out_dir=str(tmp_path / "full"), **common))
    first = train_reward_model(train_config(out_dir=str(tmp_path / "cut"), stop_after_steps=3, **common))
    assert first.stopped == "stop_after_steps"
    assert first.steps == 3
    state = load_train_state(tmp_path / "cut" / TRAIN_STATE_FILE)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (3, 0, 3)
    assert {"model", "optimizer", "scheduler", "rng"} <= set(state)
    resumed = train_reward_model(train_config(out_dir=str(tmp_path / "cut"), **common))
    assert resumed.steps == full.steps == 7
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    expected, got = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert not [p for p in (tmp_path / "cut").iterdir() if ".tmp-" in p.name]


def test_a_foreign_checkpoint_is_refused(train_config, tmp_path):
    train_reward_model(train_config(out_dir=str(tmp_path / "a"), max_steps=4, stop_after_steps=1))
    with pytest.raises(ValueError, match="different run"):
        train_reward_model(train_config(out_dir=str(tmp_path / "a"), max_steps=6))


def test_time_budget_stops_with_a_checkpoint(train_config):
    seen = []
    result = train_reward_model(train_config(max_minutes=0.0), progress=seen.append)
    assert result.stopped == "max_minutes"
    assert result.steps == 1
    assert [p.step for p in seen] == [1]
    assert seen[0].total_steps == 24
    assert 0 < seen[0].learning_rate <= 3e-3
    assert (Path(result.out_dir) / TRAIN_STATE_FILE).is_file()
    assert (Path(result.out_dir) / "model" / "reward_model.json").is_file()


def test_validation_keeps_the_best_weights(train_config):
    result = train_reward_model(train_config(validation_fraction=0.2, eval_every=3, epochs=1, early_stopping_patience=2))
    evaluated = [h for h in result.history if "validation_accuracy" in h]
    assert evaluated
    assert result.best_validation_accuracy == max(h["validation_accuracy"] for h in evaluated)
    assert result.n_validation_pairs == round(0.2 * 192)
    saved, _ = load_reward_model(Path(result.out_dir) / "model")
    assert saved.args.dim == 32


def test_distributed_two_processes_match_one(tmp_path, tiny_checkpoint, stories_tokenizer, synthetic_file):
    args = ["--kind", "helpfulness", "--data", str(synthetic_file), "--format", "trl", "--init", str(tiny_checkpoint),
            "--tokenizer", str(stories_tokenizer), "--no-mix", "--test-fraction", "0.25", "--max-seq-len", "64",
            "--global-batch-size", "8", "--micro-batch-size", "2", "--learning-rate", "3e-3", "--max-steps", "4",
            "--threads", "1", "--quiet", "--margin", "small"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "rewards.train",
         *args, "--out", str(tmp_path / "ddp")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    single, ddp = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5)
    summary = json.loads(two.stdout[two.stdout.index("{"):])
    assert summary["steps"] == 4


def test_cli_trains_and_evaluate_prints_a_json_report(tmp_path, tiny_checkpoint, stories_tokenizer, synthetic_file, capsys):
    code = main(["--kind", "safety", "--data", str(synthetic_file), "--format", "trl", "--init", str(tiny_checkpoint),
                 "--tokenizer", str(stories_tokenizer), "--out", str(tmp_path / "cli"), "--max-seq-len", "64",
                 "--global-batch-size", "8", "--micro-batch-size", "8", "--max-steps", "2", "--threads", "1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["steps"], summary["stopped"]) == (2, "completed")
    assert evaluate_main(["--model", str(tmp_path / "cli"), "--data", str(synthetic_file), "--format", "trl",
                          "--split", "test", "--test-fraction", "0.25"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["n_pairs"] == 64
    assert report["kind"] == "safety"
    assert set(report["by_strength"]) == {"significantly_better", "better", "slightly_better", "negligibly_better"}


def test_cli_reports_bad_settings(tmp_path, synthetic_file, capsys):
    code = main(["--kind", "safety", "--data", str(synthetic_file), "--format", "trl", "--config", "tiny",
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "tokenizer" in capsys.readouterr().err


def test_rare_tokens_share_an_embedding_in_the_saved_model(train_config, synthetic_file):
    from rewards.evaluate import evaluate_reward_model_dir

    result = train_reward_model(train_config(min_token_count=50, max_steps=6))
    # the saved model reads raw token ids; its tied rows make it score exactly as the remapped training view
    report = evaluate_reward_model_dir(Path(result.out_dir) / "model", [synthetic_file], "trl", split="test",
                                       test_fraction=0.25)
    assert report["mean_margin"] == pytest.approx(result.test_report["mean_margin"], abs=1e-5)
    model, _ = load_reward_model(Path(result.out_dir) / "model")
    rows = model.transformer.tok_embeddings.weight
    tied = (rows == rows[3]).all(dim=1)
    assert 10 < int(tied.sum()) < 512


def test_language_model_pretraining_lowers_its_loss_and_refreezes_the_head(train_config):
    result = train_reward_model(train_config(lm_pretrain_epochs=3, max_steps=2, max_seq_len=32))
    first, *_, last = result.lm_pretrain_losses
    assert len(result.lm_pretrain_losses) == 3
    assert last < first
    model, _ = load_reward_model(Path(result.out_dir) / "model")
    assert not model.transformer.output.weight.requires_grad


def test_trains_on_plain_records_and_reports_by_batch(train_config):
    """The platform's path: pairs from the database selector, their batch's own held-out split."""
    import dataclasses

    from rewards.evaluate import evaluate_reward_model
    from rewards.synthetic import synthetic_pairs

    pairs = [dataclasses.replace(p, batch=f"batch-{i % 2}", split="test" if i % 5 == 0 else "train")
             for i, p in enumerate(synthetic_pairs(80, seed=3))]
    result = train_reward_model(train_config(data=[], max_steps=3), pairs=pairs)
    assert result.n_train_pairs == 64
    assert result.n_test_pairs == 16
    report = evaluate_reward_model(Path(result.out_dir), [p for p in pairs if p.split == "test"])
    assert set(report["by_batch"]) == {"batch-0", "batch-1"}
    assert report["by_batch"]["batch-0"]["n"] == 8
    assert report["accuracy"] == pytest.approx(result.test_report["accuracy"])


def test_soup_ingredients_share_the_initial_weights_and_differ_in_batch_order(train_config):
    from rewards.soup import ingredient_config

    config = train_config(config="tiny", init=None, seed=2, soup_size=4).resolved()
    ingredients = [ingredient_config(config, i, max_minutes=None) for i in range(4)]
    assert {c.init_seed for c in ingredients} == {2}
    assert len({c.seed for c in ingredients}) == 4
    assert len({c.out_dir for c in ingredients}) == 4
    assert all(c.soup_size == 1 for c in ingredients)


def test_a_soup_averages_its_ingredients(train_config):
    from rewards.soup import INGREDIENTS_DIR

    result = train_reward_model(train_config(soup_size=3, epochs=2))
    ingredients = [_weights(Path(result.out_dir) / INGREDIENTS_DIR / str(i)) for i in range(3)]
    soup = _weights(result.out_dir)
    name = "transformer.layers.0.attention.wq.weight"
    assert not torch.equal(ingredients[0][name], ingredients[1][name])  # another batch order each
    for key, value in soup.items():
        torch.testing.assert_close(value, sum(w[key] for w in ingredients) / 3)
    assert result.test_report["accuracy"] >= 0.95
    assert result.steps == 3 * 2 * (192 // 8)


def test_a_soup_leaves_out_ingredients_that_the_time_budget_stopped(train_config):
    with pytest.raises(ValueError, match="no ingredient of the soup finished"):
        train_reward_model(train_config(soup_size=3, max_minutes=1e-4))


def test_a_single_rare_token_is_tied_too():
    # one rare id made the shared row's view overlap the written rows (a RuntimeError before the copy)
    from rewards.model import RewardModel
    from rewards.train import tie_rare_embeddings
    from training.llama.model import ModelArgs

    model = RewardModel.from_args(ModelArgs(dim=8, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=16, multiple_of=8,
                                            max_seq_len=8))
    tie_rare_embeddings(model, [5], 3)
    rows = model.transformer.tok_embeddings.weight
    assert torch.equal(rows[5], rows[3])
    assert not torch.equal(rows[4], rows[3])


def test_context_turns_is_saved_with_the_model_and_used_to_evaluate_it(train_config, synthetic_file):
    from rewards.evaluate import evaluate_reward_model_dir
    from rewards.model import read_reward_model_info

    result = train_reward_model(train_config(context_turns=1, max_steps=3))
    assert read_reward_model_info(Path(result.out_dir) / "model").context_turns == 1
    report = evaluate_reward_model_dir(Path(result.out_dir) / "model", [synthetic_file], "trl", split="test",
                                       test_fraction=0.25)
    assert report["mean_margin"] == pytest.approx(result.test_report["mean_margin"], abs=1e-5)
    plain = train_reward_model(train_config(max_steps=3, out_dir=str(Path(result.out_dir).parent / "plain")))
    assert read_reward_model_info(Path(plain.out_dir) / "model").context_turns is None
