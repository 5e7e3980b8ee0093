import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from training.evaluate import EvaluateConfig, evaluate_policy
from training.llama.checkpoint import detect_format, load_checkpoint
from training.prompts import PromptRecord, read_prompts, write_prompts
from training.rejection_sampling import (
    BEST_FILE,
    MARKER_FILE,
    REPORT_FILE,
    SAMPLES_FILE,
    RejectionSamplingConfig,
    expected_max_of_n,
    main,
    reward_curve,
    run_rejection_sampling,
)
from training.reward_sources import RewardFunctionSource, RewardScores
from training.stages import read_jsonl
from training.tests import reward_functions

REPO = Path(__file__).resolve().parents[2]
LENGTH_FN = "training.tests.reward_functions:response_length"
PROMPTS = ["Once upon a time", "One day, Tim", "Lily saw a", "The little girl"]


@pytest.fixture
def rs_prompts(tmp_path):
    return write_prompts([PromptRecord.of(p) for p in PROMPTS], tmp_path / "prompts.jsonl")


def _config(policy, tokenizer, prompts, out, **overrides) -> RejectionSamplingConfig:
    values = dict(policy=str(policy), tokenizer=str(tokenizer), prompts=str(prompts), out_dir=str(out), samples=4,
                  prompt_format="plain", max_new_tokens=12, batch_size=64, seq_len=64, global_batch_rows=2,
                  micro_batch_rows=2, epochs=None, max_steps=2, learning_rate=1e-3, checkpoint_every=0)
    values.update(overrides)
    return RejectionSamplingConfig(**values)


def _by_prompt(lines):
    out = defaultdict(list)
    for line in lines:
        out[line["prompt"]].append(line)
    return out


# ------------------------------------------------------------------------------------------------ Figure 7


def test_the_figure_7_curve_on_hand_computed_values():
    # prompt A: samples 3, 1, 2 (sorted 1, 2, 3); prompt B: 0, 0, 6
    # E[max of 2 of 3]: A (1*2 + 2*3) / 3 = 8/3; B (1*0 + 2*6) / 3 = 4
    curve = reward_curve([[3.0, 1.0, 2.0], [0.0, 0.0, 6.0]])
    assert [c["n"] for c in curve] == [1, 2, 3]
    assert [c["max_reward"] for c in curve] == pytest.approx([2.0, (8 / 3 + 4) / 2, (3 + 6) / 2])
    # medians of the first N in the order drawn: A 3, 2, 2; B 0, 0, 0
    assert [c["median_reward"] for c in curve] == pytest.approx([1.5, 1.0, 1.0])


def test_the_expected_max_is_the_mean_over_every_subset_and_rises_with_n():
    rewards = [0.3, -1.2, 2.5, 0.3, 1.1, -0.4, 0.9]
    for n in range(1, len(rewards) + 1):
        brute = statistics.fmean(max(s) for s in itertools.combinations(rewards, n))
        assert expected_max_of_n(rewards, n) == pytest.approx(brute)
    assert expected_max_of_n(rewards, 1) == pytest.approx(statistics.fmean(rewards))
    assert expected_max_of_n(rewards, len(rewards)) == max(rewards)
    values = [expected_max_of_n(rewards, n) for n in range(1, len(rewards) + 1)]
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError, match="within 1..7"):
        expected_max_of_n(rewards, 8)


def test_the_sft_options_reach_training_sft(tmp_path):
    from training.rejection_sampling import build_parser
    from training.stages import config_values, finetune_config

    args = build_parser().parse_args(["--policy", "p", "--prompts", "x.jsonl", "--samples", "2", "--out", "o",
                                      "--max-steps", "7", "--learning-rate", "3e-4", "--seq-len", "48", "--fsdp",
                                      "--global-batch-rows", "6", "--micro-batch-rows", "3", "--prompt-format", "plain"])
    config = RejectionSamplingConfig(**config_values(args))
    sft = finetune_config(config, init="p", data=tmp_path / "best.jsonl", out_dir=tmp_path)
    assert (sft.init, sft.data, sft.format, sft.out_dir) == ("p", [str(tmp_path / "best.jsonl")], "prompts", str(tmp_path))
    assert (sft.max_steps, sft.epochs, sft.learning_rate, sft.seq_len) == (7, None, 3e-4, 48)
    assert (sft.global_batch_rows, sft.micro_batch_rows, sft.prompt_format, sft.sharding) == (6, 3, "plain", "fsdp")


