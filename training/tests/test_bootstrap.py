import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training.bootstrap import REPORT_FILE, BootstrapConfig, bootstrap_policy, main
from training.llama.checkpoint import detect_format, load_checkpoint
from training.llama.tokenizer import Tokenizer
from training.prompts import PromptRecord, read_prompts
from training.sampling import SamplingSettings, load_policy, sample_answers
from training.sft import Example, SFTConfig, pack_rows

REPO = Path(__file__).resolve().parents[2]

THINGS = ["cat", "dog", "bird", "fish", "ball", "tree", "car", "boat", "cup", "hat", "sun", "moon"]
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


def _dialogues() -> list[dict]:
    """30 dialogues with answers (two of several turns, one with a system turn) and two prompts without."""
    lines = [{"prompt": f"What colour is the {thing}?", "response": f"The {thing} is {COLOURS[i % len(COLOURS)]}."}
             for i, thing in enumerate(THINGS)]
    lines += [{"prompt": f"Where is the {thing}?", "response": f"The {thing} is next to the {THINGS[(i + 1) % 12]}."}
              for i, thing in enumerate(THINGS)]
    lines += [
        {"prompt": "Tell me about the cat.", "response": "The cat sat on the mat and purred."},
        {"prompt": "Who is Lily?", "response": "Lily is a little girl who likes to play."},
        {"prompt": "Say something happy.", "response": "Tim smiled and said thank you to his mom."},
        {"dialogue": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi, how can I help?"},
                      {"role": "user", "content": "What did the dog do?"}],
         "response": "The dog ran to the park with a red ball."},
        {"dialogue": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "Where is the bird?"}],
         "response": "In the big green tree."},
        {"dialogue": [{"role": "user", "content": "Is the sun warm?"}, {"role": "assistant", "content": "Yes."},
                      {"role": "user", "content": "And the moon?"}],
         "response": "The moon is cold and white in the night sky."},
        {"prompt": "What is a story?"},  # no answer: language-model text only
        {"prompt": "Write about a boat.", "domain": "helpfulness"},
    ]
    return lines


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("texts")
    prompts = folder / "dialogues.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in _dialogues()))
    stories = folder / "stories.txt"
    stories.write_text("Once upon a time there was a little cat.\n\nThe cat liked to play with a red ball in the sun.\n"
                       "One day the dog and the cat went to the park together and they were happy.\n")
    return [prompts, stories]


@pytest.fixture(scope="module")
def trained(texts, tmp_path_factory) -> tuple[Path, object, list]:
    out = tmp_path_factory.mktemp("bootstrap") / "policy"
    seen = []
    result = bootstrap_policy(BootstrapConfig(out_dir=str(out), texts=[str(t) for t in texts], steps=80),
                              progress=seen.append)
    return out, result, seen


def _answers(prompts_file: Path) -> list[Example]:
    return [Example(tuple(dict(m) for m in r.dialogue), r.response)
            for r in read_prompts(prompts_file) if r.response]


def _answer_loss(checkpoint: Path, tokenizer: Tokenizer, examples: list[Example]) -> float:
    model, _ = load_checkpoint(checkpoint)
    rows, _ = pack_rows(tokenizer, examples, SFTConfig(prompt_format="chat"), 256)
    with torch.no_grad():
        return float(model(rows.tokens, position_ids=rows.position_ids, targets=rows.targets))


def test_dialogues_give_a_policy_that_loads_samples_and_learned_the_answers(trained, texts, tmp_path):
    out, result, seen = trained
    assert detect_format(out) == "meta"
    tokenizer = Tokenizer(out / "tokenizer.model")
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["model_args"]["vocab_size"] == tokenizer.n_words == result.vocab_size <= 512
    assert report["model_args"]["dim"] == 64
    assert report["parameters"] == result.parameters > 0
    assert report["tokenizer"] == "fitted"
    assert (report["lm_steps"], report["sft_steps"], report["steps"]) == (32, 48, 80)
    assert report["n_dialogues"] == 30
    assert report["stopped"] == "completed"
    assert report["final_loss"] == result.final_loss
    assert report["seconds"] > 0
    assert [p.step for p in seen] == list(range(1, 81))
    assert {p.total_steps for p in seen} == {80}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left

    model = load_policy(out, device="cpu")
    prompts = [PromptRecord.of("What colour is the cat?"), PromptRecord.of("Tell me a story about a boat.")]
    samples = sample_answers(model, tokenizer, prompts, SamplingSettings(max_new_tokens=24))
    assert len(samples) == 2
    assert all(s.response_ids and isinstance(s.response, str) for s in samples)

    # The same shape, tokenizer and seed untrained (what --random writes is the run's starting point) is far worse
    # on the training answers.
    random_dir = tmp_path / "random"
    assert main(["--out", str(random_dir), "--random", "--tokenizer", str(out / "tokenizer.model"), "--quiet"]) == 0
    examples = _answers(texts[0])
    before = _answer_loss(random_dir, tokenizer, examples)
    after = _answer_loss(out, tokenizer, examples)
    assert before > 0.8 * math.log(tokenizer.n_words)  # about ln(vocab): a uniform guess
    assert after < 0.6 * before
    assert result.answer_loss_initial == pytest.approx(before, rel=1e-4)
    assert result.answer_loss_final == pytest.approx(after, rel=1e-4)


