"""The peer side of benchmarks/ppo_iteration.py: TRL 1.12's PPOTrainer (trl.experimental.ppo) on the same models.

Runs in a separate environment with TRL installed (never a project dependency):
    /work/trl112-venv/bin/pip install torch==2.13.0 "trl==1.12.*" accelerate datasets
It reads the payload ppo_iteration.py writes: the policy (LlamaForCausalLM, also loaded again as the reference)
and the reward model (LlamaForSequenceClassification, its `score` set to our score head; a second copy is the
value model, as ours starts the value model from the reward model) in Hugging Face's layout, the prompts as token
ids, and the settings. Prints one JSON object as its last line.

Settings: per_device_train_batch_size 16 with no gradient accumulation and num_mini_batches 4, so one iteration
samples the 16 prompts (in one generate() call: local_rollout_forward_batch_size 64) and takes four optimizer
steps of 4 sequences; num_ppo_epochs 1, response_length 32 with no stop token (every response 32 tokens),
temperature 1, kl_coef as ours, constant learning rate, AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1 (TRL's default
optimizer implementation, transformers' fused AdamW), float32 (bf16 off), gradient checkpointing off (PPOConfig
turns it on by default), num_sample_generations 0 (no extra greedy samples), save_strategy "no". The tokenizer is a
word-level one over the stories260K pieces: TRL only pads with it (id 0, on the left) and reads its pad and EOS ids.

Phases. PPOTrainer.train is one loop with no timing hooks, so the module's functions and the trainer's objects are
wrapped (timing only, nothing else changes):
- rollout: the `batch_generation` call (HF generate, KV-cached, with the per-step logits kept);
- scoring: from the end of generation to the first forward pass of the policy-and-value wrapper in training mode:
  log-probs from the generation logits, the reference, value and reward models' forward passes, truncation,
  rewards with the KL penalty, GAE, whitening, and the loop's own empty_cache/gc.collect;
- optimisation: from that forward pass to the first `accelerator.gather_for_metrics` (the metrics block after the
  minibatch loop): every minibatch's forward, loss, backward, optimizer step and statistics;
- total: the time between successive `on_step_end` callbacks (so also the dataloader, the metrics, the log line
  and the scheduler step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_iteration import Clock, child_summary, proc_status_bytes, reset_peak_rss  # noqa: E402  (stdlib only)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--payload", required=True)
    parser.add_argument("--run-index", type=int, default=0)
    args = parser.parse_args()
    payload = json.loads(Path(args.payload).read_text())
    import torch

    threads = payload["threads"]
    torch.set_num_threads(threads)
    from datasets import Dataset
    from tokenizers import Tokenizer as WordTokenizer
    from tokenizers.models import WordLevel
    from transformers import (
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    pad_id = payload["pad_id"]
    pieces = payload["pieces"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=WordTokenizer(WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=pieces[pad_id])),
        bos_token=pieces[payload["bos_id"]], eos_token=pieces[payload["eos_id"]], unk_token=pieces[pad_id],
        pad_token=pieces[pad_id], padding_side="left",
    )
    assert tokenizer.pad_token_id == pad_id
    assert tokenizer.eos_token_id == payload["eos_id"]

    def policy_model() -> LlamaForCausalLM:
        model = LlamaForCausalLM.from_pretrained(payload["policy_hf"], dtype=torch.float32)
        model.generation_config.pad_token_id = pad_id
        return model

    def reward_model() -> LlamaForSequenceClassification:
        model = LlamaForSequenceClassification.from_pretrained(payload["reward_hf"], num_labels=1, dtype=torch.float32)
        with torch.no_grad():
            model.score.weight.copy_(torch.tensor(payload["score_head"]).view_as(model.score.weight))
        model.config.pad_token_id = pad_id
        return model

    n_iterations = payload["warmup"] + payload["iterations"]
    dataset = Dataset.from_dict({"input_ids": payload["prompt_ids"]})
    config = PPOConfig(
        output_dir=str(Path(payload["work"]) / f"trl-{args.run_index}"),
        per_device_train_batch_size=payload["batch"], gradient_accumulation_steps=1,
        num_mini_batches=payload["batch"] // payload["minibatch"], num_ppo_epochs=1,
        total_episodes=payload["batch"] * n_iterations, response_length=payload["response_length"],
        stop_token=None, temperature=1.0, kl_coef=payload["kl_coef"], learning_rate=payload["learning_rate"],
        lr_scheduler_type="constant", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, weight_decay=0.1,
        gradient_checkpointing=False, bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, num_sample_generations=0, disable_tqdm=True, seed=payload["seed"],
        dataloader_num_workers=0,
    )

    iterations: list[dict[str, Any]] = []
    state: dict[str, Any] = {"last": None}
    current: dict[str, Any] = {}
    trainer_ref: dict[str, Any] = {}

    def timed_generation(model, queries, *a, **k):
        start = Clock.now()
        query_responses, logits = original_generation(model, queries, *a, **k)
        current["generation"] = (start, Clock.now())
        responses = query_responses[:, queries.shape[1]:]
        is_pad = torch.cat([responses == pad_id, torch.ones_like(responses[:, :1], dtype=torch.bool)], dim=1)
        current["generated_tokens"] = responses.shape[1]
        # TRL's masks end a response at its first pad id (here: a sampled <unk>)
        current["response_length"] = float(is_pad.float().argmax(dim=1).float().mean())
        return query_responses, logits

    def marking_forward(model, *a, **k):
        if "optimisation_start" not in current and model is trainer_ref["trainer"].model:
            current["optimisation_start"] = Clock.now()
        return original_forward(model, *a, **k)

    original_generation, original_forward = trl_ppo.batch_generation, trl_ppo.forward
    trl_ppo.batch_generation, trl_ppo.forward = timed_generation, marking_forward

    class Timer(TrainerCallback):
        def on_train_begin(self, args_, state_, control, **kwargs):
            torch.set_num_threads(threads)
            state["last"] = Clock.now()

        def on_step_end(self, args_, state_, control, **kwargs):
            now = Clock.now()
            gen_start, gen_end = current["generation"]
            opt_start, opt_end = current["optimisation_start"], current["optimisation_end"]
            wall, cpu = {}, {}
            for key, (a, b) in (("rollout_s", (gen_start, gen_end)), ("scoring_s", (gen_end, opt_start)),
                                ("optimisation_s", (opt_start, opt_end)), ("total_s", (state["last"], now))):
                wall[key], cpu[key] = Clock.since(a, b)
            iterations.append({"wall": wall, "cpu": cpu, "response_length": current["response_length"],
                               "generated_tokens": current["generated_tokens"],
                               "optimizer_steps": current.get("steps", 0)})
            current.clear()
            if len(iterations) == payload["warmup"]:
                state["peak_before_iterations"] = proc_status_bytes("VmHWM")
                state["rss_after_warmup"] = proc_status_bytes("VmRSS")
                reset_peak_rss()
            state["last"] = Clock.now()

    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, model=policy_model(), ref_model=policy_model(),
        reward_model=reward_model(), value_model=reward_model(), train_dataset=dataset, eval_dataset=dataset,
        callbacks=[Timer()],
    )
    trainer_ref["trainer"] = trainer
    gather = trainer.accelerator.gather_for_metrics

    def marking_gather(*a, **k):
        current.setdefault("optimisation_end", Clock.now())
        return gather(*a, **k)

    trainer.accelerator.gather_for_metrics = marking_gather
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    inner_step = inner.step

    def counting_step(*a, **k):
        current["steps"] = current.get("steps", 0) + 1
        return inner_step(*a, **k)

    inner.step = counting_step
    trainer.train()
    if len(iterations) != n_iterations:
        raise SystemExit(f"TRL ran {len(iterations)} iterations, expected {n_iterations}")
    print(json.dumps(child_summary("trl.experimental.ppo.PPOTrainer", iterations, payload["warmup"], state,
                                   torch.get_num_threads())))


if __name__ == "__main__":
    main()
