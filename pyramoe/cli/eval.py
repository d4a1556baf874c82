"""`pyramoe eval CKPT`: validation loss, perplexity and per-layer expert load of a checkpoint.

CKPT is a checkpoint directory or a run directory (its latest checkpoint). The validation split,
tokenizer, batch size and sequence length default to the ones the run trained with; MoE layers use
their eval capacity factor unless --dropless.

`pyramoe eval CKPT --tasks T1,T2` runs lm-evaluation-harness tasks instead (zero-shot; needs the
`eval` extra), MoE layers dropless: the local tasks built from the stdlib's held-out files
(pyramoe_stdlib = all of them; see pyramoe/evaluation/tasks/) or any of the harness's own. It prints
each score beside its chance level and the accuracy of a trivial strategy (most frequent identifier,
shortest/longest choice, most words shared with the context) and, for a run's checkpoint, appends a
"zeroshot" record to the run's metrics.jsonl. Requests are scored in at most the seq_len the checkpoint
trained on (--seq-len to change it). The harness's own tasks need their datasets: from the Hugging Face
Hub, or where it cannot be reached, from copies under --data-dir DIR (DIR/baber/piqa, ...). `pyramoe eval
--build-tasks` builds the local tasks' files ahead of time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pyramoe.inference.packing import QUANTIZE_HELP, check_quantize, quantize_model
from pyramoe.tables import format_table
from pyramoe.train import build_model, evaluate, load_checkpoint
from pyramoe.train.config import merge, run_config_from_dict
from pyramoe.train.metrics import METRICS_FILE, MetricsLog
from pyramoe.train.session import load_data


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="validation loss / perplexity / expert load of a checkpoint",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", nargs="?",
                        help="checkpoint directory or run directory (with --tasks also a Hugging Face directory)")
    parser.add_argument("--batches", type=int, help="validation batches (default: the run's eval_batches)")
    parser.add_argument("--batch-size", type=int,
                        help="default: the run's batch_size (with --tasks: 8 sequences per forward)")
    parser.add_argument("--seq-len", type=int,
                        help="default: the run's seq_len (with --tasks: the most tokens a request is scored in; "
                             "default the seq_len the checkpoint trained on)")
    parser.add_argument("--corpus", metavar="SPEC", help="evaluate on another corpus's validation split")
    parser.add_argument("--dropless", action="store_true", help="no capacity limit: no token is dropped")
    parser.add_argument("--quantize", default=None, metavar="FORMAT",
                        help="evaluate the model with its linear layers and experts quantized as "
                             "`pyramoe generate --quantize` runs them (CPU): " + QUANTIZE_HELP)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    zeroshot = parser.add_argument_group("zero-shot tasks (lm-evaluation-harness)")
    zeroshot.add_argument("--tasks", metavar="T1,T2", help="harness tasks to run instead of validation loss")
    zeroshot.add_argument("--limit", type=int, help="at most this many examples per task")
    zeroshot.add_argument("--data-dir", metavar="DIR",
                          help="copies of the harness tasks' datasets, DIR/DATASET_PATH (e.g. DIR/baber/piqa), "
                               "read with no network")
    zeroshot.add_argument("--dtype", default="fp32", help="fp32, bf16 (autocast, CPUs with native bf16) or auto")
    zeroshot.add_argument("--build-tasks", action="store_true",
                          help="build the local tasks' files from the stdlib's validation split and say where")
    zeroshot.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    zeroshot.add_argument("--verbose", action="store_true", help="the harness's own log lines")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.build_tasks:
        return build_tasks_main(args)
    if args.checkpoint is None:
        raise ValueError("CKPT: a checkpoint or run directory is required")
    check_quantize(args.quantize, "--quantize")
    if args.tasks is not None:
        return zeroshot_main(args)
    return loss_main(args)


def build_tasks_main(args: argparse.Namespace) -> int:
    from pyramoe.evaluation.taskdata import TASKS, build_tasks

    files = build_tasks()
    meta = files.meta
    print(f"{files.directory}: {meta['val_documents']} held-out files of corpus {meta['corpus']!r} "
          f"(val_percent {meta['val_percent']})")
    dedup = meta["dedup"]
    print(f"deduplicated against the training split: {dedup['documents_dropped']} near-duplicate file(s) dropped; "
          "records dropped as their answer line is in the training split, per task below")
    rows = []
    for name, spec in TASKS.items():
        baseline = meta["baseline"][name]
        rows.append([name, meta["examples"][name], dedup["records_dropped"][name], spec.chance,
                     f"{baseline['acc']:.3f} ({baseline['strategy']})" if baseline else None, spec.about])
    print(format_table(["task", "examples", "dropped", "chance", "trivial baseline", "what"], rows))
    if args.checkpoint is not None and args.tasks is not None:
        return zeroshot_main(args)
    return 0


def zeroshot_main(args: argparse.Namespace) -> int:
    try:
        from pyramoe.evaluation import harness
    except ImportError as exc:
        raise ValueError(f"--tasks needs lm-evaluation-harness: pip install 'pyramoe[eval]' ({exc})") from None
    tasks = harness.parse_tasks(args.tasks)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        model = harness.load_model(args.checkpoint, args.dtype, args.batch_size, args.seq_len, args.quantize)
    except ValueError as exc:
        if str(exc).startswith("max_length"):
            raise ValueError(f"--seq-len: {str(exc).split(': ', 1)[1]}") from None
        raise
    warning = harness.heldout_warning(model.source, tasks)
    if warning:
        print(f"pyramoe eval: warning: {warning}", file=sys.stderr)
    results = harness.run_zeroshot(model, tasks, args.limit, args.verbose, args.data_dir)
    source = model.source
    record = harness.zeroshot_record(source.step, str(source.path.resolve()), results, args.limit, model.max_length)
    if args.json:
        print(json.dumps(record, indent=1))
    else:
        step = f"step {source.step}" if source.step is not None else "Hugging Face directory"
        print(f"{source.path} ({step}), zero-shot, requests in at most {model.max_length} tokens"
              + (f", --limit {args.limit}" if args.limit else ""))
        print(harness.table(results))
        dedup = harness.dedup_line(tasks)
        if dedup:
            print(dedup)
    if model.scorer.shortened_generations:
        print(f"pyramoe eval: warning: {model.scorer.shortened_generations} generation request(s) had a "
              f"max_gen_toks that does not fit after the prompt in {model.max_length} tokens; their prompts were "
              "kept and the generations shortened", file=sys.stderr)
    run_dir = run_dir_of(source.path) if source.step is not None else None
    if run_dir is not None:
        MetricsLog(run_dir / METRICS_FILE).write(record)
    return 0


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory holding `checkpoint` (RUN/checkpoints/step-N, beside RUN/metrics.jsonl), else None."""
    run_dir = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (run_dir / METRICS_FILE).is_file():
        return run_dir
    return None


def loss_main(args: argparse.Namespace) -> int:
    ckpt = load_checkpoint(args.checkpoint)
    overrides = {"batch_size": args.batch_size, "seq_len": args.seq_len, "eval_batches": args.batches,
                 "corpus": args.corpus}
    train = merge(ckpt.state["run_config"]["train"], {k: v for k, v in overrides.items() if v is not None})
    run = run_config_from_dict({"train": train, "model": ckpt.state["run_config"].get("model", {})})
    model = build_model(ckpt, dropless=args.dropless)
    if args.quantize is not None:
        quantize_model(model.eval(), args.quantize)
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
