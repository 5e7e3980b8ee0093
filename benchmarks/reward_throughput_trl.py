"""The peer side of benchmarks/reward_throughput.py: TRL's RewardTrainer on LlamaForSequenceClassification.

Runs in a separate environment with TRL installed (never a project dependency):
    python3.11 -m venv var/bench-venv
    var/bench-venv/bin/pip install torch==2.13.0 transformers==5.23.0 trl==1.16.0 accelerate datasets
It reads the payload written by reward_throughput.py (the same token ids, the same initial weights in Hugging
Face format, the same hyperparameters) and prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payload", required=True)
    args = parser.parse_args()
    with open(args.payload) as f:
        payload = json.load(f)
    import torch

    torch.set_num_threads(payload["threads"])
    torch.manual_seed(payload["seed"])
    from datasets import Dataset
    from transformers import LlamaForSequenceClassification, LlamaTokenizer
    from trl import RewardConfig, RewardTrainer

    model = LlamaForSequenceClassification.from_pretrained(payload["hf_init"], num_labels=1, dtype=torch.float32)
    # Only the pad token matters (the data is already tokenized): "<unk>" (id 0), never EOS, to avoid the
    # pad = EOS pooling trap.
    tokenizer = LlamaTokenizer(vocab_file=payload["tokenizer"])
    train = Dataset.from_list([{"chosen_ids": c, "rejected_ids": r} for c, r in payload["train"]])
    h = payload["hparams"]
    config = RewardConfig(
        output_dir=payload["trl_out"], max_steps=h["steps"], per_device_train_batch_size=h["batch"],
        gradient_accumulation_steps=1, learning_rate=h["lr"], lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=h["warmup"], weight_decay=0.1, adam_beta1=0.9,
        adam_beta2=0.95, adam_epsilon=1e-5, max_grad_norm=1.0, logging_steps=10, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, seed=payload["seed"], dataloader_num_workers=0,
        pad_token="<unk>", max_length=None, disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(payload["test"]), 32):
            chunk = payload["test"][start : start + 32]
            seqs = [c for c, _ in chunk] + [r for _, r in chunk]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            scores = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
            correct += int((scores[: len(chunk)] > scores[len(chunk) :]).sum())
    print(json.dumps({
        "trainer": "trl.RewardTrainer", "steps": h["steps"], "seconds": seconds,
        "pairs_per_s": h["steps"] * h["batch"] / seconds, "peak_rss_mib": peak / 1024,
        "rss_before_train_mib": rss_before / 1024, "test_accuracy": correct / len(payload["test"]),
        "final_loss": next((e["loss"] for e in reversed(trainer.state.log_history) if "loss" in e), None),
    }))


if __name__ == "__main__":
    main()
