"""Run a study: every arm x seed as a training run, then a summary with paired verdicts.

Runs are keyed by their full settings (pyramoe/experiments/plan.py). A finished run leaves
`result.json` (with its key and settings) and is read back only under the same key; an interrupted
run resumes from its latest checkpoint, or restarts cleanly when it saved none.
"""

from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pyramoe.bench.common import machine_label, write_json
from pyramoe.config import ModelConfig
from pyramoe.experiments.plan import STUDENT_SEED_OFFSET, ArmPlan, config_key, plan_arm
from pyramoe.experiments.studies import Study
from pyramoe.experiments.timing import measure_step_times, speedups
from pyramoe.experiments.verdicts import fewer_params_verdict, loss_verdict, paired_differences, step_time_verdict
from pyramoe.models import count_active_parameters, count_parameters
from pyramoe.train import checkpoint as ckpt_io
from pyramoe.train.distill import create_distill_trainer, resolve_distill_run
from pyramoe.train.metrics import METRICS_FILE
from pyramoe.train.session import LATEST, create_trainer, resolve_run
from pyramoe.train.trainer import Trainer

RESULT_FILE = "result.json"


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


# -- one run ----------------------------------------------------------------------------------------------


def read_result(plan: ArmPlan) -> RunResult | None:
    """The finished run's result, only when it was produced under the plan's key."""
    path = plan.run_dir / RESULT_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if data.get("key") != plan.key:
        return None
    values = {f.name: data[f.name] for f in fields(RunResult)}
    values["val_losses"] = {int(k): v for k, v in values["val_losses"].items()}
    return RunResult(**values)


def same_run_elsewhere(plan: ArmPlan) -> RunResult | None:
    """The result of a run with the very same settings in another directory - an identical arm in
    another study, or this arm keyed by older code whose stored settings come to the same key -
    recorded in this run's directory with where it came from."""
    root = plan.run_dir.parent.parent
    for path in sorted(root.glob(f"*/*-seed{plan.seed}-*/{RESULT_FILE}")):
        data = json.loads(path.read_text())
        same = data.get("key") == plan.key or config_key(data.get("config") or {}) == plan.key
        if same and path.parent != plan.run_dir:
            data = {**data, "arm": plan.arm.name, "key": plan.key, "reused_from": str(path.parent)}
            write_json(plan.run_dir / RESULT_FILE, data)
            return read_result(plan)
    return None


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
        d_model=config.d_model, tokens=trainer.tokens_seen,
    )
    write_json(plan.run_dir / RESULT_FILE, {**asdict(result), "key": plan.key, "config": plan.config})
    return result


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
    }


def run_settings(plan: ArmPlan) -> dict[str, Any]:
    """The settings a report states, read from a run's resolved config (never assumed)."""
    train = plan.config["train"]
    tokens = train["steps"] * train["batch_size"] * train["seq_len"] * train["grad_accum"]
    return {key: train[key] for key in ("steps", "batch_size", "seq_len", "grad_accum", "lr", "min_lr", "warmup",
                                        "precision", "corpus")} | {"tokens_per_run": tokens}


def verdict(study: Study, summary: dict[str, Any]) -> str:
    """The paper's direction judged on paired differences by seed (see pyramoe/experiments/verdicts.py)."""
    better, worse = summary["arms"][study.expected_better], summary["arms"][study.expected_worse]
    paired = paired_differences(_by_seed(worse), _by_seed(better))
    if study.compare == "step_time":
        rounds = speedups(summary["step_time"], study.expected_better) if summary.get("step_time") else []
        return step_time_verdict(study.expected_better, study.expected_worse, rounds, study.speedup_threshold, paired)
    if study.compare == "loss_per_param":
        params = (better["parameters"], worse["parameters"])
        return fewer_params_verdict(study.expected_better, study.expected_worse, params, paired)
    return loss_verdict(study.expected_better, study.expected_worse, paired)


def _by_seed(arm: dict[str, Any]) -> dict[int, float]:
    return {int(seed): loss for seed, loss in arm["val_loss_by_seed"].items()}


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
    summary["verdict"] = verdict(study, summary)
    return summary


def retained_pct(teacher_loss: float, student_loss: float) -> float:
    """The teacher's validation loss over the student's, in percent (above 100: the student is lower)."""
    return 100.0 * teacher_loss / student_loss


def add_teacher(summary: dict[str, Any], teacher: RunResult, teacher_plan: ArmPlan, plans: list[ArmPlan]) -> None:
    """Teacher row, retained_pct per student arm and the distillation settings the notes state."""
    summary["teacher"] = asdict(teacher)
    for arm in summary["arms"].values():
        arm["retained_pct"] = retained_pct(teacher.val_loss, arm["val_loss_mean"])
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
    if study.teacher is not None:
        return None
    first = {p.arm.name: p for p in reversed(plans)}  # one plan per arm
    configs = {name: ModelConfig.from_dict(p.config["model_config"]) for name, p in first.items()}
    train = plans[0].config["train"]
    return measure_step_times(configs, study.expected_worse, train["batch_size"], train["seq_len"],
                              train["precision"], root / study.name, rounds=study.timing_rounds)


def run_study(
    study: Study, root: Path, docs: Path, train: dict[str, Any] | None = None,
    seeds: tuple[int, ...] | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Train every arm x seed (the teacher first, once, for a distillation study), time the arms, and
    write docs/NAME.json and docs/NAME.png."""
    from pyramoe.experiments.report import plot_study

    seeds, train = seeds or study.seeds, train or {}
    teacher_plan = teacher = None
    if study.teacher is not None:
        teacher_plan = plan_arm(study, study.teacher, seeds[0], root, train, study.teacher_steps)
        teacher = run_arm(teacher_plan, progress)
    results, plans = [], []
    for seed in seeds:
        for arm in study.arms:
            plans.append(plan_arm(study, arm, seed, root, train, study.steps, teacher_plan))
            results.append(run_arm(plans[-1], progress))
    summary = summarize(study, plans, results, time_arms(study, plans, root))
    if teacher is not None and teacher_plan is not None:
        add_teacher(summary, teacher, teacher_plan, plans)
    write_json(docs / f"{study.name}.json", summary)
    plot_study(summary, docs / f"{study.name}.png")
    return summary
