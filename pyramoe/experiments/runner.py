"""Run a study: every arm x seed as a training run, then a summary with paired verdicts.

Runs are keyed by their full settings (pyramoe/experiments/plan.py). A finished run leaves
`result.json` (with its key and settings) and is read back only under the same key; an interrupted
run resumes from its latest checkpoint, or restarts cleanly when it saved none.

Every finished run's final checkpoint is then scored zero-shot on pyramoe's local accuracy tasks
(pyramoe/evaluation/accuracy.py: the numbers `pyramoe eval --tasks` gives, computed in-process), once:
the accuracies (with each record's outcome) are stored in its result.json under a key of the task
data and eval settings, so a re-report reads them back and a change of tasks or settings scores again.
The final evaluation's per-batch validation losses are kept too: verdicts pair both example by example
(pyramoe/experiments/verdicts.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from pyramoe.bench.common import machine_label, write_json
from pyramoe.config import ModelConfig
from pyramoe.experiments.plan import STUDENT_SEED_OFFSET, ArmPlan, config_key, plan_arm
from pyramoe.experiments.rundirs import RESULT_FILE, checkpoint_run_dir
from pyramoe.experiments.studies import Study
from pyramoe.experiments.timing import measure_step_times, speedups
from pyramoe.experiments.verdicts import (
    accuracy_verdict,
    fewer_params_verdict,
    loss_verdict,
    paired_bootstrap,
    paired_differences,
    speed_outcome,
    step_time_verdict,
)
from pyramoe.models import count_active_parameters, count_parameters
from pyramoe.train import checkpoint as ckpt_io
from pyramoe.train.distill import create_distill_trainer, resolve_distill_run
from pyramoe.train.metrics import METRICS_FILE
from pyramoe.train.session import LATEST, create_trainer, resolve_run
from pyramoe.train.trainer import Trainer

# Zero-shot scoring of each run's final checkpoint: every record of each local accuracy task (None: no
# limit; with the default corpus about 500 cloze, 5000 nextline, 100 docsig after deduplication), fp32,
# MoE layers dropless, in each checkpoint's trained seq_len.
ZEROSHOT_LIMIT: int | None = None
ZEROSHOT_DTYPE = "fp32"


@dataclass
class RunResult:
    arm: str
    seed: int  # the study's seed (arms are paired on it)
    train_seed: int  # the seed the run trained with (students: seed + STUDENT_SEED_OFFSET)
    val_loss: float
    val_losses: dict[int, float]  # step -> validation loss
    parameters: int
    active_parameters: int
    n_layers: int
    d_model: int
    tokens: int
    # {"key", "settings", "checkpoint", "seconds", "tasks": {task: {"acc", "n", "chance", "baseline",
    # "outcomes"}}} once scored
    zeroshot: dict[str, Any] | None = None
    val_batch_losses: list[float] | None = None  # the final evaluation's per-batch losses, when recorded


# -- one run ----------------------------------------------------------------------------------------------


def read_result(plan: ArmPlan) -> RunResult | None:
    """The finished run's result, only when it was produced under the plan's key."""
    path = plan.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("key") != plan.key:
        return None
    values = {f.name: data[f.name] for f in fields(RunResult) if f.name in data or f.default is dataclasses.MISSING}
    values["val_losses"] = {int(k): v for k, v in values["val_losses"].items()}
    return RunResult(**values)


def same_run_elsewhere(plan: ArmPlan) -> RunResult | None:
    """The result of a run with the very same settings in another directory - an identical arm in
    another study, or this arm keyed by older code whose stored settings come to the same key -
    recorded in this run's directory with where it came from."""
    root = plan.run_dir.parent.parent
    for path in sorted(root.glob(f"*/*-seed{plan.seed}-*/{RESULT_FILE}")):
        data = json.loads(path.read_text())
        same = data.get("key") == plan.key or stored_settings_key(data.get("config") or {}, root) == plan.key
        if same and path.parent != plan.run_dir:
            data = {**data, "arm": plan.arm.name, "key": plan.key, "reused_from": str(path.parent)}
            write_json(plan.run_dir / RESULT_FILE, data)
            return read_result(plan)
    return None


def stored_settings_key(config: dict[str, Any], root: Path, depth: int = 0) -> str:
    """The key that stored settings come to under the current code. A student's settings name its
    teacher by the teacher's key when it trained; that is replaced by the key the teacher's own stored
    settings come to now, so that a student keyed by older code is found like any other run."""
    distill = config.get("distill")
    teacher = distill.get("teacher") if isinstance(distill, dict) else None
    if isinstance(teacher, str) and depth < 4:
        for path in sorted(root.glob(f"*/*-{teacher}/{RESULT_FILE}")):
            stored = json.loads(path.read_text()).get("config")
            if stored:
                current = stored_settings_key(stored, root, depth + 1)
                config = {**config, "distill": {**distill, "teacher": current}}
                break
    return config_key(config)


