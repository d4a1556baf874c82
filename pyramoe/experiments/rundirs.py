"""Where a study run's files are: its result file, and the directory holding its checkpoints.

Below both the runner and the inference study (which times the runs' checkpoints), so that neither
imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyramoe.train import checkpoint as ckpt_io

RESULT_FILE = "result.json"


def checkpoint_run_dir(run_dir: Path) -> Path:
    """The directory that holds a run's checkpoints: its own, or for a result reused from another
    directory (`reused_from`), that one's (followed on, looked up by study and run name under the
    same root)."""
    root, seen = run_dir.parent.parent, set()
    while ckpt_io.latest_checkpoint(ckpt_io.checkpoint_root(run_dir)) is None:
        path = run_dir / RESULT_FILE
        origin = json.loads(path.read_text()).get("reused_from") if path.is_file() else None
        if not origin or run_dir in seen:
            raise FileNotFoundError(f"{run_dir}: no checkpoint, and no run it was reused from that has one")
        seen.add(run_dir)
        run_dir = root / Path(origin).parent.name / Path(origin).name
    return run_dir
