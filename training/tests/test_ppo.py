import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.engine import load_train_state, setup_distributed
from training.llama.checkpoint import load_checkpoint
from training.llama.tokenizer import Tokenizer
from training.ppo import (
    POLICY_DIR,
    TRAIN_STATE_FILE,
    PPOConfig,
    gae,
    main,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    rollout_tensors,
    train_ppo,
    value_loss,
)
from training.prompts import PromptRecord, write_prompts

REPO = Path(__file__).resolve().parents[2]
E_FN = "training.tests.reward_functions:share_of_letter_e"
STORY_STARTS = ["Once upon a time", "The little dog", "Lily was", "One day", "Tom and Sam", "The sun", "A big bird",
                "Mom said", "In the park", "The cat"]


@pytest.fixture(scope="module")
def story_prompts(tmp_path_factory) -> Path:
    return write_prompts([PromptRecord.of(p) for p in STORY_STARTS * 2], tmp_path_factory.mktemp("ppo") / "p.jsonl")


def _config(tmp_path, tiny_policy, stories_tokenizer, prompts, **overrides) -> PPOConfig:
    values = dict(policy=str(tiny_policy), tokenizer=str(stories_tokenizer), prompts=str(prompts),
                  out_dir=str(tmp_path / "ppo"), reward_fn=E_FN, prompt_format="plain", iterations=30, batch_size=16,
                  minibatch_size=4, max_new_tokens=16, kl_coef=0.01, learning_rate=1e-3, eval_every=0,
                  num_threads=1)
    values.update(overrides)
    return PPOConfig(**values)


# ------------------------------------------------------------------------------------- hand-computed maths


def test_per_token_rewards_put_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    got = per_token_rewards(torch.tensor([2.0, -1.0]), torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]]),
                            torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -2.0, 0.0]]),
                            torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]), kl_coef=0.1)
    torch.testing.assert_close(got, torch.tensor([[-0.05, 0.0, 2.1], [0.0, -1.1, 0.0]]))


def test_gae_against_hand_computed_values():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the second response has two tokens
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(advantages, torch.tensor([[5.22875, 3.925, 1.5], [2.45, 1.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[5.72875, 4.925, 3.0], [2.95, 2.0, 0.0]]))


def test_whitening_and_the_clipped_losses_against_hand_computed_values():
    dist = setup_distributed("cpu")
    x, mask = torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]])  # mean 2, std 1 over the mask
    torch.testing.assert_close(masked_whiten(x, mask, dist), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.9, 1.0]]))  # ratios 1.5 (clipped to 1.2), 0.9, 1.0
    adv = torch.tensor([[1.0, -2.0, 5.0]])
    loss, clipped = policy_loss(new, old, adv, mask, 0.2)
    # token 0: max(-1 * 1.5, -1 * 1.2) = -1.2; token 1: max(2 * 0.9, 2 * 0.9) = 1.8; token 2 masked
    assert float(loss) == pytest.approx(-1.2 + 1.8)
    assert float(clipped) == 1.0
    v = value_loss(torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[0.5, 2.0, 0.0]]),
                   mask, 0.2)
    # token 0: max((1 - 0.5)^2, (0.2 - 0.5)^2) / 2 = 0.125; token 1: max(4, 4) / 2 = 2
    assert float(v) == pytest.approx(2.125)


def test_rollout_rows_put_each_response_after_its_prompt():
    tokens, positions, mask = rollout_tensors([[1, 5, 6], [1, 7]], [[8, 9, 2], [4]], torch.device("cpu"))
    assert tokens.tolist() == [[1, 5, 6, 8, 9, 2], [1, 7, 4, 0, 0, 0]]
    assert positions.tolist() == [[2, 3, 4], [1, 1, 1]]  # the hidden states that predict each response token
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ------------------------------------------------------------------------------------------- behaviour


def test_ppo_raises_a_known_reward_while_the_kl_stays_bounded(tmp_path, tiny_policy, stories_tokenizer, story_prompts):
    result = train_ppo(_config(tmp_path, tiny_policy, stories_tokenizer, story_prompts))
    rewards = [h["reward_mean"] for h in result.history]
    assert len(rewards) == 30
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.25
    assert max(h["kl_k3"] for h in result.history) < 5.0
    for key in ("iteration", "reward_mean", "kl", "entropy", "clip_fraction", "value_loss", "response_length"):
        assert key in result.history[0]
    assert (Path(result.policy_dir) / "params.json").is_file()


