"""Gather one GPU session's results into one JSON (`benchmarks/gpu_session.sh` calls it last): the
device and date, each step's exit status, the CUDA tests (from pytest's JUnit XML: passed, failed,
skipped, with failure messages) and every JSON the steps wrote.

    python benchmarks/gpu_session_summary.py OUT_DIR    # writes OUT_DIR/session.json
"""

from __future__ import annotations

import datetime
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch

from pyramoe.bench.common import write_json


def junit_tests(path: Path) -> list[dict]:
    """Each test case: name, outcome, and the first line of why when it failed or skipped."""
    if not path.is_file():
        return []
    tests = []
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        outcome, why = "passed", None
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                why = (node.get("message") or "").splitlines()[0] if node.get("message") else None
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "why": why})
    return tests


def main(out: Path) -> int:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    steps = {}
    status_file = out / "steps.tsv"  # "name<TAB>exit status" per step, written by gpu_session.sh
    if status_file.is_file():
        for line in status_file.read_text().splitlines():
            name, _, code = line.rpartition("\t")
            steps[name] = int(code) if code.lstrip("-").isdigit() else code  # or "skipped"
    results = {}
    for path in sorted(out.glob("*.json")):
        if path.name != "session.json":
            try:
                results[path.stem] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                results[path.stem] = {"unreadable": str(exc)}
    tests = junit_tests(out / "cuda_tests.xml")
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "steps": steps, "tests": tests,
        "tests_failed": [t["test"] for t in tests if t["outcome"] == "failed"],
        "results": results,
    }
    print(f"wrote {write_json(out / 'session.json', payload)}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python benchmarks/gpu_session_summary.py OUT_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
