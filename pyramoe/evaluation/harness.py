"""lm-evaluation-harness in-process: local tasks first, offline, with chance levels beside the scores."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from pyramoe.data import DEFAULT_VAL_PERCENT
from pyramoe.evaluation.taskdata import TASK_VAL_PERCENT, TASKS
from pyramoe.tables import format_table

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TAG = "pyramoe_stdlib"
_OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("--tasks: give one or more task names, comma-separated")
    return list(dict.fromkeys(names))


def _is_local(name: str) -> bool:
    """A name of this package's task configs (all begin with "pyramoe_"; the harness has none such)."""
    return name.startswith("pyramoe_")


def task_manager(tasks: list[str]):
    """Only the local configs when every task is local (fast, and surely offline); else the harness's
    own tasks too. An unknown task name is one line naming it."""
    from lm_eval.tasks import TaskManager

    local = all(_is_local(t) for t in tasks)
    if local:
        for key, value in _OFFLINE.items():
            os.environ.setdefault(key, value)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not local)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            raise ValueError(f"--tasks: unknown task {name!r} (local tasks: {', '.join([LOCAL_TAG, *TASKS])})")
    return manager


def load_model(checkpoint: str, dtype: str = "fp32", batch_size: int | None = None, quantize: str | None = None):
    """The harness model "pyramoe" (a PyramoeLM) for a checkpoint, run or Hugging Face directory
    (`quantize`: its linear layers and experts quantized, `pyramoe.inference.packing.quantize_model`)."""
    from pyramoe.evaluation.lm import PyramoeLM

    return PyramoeLM(checkpoint=checkpoint, dtype=dtype, batch_size=batch_size, quantize=quantize)


def heldout_warning(source, tasks: list[str]) -> str | None:
    """Why the local tasks may not be held out for this model, if they may not: it trained on the
    stdlib with a smaller validation share than the tasks' (its training split then holds task files)."""
    if source.step is None or not any(_is_local(t) for t in tasks):
        return None
    from pyramoe.checkpoint import load_checkpoint

    train = load_checkpoint(source.path).state["run_config"]["train"]
    val_percent = float(train.get("val_percent", DEFAULT_VAL_PERCENT))
    if train.get("corpus") == "stdlib" and val_percent < TASK_VAL_PERCENT:
        return (f"{source.path} trained on the stdlib with val_percent={val_percent:g} < {TASK_VAL_PERCENT:g}: "
                "some of the local tasks' files were in its training split")
    return None


def run_zeroshot(model, tasks: list[str], limit: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """simple_evaluate on a PyramoeLM (see `load_model`); returns the harness's results dictionary."""
    import lm_eval

    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    if not verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstrap stderr in this process, not a pool per core
    manager = task_manager(tasks)
    with contextlib.ExitStack() as quiet:
        if not verbose:  # progress bars and prints of the harness (stdout must stay clean for --json)
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager,
                                       log_samples=False, bootstrap_iters=1000)


def chance_of(results: dict[str, Any], task: str) -> float | None:
    metadata = results.get("configs", {}).get(task, {}).get("metadata") or {}
    chance = metadata.get("chance")
    return float(chance) if isinstance(chance, (int, float)) else None


def summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """task -> {metric: value, metric_stderr: value, "chance": ..., "n": ...} (filters dropped when only
    "none")."""
    out: dict[str, dict[str, Any]] = {}
    for task, metrics in results.get("results", {}).items():
        entry: dict[str, Any] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}[{filt}]"
            entry[name] = float(value)
        entry["chance"] = chance_of(results, task)
        n = results.get("n-samples", {}).get(task, {})
        entry["n"] = n.get("effective")
        out[task] = entry
    return out


def table(results: dict[str, Any]) -> str:
    """The harness's columns (task, version, n-shot, metric, value, stderr) plus chance."""
    rows = []
    versions = results.get("versions", {})
    shots = results.get("n-shot", {})
    for task, entry in summary(results).items():
        for metric, value in entry.items():
            if metric in ("chance", "n") or metric.endswith("_stderr") or "_stderr[" in metric:
                continue
            stderr = entry.get(f"{metric}_stderr") if "[" not in metric else None
            chance = entry["chance"] if metric.split("[")[0] in ("acc", "acc_norm", "exact_match") else None
            rows.append([task, str(versions.get(task, "-")), shots.get(task, 0), entry["n"], metric,
                         _num(value), _num(stderr), _num(chance)])
    return format_table(["task", "version", "n-shot", "n", "metric", "value", "stderr", "chance"], rows)


def _num(value: Any) -> str | None:
    if value is None or not isinstance(value, (int, float)):
        return None
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def zeroshot_record(step: int, checkpoint: str, results: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """metrics.jsonl record: {"type": "zeroshot", "step", "checkpoint", "limit", "tasks": summary}."""
    return {"type": "zeroshot", "step": step, "checkpoint": checkpoint, "limit": limit, "tasks": summary(results)}