def _next_token_kl(a, b, prompts: list[list[int]]) -> float:
    """Mean KL(a || b) of the next-token distributions after each prefix of the prompts."""
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            pa, pb = F.log_softmax(a(x).float(), -1), F.log_softmax(b(x).float(), -1)
            total += float((pa.exp() * (pa - pb)).sum(-1).sum())
            n += len(ids)
    return total / n


def test_a_huge_kl_coefficient_keeps_the_policy_at_the_reference(tmp_path, tiny_policy, stories_tokenizer, story_prompts):
    free = train_ppo(_config(tmp_path / "free", tiny_policy, stories_tokenizer, story_prompts, iterations=15))
    held = train_ppo(_config(tmp_path / "held", tiny_policy, stories_tokenizer, story_prompts, iterations=15,
                             kl_coef=100.0))
    reference, _ = load_checkpoint(tiny_policy)
    tokenizer = Tokenizer(stories_tokenizer)
    prompts = [tokenizer.encode(p + " there was a cat", bos=True, eos=False) for p in STORY_STARTS]
    kl_free = _next_token_kl(load_checkpoint(free.policy_dir)[0], reference, prompts)
    kl_held = _next_token_kl(load_checkpoint(held.policy_dir)[0], reference, prompts)
    assert kl_held < kl_free / 5
    assert kl_held < 0.01


def test_one_gradient_step_per_minibatch(tmp_path, tiny_policy, stories_tokenizer, story_prompts):
    config = _config(tmp_path, tiny_policy, stories_tokenizer, story_prompts, iterations=3, stop_after_iterations=1,
                     batch_size=16, minibatch_size=4)
    train_ppo(config)
    state = load_train_state(Path(config.out_dir) / TRAIN_STATE_FILE)
    assert (state["iteration"], state["step"]) == (1, 16 // 4)
    assert state["optimizer"]["state"][0]["step"] == 4  # AdamW stepped four times


@pytest.mark.parametrize(("every", "minutes", "written_after"),
                         [(0, None, []), (0, 0.0, []), (2, None, [2]), (0, 1e-9, [1, 2, 3])])
def test_checkpoints_come_every_n_iterations_or_once_the_minutes_have_passed(
        tmp_path, tiny_policy, stories_tokenizer, story_prompts, every, minutes, written_after):
    state_file = tmp_path / "ppo" / TRAIN_STATE_FILE
    seen = []

    def on_iteration(record):  # the checkpoint of iteration i is written after its record, so look at i - 1's
        if state_file.exists():
            seen.append(load_train_state(state_file)["iteration"])

    train_ppo(_config(tmp_path, tiny_policy, stories_tokenizer, story_prompts, iterations=4, max_new_tokens=4,
                      checkpoint_every=every, checkpoint_minutes=minutes), on_iteration=on_iteration)
    assert sorted(set(seen)) == written_after  # the last iteration writes none: the run ends there


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_not_loaded(tmp_path, tiny_policy, stories_tokenizer,
                                                                 story_prompts):
    marker = tmp_path / "ran"
    (tmp_path / "ppo").mkdir()
    torch.save({"model": {}, "step": _RunsCode(marker)}, tmp_path / "ppo" / TRAIN_STATE_FILE)
    with pytest.raises(ValueError, match=r"could run code\): .*Unsupported global"):
        train_ppo(_config(tmp_path, tiny_policy, stories_tokenizer, story_prompts, iterations=1))
    assert not marker.exists()


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, tiny_policy, stories_tokenizer, story_prompts):
    common = dict(iterations=4, eval_every=2, early_stopping_patience=None)
    full = train_ppo(_config(tmp_path / "full", tiny_policy, stories_tokenizer, story_prompts, **common))
    cut = train_ppo(_config(tmp_path / "cut", tiny_policy, stories_tokenizer, story_prompts, stop_after_iterations=1,
                            **common))
    assert (cut.stopped, cut.iterations) == ("stop_after_iterations", 1)
    resumed = train_ppo(_config(tmp_path / "cut", tiny_policy, stories_tokenizer, story_prompts, **common))
    assert resumed.iterations == 4
    assert [h["reward_mean"] for h in resumed.history] == [h["reward_mean"] for h in full.history]
    a, b = load_checkpoint(full.policy_dir)[0].state_dict(), load_checkpoint(resumed.policy_dir)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_9_and_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, tiny_policy, stories_tokenizer,
                                                                        story_prompts):
    """The optimizer, the value model, the RNG and the iteration come back: the final weights are bitwise equal."""
    args = ["--policy", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--prompts", str(story_prompts),
            "--reward-fn", E_FN, "--prompt-format", "plain", "--iterations", "40", "--batch-size", "8",
            "--minibatch-size", "4", "--max-new-tokens", "8", "--learning-rate", "1e-3", "--eval-every", "0",
            "--threads", "1", "--checkpoint-every", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "training.ppo", *args, "--out", str(killed)], cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines = []
    while len(lines) < 3 and proc.poll() is None:  # after a few iterations' JSON lines
        lines.append(proc.stdout.readline())
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert json.loads(lines[0])["iteration"] == 1
    state = load_train_state(killed / TRAIN_STATE_FILE)
    assert 0 < state["iteration"] < 40
    assert main([*args, "--out", str(killed)]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    a = load_checkpoint(killed / POLICY_DIR)[0].state_dict()
    b = load_checkpoint(tmp_path / "whole" / POLICY_DIR)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distributed_two_processes_match_one(tmp_path, tiny_policy, stories_tokenizer, story_prompts):
    args = ["--policy", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--prompts", str(story_prompts),
            "--reward-fn", E_FN, "--prompt-format", "plain", "--iterations", "2", "--batch-size", "8",
            "--minibatch-size", "4", "--max-new-tokens", "8", "--learning-rate", "1e-3",
            "--eval-every", "0", "--threads", "1"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "training.ppo", *args, "--out", str(tmp_path / "ddp")], cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one = load_checkpoint(tmp_path / "one" / POLICY_DIR)[0].state_dict()
    ddp = load_checkpoint(tmp_path / "ddp" / POLICY_DIR)[0].state_dict()
    start = load_checkpoint(tiny_policy)[0].state_dict()
    for name in one:
        assert not torch.equal(one[name], start[name]), name
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-4, atol=1e-5)
    lines = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    one_report = json.loads((tmp_path / "one" / "ppo_report.json").read_text())
    assert [x["reward_mean"] for x in lines[:2]] == pytest.approx([h["reward_mean"] for h in one_report["history"]])


