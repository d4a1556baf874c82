"""Run a study: every arm x seed as a training run, then a table, a plot and a verdict.

Each finished run leaves `result.json` in its run directory, so an interrupted study picks up where
it stopped and a finished one only re-renders its report.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyramoe.bench.common import format_table, write_json
from pyramoe.experiments.studies import Arm, Study
from pyramoe.models import count_active_parameters, count_parameters
from pyramoe.train.distill import create_distill_trainer, resolve_distill_run
from pyramoe.train.metrics import METRICS_FILE
from pyramoe.train.session import create_trainer, resolve_run

RESULT_FILE = "result.json"


@dataclass
class RunResult:
    arm: str
    seed: int
    val_loss: float
    val_losses: dict[int, float]  # step -> validation loss
    parameters: int
    active_parameters: int
    step_seconds: float  # median wall time of an optimizer step
    tokens: int


def run_arm(
    study: Study, arm: Arm, seed: int, root: Path, train: dict[str, Any], progress: bool,
    steps: int | None = None, teacher_dir: Path | None = None,
) -> RunResult:
    run_dir = root / study.name / f"{arm.name}-seed{seed}"
    done = run_dir / RESULT_FILE
    if done.is_file():
        data = json.loads(done.read_text())
        data["val_losses"] = {int(k): v for k, v in data["val_losses"].items()}
        return RunResult(**data)
    settings = {"steps": steps or study.steps, "seed": seed, "run_dir": str(run_dir), "save_every": 0,
                "keep_last": 1, **train}
    if arm.distill is None:
        run, _ = resolve_run([{"train": settings, "model": {"preset": arm.preset, **arm.model}}])
        trainer = create_trainer(run, progress=progress)
    else:
        assert teacher_dir is not None, "distill arms need the study's teacher"
        source = {"train": settings, "distill": {"teacher": str(teacher_dir), **arm.distill}}
        trainer = create_distill_trainer(resolve_distill_run([source]), progress=progress)
    fit = trainer.fit()
    if fit.stopped_by is not None:
        raise KeyboardInterrupt
    result = RunResult(
        arm=arm.name,
        seed=seed,
        val_loss=fit.evals[max(fit.evals)].loss,
        val_losses={step: e.loss for step, e in sorted(fit.evals.items())},
        parameters=count_parameters(trainer.model),
        active_parameters=count_active_parameters(trainer.model),
        step_seconds=_median_step_seconds(run_dir / METRICS_FILE),
        tokens=trainer.tokens_seen,
    )
    write_json(done, asdict(result))
    return result


def _median_step_seconds(metrics: Path) -> float:
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r["step_s"] for r in records if r.get("type") == "train"]
    return statistics.median(steps[1:] or steps)  # the first step pays one-time allocation costs


def summarize(study: Study, results: list[RunResult]) -> dict[str, Any]:
    arms = {}
    for arm in study.arms:
        mine = [r for r in results if r.arm == arm.name]
        losses = [r.val_loss for r in mine]
        arms[arm.name] = {
            "preset": arm.preset,
            "model": arm.model,
            "seeds": [r.seed for r in mine],
            "val_loss_mean": statistics.mean(losses),
            "val_loss_min": min(losses),
            "val_loss_max": max(losses),
            "val_loss_spread": max(losses) - min(losses),
            "parameters": mine[0].parameters,
            "active_parameters": mine[0].active_parameters,
            "step_seconds": statistics.median(r.step_seconds for r in mine),
        }
    return {"study": study.name, "title": study.title, "paper": study.paper_finding, "notes": study.notes,
            "steps": study.steps, "arms": arms, "verdict": verdict(study, arms),
            "runs": [asdict(r) for r in results]}


def verdict(study: Study, arms: dict[str, dict[str, Any]]) -> str:
    """Whether the paper's direction holds here, judged on the study's criterion.

    A loss difference smaller than the larger seed spread of the two arms is called inconclusive.
    """
    better, worse = arms[study.expected_better], arms[study.expected_worse]
    gap = worse["val_loss_mean"] - better["val_loss_mean"]
    noise = max(better["val_loss_spread"], worse["val_loss_spread"])
    if study.compare == "step_time":
        speedup = worse["step_seconds"] / better["step_seconds"]
        quality = "on par" if abs(gap) <= max(noise, 0.02) else ("better" if gap > 0 else "worse")
        holds = "holds" if speedup > 1.0 and quality != "worse" else "does not hold"
        return (f"{holds}: {study.expected_better} steps {speedup:.2f}x as fast as {study.expected_worse}; "
                f"its validation loss is {quality} ({-gap:+.3f})")
    if study.compare == "loss_per_param":
        fewer = better["parameters"] < worse["parameters"]
        ratio = better["parameters"] / worse["parameters"]
        if not fewer:
            return "does not hold: the PR-MoE arm does not have fewer parameters"
        if gap >= -noise:
            return (f"holds: {study.expected_better} has {ratio:.0%} of the parameters and a validation loss "
                    f"{-gap:+.3f} from {study.expected_worse} (seed spread {noise:.3f})")
        return (f"does not hold: with {ratio:.0%} of the parameters, {study.expected_better}'s validation loss is "
                f"{-gap:+.3f} worse, beyond the seed spread {noise:.3f}")
    if abs(gap) <= noise:
        return f"inconclusive: difference {gap:.3f} is within the seed spread {noise:.3f}"
    if gap > 0:
        return f"holds: {study.expected_better} is {gap:.3f} lower than {study.expected_worse} (spread {noise:.3f})"
    return (f"does not hold: {study.expected_better} is {-gap:.3f} higher than {study.expected_worse} "
            f"(spread {noise:.3f})")


def report_table(summary: dict[str, Any]) -> str:
    rows = []
    for name, a in summary["arms"].items():
        rows.append([
            name, f"{a['parameters'] / 1e6:.1f}M", f"{a['active_parameters'] / 1e6:.1f}M", len(a["seeds"]),
            f"{a['val_loss_mean']:.3f}", f"{a['val_loss_min']:.3f}-{a['val_loss_max']:.3f}",
            f"{a['step_seconds'] * 1e3:.0f}",
        ])
    headers = ["arm", "params", "active", "seeds", "val loss (mean)", "range", "step ms"]
    if "teacher" in summary:
        t = summary["teacher"]
        rows.append([f"teacher (seed {t['seed']})", f"{t['parameters'] / 1e6:.1f}M",
                     f"{t['active_parameters'] / 1e6:.1f}M", 1, f"{t['val_loss']:.3f}", "-",
                     f"{t['step_seconds'] * 1e3:.0f}"])
        for row, a in zip(rows, summary["arms"].values()):
            row.append(f"{a['retained_pct']:.1f}%")
        rows[-1].append("100%")
        headers.append("teacher loss / loss")
    return format_table(headers, rows)


def plot_study(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(summary["arms"]):
        runs = [r for r in summary["runs"] if r["arm"] == name]
        for j, run in enumerate(runs):
            points = sorted((int(step), loss) for step, loss in run["val_losses"].items())
            ax.plot(*zip(*points), color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
    ax.set(xlabel="step", ylabel="validation loss", title=summary["title"])
    ax.set_ylim(top=min(ax.get_ylim()[1], 8.0))
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_study(
    study: Study, root: Path, docs: Path, train: dict[str, Any] | None = None,
    seeds: tuple[int, ...] | None = None, progress: bool = True,
) -> dict[str, Any]:
    seeds = seeds or study.seeds
    teacher, teacher_dir = None, None
    if study.teacher is not None:
        teacher = run_arm(study, study.teacher, seeds[0], root, train or {}, progress, steps=study.teacher_steps)
        teacher_dir = root / study.name / f"{study.teacher.name}-seed{seeds[0]}"
    results = [
        run_arm(study, arm, seed, root, train or {}, progress, teacher_dir=teacher_dir)
        for seed in seeds
        for arm in study.arms
    ]
    summary = summarize(study, results)
    if teacher is not None:
        summary["teacher"] = asdict(teacher)
        for a in summary["arms"].values():
            a["retained_pct"] = 100.0 * teacher.val_loss / a["val_loss_mean"]
    write_json(docs / f"{study.name}.json", summary)
    plot_study(summary, docs / f"{study.name}.png")
    return summary


def render_results(docs: Path, studies: dict[str, Study]) -> Path:
    """docs/results.md from every study summary present in `docs` (studies not yet run are listed)."""
    out = docs.parent / "results.md" if docs.name == "results" else docs / "results.md"
    image_dir = f"{docs.name}/" if out.parent != docs else ""
    lines = [
        "# Reproducing the paper's claims at small scale",
        "",
        "Generated by `pyramoe experiments` from the summaries in this folder; every number below was",
        "measured by the command given with it. Models are 4-block, width-256 GPTs trained on the Python",
        "standard library source, so these runs test the *direction* of each claim, not its size.",
        "",
    ]
    for study in studies.values():
        path = docs / f"{study.name}.json"
        lines += [f"## {study.title}", "", f"**Paper:** {study.paper_finding}", ""]
        if not path.is_file():
            lines += [f"Not run yet: `pyramoe experiments {study.name}`.", ""]
            continue
        summary = json.loads(path.read_text())
        seeds = ",".join(str(s) for s in next(iter(summary["arms"].values()))["seeds"])
        lines += [
            f"**Measured** (`pyramoe experiments {study.name}`: {summary['steps']} steps per run, seeds {seeds}):",
            "",
            "```",
            report_table(summary),
            "```",
            "",
            f"![{study.name}]({image_dir}{study.name}.png)",
            "",
            f"**Direction:** {summary['verdict']}.",
            "",
        ]
        if summary.get("notes"):
            lines += [summary["notes"], ""]
    commentary = docs / "commentary.md"  # hand-written reading of the numbers, kept across re-renders
    if commentary.is_file():
        lines += [commentary.read_text().strip(), ""]
    out.write_text("\n".join(lines))
    return out
