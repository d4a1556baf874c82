"""Shared benchmark helpers: timing, bf16 capability probe and JSON output (tables: pyramoe.tables)."""

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


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_bytes(model: torch.nn.Module, experts_read: float | None) -> int:
    """Weight bytes one decode step reads: every weight but the embedding lookups (token rows unless
    the table is also the LM head, learned positions), and of each MoE layer's experts only the
    `experts_read` it touches (mean distinct experts per layer; None: all of them)."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    total = 0.0
    for name, p in model.named_parameters():
        if (name.endswith("tok_emb.weight") and p is not head) or name.endswith("pos_emb.weight"):
            continue
        size = p.numel() * p.element_size()
        if ".experts." in name and experts_read is not None:
            size = size * experts_read / p.shape[0]
        total += size
    return int(total)


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


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomic write: a temp name, then rename, so an interrupted run leaves no half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_label() -> str:
    """One line naming the machine a measurement ran on, for tables and figures."""
    flags = {"avx512_bf16": "AVX512-BF16", "amx_tile": "AMX"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    extras = [label for flag, label in flags.items() if f" {flag}" in text]
    cores = f"{os.cpu_count()} cores"
    isa = "/".join([torch.backends.cpu.get_cpu_capability(), *extras])
    return f"{cpu_model()}, {cores}, {isa}, torch {torch.__version__}"


def print_and_write(report: str, payload: dict[str, Any], out: str | Path) -> int:
    """A bench's table, its notes and the JSON it writes (the exit status: 0)."""
    print(report)
    for note in payload["notes"]:
        print(f"note: {note}")
    print(f"wrote {write_json(out, payload)}")
    return 0


def positive_integers(text: str, flag: str) -> list[int]:
    """Comma-separated integers >= 1 from `text`; ValueError naming `flag` otherwise."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag}: values must be >= 1, got {text!r}")
    return values