def test_random_with_the_stories_tokenizer_from_the_command_line(tmp_path, stories_tokenizer):
    out = tmp_path / "random"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "training.bootstrap", "--out", str(out), "--random",
                           "--tokenizer", str(stories_tokenizer), "--dim", "32", "--layers", "1", "--heads", "2",
                           "--quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    tokenizer = Tokenizer(stories_tokenizer)
    model = load_policy(out, device="cpu")
    assert model.args.vocab_size == tokenizer.n_words == summary["vocab_size"] == 512
    assert (model.args.dim, model.args.n_layers, model.args.n_heads) == (32, 1, 2)
    assert (out / "tokenizer.model").read_bytes() == stories_tokenizer.read_bytes()
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["steps"] == 0
    assert report["final_loss"] is None
    assert report["stopped"] == "random"


def test_hf_layout(tmp_path, stories_tokenizer):
    out = tmp_path / "hf"
    assert main(["--out", str(out), "--random", "--tokenizer", str(stories_tokenizer), "--layout", "hf", "--quiet"]) == 0
    assert detect_format(out) == "hf"
    model = load_policy(out, device="cpu")
    assert model.args.vocab_size == 512
    assert (out / "tokenizer.model").is_file()


def test_plain_text_alone_is_a_language_model_pass_in_the_hf_layout(tmp_path, texts, capsys):
    out = tmp_path / "lm"
    assert main(["--out", str(out), "--texts", str(texts[1]), "--steps", "6", "--layout", "hf", "--quiet",
                 "--vocab-size", "64"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["lm_steps"], summary["sft_steps"], summary["n_dialogues"]) == (6, 0, 0)
    assert summary["n_documents"] == 3
    assert summary["answer_loss_final"] is None
    assert summary["final_loss"] is not None
    assert detect_format(out) == "hf"
    assert load_policy(out, device="cpu").args.vocab_size == summary["vocab_size"] <= 64


def test_a_bad_line_is_exit_status_2_naming_it_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "response": "Hello."}) + "\n\n" + '{"prompt": ""}\n')
    out = tmp_path / "out" / "policy"
    assert main(["--out", str(out), "--texts", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err
    assert "prompt" in err
    assert not (tmp_path / "out").exists()

    text = tmp_path / "bad.txt"
    text.write_bytes(b"a fine line\n\xff\xfe not utf-8\n")
    assert main(["--out", str(out), "--texts", str(bad.with_name("missing.jsonl")), "--quiet"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["--out", str(out), "--texts", str(text), "--quiet"]) == 2
    assert f"{text}:2" in capsys.readouterr().err
    assert main(["--out", str(out), "--random", "--quiet"]) == 2  # --random needs a tokenizer
    assert "--tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_output_is_replaced_only_when_asked(tmp_path, stories_tokenizer, capsys):
    out = tmp_path / "policy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["--out", str(out), "--random", "--tokenizer", str(stories_tokenizer), "--quiet"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").is_file()
    assert main([*args, "--overwrite"]) == 0
    assert detect_format(out) == "meta"
    assert not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_the_time_bound_is_respected(tmp_path, texts, trained):
    # (after `trained`: the process has made its one-time imports, which a time bound of a few seconds would notice)
    t0 = time.monotonic()
    result = bootstrap_policy(BootstrapConfig(out_dir=str(tmp_path / "p"), texts=[str(texts[0])], seconds=3.0))
    wall = time.monotonic() - t0
    assert result.seconds <= 3.0 + 0.5
    assert wall <= 3.0 + 1.0
    assert result.seconds > 1.5  # the time is used, not only bounded
    assert result.lm_steps >= 1
    assert result.sft_steps >= 1
    assert result.steps == result.lm_steps + result.sft_steps
    assert result.answer_loss_final < result.answer_loss_initial
    assert load_policy(tmp_path / "p", device="cpu").args.vocab_size == result.vocab_size
