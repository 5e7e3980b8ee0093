"""One PPO iteration, split into rollout, scoring and optimisation: training.ppo against TRL 1.12's PPOTrainer.

    .venv/bin/python benchmarks/ppo_iteration.py [--shape stories260k|llama2-24m] [--threads 1] [--rounds 3]
        [--iterations 3] [--trl-python /work/trl112-venv/bin/python]

TRL runs in a separate environment (never a project dependency; 1.12 is TRL's last release with PPO):
    python3.11 -m venv /work/trl112-venv
    /work/trl112-venv/bin/pip install torch==2.13.0 "trl==1.12.*" accelerate datasets

The same models on both sides: one random Llama (training.llama.model.Transformer, stories260K's shape by
default: dim 64, 5 layers, 8 heads, 4 KV heads, vocabulary 512; `--shape llama2-24m`: dim 288, 6 layers, 6 heads,
Llama 2's tokenizer and vocabulary of 32,000) saved in Hugging Face's layout, which our policy
and reference load and TRL's LlamaForCausalLM policy and reference load; one random reward model of the same
shape (rewards.model.RewardModel), saved with rewards.model.save_reward_model for ours and in Hugging Face's layout
for TRL's LlamaForSequenceClassification, whose `score` weight is set to our score head's: the reward and value
models are weight-identical on both sides (both sides start the value model from the reward model). The same 16
story openings, tokenized by the stories260K tokenizer (BOS + text, the `plain` prompt format) once, here: TRL gets
the token ids (its tokenizer object only pads, with id 0 `<unk>`, on the left as its PPO needs). Batch 16,
minibatch 4 (one gradient step each, four an iteration), 32 response tokens, one PPO epoch, temperature 1, the same
AdamW settings and constant learning rate, float32, no evaluation, no sample generations, no gradient
checkpointing on either side.

What differs by design: our rollout stops an answer at EOS (the random policy draws EOS about once in 512 tokens;
the mean response length is reported); TRL's is run without a stop token, so it always generates 32. Our reward
model reads the prompt and the answer as text rendered in the chat format (rewards.scoring), TRL's reward model the
raw prompt + response ids. Ours writes its exact-resume checkpoint (train_state.pt, fsynced) on its default
schedule, every 10 minutes, so none falls between timed iterations: the run is stopped after them, which writes
one, and its time is reported apart (`checkpoint_s`); TRL's PPOTrainer has no resume and saves nothing
(save_strategy "no"). TRL clips no gradients in its PPO loop; ours clips at 1.0. Ours runs with PyTorch's
transparent huge pages for large CPU tensors, which importing training.llama turns on; TRL as installed, without.
THP_MEM_ALLOC_ENABLE=0 (or 1) in this script's environment reaches both children: neither (or both) has them.

Phases. Ours: rollout = `_PPORun.rollout` (sampling), scoring = the rest of `_PPORun.prepare` (reward model,
policy/value and reference forward passes, rewards, GAE, whitening), optimisation = `_PPORun.optimise` (the
minibatch steps); total = the time between successive iterations' records (so it also holds the batch
statistics). TRL (its `train` loop has no timing hooks; see ppo_iteration_trl.py): rollout = its
`batch_generation` call, scoring = from there to the first training forward pass (log-probs from the generation
logits, reference, value and reward forward passes, rewards, GAE, whitening, its gc.collect), optimisation = from
that forward pass to the first `gather_for_metrics` (the minibatch steps with their statistics); total = the
time between successive `on_step_end` callbacks. Wall and CPU seconds (this process, all threads) both: other jobs
share the machine, and CPU time is less disturbed by them.

Each side runs in its own child process, `--warmup` untimed iterations then `--iterations` timed ones, the sides
alternating for `--rounds` rounds, with the same torch threads (`--threads`, also OMP_NUM_THREADS). Peak memory:
VmHWM of each child (/proc/self/status), over the whole process and over the timed iterations (the mark reset
by /proc/self/clear_refs at the end of the warm-up). Prints one JSON object; ratios are TRL / ours (above 1: ours
faster or smaller).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.llama_sampling import proc_status_bytes  # noqa: E402

DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO.parent / "shared" / "data"))
# The caller's huge-pages setting, read before anything imports training.llama (which sets it in this process's
# environment): the children get exactly this, so TRL's runs as installed unless the caller sets it.
CALLER_THP = os.environ.get("THP_MEM_ALLOC_ENABLE")
PHASES = ("rollout_s", "scoring_s", "optimisation_s")
SHAPES = {
    # stories260K's shape: a tiny model whose time goes to the cost of each operation more than to arithmetic
    "stories260k": dict(tokenizer=DATA / "stories260k" / "tokenizer.model", dim=64, layers=5, heads=8, kv_heads=4,
                        multiple_of=4),
    # llama2.c's stories15M shape with Llama 2's tokenizer (24.4M parameters, 18.4M of them the embedding and the
    # head): a tiny Llama 2 whose time goes to its matrix products, as a real one's does
    "llama2-24m": dict(tokenizer=DATA / "llama2-tokenizer" / "tokenizer.model", dim=288, layers=6, heads=6,
                       kv_heads=6, multiple_of=32),
}

STORY_OPENINGS = [
    "Once upon a time, there was a little girl named Lily.",
    "One day, a big dog found a red ball in the park.",
    "Tom and Sam went to the beach with their mom.",
    "The sun was warm and the birds sang in the tree.",
    "Once upon a time, a small cat lived in a house.",
    "Mia wanted to bake a cake for her friend.",
    "There was a boy who liked to play with his toy car.",
    "In the forest, a bunny was looking for food.",
    "One morning, Ben saw a butterfly in the garden.",
    "The little fish swam in the big blue sea.",
    "Anna had a doll that she loved very much.",
    "A kind old man gave the children some apples.",
    "It was a rainy day, so Tim stayed inside.",
    "The bird could not fly because its wing was hurt.",
    "Sue and her dad went to the store to buy milk.",
    "Once upon a time, a tiny frog jumped into a pond.",
]


# ------------------------------------------------------------------------------------------ shared helpers


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


class Clock:
    """Wall (perf_counter) and CPU (process_time: this process, all threads) seconds."""

    @staticmethod
    def now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    @staticmethod
    def since(start: tuple[float, float], end: tuple[float, float] | None = None) -> tuple[float, float]:
        end = end or Clock.now()
        return end[0] - start[0], end[1] - start[1]


# ----------------------------------------------------------------------------------------------- prepare


def prepare(args: argparse.Namespace, work: Path) -> Path:
    import torch

    from rewards.model import RewardModel, save_reward_model
    from training.llama.checkpoint import save_hf_checkpoint
    from training.llama.model import ModelArgs, Transformer
    from training.llama.tokenizer import Tokenizer
    from training.prompts import PromptRecord, encode_prompt, write_prompts

    tokenizer = Tokenizer(args.tokenizer)
    model_args = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                           vocab_size=tokenizer.n_words, multiple_of=args.multiple_of, max_seq_len=args.max_seq_len)
    torch.manual_seed(args.seed)
    save_hf_checkpoint(Transformer(model_args), work / "policy-hf")
    torch.manual_seed(args.seed + 1)
    reward = RewardModel(Transformer(model_args))
    save_reward_model(reward, work / "reward", kind="helpfulness", tokenizer_path=args.tokenizer,
                      max_seq_len=args.max_seq_len)
    save_hf_checkpoint(reward.transformer, work / "reward-hf")  # the same weights for LlamaForSequenceClassification
    records = [PromptRecord.of(p) for p in STORY_OPENINGS[: args.batch]]
    write_prompts(records, work / "prompts.jsonl")
    payload = {
        "threads": args.threads, "seed": args.seed, "warmup": args.warmup, "iterations": args.iterations,
        "batch": args.batch, "minibatch": args.minibatch, "response_length": args.response_length,
        "learning_rate": args.lr, "kl_coef": args.kl_coef,
        "tokenizer": str(args.tokenizer), "policy_hf": str(work / "policy-hf"), "reward_dir": str(work / "reward"),
        "reward_hf": str(work / "reward-hf"), "prompts": str(work / "prompts.jsonl"), "work": str(work),
        "score_head": reward.score_head.weight.detach().reshape(-1).tolist(),
        "prompt_ids": [encode_prompt(tokenizer, r, "plain") for r in records],
        "pieces": [tokenizer.sp_model.id_to_piece(i) for i in range(tokenizer.n_words)],
        "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id, "pad_id": 0,
        "model_args": model_args.to_params_json(),
        "policy_params": sum(p.numel() for p in Transformer(model_args, device="meta").parameters()),
    }
    path = work / "payload.json"
    path.write_text(json.dumps(payload))
    return path


# -------------------------------------------------------------------------------------------- our side


def run_ours(payload_path: str, run_index: int) -> None:
    payload = json.loads(Path(payload_path).read_text())
    import torch

    torch.set_num_threads(payload["threads"])
    sys.path.insert(0, str(REPO))
    from training import ppo
    from training.engine import Engine

    marks: dict[str, Any] = {"rollout": [], "prepare": [], "optimise": [], "checkpoint": [], "steps": 0}

    def timed(name: str, method):
        def wrapper(self, *a, **k):
            start = Clock.now()
            try:
                return method(self, *a, **k)
            finally:
                marks[name].append(Clock.since(start))
        return wrapper

    # Timing wrappers only: the methods themselves run unchanged.
    ppo._PPORun.rollout = timed("rollout", ppo._PPORun.rollout)
    ppo._PPORun.prepare = timed("prepare", ppo._PPORun.prepare)
    ppo._PPORun.optimise = timed("optimise", ppo._PPORun.optimise)
    ppo._PPORun.checkpoint = timed("checkpoint", ppo._PPORun.checkpoint)
    optimizer_step = Engine.optimizer_step

    def counting_step(self, *a, **k):
        marks["steps"] += 1
        return optimizer_step(self, *a, **k)

    Engine.optimizer_step = counting_step

    iterations: list[dict[str, Any]] = []
    state: dict[str, Any] = {"last": None}

    def on_iteration(record: dict[str, Any]) -> None:
        now = Clock.now()
        i = len(iterations)
        rollout, prepare_, optimise = marks["rollout"][i], marks["prepare"][i], marks["optimise"][i]
        entry = {
            "wall": {"rollout_s": rollout[0], "scoring_s": prepare_[0] - rollout[0], "optimisation_s": optimise[0]},
            "cpu": {"rollout_s": rollout[1], "scoring_s": prepare_[1] - rollout[1], "optimisation_s": optimise[1]},
            "reported": {k: record[k] for k in PHASES},  # training.ppo's own record
            "response_length": record["response_length"], "optimizer_steps": marks["steps"],
        }
        marks["steps"] = 0
        if state["last"] is not None:
            entry["wall"]["total_s"], entry["cpu"]["total_s"] = Clock.since(state["last"], now)
        iterations.append(entry)
        if i == payload["warmup"] - 1:
            state["peak_before_iterations"] = proc_status_bytes("VmHWM")
            state["rss_after_warmup"] = proc_status_bytes("VmRSS")
            reset_peak_rss()
        state["last"] = Clock.now()  # the callback's own bookkeeping stays out of the next interval

    out = Path(payload["work"]) / f"ours-{run_index}"
    config = ppo.PPOConfig(
        policy=payload["policy_hf"], tokenizer=payload["tokenizer"], prompts=payload["prompts"], out_dir=str(out),
        # one iteration more in the plan, stopped before it: the stop writes the checkpoint, timed on its own
        reward_model=payload["reward_dir"], prompt_format="plain", iterations=payload["warmup"] + payload["iterations"] + 1,
        stop_after_iterations=payload["warmup"] + payload["iterations"],
        batch_size=payload["batch"], minibatch_size=payload["minibatch"], max_new_tokens=payload["response_length"],
        temperature=1.0, top_p=1.0, kl_coef=payload["kl_coef"], learning_rate=payload["learning_rate"],
        schedule="constant", eval_every=0, early_stopping_patience=None, resume=False, seed=payload["seed"],
        device="cpu", num_threads=payload["threads"],
    )
    ppo.train_ppo(config, on_iteration=on_iteration)
    summary = child_summary("training.ppo", iterations, payload["warmup"], state, torch.get_num_threads())
    summary["checkpoint_s"] = marks["checkpoint"][-1][0]
    print(json.dumps(summary))


def child_summary(name: str, iterations: list[dict[str, Any]], warmup: int, state: dict[str, Any],
                  threads: int) -> dict[str, Any]:
    peak_iterations = proc_status_bytes("VmHWM")
    return {
        "trainer": name, "threads": threads,
        "iterations": iterations[warmup:], "warmup_iterations": iterations[:warmup],
        "peak_rss_mib": max(peak_iterations, state["peak_before_iterations"]) / 2**20,
        "peak_rss_iterations_mib": peak_iterations / 2**20,
        "rss_after_warmup_mib": state["rss_after_warmup"] / 2**20,
    }


# ------------------------------------------------------------------------------------------------ parent


def run_child(cmd: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env.pop("THP_MEM_ALLOC_ENABLE", None)
    if CALLER_THP is not None:
        env["THP_MEM_ALLOC_ENABLE"] = CALLER_THP
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed ({out.returncode}):\n{out.stderr[-6000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over every timed iteration of every round, wall and CPU; peaks the largest of any round."""
    its = [it for r in runs for it in r["iterations"]]
    out: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        out[clock] = {k: round(statistics.median(it[clock][k] for it in its), 4) for k in ("total_s", *PHASES)}
        out[clock]["phases_sum_s"] = round(sum(out[clock][k] for k in PHASES), 4)
    out["per_round_wall_total_s"] = [round(statistics.median(it["wall"]["total_s"] for it in r["iterations"]), 4)
                                     for r in runs]
    out["timed_iterations"] = len(its)
    out["optimizer_steps_per_iteration"] = sorted({it["optimizer_steps"] for it in its})
    out["mean_response_length"] = round(statistics.mean(it["response_length"] for it in its), 3)
    if "checkpoint_s" in runs[0]:
        out["checkpoint_s"] = round(statistics.median(r["checkpoint_s"] for r in runs), 4)
    if "reported" in its[0]:
        out["reported_by_training_ppo"] = {k: round(statistics.median(it["reported"][k] for it in its), 4)
                                           for k in PHASES}
    for key in ("peak_rss_mib", "peak_rss_iterations_mib", "rss_after_warmup_mib"):
        out[key] = round(max(r[key] for r in runs), 1)
    out["threads"] = sorted({r["threads"] for r in runs})
    return out