def test_fsdp_two_processes_match_one_with_early_stopping_on_held_out_prompts(tmp_path, tiny_policy, stories_tokenizer,
                                                                             story_prompts):
    """FSDP2 shards policy and value over two processes; sampling gathers the full weights once (rollouts and the
    held-out evaluation), the best policy is gathered for saving: the same run as one process."""
    args = ["--policy", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--prompts", str(story_prompts),
            "--reward-fn", E_FN, "--prompt-format", "plain", "--iterations", "3", "--batch-size", "8",
            "--minibatch-size", "4", "--max-new-tokens", "8", "--learning-rate", "1e-3", "--eval-every", "1",
            "--eval-fraction", "0.2", "--threads", "1"]  # fmt: skip
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "training.ppo", *args, "--fsdp", "--out", str(tmp_path / "fsdp")], cwd=REPO,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one_report = json.loads((tmp_path / "one" / "ppo_report.json").read_text())
    fsdp_report = json.loads((tmp_path / "fsdp" / "ppo_report.json").read_text())
    assert fsdp_report["config"]["sharding"] == "fsdp"
    assert [h["reward_mean"] for h in fsdp_report["history"]] == pytest.approx([h["reward_mean"] for h in one_report["history"]])
    assert [h["eval_reward_mean"] for h in fsdp_report["history"]] == pytest.approx(
        [h["eval_reward_mean"] for h in one_report["history"]])  # fmt: skip
    assert fsdp_report["best_iteration"] == one_report["best_iteration"]
    one = load_checkpoint(tmp_path / "one" / POLICY_DIR)[0].state_dict()
    fsdp = load_checkpoint(tmp_path / "fsdp" / POLICY_DIR)[0].state_dict()
    for name in one:
        torch.testing.assert_close(fsdp[name], one[name], rtol=1e-4, atol=1e-5)


