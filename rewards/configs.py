"""The project's named from-scratch reward-model configs ("tiny", "small"), sized for a laptop CPU.

Each gives the Llama shape (the vocabulary comes from the tokenizer) and the training recipe that goes with
it. A model trained from scratch on a few thousand pairs needs more than the report's one epoch at 1e-5: it
trains for several epochs at a higher rate and keeps the weights with the best validation accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from training.llama.model import ModelArgs


@dataclass(frozen=True)
class FromScratchConfig:
    """A named model shape and its training recipe (defaults for RewardTrainConfig's unset fields)."""

    name: str
    model: dict[str, Any]
    training: dict[str, Any]

    def model_args(self, vocab_size: int) -> ModelArgs:
        return ModelArgs(vocab_size=vocab_size, **self.model)


FROM_SCRATCH_CONFIGS: dict[str, FromScratchConfig] = {
    "tiny": FromScratchConfig(
        name="tiny",
        model=dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, multiple_of=32, max_seq_len=256),
        training=dict(
            max_seq_len=256,
            global_batch_size=32,
            micro_batch_size=32,
            learning_rate=1e-3,
            epochs=10,
            validation_fraction=0.15,
            eval_every=20,
            early_stopping_patience=10,
        ),
    ),
    "small": FromScratchConfig(
        name="small",
        model=dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32, max_seq_len=512),
        training=dict(
            max_seq_len=512,
            global_batch_size=32,
            micro_batch_size=16,
            learning_rate=5e-4,
            epochs=5,
            validation_fraction=0.1,
            eval_every=50,
            early_stopping_patience=6,
        ),
    ),
}


def from_scratch_config(name: str) -> FromScratchConfig:
    """The named config, or a ValueError listing the names."""
    if name not in FROM_SCRATCH_CONFIGS:
        raise ValueError(f"unknown from-scratch config {name!r}; expected one of {sorted(FROM_SCRATCH_CONFIGS)}")
    return FROM_SCRATCH_CONFIGS[name]
