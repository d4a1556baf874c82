"""`pyramoe experiments NAME`: run a small-scale study of one of the paper's claims."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pyramoe.experiments import STUDIES, Study, get_study, render_results, run_study
from pyramoe.experiments.report import accuracy_seed_table, accuracy_table, report_table, seed_table


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "experiments",
        help="reproduce one of the paper's claims at small scale (tables and plots to docs/results)",
        description="Studies: " + "; ".join(f"{s.name}: {s.title}" for s in STUDIES.values()),
    )
    parser.add_argument("study", nargs="?", help="study name, 'all', or omit with --list")
    parser.add_argument("--list", action="store_true", help="list the studies")
    parser.add_argument("--steps", type=int, help="steps per run (default: the study's)")
    parser.add_argument("--teacher-steps", type=int, help="a distillation study's teacher steps (default: the study's)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the study's; a verdict needs >= 2)")
    parser.add_argument("--root", default="runs/experiments", help="where the runs go")
    parser.add_argument("--docs", default="docs/results", help="where summaries and plots go")
    parser.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                        help="extra train settings for every run (e.g. train.threads=1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-zeroshot", action="store_true",
                        help="do not score the runs' final checkpoints on the local zero-shot accuracy tasks")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.list or not args.study:
        for study in STUDIES.values():
            print(f"{study.name:18s} {study.title} ({len(study.arms)} arms x {len(study.seeds)} seeds, "
                  f"{study.steps} steps)")
        return 0
    names = list(STUDIES) if args.study == "all" else [get_study(args.study).name]
    train = _train_settings(args)
    seeds = _seeds(args.seeds)
    docs = Path(args.docs)
    for name in names:
        study = _with_budget(STUDIES[name], args.steps, args.teacher_steps)
        summary = run_study(study, Path(args.root), docs, train=train, seeds=seeds, progress=not args.quiet,
                            zeroshot=False if args.no_zeroshot else None)
        print(f"\n== {study.title} ==")
        print(report_table(summary))
        print(seed_table(summary))
        print(f"direction: {summary['verdict']}")
        if summary.get("paired_accuracy") is not None:
            print(accuracy_table(summary))
            print(accuracy_seed_table(summary))
            print(f"direction (zero-shot accuracy): {summary['accuracy_verdict']}")
    print(f"wrote {render_results(docs, STUDIES)}")
    return 0


def _with_budget(study: Study, steps: int | None, teacher_steps: int | None) -> Study:
    """The study with --steps / --teacher-steps applied."""
    for flag, value in (("--steps", steps), ("--teacher-steps", teacher_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: must be >= 1, got {value}")
    changes = {"steps": steps, "teacher_steps": teacher_steps if study.teacher is not None else None}
    return dataclasses.replace(study, **{k: v for k, v in changes.items() if v is not None})


def _train_settings(args: argparse.Namespace) -> dict:
    from pyramoe.train.config import parse_override

    train: dict = {}
    for item in args.set:
        parsed = parse_override(item)
        if set(parsed) != {"train"}:
            raise ValueError(f"--set {item}: only train.* settings apply to every run of a study")
        train.update(parsed["train"])
    return train


def _seeds(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: each seed once, got {text!r}")
    return seeds