def test_bad_settings_are_clear_errors(tmp_path, tiny_policy, stories_tokenizer, story_prompts, capsys):
    with pytest.raises(ValueError, match="not a multiple of the minibatch"):
        train_ppo(_config(tmp_path, tiny_policy, stories_tokenizer, story_prompts, batch_size=10, minibatch_size=4))
    args = ["--policy", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--prompts", str(story_prompts),
            "--out", str(tmp_path / "x")]
    assert main(args) == 2
    assert "--reward-fn" in capsys.readouterr().err


def test_early_stopping_keeps_the_best_policy_on_the_held_out_prompts(tmp_path, tiny_policy, stories_tokenizer,
                                                                      story_prompts):
    common = dict(kl_coef=0.0, learning_rate=3e-3, eval_fraction=0.1)
    result = train_ppo(_config(tmp_path / "es", tiny_policy, stories_tokenizer, story_prompts, iterations=12,
                               eval_every=1, early_stopping_patience=2, **common))
    evaluated = [h["eval_reward_mean"] for h in result.history]
    assert result.best_eval_reward == max(evaluated)
    assert result.best_iteration == 1 + evaluated.index(max(evaluated))
    if result.stopped == "early_stopping":
        assert result.iterations < 12
        assert evaluated[-2:] < [result.best_eval_reward] * 2
    # the saved policy is the best iteration's: a run of exactly that many iterations ends with the same weights
    # (the same held-out prompts; evaluated only at its end, so it saves its last weights)
    plain = train_ppo(_config(tmp_path / "plain", tiny_policy, stories_tokenizer, story_prompts,
                              iterations=result.best_iteration, eval_every=1000, **common))
    a = load_checkpoint(result.policy_dir)[0].state_dict()
    b = load_checkpoint(plain.policy_dir)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_answer_without_eos_can_be_penalised(tmp_path, tiny_policy, stories_tokenizer, story_prompts):
    # 4 tokens: most answers do not end (EOS is 1 token in 512 for this random policy)
    kwargs = dict(iterations=1, max_new_tokens=4, eval_every=0)
    plain = train_ppo(_config(tmp_path / "a", tiny_policy, stories_tokenizer, story_prompts, **kwargs))
    penalised = train_ppo(_config(tmp_path / "b", tiny_policy, stories_tokenizer, story_prompts,
                                  missing_eos_penalty=5.0, **kwargs))
    unfinished = 1.0 - plain.history[0]["finished_rate"]
    assert unfinished > 0.5
    assert penalised.history[0]["reward_mean"] == pytest.approx(plain.history[0]["reward_mean"] - 5.0 * unfinished)


def test_the_missing_eos_penalty_falls_on_unfinished_answers_only(tmp_path, tiny_policy, stories_tokenizer,
                                                                  story_prompts):
    from training.ppo import _PPORun
    from training.reward_sources import reward_source

    scores = {}
    for penalty in (None, 5.0):
        config = _config(tmp_path / str(penalty), tiny_policy, stories_tokenizer, story_prompts,
                         missing_eos_penalty=penalty)
        dist = setup_distributed("cpu")
        run = _PPORun(config, dist, reward_source(reward_fn=config.reward_fn, device=dist.device))
        eos = run.tokenizer.eos_id
        _, raw = run.score([0, 1, 2], [[5, 6, eos], [5, 6, 7], [9, eos]], [True, False, True])
        scores[penalty] = raw
    torch.testing.assert_close(scores[5.0] - scores[None], torch.tensor([0.0, -5.0, 0.0]))


def test_a_failure_on_one_process_ends_the_run_instead_of_hanging(tmp_path, tiny_policy, stories_tokenizer,
                                                                  story_prompts):
    """Rank 0 alone evaluates the held-out prompts; when that fails, the job must stop, not wait for it forever."""
    args = ["--policy", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--prompts", str(story_prompts),
            "--reward-fn", "training.tests.reward_functions:fails_on_small_batches", "--prompt-format", "plain",
            "--iterations", "4", "--batch-size", "8", "--minibatch-size", "8", "--max-new-tokens", "8",
            "--eval-every", "1", "--eval-fraction", "0.1", "--threads", "1", "--out", str(tmp_path / "x")]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "training.ppo", *args], cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=240)
    assert run.returncode != 0
    assert "this judge needs at least 4 answers" in run.stderr
