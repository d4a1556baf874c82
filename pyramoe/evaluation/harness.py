"""lm-evaluation-harness in-process: local tasks first, offline, with chance levels and trivial
baselines beside the scores; the harness's own tasks from a local data directory where the Hub cannot be
reached (`standard`)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from pyramoe.data import DEFAULT_VAL_PERCENT
from pyramoe.evaluation import standard
from pyramoe.evaluation.baselines import task_baseline
from pyramoe.evaluation.taskdata import TASK_VAL_PERCENT, TASKS, build_tasks, read_task
from pyramoe.tables import format_table

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TAG = "pyramoe_stdlib"


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
        for key, value in standard.OFFLINE.items():
            os.environ.setdefault(key, value)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not local)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            raise ValueError(f"--tasks: unknown task {name!r} (local tasks: {', '.join([LOCAL_TAG, *TASKS])})")
    return manager


def load_model(checkpoint: str, dtype: str = "fp32", batch_size: int | None = None, max_length: int | None = None,
               quantize: str | None = None):
    """The harness model "pyramoe" (a PyramoeLM) for a checkpoint, run or Hugging Face directory, scoring
    at most `max_length` tokens (default: the length the checkpoint trained on); `quantize`: its linear
    layers and experts quantized (`pyramoe.inference.packing.quantize_model`)."""
    from pyramoe.evaluation.lm import PyramoeLM

    return PyramoeLM(checkpoint=checkpoint, dtype=dtype, batch_size=batch_size, max_length=max_length,
                     quantize=quantize)


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


def run_zeroshot(
    model, tasks: list[str], limit: int | None = None, verbose: bool = False, data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """simple_evaluate on a PyramoeLM (see `load_model`); returns the harness's results dictionary.
    The harness's own tasks read their datasets from `data_dir` where a copy is there (`standard`)."""
    import lm_eval

    if limit is not None and limit < 1:
        raise ValueError(f"--limit: must be >= 1, got {limit}")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else None
    if data_dir is not None and not data_dir.is_dir():
        raise ValueError(f"--data-dir: not a directory: {data_dir}")
    if not verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # bootstrap stderr in this process, not a pool per core
    manager = task_manager(tasks)
    specs, remote = standard.task_specs(manager, [t for t in tasks if not _is_local(t)], data_dir)
    standard.prepare_offline(remote)
    with contextlib.ExitStack() as quiet:
        if not verbose:  # progress bars and prints of the harness (stdout must stay clean for --json)
            quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        try:
            return lm_eval.simple_evaluate(model=model, tasks=[t for t in tasks if _is_local(t)] + specs, limit=limit,
                                           task_manager=manager, log_samples=False, bootstrap_iters=1000)
        except ConnectionError:  # the datasets library offline (or no network) and no copy of the data
            if not remote:
                raise
            raise ValueError(standard.unavailable(remote, data_dir)) from None


def chance_of(results: dict[str, Any], task: str) -> float | None:
    metadata = results.get("configs", {}).get(task, {}).get("metadata") or {}
    chance = metadata.get("chance")
    return float(chance) if isinstance(chance, (int, float)) else None


def baseline_of(task: str, n: int | None) -> float | None:
    """The best trivial strategy's accuracy on the first `n` records of a local task (None elsewhere)."""
    if task not in TASKS or not n:
        return None
    found = task_baseline(read_task(task)[:n])
    return found["acc"] if found else None


def summary(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """task -> {metric: value, metric_stderr: value, "chance": ..., "baseline": ..., "n": ...} (filters
    dropped when only "none"); baseline: a trivial strategy's accuracy on the same records."""
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
        entry["baseline"] = baseline_of(task, entry["n"])
        out[task] = entry
    return out


def table(results: dict[str, Any]) -> str:
    """The harness's columns (task, version, n-shot, metric, value, stderr) plus chance and the trivial
    baseline (for acc and exact_match)."""
    rows = []
    versions = results.get("versions", {})
    shots = results.get("n-shot", {})
    for task, entry in summary(results).items():
        for metric, value in entry.items():
            if metric in ("chance", "n", "baseline") or metric.endswith("_stderr") or "_stderr[" in metric:
                continue
            stderr = entry.get(f"{metric}_stderr") if "[" not in metric else None
            accuracy = metric.split("[")[0] in ("acc", "acc_norm", "exact_match")
            chance = entry["chance"] if accuracy else None
            baseline = entry.get("baseline") if metric in ("acc", "exact_match") else None
            rows.append([task, str(versions.get(task, "-")), shots.get(task, 0), entry["n"], metric,
                         _num(value), _num(stderr), _num(chance), _num(baseline)])
    return format_table(["task", "version", "n-shot", "n", "metric", "value", "stderr", "chance", "baseline"],
                        rows)


def dedup_line(tasks: list[str]) -> str | None:
    """What deduplication against the training split dropped from the local tasks' data, if any are run."""
    local = [t for t in TASKS if any(t == name or name == LOCAL_TAG for name in tasks)]
    if not local:
        return None
    meta = build_tasks().meta
    dedup = meta["dedup"]
    dropped = ", ".join(f"{t.removeprefix(LOCAL_TAG + '_')} {dedup['records_dropped'][t]}" for t in local)
    return (f"local tasks: {meta['val_documents']} held-out files ({dedup['documents_dropped']} more dropped as "
            f"near-duplicates of training files); records dropped as their answer line is in the training "
            f"split: {dropped}")


def _num(value: Any) -> str | None:
    if value is None or not isinstance(value, (int, float)):
        return None
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def zeroshot_record(step: int, checkpoint: str, results: dict[str, Any], limit: int | None,
                    max_length: int | None = None) -> dict[str, Any]:
    """metrics.jsonl record: {"type": "zeroshot", "step", "checkpoint", "limit", "max_length", "tasks":
    summary} and, with local tasks, "dedup": what deduplication dropped from their data."""
    tasks = summary(results)
    record = {"type": "zeroshot", "step": step, "checkpoint": checkpoint, "limit": limit, "max_length": max_length,
              "tasks": tasks}
    if any(task in TASKS for task in tasks):
        record["dedup"] = build_tasks().meta["dedup"]
    return record
