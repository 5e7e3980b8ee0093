"""Fixtures for the reward-model tests: tiny Llama shapes, a random tiny checkpoint, the shared tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rewards.data import write_trl_jsonl
from rewards.synthetic import synthetic_pairs
from rewards.train import RewardTrainConfig
from training.llama.checkpoint import save_meta_checkpoint
from training.llama.model import ModelArgs, Transformer


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # The CI machine has two cores shared with other work; tiny models gain nothing from more threads.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_args() -> ModelArgs:
    """A two-layer GQA Llama over the 512-piece stories260k vocabulary."""
    return ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=128)


@pytest.fixture(scope="session")
def llama_tokenizer(shared_data: Path) -> Path:
    return shared_data / "llama2-tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_args: ModelArgs) -> Path:
    """A randomly initialised tiny Llama in Meta's format: the "chat checkpoint" the tests start from."""
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("tiny-llama") / "meta"
    save_meta_checkpoint(Transformer(tiny_args), path)
    return path


@pytest.fixture(scope="session")
def synthetic_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 clearly separable pairs in TRL's conversational format."""
    return write_trl_jsonl(synthetic_pairs(256, seed=0), tmp_path_factory.mktemp("pairs") / "synthetic.jsonl")


@pytest.fixture
def train_config(tmp_path: Path, tiny_checkpoint: Path, stories_tokenizer: Path, synthetic_file: Path):
    """A factory of small, fast training configs on the synthetic pairs."""

    def make(**overrides: object) -> RewardTrainConfig:
        values: dict[str, object] = dict(
            kind="helpfulness", data=[str(synthetic_file)], format="trl", init=str(tiny_checkpoint),
            tokenizer=str(stories_tokenizer), out_dir=str(tmp_path / "run"), mix=False, test_fraction=0.25,
            max_seq_len=64, global_batch_size=8, micro_batch_size=4, learning_rate=3e-3, epochs=1, num_threads=1,
        )
        values.update(overrides)
        return RewardTrainConfig(**values)  # type: ignore[arg-type]

    return make
