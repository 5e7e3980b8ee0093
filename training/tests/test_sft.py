import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.engine import load_train_state
from training.llama.checkpoint import detect_format, load_checkpoint
from training.llama.tokenizer import Tokenizer
from training.prompts import PromptRecord, encode_answered, write_prompts
from training.sft import (
    POLICY_DIR,
    TRAIN_STATE_FILE,
    Example,
    SFTConfig,
    encode_example,
    last_answer_only,
    main,
    train_sft,
)

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path, tiny_policy, stories_tokenizer, data, **overrides) -> SFTConfig:
    values = dict(init=str(tiny_policy), tokenizer=str(stories_tokenizer), data=[str(data)], format="prompts",
                  prompt_format="plain", out_dir=str(tmp_path / "sft"), seq_len=64, global_batch_rows=2,
                  micro_batch_rows=1, learning_rate=1e-2, epochs=None, max_steps=4, checkpoint_every=0, num_threads=1)
    values.update(overrides)
    return SFTConfig(**values)


def _weights(path) -> dict[str, torch.Tensor]:
    model, _ = load_checkpoint(path)
    return model.state_dict()


def test_the_answer_loss_goes_to_zero_on_a_handful_of_dialogues(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file):
    result = train_sft(_config(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file, max_steps=80,
                               schedule="constant", min_warmup_steps=1))
    assert result.stopped == "completed"
    assert result.steps == 80
    assert result.n_examples == 6
    losses = [h["loss"] for h in result.history]
    assert losses[0] > 4.0  # a random model over 512 pieces: about ln 512 = 6.2
    assert losses[-1] < 0.1
    # the saved policy writes the learned answer after its prompt, greedily
    from training.llama.generation import generate

    tokenizer = Tokenizer(stories_tokenizer)
    model, _ = load_checkpoint(Path(result.policy_dir))
    prompt = tokenizer.encode("Tell me about the cat.", bos=True, eos=False)
    out = generate(model, [prompt], max_new_tokens=20, temperature=0.0, eos_id=tokenizer.eos_id)
    assert tokenizer.decode(out.tokens[0]).strip() == "The cat sat on the mat and purred."


def test_prompt_positions_get_no_gradient(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file):
    """The loss reaches the model only through answer positions: the hidden states of prompt tokens get zero
    gradient, those of answer tokens do not."""
    from training.engine import Engine, OptimizerSettings, setup_distributed
    from training.sft import _SFTRun, pack_rows, read_examples

    config = _config(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file, global_batch_rows=1)
    tokenizer = Tokenizer(stories_tokenizer)
    examples, _ = read_examples(config)
    rows, _ = pack_rows(tokenizer, examples, config, 64)
    model, _ = load_checkpoint(tiny_policy)
    grads = []

    def keep_gradient(_module, _inputs, out):
        out.register_hook(grads.append)

    model.norm.register_forward_hook(keep_gradient)
    engine = Engine(model, OptimizerSettings(learning_rate=1e-3), total_steps=1, dist=setup_distributed("cpu"))
    run = _SFTRun(config, rows, engine)
    row = run.global_batch()[0][0]
    run.train_step()
    grad = grads[0][0].abs().sum(-1)  # (seqlen,): the gradient at each position of the row
    has_target = rows.targets[row] != -100
    assert has_target.any()
    assert (~has_target).any()
    assert torch.all(grad[~has_target] == 0)
    assert torch.all(grad[has_target] > 0)


def test_the_mask_covers_answers_and_their_eos_only(stories_tokenizer):
    tokenizer = Tokenizer(stories_tokenizer)
    ids, mask = encode_answered(tokenizer, [{"role": "user", "content": "Once upon a time"}], " there was a cat.", "plain")
    head = tokenizer.encode("Once upon a time", bos=True, eos=False)
    assert ids[: len(head)] == head
    assert ids[-1] == tokenizer.eos_id
    assert not any(mask[: len(head)])
    assert all(mask[len(head):])
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]).strip() == "there was a cat."
    chat_ids, chat_mask = encode_answered(tokenizer, [{"role": "user", "content": "Hi"}], "Hello.", "chat")
    assert tokenizer.decode([i for i, m in zip(chat_ids, chat_mask, strict=True) if m]).strip() == "Hello."
    config = SFTConfig(init="x", data=["x"], loss_on="all")
    all_ids, all_mask = encode_example(tokenizer, Example(({"role": "user", "content": "Hi"},), "Hello."), config)
    assert all_mask == [False] + [True] * (len(all_ids) - 1)


