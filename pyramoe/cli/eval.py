"""`pyramoe eval CKPT`: validation loss, perplexity and per-layer expert load of a checkpoint.

CKPT is a checkpoint directory or a run directory (its latest checkpoint). The validation split,
tokenizer, batch size and sequence length default to the ones the run trained with; MoE layers use
their eval capacity factor unless --dropless.
"""

from __future__ import annotations

import argparse
import json

from pyramoe.tables import format_table
from pyramoe.train import build_model, evaluate, load_checkpoint
from pyramoe.train.config import merge, run_config_from_dict
from pyramoe.train.session import load_data


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="validation loss / perplexity / expert load of a checkpoint",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory or run directory")
    parser.add_argument("--batches", type=int, help="validation batches (default: the run's eval_batches)")
    parser.add_argument("--batch-size", type=int, help="default: the run's batch_size")
    parser.add_argument("--seq-len", type=int, help="default: the run's seq_len")
    parser.add_argument("--corpus", metavar="SPEC", help="evaluate on another corpus's validation split")
    parser.add_argument("--dropless", action="store_true", help="no capacity limit: no token is dropped")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    overrides = {"batch_size": args.batch_size, "seq_len": args.seq_len, "eval_batches": args.batches,
                 "corpus": args.corpus}
    train = merge(ckpt.state["run_config"]["train"], {k: v for k, v in overrides.items() if v is not None})
    run = run_config_from_dict({"train": train, "model": ckpt.state["run_config"].get("model", {})})
    model = build_model(ckpt, dropless=args.dropless)
    cfg = run.train
    if cfg.seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len: {cfg.seq_len} exceeds the model's max_seq_len={model.config.max_seq_len}")
    data = load_data(run, ckpt, progress=not args.json)
    result = evaluate(model, data.val_dataset(), cfg.batch_size, cfg.seq_len, cfg.eval_batches, cfg.precision)
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt.path), "step": ckpt.step, **result.to_record()}, indent=1))
        return 0
    print(f"{ckpt.path} (step {ckpt.step}): val loss {result.loss:.4f}, perplexity {result.perplexity:.2f} "
          f"over {result.tokens:,} tokens")
    if result.load:
        rows = []
        for layer, load in result.load.items():
            total = max(sum(load.routed), 1)
            shares = [count * len(load.routed) / total for count in load.routed]
            rows.append([layer, len(load.routed), f"{load.drop_rate:.2%}", max(shares), min(shares)])
        print(format_table(["block", "experts", "dropped", "max load / uniform", "min load / uniform"], rows))
    return 0
