"""`pyramoe train`: train a GPT-MoE. With no arguments: the tiny-moe preset on the Python standard
library's source (tokenized once, ~20 s, then cached), a few minutes on two CPU cores.

Settings are merged in order, later ones winning: the preset, --config FILE.toml, the flags below,
then --set. A TOML file has a [train] table (TrainConfig fields) and a [model] table (preset plus
ModelConfig fields; n_layers / moe_placement / num_experts rebuild the layers; [model.moe] sets
MoEConfig fields of every MoE layer), for example:

    [train]
    steps = 600
    lr = 1e-3
    [model]
    preset = "tiny-moe-top2"
    dropout = 0.1
    [model.moe]
    capacity_factor = 1.5

RUN_DIR (default runs/PRESET) receives config.json, metrics.jsonl, tokenizer.json,
checkpoints/step-NNNNNNN/ (the last keep_last) and plots/*.png. Ctrl-C or SIGTERM finishes the
current step, saves a checkpoint and exits; `--resume` continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

import torch

from pyramoe.inference import complete
from pyramoe.models import GPT, count_active_parameters, count_parameters
from pyramoe.parallel.launch import (
    DistributedFailure,
    Launch,
    argv_without_nproc,
    check_layout,
    relaunch_with_torchrun,
    world_size_from_env,
)
from pyramoe.train import Checkpoint, RunConfig, build_model, create_trainer, load_checkpoint, resolve_run
from pyramoe.train.config import build_model_config, load_toml, parse_override
from pyramoe.train.metrics import METRICS_FILE, read_metrics, records_of
from pyramoe.train.session import LATEST, check_plain_run, keep_global_batch
from pyramoe.train.trainer import FitResult, Trainer

# Dedicated flags are shorthands for --set; values are checked by the same code, so errors match.
RUN_FLAGS = {
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "seq_len": "train.seq_len",
    "lr": "train.lr",
    "precision": "train.precision",
    "corpus": "train.corpus",
    "max_bytes": "train.max_bytes",
    "seed": "train.seed",
    "run_dir": "train.run_dir",
}
FLAGS = {"preset": "model.preset", **RUN_FLAGS}
SAMPLE_PROMPT = "def"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="train a GPT-MoE (default: tiny-moe on the Python stdlib)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", metavar="NAME", help="model preset (see `pyramoe presets`); default tiny-moe")
    add_run_arguments(parser)
    add_launch_arguments(parser)
    parser.set_defaults(func=main)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """How the run executes (not saved with it: a run may resume on another device or EP size)."""
    group = parser.add_argument_group("devices and processes")
    group.add_argument("--device", default="auto", metavar="auto|cpu|cuda",
                       help="where to train (default auto: cuda when available)")
    group.add_argument("--ep", type=int, default=1, metavar="N",
                       help="expert-parallel degree: each MoE layer's experts split over min(N, experts) ranks; "
                       "needs N processes (torchrun or --nproc-per-node)")
    group.add_argument("--tp", type=int, default=1, metavar="N",
                       help="tensor-parallel degree: attention heads, MLP units and each MoE layer's tokens split "
                       "over N ranks (all-to-all then runs among ranks of the same TP index)")
    group.add_argument("--expert-slicing", action="store_true",
                       help="with --tp: split every expert's hidden units over the TP ranks instead of the MoE tokens "
                       "(for layers with fewer experts than ranks)")
    group.add_argument("--zero", action="store_true",
                       help="shard parameters, gradients and AdamW state over the data-parallel ranks (FSDP2; experts "
                       "over their expert-data-parallel ranks; with --tp each TP rank's share); checkpoints are "
                       "written sharded, each rank its shard, and resume at any count with or without --zero")
    group.add_argument("--nproc-per-node", type=int, metavar="N",
                       help="launch N local processes with torchrun (gloo on CPU, NCCL on CUDA)")
    group.add_argument("--all-to-all", choices=("flat", "hierarchical"), default="flat",
                       help="hierarchical: exchange inside each node first, then across nodes among ranks of the "
                       "same local index (G + p/G peers instead of p); same results")
    group.add_argument("--ranks-per-node", type=int, metavar="N",
                       help="ranks per node for hierarchical all-to-all (default: torchrun's local world size); "
                       "a smaller N emulates several nodes on one box")
    group.add_argument("--dist-timeout", type=float, default=60.0, metavar="S",
                       help="seconds a collective waits for a dead or hung rank before failing (default 60)")


def launch_of(args: argparse.Namespace) -> Launch:
    for name in ("ep", "tp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.dist_timeout <= 0:
        raise ValueError(f"--dist-timeout: must be > 0, got {args.dist_timeout}")
    return Launch(
        device=args.device, ep=args.ep, timeout_s=args.dist_timeout, hierarchical=args.all_to_all == "hierarchical",
        ranks_per_node=args.ranks_per_node, tp=args.tp, expert_slicing=args.expert_slicing,
        zero=getattr(args, "zero", False),
    )


def add_run_arguments(
    parser: argparse.ArgumentParser, defaults: str | None = None, tables: str = "[train] and [model] tables",
    run_dir: str = "runs/PRESET",
) -> None:
    """The flags `train` and `distill` share; `defaults` replaces the defaults named in the help."""

    def default(value: str) -> str:
        return defaults or value

    parser.add_argument("--config", metavar="FILE.toml", help=f"TOML file with {tables}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.lr=3e-4 --set model.dropout=0.1 (repeatable)")
    parser.add_argument("--steps", metavar="N", help=f"optimizer steps (default {default('300')})")
    parser.add_argument("--batch-size", metavar="N", help=f"sequences per micro-batch (default {default('16')})")
    parser.add_argument("--seq-len", metavar="N", help=f"tokens per sequence (default {default('128')})")
    parser.add_argument("--lr", metavar="LR", help=f"peak learning rate (default {default('2e-3')})")
    parser.add_argument("--precision", metavar="fp32|bf16",
                        help="bf16 autocast needs AVX512-BF16/AMX to be fast; default " + default("fp32"))
    parser.add_argument("--corpus", metavar="SPEC",
                        help=f"{default('stdlib (default)')}, a text file, a directory, a .jsonl file "
                        "or hf:DIR[:split]")
    parser.add_argument("--max-bytes", metavar="N", help="use only the first N bytes of the corpus")
    parser.add_argument("--seed", metavar="N", help="seed of the initialisation and batch order")
    parser.add_argument("--run-dir", metavar="DIR", help=f"output directory (default {run_dir})")
    parser.add_argument("--resume", nargs="?", const=LATEST, metavar="CKPT",
                        help="continue the run in RUN_DIR from its latest checkpoint, or from CKPT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-eval lines")
    parser.add_argument("--no-plot", action="store_true", help="do not write plots at the end")
    parser.add_argument("--sample-tokens", type=int, default=120, metavar="N",
                        help="print an N-token sample at the end (0: none)")


def config_sources(
    args: argparse.Namespace, flags: dict[str, str] = FLAGS, extra: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """--config, then the dedicated flags, then `extra` (other flags), then --set: later ones win."""
    sources = [load_toml(args.config)] if args.config else []
    for attr, key in flags.items():
        value = getattr(args, attr)
        if value is not None:
            sources.append(parse_override(f"{key}={value}"))
    sources.extend(extra or [])
    sources.extend(parse_override(item) for item in args.overrides)
    return sources


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    launch = launch_of(args)
    run, ckpt = resolve_run(config_sources(args), args.resume)
    check_plain_run(run)
    if args.nproc_per_node is not None and world_size_from_env() == 1:
        model = ckpt.model_config() if ckpt is not None else build_model_config(run, run.train.vocab_size)
        check_layout(model, args.nproc_per_node, launch)  # one line here rather than one per rank
        keep_global_batch(run, ckpt, args.nproc_per_node // launch.tp)
        return relaunch_with_torchrun(args.nproc_per_node, argv_without_nproc(args.argv))
    if nothing_to_do(run, ckpt):
        return 0
    trainer = create_trainer(run, ckpt, progress=not args.quiet, launch=launch)
    try:
        if trainer.is_main:
            _print_header(trainer, resumed=ckpt is not None)
        return fit_and_report(trainer, args, start)
    except RuntimeError as exc:
        if trainer.dist is None:
            raise
        # A peer that died closes its connections (gloo fails at once); one that hangs lets the
        # collective time out after --dist-timeout. Either way: one line naming this rank.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedFailure(f"rank {trainer.dist.rank}: a collective failed ({first[:300]})") from None
    finally:
        if trainer.dist is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def nothing_to_do(run: RunConfig, ckpt: Checkpoint | None) -> bool:
    if ckpt is not None and ckpt.step >= run.train.steps:
        print(f"{ckpt.path} is at step {ckpt.step} of {run.train.steps}: nothing to do "
              f"(--steps N continues to step N)")
        return True
    return False


def fit_and_report(trainer: Trainer, args: argparse.Namespace, start: float) -> int:
    """Train to the end, then a summary, plots and a sample; or, when a signal stopped it, how to go on.
    The run directory is released at the end, however it ends."""
    try:
        return _fit_and_report(trainer, args, start)
    finally:
        trainer.close()


def _fit_and_report(trainer: Trainer, args: argparse.Namespace, start: float) -> int:
    result = trainer.fit()
    wall = time.perf_counter() - start
    if not trainer.is_main:
        return 128 + result.stopped_by if result.stopped_by is not None else 0
    if result.stopped_by is not None:
        name, command = signal.Signals(result.stopped_by).name, getattr(args, "command", "train")
        print(f"{name}: stopped at step {result.step}; checkpoint {result.checkpoint}\n"
              f"continue with: pyramoe {command} --resume --run-dir {trainer.run_dir}", file=sys.stderr)
        return 128 + result.stopped_by
    _print_summary(trainer, result, wall, args)
    return 0


def _print_header(trainer: Trainer, resumed: bool) -> None:
    cfg, model = trainer.config, trainer.model
    if trainer.dist is not None:  # this rank holds a shard of the experts: count the whole model
        with torch.device("meta"):
            model = GPT(model.config)
    action = f"resuming at step {trainer.step}" if resumed else "training"
    print(
        f"{action}: {trainer.run.preset} ({count_parameters(model) / 1e6:.1f}M parameters, "
        f"{count_active_parameters(model) / 1e6:.1f}M active per token), vocab {trainer.data.vocab_size}, "
        f"{trainer.data.train_tokens:,} train / {trainer.data.val_tokens:,} val tokens\n"
        f"{cfg.steps} steps x {trainer.tokens_per_step:,} tokens, lr {cfg.lr:g}, {cfg.precision} -> {trainer.run_dir}"
        f"{_layout(trainer)}",
        flush=True,
    )
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(trainer.data.skipped_files.items()))
    if skipped:
        print(f"corpus {cfg.corpus}: skipped files ({skipped})", flush=True)


def _layout(trainer: Trainer) -> str:
    """Where it runs: device, and under torchrun the ranks and each MoE layer's EP degree."""
    text = f" on {trainer.device}"
    if trainer.dist is not None and trainer.dist.state is not None:
        degrees = sorted(set(trainer.dist.state.layer_ep.values()))
        topology = trainer.dist.topology
        text += f", {topology.world_size} ranks (DP {trainer.dp}, TP {topology.tp}, EP {'/'.join(map(str, degrees))})"
    return text