# ---------------------------------------------------------------------------------------------- selection


def test_keeps_the_argmax_per_prompt_and_the_pooled_best_never_decreases(tmp_path, tiny_policy, stories_tokenizer,
                                                                         rs_prompts):
    source = RewardFunctionSource.load(LENGTH_FN)
    policy, outs, pooled = tiny_policy, [], []
    for iteration in (1, 2, 3):
        out = tmp_path / f"it{iteration}"
        report = run_rejection_sampling(_config(policy, stories_tokenizer, rs_prompts, out, pool=[str(o) for o in outs],
                                                seed=iteration), source=source)
        assert report["iteration"] == iteration
        samples = read_jsonl(out / SAMPLES_FILE)
        best = {line["prompt"]: line for line in read_jsonl(out / BEST_FILE)}
        assert len(samples) == 4 * len(PROMPTS)
        assert set(best) == set(PROMPTS)
        # the rewards written are the function's
        assert [s["reward"] for s in samples] == pytest.approx(
            reward_functions.response_length([], [s["response"] for s in samples]), abs=1e-5)
        for prompt, lines in _by_prompt(samples).items():
            assert sorted(line["sample"] for line in lines) == [0, 1, 2, 3]
            top = max(lines, key=lambda line: line["reward"])
            previous = pooled[-1][prompt] if pooled else None
            if previous is None or top["reward"] > previous["reward"]:
                assert best[prompt]["response"] == top["response"]  # this iteration's argmax
                assert best[prompt]["iteration"] == iteration
            else:  # the earlier best stays
                assert best[prompt]["response"] == previous["response"]
                assert best[prompt]["iteration"] == previous["iteration"]
            assert best[prompt]["reward"] == max(line["reward"] for line in lines + ([previous] if previous else []))
            if previous is not None:
                assert best[prompt]["reward"] >= previous["reward"]
        assert report["pool"]["reward_mean"] == pytest.approx(statistics.fmean(b["reward"] for b in best.values()))
        assert report["iteration_best_reward_mean"] == pytest.approx(
            statistics.fmean(max(line["reward"] for line in lines) for lines in _by_prompt(samples).values()))
        # the new policy, in the layout of the one given, is the next iteration's policy
        assert detect_format(out / "policy") == "meta"
        assert report["sft"]["n_examples"] == len(PROMPTS)
        outs.append(out)
        pooled.append(best)
        policy = out / "policy"
    # the third iteration pooled the first two's kept answers, each once
    kept = {(b["prompt"], b["response"], b["iteration"]) for best in pooled[:2] for b in best.values()}
    assert report["pool"]["n_candidates"] == len(kept)
    assert report["pool"]["directories"] == [str(tmp_path / "it1"), str(tmp_path / "it2")]


def test_earlier_bests_are_scored_again_by_the_current_judge(tmp_path, tiny_policy, stories_tokenizer, rs_prompts):
    first = tmp_path / "long"
    run_rejection_sampling(_config(tiny_policy, stories_tokenizer, rs_prompts, first),
                           source=RewardFunctionSource.load(LENGTH_FN))
    second = tmp_path / "short"
    # the same policy and seed draw the same answers; under the opposite judge the shortest wins
    run_rejection_sampling(_config(tiny_policy, stories_tokenizer, rs_prompts, second, pool=[str(first)]),
                           source=RewardFunctionSource.load("training.tests.reward_functions:shortness"))
    earlier = {line["prompt"]: line for line in read_jsonl(first / BEST_FILE)}
    samples = _by_prompt(read_jsonl(second / SAMPLES_FILE))
    for line in read_jsonl(second / BEST_FILE):
        assert line["reward"] == pytest.approx(-len(line["response"]) / 10, abs=1e-5)  # written as the current judge scores it
        shortest = min([earlier[line["prompt"]]["response"], *(s["response"] for s in samples[line["prompt"]])], key=len)
        assert len(line["response"]) == len(shortest)


