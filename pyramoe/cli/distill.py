"""`pyramoe distill --teacher CKPT`: Mixture-of-Students. Trains a shallower student on
ce_weight * CE(labels) + w(step) * T² KL(teacher_T || student_T) + its MoE aux loss, where the KD
weight w is staged: kd_weight until distill.kd_stop_step (default 3/4 of the steps), then 0 and the
teacher stops running ("linear_decay" ramps it down instead, "constant" never stops).

The student is, by default, the teacher minus 12.5% of its blocks (distill.layer_fraction, rounded
down; or --student-layers N): the first and last blocks are kept, evenly spaced middle ones dropped,
each kept block with its own FFN (dense or MoE with its expert count), initialised from the teacher's
weights. --student NAME trains a preset instead (only same-shaped tensors are copied from the
teacher); --student FILE.toml reads a [model] table (with a preset: that preset; without: overrides
of the derived student).

The student uses the teacher's tokenizer, and starts from the teacher run's settings (corpus,
validation split, steps, batch, LR...); the flags, --config FILE.toml ([train], [model], [distill]
tables) and --set override them, e.g.:

    pyramoe distill --teacher runs/tiny-prmoe --steps 200 --set distill.temperature=2 \\
                    --set distill.kd_schedule=linear_decay --set distill.kd_stop_step=150

[distill] settings: teacher, student_layers, layer_fraction (0.875), init_from_teacher (true),
ce_weight (1), kd_weight (1), temperature (1), kd_schedule (stop | linear_decay | constant),
kd_stop_step. RUN_DIR (default runs/TEACHER_PRESET-mos, or runs/STUDENT_PRESET-distilled) is laid out
like a training run's; metrics.jsonl train records add kd and kd_weight, and `--resume` continues
with the same losses.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from pyramoe.cli.train import RUN_FLAGS, add_run_arguments, config_sources, fit_and_report, nothing_to_do
from pyramoe.models import count_active_parameters, count_parameters
from pyramoe.presets import get_preset
from pyramoe.train.config import load_toml
from pyramoe.train.distill import DistillTrainer, create_distill_trainer, resolve_distill_run

FLAGS = {**RUN_FLAGS, "student_layers": "distill.student_layers", "kd_stop_step": "distill.kd_stop_step"}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "distill", help="Mixture-of-Students: distil a PR-MoE teacher checkpoint into a shallower student",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--teacher", metavar="CKPT", help="teacher checkpoint, or a run directory (its latest)")
    parser.add_argument("--student", metavar="PRESET|FILE.toml",
                        help="student preset or TOML [model] table (default: the teacher minus 12.5%% of its blocks)")
    parser.add_argument("--student-layers", metavar="N", help="depth of the student derived from the teacher")
    parser.add_argument("--kd-stop-step", metavar="N", help="step where the KD weight reaches 0 (default 3/4 of steps)")
    add_run_arguments(parser, defaults="the teacher's", tables="[train], [model] (the student) and [distill] tables",
                      run_dir="runs/TEACHER_PRESET-mos or runs/STUDENT_PRESET-distilled")
    parser.set_defaults(func=main)


def student_sources(spec: str | None) -> list[dict[str, Any]]:
    """--student as settings: a preset name, or a TOML file's [model] table."""
    if spec is None:
        return []
    if spec.endswith(".toml") or Path(spec).is_file():
        data = load_toml(spec)
        other = sorted(set(data) - {"model"})
        if other:
            raise ValueError(f"--student {spec}: a student file holds a [model] table only, not [{other[0]}] "
                             "(put other tables in --config)")
        return [{"model": data.get("model", {})}]
    try:
        get_preset(spec)
    except ValueError as exc:
        raise ValueError(f"--student: {exc}") from None
    return [{"model": {"preset": spec}}]


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    extra = student_sources(args.student)
    if args.teacher is not None:
        extra.append({"distill": {"teacher": args.teacher}})  # a path: not parsed as JSON like --set values
    setup = resolve_distill_run(config_sources(args, FLAGS, extra), args.resume)
    if nothing_to_do(setup.run, setup.ckpt):
        return 0
    trainer = create_distill_trainer(setup, progress=not args.quiet)
    _print_header(trainer, setup.teacher.path, resumed=setup.ckpt is not None)
    return fit_and_report(trainer, args, start)


def _print_header(trainer: DistillTrainer, teacher_path: Path, resumed: bool) -> None:
    cfg, kd, student, teacher = trainer.config, trainer.distill, trainer.model, trainer.teacher
    action = f"resuming at step {trainer.step}" if resumed else "distilling"
    kept = [i for i in trainer.layer_map if i is not None]  # empty unless a new derived student
    name = "" if resumed else f" derived from the teacher's blocks {kept}" if kept else f" {trainer.run.preset}"
    schedule = "never stops" if kd.kd_schedule == "constant" else f"{kd.kd_schedule} at step {kd.kd_stop_step}"
    print(
        f"{action}: teacher {teacher_path} ({teacher.config.n_layers} blocks, "
        f"{count_parameters(teacher) / 1e6:.1f}M parameters)\n"
        f"student{name}: {student.config.n_layers} blocks, "
        f"{count_parameters(student) / 1e6:.1f}M parameters, {count_active_parameters(student) / 1e6:.1f}M active; "
        f"vocab {trainer.data.vocab_size}, {trainer.data.train_tokens:,} train / "
        f"{trainer.data.val_tokens:,} val tokens\n"
        f"loss {kd.ce_weight:g}·CE + {kd.kd_weight:g}·T²·KL (T={kd.temperature:g}), KD {schedule}"
        + (f"; {len(trainer.initialised)} tensors copied from the teacher" if trainer.initialised else ""),
        flush=True,
    )
    if not resumed:
        result = trainer.evaluate_teacher()
        print(f"teacher val loss {result.loss:.4f} (ppl {result.perplexity:.2f})", flush=True)
    print(f"{cfg.steps} steps x {cfg.tokens_per_step:,} tokens, lr {cfg.lr:g}, {cfg.precision} -> {trainer.run_dir}",
          flush=True)