def _print_summary(trainer: Trainer, result: FitResult, wall: float, args: argparse.Namespace) -> None:
    evals = records_of(read_metrics(trainer.run_dir / METRICS_FILE), "eval")
    if evals:
        first, last = evals[0], evals[-1]
        print(f"val loss {first['val_loss']:.3f} (step {first['step']}) -> {last['val_loss']:.3f} "
              f"(step {last['step']}), perplexity {first['val_ppl']:.1f} -> {last['val_ppl']:.1f}")
    print(f"{len(result.losses)} steps in {wall:.0f} s wall (data preparation included); "
          f"checkpoint {result.checkpoint}")
    if not args.no_plot:
        from pyramoe.train.plot import plot_run

        print("plots: " + ", ".join(str(p) for p in plot_run(trainer.run_dir)))
    if args.sample_tokens > 0 and result.checkpoint is not None:
        model = build_model(load_checkpoint(result.checkpoint), dropless=True)
        text = complete(model, trainer.data.tokenizer, SAMPLE_PROMPT, args.sample_tokens, seed=trainer.config.seed)
        print(f"sample ({args.sample_tokens} tokens after {SAMPLE_PROMPT!r}):\n{SAMPLE_PROMPT}{text}")
    print(f"next: pyramoe generate {trainer.run_dir} --prompt import   |   pyramoe eval {trainer.run_dir}")
