"""Shared benchmark helpers: timing, bf16 capability probe, tables and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def time_call(fn: Callable[[], Any], repeats: int, warmup: int) -> dict[str, float]:
    """Median and spread (ms) of `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return summarize(samples)


def summarize(samples: list[float]) -> dict[str, float]:
    """Median and spread (ms) of timing samples; empty when there are none."""
    if not samples:
        return {}
    return {
        "median_ms": statistics.median(samples),
        "min_ms": min(samples),
        "max_ms": max(samples),
        "repeats": len(samples),
    }


def native_bf16_matmul(threshold: float = 3.0) -> tuple[bool, str]:
    """Whether bf16 matmul runs at least at fp32 speed / threshold on this CPU.

    CPUs without AVX512-BF16 or AMX fall back to a scalar bf16 GEMM ~100x slower than fp32, where
    a bf16 benchmark would take hours and measure nothing of interest.
    """
    a = torch.randn(256, 256)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        timings[dtype] = time_call(lambda x=x: x @ x, repeats=3, warmup=1)["min_ms"]
    ratio = timings[torch.bfloat16] / timings[torch.float32]
    detail = f"bf16 matmul is {ratio:.1f}x the fp32 time on this CPU"
    return ratio <= threshold, detail


def machine_info() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomic write: a temp name, then rename, so an interrupted run leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path