def ratios(ours: dict[str, Any], trl: dict[str, Any]) -> dict[str, Any]:
    """TRL / ours per phase and total (above 1: ours faster), wall and CPU; memory TRL / ours (above 1: ours smaller)."""
    out: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        out[clock] = {k.removesuffix("_s"): round(trl[clock][k] / ours[clock][k], 3)
                      for k in ("total_s", *PHASES)}
    out["peak_rss"] = round(trl["peak_rss_mib"] / ours["peak_rss_mib"], 3)
    out["peak_rss_iterations"] = round(trl["peak_rss_iterations_mib"] / ours["peak_rss_iterations_mib"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-python", default="/work/trl112-venv/bin/python")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="stories260k",
                        help="the model's shape and tokenizer (the flags below override its parts)")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--dim", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--multiple-of", type=int)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16, help="prompts an iteration (at most 16)")
    parser.add_argument("--minibatch", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first in each child (at least 1)")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations in each child")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("ours",), help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    parser.add_argument("--run-index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for key, value in SHAPES[args.shape].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker == "ours":
        run_ours(args.payload, args.run_index)
        return
    if args.warmup < 1 or args.iterations < 1 or not 1 <= args.batch <= len(STORY_OPENINGS):
        parser.error(f"--warmup and --iterations must be at least 1, --batch 1..{len(STORY_OPENINGS)}")
    sys.path.insert(0, str(REPO))
    import torch

    load_start = os.getloadavg()
    started = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="ppo-iteration-") as tmp:
        payload = prepare(args, Path(tmp))
        n_params = json.loads(payload.read_text())["policy_params"]
        for round_ in range(args.rounds):
            results["ours"].append(run_child([sys.executable, str(Path(__file__).resolve()), "--worker", "ours",
                                              "--payload", str(payload), "--run-index", str(round_)], args.threads))
            results["trl"].append(run_child([args.trl_python, str(REPO / "benchmarks" / "ppo_iteration_trl.py"),
                                             "--payload", str(payload), "--run-index", str(round_)], args.threads))
            print(f"round {round_ + 1}/{args.rounds}: ours {results['ours'][-1]['iterations'][-1]['wall']['total_s']:.2f} s, "
                  f"TRL {results['trl'][-1]['iterations'][-1]['wall']['total_s']:.2f} s an iteration", file=sys.stderr)
    ours, trl = summarise(results["ours"]), summarise(results["trl"])
    print(json.dumps({
        "benchmark": "ppo_iteration",
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k not in ("worker", "payload", "run_index")},
                   "policy_params": n_params, "dtype": "float32", "torch": torch.__version__},
        "ours": ours, "trl": trl,
        "speedup_trl_over_ours": ratios(ours, trl),
        "round_speedups_wall_total": [round(t / o, 3) for o, t in zip(ours["per_round_wall_total_s"],
                                                                       trl["per_round_wall_total_s"], strict=True)],
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "THP_MEM_ALLOC_ENABLE": CALLER_THP,  # None: each side as it comes (ours on, TRL's off)
        "benchmark_wall_s": round(time.perf_counter() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
