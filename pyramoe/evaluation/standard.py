"""The harness's own tasks (hellaswag, piqa, arc_*, winogrande, lambada_*, ...) without a network.

Their data lives on the Hugging Face Hub. Where the Hub cannot be reached, the harness would retry for
half a minute and end in a ConnectionError traceback; here a quick probe decides first, the datasets
library is put offline (a copy in its cache still loads) and a failure to find the data is one line.

The offline path: a data directory holding a copy of each task's dataset repository, at
DIR/DATASET_PATH (the task config's `dataset_path`, e.g. DIR/baber/piqa, DIR/Rowan/hellaswag), with
the split files as the Hub has them (`data/validation-00000-of-00001.parquet`, `validation.jsonl`, ...;
a dataset with configurations keeps one folder per configuration, e.g. DIR/allenai/ai2_arc/ARC-Easy).
On a machine with a network: `huggingface-cli download --repo-type dataset baber/piqa --local-dir
DIR/baber/piqa`. Tasks whose folder is there read it with no network at all.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

HUB_HOST = "huggingface.co"
PROBE_SECONDS = 3.0
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def hub_reachable(host: str = HUB_HOST, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the Hub opens within `timeout` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _leaf_tasks(manager: Any, name: str, depth: int = 0) -> list[str]:
    """The tasks a name stands for: itself, or a tag's members (groups are left whole)."""
    entry = manager.task_index.get(name)
    kind = getattr(getattr(entry, "kind", None), "name", None)
    if kind == "TAG" and depth < 4:
        return [leaf for member in sorted(entry.tags) for leaf in _leaf_tasks(manager, member, depth + 1)]
    return [name]


def local_copy(data_dir: Path, config: dict[str, Any]) -> tuple[Path, str | None] | None:
    """(directory, dataset name to load it with) of a task's dataset under `data_dir`, if there."""
    path, name = config.get("dataset_path"), config.get("dataset_name")
    if not path or config.get("custom_dataset"):
        return None
    root = data_dir / path
    if name and (root / name).is_dir():
        return root / name, None
    return (root, name) if root.is_dir() else None


def task_specs(manager: Any, tasks: list[str], data_dir: Path | None) -> tuple[list[Any], list[str]]:
    """What to hand simple_evaluate for the standard `tasks`, and the tasks that still need the Hub.

    A task with a copy under `data_dir` becomes its config (from the harness's index) with
    dataset_path pointing there."""
    specs: list[Any] = []
    remote: list[str] = []
    for name in tasks:
        leaves = _leaf_tasks(manager, name)
        if data_dir is None or (leaves == [name] and _config(manager, name) is None):  # a group: whole
            specs.append(name)
            remote += leaves
            continue
        for leaf in leaves:
            config = _config(manager, leaf)
            found = local_copy(data_dir, config) if config is not None else None
            if found is None:
                specs.append(leaf)
                remote.append(leaf)
            else:
                specs.append({**config, "dataset_path": str(found[0]), "dataset_name": found[1]})
    return specs, remote


def _config(manager: Any, name: str) -> dict[str, Any] | None:
    entry = manager.task_index.get(name)
    cfg = getattr(entry, "cfg", None)
    kind = getattr(getattr(entry, "kind", None), "name", None)
    return dict(cfg) if kind == "TASK" and isinstance(cfg, dict) else None


def prepare_offline(remote: list[str], probe=None) -> None:
    """Before tasks that need the Hub: if it cannot be reached, put the datasets library offline (so a
    cached copy loads at once, and a missing one fails at once instead of after retries)."""
    if not remote or is_offline():
        return
    if not (probe or hub_reachable)():
        os.environ.update(OFFLINE)
        _datasets_offline()


def is_offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def _datasets_offline() -> None:
    """The datasets library reads HF_DATASETS_OFFLINE when imported; tell an imported one too."""
    import datasets.config

    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    try:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def unavailable(remote: list[str], data_dir: Path | None) -> str:
    """The one-line error for standard tasks whose data is neither here nor downloadable."""
    where = f"no copy under --data-dir {data_dir}" if data_dir else "no --data-dir copy"
    return (f"--tasks {','.join(remote)}: the task data cannot be downloaded here (the Hugging Face Hub is not "
            f"reachable, {where}, none in the datasets cache); copy each dataset's files to DIR/DATASET_PATH "
            "(e.g. DIR/baber/piqa) and pass --data-dir DIR (README: Zero-shot evaluation)")