def open_trainer(plan: ArmPlan, progress: bool) -> Trainer:
    """A new run, or the interrupted one resumed from its latest checkpoint. A directory without a
    checkpoint (stopped before its first save) or with a stale result is cleared and started again."""
    latest = ckpt_io.latest_checkpoint(ckpt_io.checkpoint_root(plan.run_dir))
    stale = (plan.run_dir / RESULT_FILE).is_file()
    if plan.run_dir.exists() and (latest is None or stale):
        shutil.rmtree(plan.run_dir)
        latest = None
    resume = LATEST if latest is not None else None
    if plan.is_student:
        return create_distill_trainer(resolve_distill_run(plan.sources, resume), progress=progress)
    run, ckpt = resolve_run(plan.sources, resume)
    return create_trainer(run, ckpt, progress=progress)


def final_batch_losses(run_dir: Path) -> list[float] | None:
    """The last evaluation's per-batch validation losses from metrics.jsonl (None: not recorded)."""
    last = None
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("type") == "eval":
                last = record
    losses = (last or {}).get("val_batch_losses")
    return [float(x) for x in losses] if losses else None


def eval_curve(run_dir: Path) -> dict[int, float]:
    """step -> validation loss from metrics.jsonl, across resumed sessions (the last record per step wins)."""
    curve: dict[int, float] = {}
    for line in (run_dir / METRICS_FILE).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("type") == "eval":
                curve[int(record["step"])] = float(record["val_loss"])
    return dict(sorted(curve.items()))


def run_arm(plan: ArmPlan, progress: bool = True) -> RunResult:
    """Train (or resume) the planned run unless its result under this key is already there."""
    cached = read_result(plan) or same_run_elsewhere(plan)
    if cached is not None:
        return cached
    trainer = open_trainer(plan, progress)
    fit = trainer.fit()
    if fit.stopped_by is not None:
        raise KeyboardInterrupt
    curve = eval_curve(plan.run_dir)
    config = trainer.model.config
    result = RunResult(
        arm=plan.arm.name, seed=plan.seed, train_seed=plan.train_seed, val_loss=curve[max(curve)],
        val_losses=curve, parameters=count_parameters(trainer.model),
        active_parameters=count_active_parameters(trainer.model), n_layers=config.n_layers,
        d_model=config.d_model, tokens=trainer.tokens_seen, val_batch_losses=final_batch_losses(plan.run_dir),
    )
    write_json(plan.run_dir / RESULT_FILE, {**asdict(result), "key": plan.key, "config": plan.config})
    return result


# -- zero-shot accuracy ----------------------------------------------------------------------------------


def zeroshot_settings(limit: int | None = None, dtype: str | None = None) -> dict[str, Any]:
    """What a stored accuracy must have been measured with (task data hashed, tasks, limit, dtype)."""
    from pyramoe.evaluation.accuracy import ACCURACY_TASKS, eval_settings
    from pyramoe.evaluation.taskdata import build_tasks

    limit = ZEROSHOT_LIMIT if limit is None else limit
    return eval_settings(ACCURACY_TASKS, limit, dtype or ZEROSHOT_DTYPE, build_tasks())


