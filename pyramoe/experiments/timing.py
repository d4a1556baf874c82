"""A study's step-time comparison: its arms' models timed in ONE interleaved run (`pyramoe bench
train-step`'s machinery), so that other jobs on the machine slow every arm alike.

Separately run trainings overlap with whatever else the machine runs, so their step times are not
compared. The measurement is cached next to the runs, keyed by the arms' model configs and the step
shape, so re-rendering a study does not re-time it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import torch

from pyramoe.bench.common import machine_info, write_json
from pyramoe.bench.train_setup import build_setup, random_batch
from pyramoe.bench.train_step import round_ratios, time_interleaved
from pyramoe.config import ModelConfig
from pyramoe.experiments.plan import config_key

WARMUP_ROUNDS = 2
TIMED_ROUNDS = 10


def measure_step_times(
    configs: dict[str, ModelConfig], baseline: str, batch_size: int, seq_len: int, precision: str,
    cache_dir: Path, rounds: int = TIMED_ROUNDS, warmup: int = WARMUP_ROUNDS,
) -> dict[str, Any]:
    """Median step ms per arm and each arm's per-round time ratio to `baseline`, from one run."""
    shape = {"batch_size": batch_size, "seq_len": seq_len, "precision": precision, "rounds": rounds,
             "warmup": warmup, "baseline": baseline}
    key = config_key({"models": {name: c.to_dict() for name, c in configs.items()}, **shape})
    cached = cache_dir / f"step-time-{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    setups = {name: build_setup(config) for name, config in configs.items()}
    vocab = min(c.vocab_size for c in configs.values())
    time_interleaved(setups, random_batch(vocab, batch_size, seq_len), warmup, rounds, precision, log=False)
    base = setups[baseline]["times"]
    arms = {name: {"median_ms": statistics.median(s["times"]), "times_ms": s["times"],
                   "ratio_to_baseline": round_ratios(s["times"], base)} for name, s in setups.items()}
    result = {**shape, "threads": torch.get_num_threads(), "machine": machine_info(), "arms": arms}
    write_json(cached, result)
    return result


def speedups(timing: dict[str, Any], faster: str) -> list[float]:
    """Per round: the baseline's time over `faster`'s time (> 1: `faster` is faster)."""
    return [1.0 / r for r in timing["arms"][faster]["ratio_to_baseline"]]
