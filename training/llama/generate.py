"""Sample a completion from a Llama 2 checkpoint: `python -m training.llama.generate --checkpoint DIR ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from training.llama.checkpoint import load_checkpoint
from training.llama.generation import generate
from training.llama.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(prog="python -m training.llama.generate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory, Meta or Hugging Face format")
    parser.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    parser.add_argument("--prompt", required=True, help="the prompt text (the user message with --chat)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the Llama 2 chat format")
    parser.add_argument("--system", default=None, help="system prompt (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: as stored")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Load the checkpoint and tokenizer, sample once, print the completion."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    if opts.system is not None and not opts.chat:
        parser.error("--system needs --chat")
    try:
        tokenizer = Tokenizer(opts.tokenizer)
        model, args = load_checkpoint(opts.checkpoint, device=opts.device,
                                      dtype=_DTYPES[opts.dtype] if opts.dtype else None)
        if tokenizer.n_words > args.vocab_size:
            raise ValueError(f"the tokenizer {opts.tokenizer} has {tokenizer.n_words} pieces but the model's "
                             f"vocabulary has {args.vocab_size}: it is not this checkpoint's tokenizer")
        if opts.chat:
            prompt, _ = tokenizer.encode_dialog([{"role": "user", "content": opts.prompt}], system=opts.system)
        else:
            prompt = tokenizer.encode(opts.prompt, bos=True, eos=False)
        result = generate(
            model.eval(),
            [prompt],
            max_new_tokens=opts.max_new_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=opts.top_k,
            eos_id=tokenizer.eos_id,
            seed=opts.seed,
            return_logprobs=False,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(tokenizer.decode(result.tokens[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