def test_the_uncertainty_coefficient_subtracts_the_spread(tmp_path, tiny_policy, stories_tokenizer, rs_prompts):
    class Ensemble:
        """Helpfulness = the length mod 20; spread = the same for odd values: with coef 2 odd values lose."""

        def score(self, records, responses):
            lengths = torch.tensor([float(len(r) % 20) for r in responses])
            return RewardScores(helpfulness=lengths, helpfulness_spread=lengths * (lengths % 2))

    run_rejection_sampling(_config(tiny_policy, stories_tokenizer, rs_prompts, tmp_path / "u", uncertainty_coef=2.0),
                           source=Ensemble())
    for line in read_jsonl(tmp_path / "u" / SAMPLES_FILE):
        n = len(line["response"]) % 20
        assert line["reward"] == pytest.approx(n - 2.0 * n * (n % 2), abs=1e-5)
        assert line["helpfulness_reward"] == n


def test_sft_on_the_best_samples_raises_the_rule_score(tmp_path, shared_data):
    """stories260K says "dog" in about one answer of ten; after one iteration on the best of 8 it says it more often
    on fresh samples (another seed)."""
    policy, tokenizer = shared_data / "stories260k" / "meta", shared_data / "stories260k" / "tokenizer.model"
    prompts = write_prompts([PromptRecord.of(p) for p in [*PROMPTS, "Mom said", "There was a big", "Sam and Anna",
                                                          "The sun was"]], tmp_path / "stories.jsonl")
    source = RewardFunctionSource.load("training.tests.reward_functions:mentions_a_dog")
    report = run_rejection_sampling(_config(policy, tokenizer, prompts, tmp_path / "rs", samples=8, max_new_tokens=32,
                                            global_batch_rows=4, micro_batch_rows=4, max_steps=20,
                                            schedule="constant", min_warmup_steps=1), source=source)
    assert report["iteration_best_reward_mean"] > report["sample_reward_mean"]
    assert report["figure7"][-1]["max_reward"] == pytest.approx(report["iteration_best_reward_mean"])

    def rule_score(checkpoint):
        return evaluate_policy(EvaluateConfig(policy=str(checkpoint), tokenizer=str(tokenizer), prompts=str(prompts),
                                              prompt_format="plain", samples_per_prompt=8, max_new_tokens=32,
                                              temperature=1.0, seed=99, batch_size=64), source)["reward_mean"]

    before, after = rule_score(policy), rule_score(report["policy_dir"])
    assert before < 0.2
    assert after > before + 0.15


# -------------------------------------------------------------------------------------------------- resume


