"""Fixtures for the torch tests under training/ (training/llama too): one thread, a tiny random Llama over the
stories260K vocabulary, prompts files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.llama.checkpoint import save_hf_checkpoint, save_meta_checkpoint
from training.llama.model import ModelArgs, Transformer


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every torch test here on one thread (the root conftest's one_torch_thread)."""


@pytest.fixture(scope="session")
def policy_args() -> ModelArgs:
    return ModelArgs(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=128)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory: pytest.TempPathFactory, policy_args: ModelArgs) -> Path:
    """A randomly initialised tiny Llama in Meta's layout (the policy the tests fine-tune)."""
    torch.manual_seed(4321)
    path = tmp_path_factory.mktemp("policy") / "meta"
    save_meta_checkpoint(Transformer(policy_args), path)
    return path


@pytest.fixture(scope="session")
def tiny_policy_hf(tmp_path_factory: pytest.TempPathFactory, policy_args: ModelArgs) -> Path:
    torch.manual_seed(4321)
    path = tmp_path_factory.mktemp("policy-hf") / "hf"
    save_hf_checkpoint(Transformer(policy_args), path)
    return path


DIALOGUES = [
    ("Tell me about the cat.", "The cat sat on the mat and purred."),
    ("What did the dog do?", "The dog ran to the park with a red ball."),
    ("Where is the bird?", "The bird is in the big green tree."),
    ("Who is Lily?", "Lily is a little girl who likes to play."),
    ("What is the sun like?", "The sun is warm and bright in the sky."),
    ("Say something happy.", "Tim smiled and said thank you to his mom."),
]


@pytest.fixture(scope="session")
def sft_prompts_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six one-turn dialogues with the answers to learn, as a prompts file."""
    path = tmp_path_factory.mktemp("sft") / "answers.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in DIALOGUES))
    return path