def test_ghost_attention_keeps_the_loss_on_the_last_answer_only(stories_tokenizer):
    tokenizer = Tokenizer(stories_tokenizer)
    dialogue = ({"role": "system", "content": "Answer as a pirate."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Arr, hello."}, {"role": "user", "content": "Bye"})
    example = Example(dialogue, "Arr, farewell.")
    ids, plain_mask = encode_example(tokenizer, example, SFTConfig(init="x", data=["x"]))
    _, gatt_mask = encode_example(tokenizer, example, SFTConfig(init="x", data=["x"], ghost_attention=True))
    learned = lambda mask: tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])  # noqa: E731
    assert "hello" in learned(plain_mask)
    assert "farewell" in learned(plain_mask)
    assert "hello" not in learned(gatt_mask)
    assert learned(gatt_mask).strip() == "Arr, farewell."
    assert last_answer_only([1, 2, 3, 4, 5], [False, True, False, True, True]) == [False, False, False, True, True]


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file):
    common = dict(max_steps=6, checkpoint_every=2, global_batch_rows=2, micro_batch_rows=1, seq_len=32)
    full = train_sft(_config(tmp_path / "a", tiny_policy, stories_tokenizer, sft_prompts_file, **common))
    cut = _config(tmp_path / "b", tiny_policy, stories_tokenizer, sft_prompts_file, stop_after_steps=3, **common)
    first = train_sft(cut)
    assert (first.stopped, first.steps) == ("stop_after_steps", 3)
    resumed = train_sft(_config(tmp_path / "b", tiny_policy, stories_tokenizer, sft_prompts_file, **common))
    assert resumed.steps == full.steps == 6
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    expected, got = _weights(Path(full.policy_dir)), _weights(Path(resumed.policy_dir))
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_kill_9_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, tiny_policy, stories_tokenizer,
                                                                         sft_prompts_file):
    args = ["--init", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--data", str(sft_prompts_file),
            "--format", "prompts", "--prompt-format", "plain", "--seq-len", "32", "--global-batch-rows", "2",
            "--micro-batch-rows", "1", "--learning-rate", "1e-2", "--max-steps", "200", "--checkpoint-every", "1",
            "--threads", "1", "--quiet"]
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "training.sft", *args, "--out", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / TRAIN_STATE_FILE).is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # a few more steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    step = load_train_state(killed / TRAIN_STATE_FILE)["step"]
    assert 0 < step < 200
    assert not (killed / POLICY_DIR).exists()
    assert main([*args, "--out", str(killed)]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    expected, got = _weights(tmp_path / "whole" / POLICY_DIR), _weights(killed / POLICY_DIR)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_distributed_two_processes_match_one(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file):
    args = ["--init", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--data", str(sft_prompts_file),
            "--format", "prompts", "--prompt-format", "plain", "--seq-len", "32", "--global-batch-rows", "2",
            "--micro-batch-rows", "1", "--learning-rate", "1e-2", "--max-steps", "3", "--threads", "1", "--quiet"]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "training.sft",
         *args, "--out", str(tmp_path / "ddp")],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, ddp = _weights(tmp_path / "one" / POLICY_DIR), _weights(tmp_path / "ddp" / POLICY_DIR)
    start = _weights(tiny_policy)
    for name in one:
        assert not torch.equal(one[name], start[name]), name
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-4, atol=1e-5)
    assert json.loads(two.stdout[two.stdout.index("{"):])["steps"] == 3


def test_the_policy_is_saved_in_the_layout_it_came_in(tmp_path, tiny_policy_hf, stories_tokenizer, sft_prompts_file):
    result = train_sft(_config(tmp_path, tiny_policy_hf, stories_tokenizer, sft_prompts_file, max_steps=1))
    assert detect_format(result.policy_dir) == "hf"
    assert (Path(result.policy_dir) / "tokenizer.model").is_file()
    report = json.loads((tmp_path / "sft" / "sft_report.json").read_text())
    assert report["steps"] == 1


def test_preference_files_give_their_chosen_replies_and_respect_the_split(tmp_path, tiny_policy, stories_tokenizer,
                                                                          shared_data):
    from rewards.data import assign_splits, read_hh_rlhf
    from training.sft import read_examples

    hh = shared_data / "hh-rlhf-harmless" / "pairs.jsonl.gz"
    config = SFTConfig(init=str(tiny_policy), data=[str(hh)], format="hh-rlhf", split="train")
    examples, skipped = read_examples(config)
    test_replies = {p.chosen for p in assign_splits(read_hh_rlhf(hh), 0.2) if p.split == "test"}
    train_replies = {p.chosen for p in assign_splits(read_hh_rlhf(hh), 0.2) if p.split == "train"}
    answers = {e.answer for e in examples}
    assert answers <= train_replies
    assert not answers & (test_replies - train_replies)
    assert skipped > 0  # HH has empty replies preferred to harmful ones
    both, _ = read_examples(SFTConfig(init="x", data=[str(hh)], format="hh-rlhf", split="train", both_replies=True))
    assert len(both) > len(examples)