def score_checkpoint(checkpoint: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """task -> {"acc", "n", "chance"} of a checkpoint (the tasks and limit of `settings`)."""
    from pyramoe.evaluation.accuracy import checkpoint_accuracy

    return checkpoint_accuracy(checkpoint, settings["tasks"], settings["limit"], settings["dtype"])


def _stored_zeroshot(run_dir: Path, key: str) -> dict[str, Any] | None:
    path = run_dir / RESULT_FILE
    stored = json.loads(path.read_text()).get("zeroshot") if path.is_file() else None
    return stored if isinstance(stored, dict) and stored.get("key") == key else None


def _store_zeroshot(run_dir: Path, entry: dict[str, Any]) -> None:
    path = run_dir / RESULT_FILE
    write_json(path, {**json.loads(path.read_text()), "zeroshot": entry})


def add_zeroshot(plan: ArmPlan, result: RunResult, settings: dict[str, Any]) -> RunResult:
    """The run's result with the zero-shot accuracies of its final checkpoint: read back when stored
    under these settings (in its own result.json, or in the one of the run it was reused from), else
    scored now and stored in both."""
    from pyramoe.evaluation.accuracy import settings_key

    key = settings_key(settings)
    if result.zeroshot is not None and result.zeroshot.get("key") == key:
        return result
    source = checkpoint_run_dir(plan.run_dir)
    entry = _stored_zeroshot(source, key)
    if entry is None:
        checkpoint = ckpt_io.latest_checkpoint(ckpt_io.checkpoint_root(source))
        step = ckpt_io.load_checkpoint(checkpoint).step
        if step != max(result.val_losses):
            raise ValueError(f"{checkpoint}: step {step}, but the run's final step is {max(result.val_losses)}")
        start = time.perf_counter()
        tasks = score_checkpoint(checkpoint, settings)
        entry = {"key": key, "settings": settings, "checkpoint": f"{source.name}/{checkpoint.name}",
                 "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(), "tasks": tasks}
        if source != plan.run_dir:
            _store_zeroshot(source, entry)
    _store_zeroshot(plan.run_dir, entry)
    return dataclasses.replace(result, zeroshot=entry)


# -- summary ---------------------------------------------------------------------------------------------


def arm_summary(arm_name: str, preset: str, model: dict[str, Any], results: list[RunResult]) -> dict[str, Any]:
    mine = [r for r in results if r.arm == arm_name]
    losses = [r.val_loss for r in mine]
    return {
        "preset": preset, "model": model, "seeds": [r.seed for r in mine],
        "val_loss_by_seed": {r.seed: r.val_loss for r in mine},
        "val_loss_mean": statistics.mean(losses), "val_loss_min": min(losses), "val_loss_max": max(losses),
        "val_loss_spread": max(losses) - min(losses),
        "parameters": mine[0].parameters, "active_parameters": mine[0].active_parameters,
        "n_layers": mine[0].n_layers, "d_model": mine[0].d_model,
    } | accuracy_summary(mine)


def run_accuracy(result: RunResult | dict[str, Any]) -> dict[str, float] | None:
    """task -> accuracy and "mean" (over the tasks) of a scored run; None when it was not scored."""
    zeroshot = result.zeroshot if isinstance(result, RunResult) else result.get("zeroshot")
    if not zeroshot:
        return None
    accs = {task: entry["acc"] for task, entry in zeroshot["tasks"].items()}
    return accs | {"mean": statistics.mean(accs.values())}


def accuracy_summary(results: list[RunResult]) -> dict[str, Any]:
    """An arm's zero-shot accuracy by seed, and per task (and their mean) its mean, min, max and spread
    over seeds; nothing when a run of the arm was not scored."""
    by_seed = {r.seed: run_accuracy(r) for r in results}
    if not by_seed or any(acc is None for acc in by_seed.values()):
        return {}
    stats = {}
    for name in next(iter(by_seed.values())):
        values = [acc[name] for acc in by_seed.values()]
        stats[name] = {"mean": statistics.mean(values), "min": min(values), "max": max(values),
                       "spread": max(values) - min(values)}
    return {"accuracy_by_seed": by_seed, "accuracy": stats}


def run_settings(plan: ArmPlan) -> dict[str, Any]:
    """The settings a report states, read from a run's resolved config (never assumed)."""
    train = plan.config["train"]
    tokens = train["steps"] * train["batch_size"] * train["seq_len"] * train["grad_accum"]
    return {key: train[key] for key in ("steps", "batch_size", "seq_len", "grad_accum", "lr", "min_lr", "warmup",
                                        "precision", "corpus")} | {"tokens_per_run": tokens}


def verdict(study: Study, summary: dict[str, Any]) -> str:
    """The paper's direction judged on paired differences by seed (see pyramoe/experiments/verdicts.py)."""
    if study.compare == "inference":  # decode speed against the quality-equivalent dense arm
        from pyramoe.experiments.inference_study import inference_verdict

        return inference_verdict(summary)
    better, worse = summary["arms"][study.expected_better], summary["arms"][study.expected_worse]
    # summarize's pairing carries the per-batch bootstrap; without it the verdict fell back to the seed rule
    paired = summary.get("paired") or paired_differences(_by_seed(worse), _by_seed(better))
    if study.compare == "step_time":
        rounds = speedups(summary["step_time"], study.expected_better) if summary.get("step_time") else []
        return step_time_verdict(study.expected_better, study.expected_worse, rounds, study.speedup_threshold, paired)
    if study.compare == "loss_per_param":
        params = (better["parameters"], worse["parameters"])
        return fewer_params_verdict(study.expected_better, study.expected_worse, params, paired)
    return loss_verdict(study.expected_better, study.expected_worse, paired)


def _by_seed(arm: dict[str, Any]) -> dict[int, float]:
    return {int(seed): loss for seed, loss in arm["val_loss_by_seed"].items()}


def _outcomes(run: dict[str, Any]) -> dict[str, list[float]] | None:
    """task -> 1/0 per record of a scored run (None: scored before outcomes were stored)."""
    tasks = (run.get("zeroshot") or {}).get("tasks") or {}
    if not tasks or any("outcomes" not in entry for entry in tasks.values()):
        return None
    return {task: [float(c == "1") for c in entry["outcomes"]] for task, entry in tasks.items()}


def _batch_losses(run: dict[str, Any]) -> dict[str, list[float]] | None:
    losses = run.get("val_batch_losses")
    return {"val": losses} if losses else None


def _per_example(summary: dict[str, Any], arm: str, values) -> dict[int, dict[str, list[float]]]:
    """seed -> group -> per-example values of an arm's runs; empty when any run lacks them (the verdict
    then falls back to the seed rule rather than pairing a subset)."""
    out = {}
    for run in summary["runs"]:
        if run["arm"] == arm:
            found = values(run)
            if found is None:
                return {}
            out[run["seed"]] = found
    return out


def _mean_accuracy_by_seed(arm: dict[str, Any]) -> dict[int, float]:
    return {int(seed): acc["mean"] for seed, acc in arm["accuracy_by_seed"].items()}


def add_accuracy(study: Study, summary: dict[str, Any]) -> None:
    """Paired mean-accuracy differences (expected-better arm minus the other) and the accuracy verdict,
    when every run was scored; with the tasks' example counts, chance levels and settings."""
    better, worse = summary["arms"][study.expected_better], summary["arms"][study.expected_worse]
    scored = [r["zeroshot"] for r in summary["runs"] if r.get("zeroshot")]
    if "accuracy" not in better or "accuracy" not in worse or not scored:
        return
    tasks = scored[0]["tasks"]
    chance = {task: entry["chance"] for task, entry in tasks.items()}
    seconds = [z["seconds"] for z in scored]
    summary["zeroshot"] = {
        "settings": scored[0]["settings"], "examples": {task: entry["n"] for task, entry in tasks.items()},
        "chance": chance | {"mean": statistics.mean(chance.values())},
        "seconds_per_checkpoint": {"mean": statistics.mean(seconds), "min": min(seconds), "max": max(seconds)},
        "threads": sorted({z.get("threads") for z in scored if z.get("threads")}),
    }
    paired = paired_differences(_mean_accuracy_by_seed(better), _mean_accuracy_by_seed(worse))  # better - worse
    paired["bootstrap"] = paired_bootstrap(_per_example(summary, study.expected_better, _outcomes),
                                           _per_example(summary, study.expected_worse, _outcomes))
    summary["paired_accuracy"] = paired
    speed = None
    if study.compare == "step_time" and summary.get("step_time"):
        speed = speed_outcome(speedups(summary["step_time"], study.expected_better), study.speedup_threshold)
    summary["accuracy_verdict"] = accuracy_verdict(study.compare, study.expected_better, study.expected_worse,
                                                   paired, speed)


def summarize(
    study: Study, plans: list[ArmPlan], results: list[RunResult], step_time: dict[str, Any] | None = None,
) -> dict[str, Any]:
    arms = {arm.name: arm_summary(arm.name, arm.preset, arm.model, results) for arm in study.arms}
    summary = {
        "study": study.name, "title": study.title, "paper": study.paper_finding,
        "settings": run_settings(plans[0]), "machine": machine_label(), "arms": arms,
        "runs": [asdict(r) for r in results], "step_time": step_time,
    }
    better, worse = arms[study.expected_better], arms[study.expected_worse]
    summary["paired"] = paired_differences(_by_seed(worse), _by_seed(better))
    summary["paired"]["bootstrap"] = paired_bootstrap(  # worse - better: lower loss is the expected direction
        _per_example(summary, study.expected_worse, _batch_losses),
        _per_example(summary, study.expected_better, _batch_losses))
    summary["verdict"] = verdict(study, summary)
    add_accuracy(study, summary)
    return summary


def retained_pct(teacher_loss: float, student_loss: float) -> float:
    """The teacher's validation loss over the student's, in percent (above 100: the student is lower)."""
    return 100.0 * teacher_loss / student_loss


def accuracy_pct_of_teacher(teacher_acc: float, student_acc: float) -> float:
    """The student's zero-shot accuracy as a percentage of its teacher's (the paper's 99.1-99.5%)."""
    return 100.0 * student_acc / teacher_acc


def add_teacher(summary: dict[str, Any], teacher: RunResult, teacher_plan: ArmPlan, plans: list[ArmPlan]) -> None:
    """Teacher row, retained_pct per student arm (and, when scored, each student's accuracy as a
    percentage of the teacher's: of the mean over seeds, and its min-max over seeds) and the
    distillation settings the notes state."""
    summary["teacher"] = asdict(teacher)
    teacher_acc = run_accuracy(teacher)
    for arm in summary["arms"].values():
        arm["retained_pct"] = retained_pct(teacher.val_loss, arm["val_loss_mean"])
        if teacher_acc is not None and "accuracy" in arm:
            by_seed = [accuracy_pct_of_teacher(teacher_acc["mean"], a["mean"])
                       for a in arm["accuracy_by_seed"].values()]
            arm["accuracy_pct_of_teacher"] = {
                "mean": accuracy_pct_of_teacher(teacher_acc["mean"], arm["accuracy"]["mean"]["mean"]),
                "min": min(by_seed), "max": max(by_seed)}
    if teacher_acc is not None:
        summary["teacher_accuracy"] = teacher_acc
    stops = [p.config["distill"].get("kd_stop_step") for p in plans
             if p.config["distill"]["kd_schedule"] == "stop" and p.config["distill"]["kd_weight"] > 0]
    student = next(iter(summary["arms"].values()))
    summary["settings"] |= {
        "teacher_steps": teacher_plan.config["train"]["steps"], "teacher_preset": teacher_plan.arm.preset,
        "teacher_layers": teacher.n_layers, "student_layers": student["n_layers"],
        "dropped_layers": teacher.n_layers - student["n_layers"], "kd_stop_step": stops[0] if stops else None,
        "student_seed_offset": STUDENT_SEED_OFFSET,
    }


def time_arms(study: Study, plans: list[ArmPlan], root: Path) -> dict[str, Any] | None:
    """Interleaved step times of the arms' models (plain arms only: students' steps include a teacher)."""
    if study.teacher is not None or study.compare == "inference":  # the inference study times decoding
        return None
    first = {p.arm.name: p for p in reversed(plans)}  # one plan per arm
    configs = {name: ModelConfig.from_dict(p.config["model_config"]) for name, p in first.items()}
    train = plans[0].config["train"]
    return measure_step_times(configs, study.expected_worse, train["batch_size"], train["seq_len"],
                              train["precision"], root / study.name, rounds=study.timing_rounds)


def run_study(
    study: Study, root: Path, docs: Path, train: dict[str, Any] | None = None,
    seeds: tuple[int, ...] | None = None, progress: bool = True, zeroshot: bool | None = None,
) -> dict[str, Any]:
    """Train every arm x seed (the teacher first, once, for a distillation study), score each final
    checkpoint zero-shot (when `zeroshot`, default: the study's), time the arms, and write
    docs/NAME.json and docs/NAME.png."""
    from pyramoe.experiments.report import plot_study

    seeds, train = seeds or study.seeds, train or {}
    zeroshot = study.zeroshot if zeroshot is None else zeroshot
    scoring = zeroshot_settings() if zeroshot else None

    def finish(plan: ArmPlan) -> RunResult:
        result = run_arm(plan, progress)
        if scoring is None:
            return result
        if train.get("threads"):
            torch.set_num_threads(int(train["threads"]))
        return add_zeroshot(plan, result, scoring)

    teacher_plan = teacher = None
    if study.teacher is not None:
        teacher_plan = plan_arm(study, study.teacher, seeds[0], root, train, study.teacher_steps)
        teacher = finish(teacher_plan)
        # students load the teacher from where its checkpoint is (its key names it in theirs)
        teacher_plan = dataclasses.replace(teacher_plan, run_dir=checkpoint_run_dir(teacher_plan.run_dir))
    results, plans = [], []
    for seed in seeds:
        for arm in study.arms:
            plans.append(plan_arm(study, arm, seed, root, train, study.steps, teacher_plan))
            results.append(finish(plans[-1]))
    summary = summarize(study, plans, results, time_arms(study, plans, root))
    if study.compare == "inference":  # re-timed on every call; the runs are reused
        from pyramoe.experiments.inference_study import time_inference_study

        time_inference_study(study, summary, plans, train, progress)
    if teacher is not None and teacher_plan is not None:
        add_teacher(summary, teacher, teacher_plan, plans)
    write_json(docs / f"{study.name}.json", summary)
    plot_study(summary, docs / f"{study.name}.png")
    return summary
