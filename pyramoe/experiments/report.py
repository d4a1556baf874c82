"""A study's report: tables, a validation-loss plot and docs/results.md, all from its summary JSON.

Zero-shot accuracy (when the study's runs were scored): per arm and task the mean (min-max) over seeds,
each task's chance level, the paired differences of the mean accuracy by seed, and for a distillation
study each student's accuracy as a percentage of its teacher's.

Every figure states the settings and machine it was measured with, read from the summary.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from pyramoe.experiments.studies import Study
from pyramoe.tables import format_table


def _step_cells(summary: dict[str, Any], name: str) -> list[Any]:
    timing = summary.get("step_time")
    if not timing:
        return ["-", "-"]
    arm = timing["arms"][name]
    ratios = arm["ratio_to_baseline"]
    return [f"{arm['median_ms']:.0f}", f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"]


def report_table(summary: dict[str, Any]) -> str:
    """One row per arm: sizes, seeds, validation loss mean and range, interleaved step time."""
    timing = summary.get("step_time")
    baseline = timing["baseline"] if timing else "baseline"
    headers = ["arm", "blocks", "params", "active", "seeds", "val loss (mean)", "min-max", "step ms",
               f"time / {baseline}"]
    rows = []
    for name, a in summary["arms"].items():
        rows.append([name, a["n_layers"], f"{a['parameters'] / 1e6:.1f}M", f"{a['active_parameters'] / 1e6:.1f}M",
                     len(a["seeds"]), f"{a['val_loss_mean']:.3f}", f"{a['val_loss_min']:.3f}-{a['val_loss_max']:.3f}",
                     *_step_cells(summary, name)])
    if "teacher" in summary:
        t = summary["teacher"]
        rows.append([f"teacher (seed {t['seed']})", t["n_layers"], f"{t['parameters'] / 1e6:.1f}M",
                     f"{t['active_parameters'] / 1e6:.1f}M", 1, f"{t['val_loss']:.3f}", "-", "-", "-"])
        for row, a in zip(rows, summary["arms"].values()):
            row.append(f"{a['retained_pct']:.1f}%")
        rows[-1].append("100%")
        headers.append("teacher loss / loss")
    return format_table(headers, rows)


def seed_table(summary: dict[str, Any]) -> str:
    """Final validation loss per seed and arm, and the paired difference the verdict is judged on."""
    arms = list(summary["arms"])
    paired = summary["paired"]
    headers = ["seed", *arms, "paired diff"]
    rows = []
    for seed, diff in paired["diffs"].items():
        losses = [f"{_loss_at(summary['arms'][a], seed):.3f}" for a in arms]
        rows.append([seed, *losses, f"{diff:+.3f}"])
    rows.append(["mean", *[f"{summary['arms'][a]['val_loss_mean']:.3f}" for a in arms], f"{paired['mean']:+.3f}"])
    return format_table(headers, rows)


def _loss_at(arm: dict[str, Any], seed: int | str) -> float:
    """An arm's final loss on `seed` (JSON turns the int keys into strings)."""
    by_seed = {str(k): v for k, v in arm["val_loss_by_seed"].items()}
    return by_seed[str(seed)]


def _task_label(task: str) -> str:
    return task.removeprefix("pyramoe_stdlib_")


def _acc_cell(stats: dict[str, float]) -> str:
    return f"{stats['mean']:.3f} ({stats['min']:.3f}-{stats['max']:.3f})"


