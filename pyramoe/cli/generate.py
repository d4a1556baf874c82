"""`pyramoe generate CKPT --prompt TEXT`: sample a continuation with the model's KV cache.

CKPT is a checkpoint directory or a run directory (its latest checkpoint). MoE layers run
dropless by default, so a prompt token is never dropped for arriving with many others.
"""

from __future__ import annotations

import argparse

from pyramoe.data import Tokenizer
from pyramoe.train import build_model, complete, load_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="sample text from a checkpoint", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory or run directory")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50, metavar="K", help="sample among the K likeliest (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", choices=("dropless", "eval"), default="dropless",
                        help="MoE capacity: none (default) or the model's eval capacity factor")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature: must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k: must be >= 0, got {args.top_k}")
    ckpt = load_checkpoint(args.checkpoint)
    tokenizer = Tokenizer.from_file(ckpt.tokenizer_path)
    model = build_model(ckpt, dropless=args.capacity == "dropless")
    text = complete(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                    args.seed)
    print(args.prompt + text)
    return 0