def test_bad_settings_are_clear_errors(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file, capsys):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train_sft(_config(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file, global_batch_rows=64))
    # What platform runs ask for: a batch larger than the data shrinks to the rows it has (here 6 examples, 2 rows).
    fitted = train_sft(_config(tmp_path / "fit", tiny_policy, stories_tokenizer, sft_prompts_file, global_batch_rows=64,
                               micro_batch_rows=4, fit_batch=True, max_steps=1))  # fmt: skip
    assert fitted.steps == 1
    report = json.loads((tmp_path / "fit" / "sft" / "sft_report.json").read_text())
    assert report["config"]["global_batch_rows"] == fitted.n_rows <= 4
    bad = write_prompts([PromptRecord.of("no answer here")], tmp_path / "bad.jsonl")
    assert main(["--init", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--data", str(bad),
                 "--format", "prompts", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "bad.jsonl:1: response: missing" in capsys.readouterr().err


def test_fsdp_two_processes_match_one_and_resume(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file):
    """Sharded (FSDP2) over two processes: the same weights as one process, also across a stop and resume."""
    args = ["--init", str(tiny_policy), "--tokenizer", str(stories_tokenizer), "--data", str(sft_prompts_file),
            "--format", "prompts", "--prompt-format", "plain", "--seq-len", "32", "--global-batch-rows", "2",
            "--micro-batch-rows", "1", "--learning-rate", "1e-2", "--max-steps", "3", "--threads", "1", "--quiet"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                "training.sft", *args, "--fsdp", "--out", str(tmp_path / "fsdp")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.run([*torchrun, "--stop-after-steps", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    state = load_train_state(tmp_path / "fsdp" / TRAIN_STATE_FILE)
    assert (state["step"], state["sharded"]) == (2, True)
    assert state["model"]["layers.0.attention.wq.weight"].shape == (48, 48)  # the full weight, not a shard
    second = subprocess.run(torchrun, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    one, fsdp = _weights(tmp_path / "one" / POLICY_DIR), _weights(tmp_path / "fsdp" / POLICY_DIR)
    for name in one:
        torch.testing.assert_close(fsdp[name], one[name], rtol=1e-4, atol=1e-5)
    # a sharded checkpoint is not resumed by a DDP run
    with pytest.raises(ValueError, match="sharded"):
        train_sft(SFTConfig(init=str(tiny_policy), tokenizer=str(stories_tokenizer), data=[str(sft_prompts_file)],
                            format="prompts", prompt_format="plain", out_dir=str(tmp_path / "fsdp"), seq_len=32,
                            global_batch_rows=2, micro_batch_rows=1, learning_rate=1e-2, epochs=None, max_steps=4))


def test_a_long_example_loses_its_oldest_turns_not_its_answer(stories_tokenizer):
    tokenizer = Tokenizer(stories_tokenizer)
    long_turn = "The dog ran and ran in the big green park with his friend. " * 4
    dialogue = ({"role": "system", "content": "Be kind."}, {"role": "user", "content": long_turn},
                {"role": "assistant", "content": long_turn}, {"role": "user", "content": "And then?"})
    example = Example(dialogue, "They went home.")
    config = SFTConfig(init="x", data=["x"])
    whole, _ = encode_example(tokenizer, example, config)
    ids, mask = encode_example(tokenizer, example, config, seq_len=60)
    assert len(whole) > 60 >= len(ids)
    learned = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]).strip()
    assert learned == "They went home."
    assert "Be kind." in tokenizer.decode(ids)  # the system turn stays
    assert "park" not in tokenizer.decode(ids)  # the oldest exchange went
    # a last turn longer than the row: its oldest tokens go, BOS and the answer stay
    ids, mask = encode_example(tokenizer, Example(({"role": "user", "content": long_turn * 2},), "Yes."), config,
                               seq_len=24)
    assert len(ids) == 24
    assert ids[0] == tokenizer.bos_id
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]).strip() == "Yes."


def test_a_bf16_checkpoint_trains_in_float32_and_is_saved_in_bf16(tmp_path, policy_args, stories_tokenizer,
                                                                   sft_prompts_file):
    """Meta's and Hugging Face's Llama 2 files are bf16/fp16: AdamW's updates at lr 2e-5 would mostly round away
    in such weights; the trainer keeps float32 master weights and saves in the dtype it loaded."""
    from training.llama.checkpoint import save_meta_checkpoint
    from training.llama.model import Transformer

    torch.manual_seed(0)
    init = tmp_path / "bf16"
    save_meta_checkpoint(Transformer(policy_args).to(torch.bfloat16), init)
    settings = dict(learning_rate=2e-5, max_steps=4, schedule="constant", min_warmup_steps=1)
    train_sft(_config(tmp_path, init, stories_tokenizer, sft_prompts_file, stop_after_steps=3, **settings))
    master = load_train_state(tmp_path / "sft" / TRAIN_STATE_FILE)["model"]
    before = _weights(init)
    assert master["layers.0.attention.wq.weight"].dtype == torch.float32
    changed = sum(int((master[k] != before[k].float()).sum()) for k in before)
    assert changed > 0.9 * sum(v.numel() for v in before.values())  # in bf16 weights about a quarter changed
    result = train_sft(_config(tmp_path, init, stories_tokenizer, sft_prompts_file, **settings))
    assert _weights(result.policy_dir)["layers.0.attention.wq.weight"].dtype == torch.bfloat16


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file):
    train_sft(_config(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file, stop_after_steps=2))
    with pytest.raises(ValueError, match="different run"):
        train_sft(_config(tmp_path, tiny_policy, stories_tokenizer, sft_prompts_file, learning_rate=1e-6))