def accuracy_table(summary: dict[str, Any]) -> str:
    """One row per arm: each task's zero-shot accuracy and their mean, mean (min-max) over seeds; the
    teacher's (one seed) and each student's mean as a percentage of it for a distillation study; chance."""
    zeroshot = summary["zeroshot"]
    names = [*zeroshot["examples"], "mean"]
    headers = ["arm", "seeds", *[f"{_task_label(n)} (n={zeroshot['examples'][n]})" if n != "mean" else "mean"
                                 for n in names]]
    teacher = summary.get("teacher_accuracy")
    if teacher is not None:
        headers.append("% of teacher (min-max)")
    rows = []
    for name, arm in summary["arms"].items():
        if "accuracy" not in arm:  # an arm whose runs were not all scored (e.g. reused from an unscored study)
            rows.append([name, len(arm["seeds"]), *["-" for _ in names], *(["-"] if teacher is not None else [])])
            continue
        row = [name, len(arm["seeds"]), *[_acc_cell(arm["accuracy"][n]) for n in names]]
        if teacher is not None:
            pct = arm["accuracy_pct_of_teacher"]
            row.append(f"{pct['mean']:.1f}% ({pct['min']:.1f}-{pct['max']:.1f})")
        rows.append(row)
    if teacher is not None:
        rows.append([f"teacher (seed {summary['teacher']['seed']})", 1, *[f"{teacher[n]:.3f}" for n in names],
                     "100%"])
    chance = zeroshot["chance"]
    rows.append(["chance", "-", *[f"{chance[n]:.3f}" for n in names], *(["-"] if teacher is not None else [])])
    return format_table(headers, rows)


def accuracy_seed_table(summary: dict[str, Any]) -> str:
    """Mean zero-shot accuracy per seed and arm, and the paired difference the accuracy verdict is judged on
    (the expected-better arm minus the other)."""
    arms = list(summary["arms"])
    paired = summary["paired_accuracy"]
    rows = []
    for seed, diff in paired["diffs"].items():
        accs = [f"{_by_seed_str(summary['arms'][a]['accuracy_by_seed'])[str(seed)]['mean']:.3f}" for a in arms]
        rows.append([seed, *accs, f"{diff:+.3f}"])
    rows.append(["mean", *[f"{summary['arms'][a]['accuracy']['mean']['mean']:.3f}" for a in arms],
                 f"{paired['mean']:+.3f}"])
    return format_table(["seed", *[f"{a} acc" for a in arms], "paired diff"], rows)