def test_a_finished_sampling_stage_is_not_redone_and_sft_resumes(tmp_path, tiny_policy, stories_tokenizer, rs_prompts):
    calls = []

    def counting(prompts, responses):
        calls.append(len(responses))
        return reward_functions.response_length(prompts, responses)

    out = tmp_path / "rs"
    config = _config(tiny_policy, stories_tokenizer, rs_prompts, out, max_steps=4, stop_after_steps=2)
    stopped = run_rejection_sampling(config, source=RewardFunctionSource(counting))
    assert stopped["sft"]["stopped"] == "stop_after_steps"
    assert stopped["sft"]["steps"] == 2
    assert calls == [16]
    assert (out / MARKER_FILE).is_file()
    assert (out / "train_state.pt").is_file()
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind
    samples = (out / SAMPLES_FILE).read_bytes()

    config.stop_after_steps = None
    done = run_rejection_sampling(config, source=RewardFunctionSource(counting))
    assert calls == [16]  # nothing sampled or scored again
    assert done["sampling_resumed"] is True
    assert done["sft"]["stopped"] == "completed"
    assert done["sft"]["steps"] == 4
    assert (out / SAMPLES_FILE).read_bytes() == samples
    assert json.loads((out / REPORT_FILE).read_text())["sft"]["steps"] == 4

    # the same as an uninterrupted run
    straight = run_rejection_sampling(_config(tiny_policy, stories_tokenizer, rs_prompts, tmp_path / "straight",
                                              max_steps=4), source=RewardFunctionSource(counting))
    a, _ = load_checkpoint(done["policy_dir"])
    b, _ = load_checkpoint(straight["policy_dir"])
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, msg=name)

    # a finished run is returned as it is; other settings in the same directory are refused
    assert run_rejection_sampling(config, source=RewardFunctionSource(counting)) == done
    with pytest.raises(ValueError, match="other settings"):
        run_rejection_sampling(_config(tiny_policy, stories_tokenizer, rs_prompts, out, samples=3),
                               source=RewardFunctionSource(counting))


# ----------------------------------------------------------------------------------------------------- CLI


def test_the_cli_writes_its_outputs_and_refuses_bad_input(tmp_path, tiny_policy, stories_tokenizer, rs_prompts,
                                                          capsys):
    base = ["--policy", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--samples", "2",
            "--prompt-format", "plain", "--max-new-tokens", "8", "--max-steps", "1", "--global-batch-rows", "1",
            "--micro-batch-rows", "1", "--seq-len", "64", "--quiet"]
    assert main([*base, "--prompts", str(rs_prompts), "--reward-fn", LENGTH_FN, "--out", str(tmp_path / "ok")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n_samples"] == 8
    assert len(printed["figure7"]) == 2
    assert len(read_prompts(tmp_path / "ok" / BEST_FILE, require_response=True)) == len(PROMPTS)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "fine", "domain": "weather"}\n')
    assert main([*base, "--prompts", str(bad), "--reward-fn", LENGTH_FN, "--out", str(tmp_path / "bad")]) == 2
    assert "bad.jsonl:2: domain" in capsys.readouterr().err
    assert main([*base, "--prompts", str(rs_prompts), "--out", str(tmp_path / "none")]) == 2
    assert "--reward-fn" in capsys.readouterr().err
    assert main([*base, "--prompts", str(rs_prompts), "--reward-fn", LENGTH_FN, "--out", str(tmp_path / "p"),
                 "--pool", str(tmp_path)]) == 2
    assert "no best.jsonl" in capsys.readouterr().err
    assert main([*base, "--prompts", str(rs_prompts), "--reward-fn", "training.tests.reward_functions:nope",
                 "--out", str(tmp_path / "f")]) == 2
    assert "no function 'nope'" in capsys.readouterr().err
    assert math.isfinite(printed["timings"]["samples_per_s"])


def test_two_processes_sample_once_and_fine_tune_as_one(tmp_path, tiny_policy, stories_tokenizer, rs_prompts):
    args = ["--policy", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--prompts", str(rs_prompts),
            "--reward-fn", LENGTH_FN, "--samples", "3", "--prompt-format", "plain", "--max-new-tokens", "8",
            "--max-steps", "2", "--global-batch-rows", "2", "--micro-batch-rows", "1", "--seq-len", "32",
            "--learning-rate", "1e-2", "--threads", "1", "--quiet"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                          "training.rejection_sampling", *args, "--out", str(tmp_path / "ddp")],
                         cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout[two.stdout.index("{"):])["sft"]["steps"] == 2  # printed once
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert (tmp_path / "ddp" / BEST_FILE).read_text() == (tmp_path / "one" / BEST_FILE).read_text()
    one, _ = load_checkpoint(tmp_path / "one" / "policy")
    ddp, _ = load_checkpoint(tmp_path / "ddp" / "policy")
    for (name, x), y in zip(one.state_dict().items(), ddp.state_dict().values(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=name)
