"""metrics.jsonl: one JSON object per line, appended as training goes.

Record types: "train" (every step), "eval" (every eval_every steps), "resume" (a resumed run starts
here). A resumed run re-does the steps after its checkpoint, so readers keep the last record per
(type, step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to `path`; a disabled log (ranks other than 0) writes nothing."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened per record: a crash loses at most the line being written, and readers skip it.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records in file order, the last one per (type, step) kept; unparseable lines are skipped."""
    if not path.is_file():
        raise ValueError(f"no {path.name} in {path.parent} (is it a run directory?)")
    latest: dict[tuple[str, int], tuple[int, dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as f:
        for order, line in enumerate(f):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "type" in record and isinstance(record.get("step"), int):
                latest[(record["type"], record["step"])] = (order, record)
    return [record for _, record in sorted(latest.values(), key=lambda item: item[0])]


def records_of(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return sorted((r for r in records if r["type"] == kind), key=lambda r: r["step"])