def _by_seed_str(values: dict[Any, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in values.items()}


def accuracy_line(summary: dict[str, Any]) -> str:
    z = summary["zeroshot"]
    s = z["settings"]
    limit = "every example" if s["limit"] is None else f"the first {s['limit']} examples"
    cost = z["seconds_per_checkpoint"]
    return (f"Zero-shot accuracy of each run's final checkpoint on pyramoe's local tasks ({limit} of each, the "
            f"same for every model; {s['dtype']}, MoE layers dropless; lm-eval's `acc`, computed in-process by "
            "pyramoe/evaluation/accuracy.py): mean (min-max) over seeds, *mean* is the mean over the tasks. "
            f"Scoring took {cost['mean']:.0f} s per checkpoint ({cost['min']:.0f}-{cost['max']:.0f}; wall time) with "
            f"{'/'.join(map(str, z.get('threads') or ['?']))} torch thread(s).")


def direction_line(summary: dict[str, Any]) -> str:
    """The verdict on validation loss and, when scored, on zero-shot accuracy."""
    loss = summary["verdict"]
    accuracy = summary.get("accuracy_verdict")
    if accuracy is None:
        return f"**Direction:** {loss} (zero-shot accuracy not measured)."
    return (f"**Direction:** {loss.split(':')[0]} on validation loss, {accuracy.split(':')[0]} on zero-shot "
            f"accuracy. Loss: {loss}. Accuracy: {accuracy}.")


def settings_line(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    return (f"{s['steps']} steps of {s['batch_size']}x{s['seq_len']} tokens per run ({s['tokens_per_run']:,} tokens), "
            f"lr {s['lr']:g}, {s['precision']}, corpus {s['corpus']}")


def plot_study(summary: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for i, name in enumerate(summary["arms"]):
        runs = [r for r in summary["runs"] if r["arm"] == name]
        for j, run in enumerate(runs):
            points = sorted((int(step), loss) for step, loss in run["val_losses"].items())
            ax.plot(*zip(*points), color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
    ax.set(xlabel="step", ylabel="validation loss", title=summary["title"])
    finals = [r["val_loss"] for r in summary["runs"]]
    ax.set_ylim(min(finals) - 0.3, min(ax.get_ylim()[1], max(finals) + 1.5))
    ax.legend()
    seeds = ",".join(str(s) for s in next(iter(summary["arms"].values()))["seeds"])
    fig.text(0.01, 0.01, f"{settings_line(summary)}; seeds {seeds}\nmeasured on {summary['machine']}",
             fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def study_section(study: Study, summary: dict[str, Any], image_dir: str) -> list[str]:
    if study.compare == "inference":
        from pyramoe.experiments.inference_study import inference_section

        return inference_section(study, summary, image_dir, settings_line(summary))
    seeds = ",".join(str(s) for s in next(iter(summary["arms"].values()))["seeds"])
    lines = [
        f"**Measured** (`pyramoe experiments {study.name}`: {settings_line(summary)}; seeds {seeds}; "
        f"{summary['machine']}):",
        "", "```", report_table(summary), "", seed_table(summary), "```", "",
    ]
    timing = summary.get("step_time")
    if timing:
        lines += [f"Step times: one interleaved run, {timing['rounds']} rounds after {timing['warmup']} warm-up, "
                  f"{timing['batch_size']}x{timing['seq_len']} tokens, {timing['precision']}, "
                  f"{timing['threads']} threads; \"time / {timing['baseline']}\" is the median (min-max) "
                  "of each round's ratio.", ""]
    if summary.get("paired_accuracy") is not None:
        lines += [accuracy_line(summary), "", "```", accuracy_table(summary), "", accuracy_seed_table(summary),
                  "```", ""]
    lines += [f"![{study.name}]({image_dir}{study.name}.png)", "", direction_line(summary), ""]
    if study.notes:
        lines += [study.notes.format(**summary["settings"]), ""]
    return lines


def render_results(docs: Path, studies: dict[str, Study]) -> Path:
    """docs/results.md from every study summary present in `docs` (studies not yet run are listed)."""
    out = docs.parent / "results.md" if docs.name == "results" else docs / "results.md"
    image_dir = f"{docs.name}/" if out.parent != docs else ""
    lines = [
        "# Reproducing the paper's claims at small scale",
        "",
        "Generated by `pyramoe experiments` from the summaries in this folder; every number below was",
        "measured by the command given with it, on the machine named with it. Each study states its",
        "models' sizes (blocks, parameters) and training settings; these small runs test the *direction*",
        "of each claim, not its size. Arms share each seed's initialisation and batch order and score the",
        "same validation batches and task records, so verdicts pair them example by example: the",
        "difference (validation loss per batch; zero-shot outcome per record, mean over the tasks) with a",
        "95% interval from a paired bootstrap over the examples, pooled over seeds. *holds* when the",
        "interval excludes zero in the expected direction, *contradicted* when it excludes zero the other",
        "way, *inconclusive* otherwise. Runs recorded before per-example data was kept fall back to the",
        "seed rule (at least 2 seeds, every paired difference of the expected sign, mean above spread).",
        "The zero-shot tasks are built from the corpus's held-out files, deduplicated against its",
        "training split; chance levels and trivial-strategy baselines are shown.",
        "",
    ]
    for study in studies.values():
        path = docs / f"{study.name}.json"
        lines += [f"## {study.title}", "", f"**Paper:** {study.paper_finding}", ""]
        if not path.is_file():
            lines += [f"Not run yet: `pyramoe experiments {study.name}`.", ""]
            continue
        lines += study_section(study, json.loads(path.read_text()), image_dir)
    commentary = docs / "commentary.md"  # hand-written reading of the numbers, kept across re-renders
    if commentary.is_file():
        lines += [commentary.read_text().strip(), ""]
    out.write_text("\n".join(lines))
    return out
