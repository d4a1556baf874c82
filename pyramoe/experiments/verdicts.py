"""Verdicts on paired differences: example by example where the runs' per-example outcomes are
stored, else seed by seed.

Arms of a study share each seed's initialisation and data order, and score the same examples (the
same validation batches, the same task records), so arm B - arm A on one example and seed is one paired
measurement of the effect. With per-example outcomes (`paired_bootstrap`): the difference is the mean
over tasks of the mean over examples and seeds; its 95% interval comes from a paired bootstrap that
resamples the examples of each task, each with its outcomes on every seed (so the interval covers
which examples were drawn; the seeds are averaged, not resampled). A direction *holds* when the
interval lies above zero, is *contradicted* when it lies below, and is *inconclusive* otherwise; two
arms are *on par* when the interval lies within the tolerance.

Without them (runs from before per-batch losses were recorded) the seed rule stands: at least
MIN_SEEDS seeds, every paired difference of the expected sign and their mean larger than their spread.

Step time is judged on the per-round speedups of one interleaved timing run (each round times both
arms back to back, so a round's ratio is one paired measurement) against the claim's own threshold
(e.g. "more than 10% faster" is 1.10): the speedup is the geometric mean of the rounds' ratios, with a
95% interval from a bootstrap over the rounds (`speedup_interval`); holds when the interval lies at or
above the threshold, contradicted when it lies below, inconclusive otherwise.

Zero-shot accuracy is judged by the same rules on the paired differences of the mean accuracy over the
local tasks (expected-better arm minus the other: positive is the expected direction, as higher is
better), with ACC_PAR_TOLERANCE in place of PAR_TOLERANCE where a claim is "about the same quality".
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MIN_SEEDS = 2
BOOTSTRAP_ITERS = 10_000
CONFIDENCE = 0.95
PAR_TOLERANCE = 0.02  # validation-loss difference (nats) within which two arms count as on par
ACC_PAR_TOLERANCE = 0.01  # mean zero-shot accuracy difference (1 point) within which two arms are on par

HOLDS, INCONCLUSIVE, CONTRADICTED = "holds", "inconclusive", "contradicted"


def paired_differences(worse: dict[int, float], better: dict[int, float]) -> dict[str, Any]:
    """worse - better per seed both arms ran (positive: the expected direction), with mean and spread."""
    seeds = sorted(set(worse) & set(better))
    diffs = {seed: worse[seed] - better[seed] for seed in seeds}
    values = list(diffs.values())
    if not values:
        return {"diffs": {}, "n": 0, "mean": 0.0, "min": 0.0, "max": 0.0, "spread": 0.0}
    return {"diffs": diffs, "n": len(values), "mean": statistics.mean(values), "min": min(values),
            "max": max(values), "spread": max(values) - min(values)}


def paired_bootstrap(
    expected: Mapping[Any, Mapping[str, Sequence[float]]], other: Mapping[Any, Mapping[str, Sequence[float]]],
    iters: int = BOOTSTRAP_ITERS, seed: int = 0,
) -> dict[str, Any] | None:
    """Paired difference expected - other with its CONFIDENCE interval, from per-example values.

    `expected`/`other`: seed -> group (a task, or "val" for validation batches) -> one value per example,
    the same examples in the same order for every seed and arm. Seeds and groups both arms have are
    used; the statistic is the mean over groups of the mean over examples and seeds. None when no seed
    and group are shared."""
    seeds = sorted(set(expected) & set(other), key=str)
    groups = sorted(set.intersection(*(set(expected[s]) & set(other[s]) for s in seeds))) if seeds else []
    if not groups:
        return None
    rng = np.random.default_rng(seed)
    point, draws, examples = [], np.zeros(iters), 0
    for group in groups:
        n = len(expected[seeds[0]][group])
        if n == 0 or any(len(expected[s][group]) != n or len(other[s][group]) != n for s in seeds):
            raise ValueError(f"paired bootstrap: group {group!r} has differing example counts across seeds or arms")
        diffs = np.array([np.subtract(expected[s][group], other[s][group], dtype=np.float64) for s in seeds])
        per_example = diffs.mean(axis=0)  # each example's difference, averaged over seeds
        point.append(per_example.mean())
        draws += per_example[rng.integers(0, n, size=(iters, n))].mean(axis=1)
        examples += n
    draws /= len(groups)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return {"diff": float(np.mean(point)), "low": float(low), "high": float(high), "confidence": CONFIDENCE,
            "examples": examples, "groups": groups, "seeds": len(seeds), "iters": iters}


def interval_outcome(boot: dict[str, Any]) -> str:
    """holds when the interval is above zero, contradicted when below, inconclusive otherwise."""
    if boot["low"] > 0:
        return HOLDS
    if boot["high"] < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def paired_outcome(paired: dict[str, Any]) -> str:
    """holds / contradicted / inconclusive for paired differences (positive: the expected direction):
    on the bootstrap interval when there is one, else the seed rule."""
    if paired.get("bootstrap"):
        return interval_outcome(paired["bootstrap"])
    if paired["n"] < MIN_SEEDS:
        return INCONCLUSIVE
    if paired["min"] > 0 and paired["mean"] > paired["spread"]:
        return HOLDS
    if paired["max"] < 0 and -paired["mean"] > paired["spread"]:
        return CONTRADICTED
    return INCONCLUSIVE


def quality(paired: dict[str, Any], tolerance: float = PAR_TOLERANCE) -> str:
    """The expected-better arm's loss (or accuracy) vs the other's: better / on par / worse / unclear."""
    outcome = paired_outcome(paired)
    if outcome == HOLDS:
        return "better"
    boot = paired.get("bootstrap")
    if boot and -tolerance <= boot["low"] and boot["high"] <= tolerance:
        return "on par"
    if not boot and paired["n"] >= MIN_SEEDS and max(abs(paired["min"]), abs(paired["max"])) <= tolerance:
        return "on par"
    if outcome == CONTRADICTED:
        return "worse"
    return "unclear"


def describe_paired(paired: dict[str, Any]) -> str:
    diffs = ", ".join(f"{d:+.3f}" for d in paired["diffs"].values())
    seeds = (f"mean paired difference {paired['mean']:+.3f} over {paired['n']} seeds "
             f"(per seed {diffs}; spread {paired['spread']:.3f})")
    boot = paired.get("bootstrap")
    if not boot:
        return seeds
    return (f"paired difference {boot['diff']:+.4f}, {boot['confidence']:.0%} interval [{boot['low']:+.4f}, "
            f"{boot['high']:+.4f}] (paired bootstrap over {boot['examples']} examples x {boot['seeds']} seeds); "
            + seeds)


def _why_inconclusive(paired: dict[str, Any]) -> str:
    if paired.get("bootstrap"):
        return "the interval includes zero"
    return "the paired differences do not exceed their spread"


def _needs_seeds(paired: dict[str, Any]) -> bool:
    """Too few seeds for the seed rule (the bootstrap needs one seed)."""
    return not paired.get("bootstrap") and paired["n"] < MIN_SEEDS


def loss_verdict(better: str, worse: str, paired: dict[str, Any]) -> str:
    outcome = paired_outcome(paired)
    detail = describe_paired(paired)
    if _needs_seeds(paired):
        return f"{INCONCLUSIVE}: {paired['n']} seed(s); a verdict needs at least {MIN_SEEDS} ({detail})"
    how = "the interval excludes zero" if paired.get("bootstrap") else "on every seed"
    if outcome == HOLDS:
        return f"{HOLDS}: {better} is lower than {worse} ({how}); {detail}"
    if outcome == CONTRADICTED:
        return f"{CONTRADICTED}: {better} is higher than {worse} ({how}); {detail}"
    why = _why_inconclusive(paired)
    return f"{INCONCLUSIVE}: {why}; {detail}"


def speedup_interval(speedups: Sequence[float], iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> dict[str, Any] | None:
    """The geometric mean of per-round speedups with its CONFIDENCE interval from a bootstrap over the
    rounds (ratios average in log space: 2x and 0.5x cancel). None for fewer than 2 rounds."""
    if len(speedups) < 2:
        return None
    logs = np.log(np.asarray(speedups, dtype=np.float64))
    draws = logs[np.random.default_rng(seed).integers(0, len(logs), size=(iters, len(logs)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.exp(np.percentile(draws, [tail, 100 - tail]))
    return {"speedup": float(np.exp(logs.mean())), "low": float(low), "high": float(high),
            "confidence": CONFIDENCE, "rounds": len(speedups), "min": min(speedups), "max": max(speedups)}


def speed_outcome(speedups: Sequence[float], threshold: float) -> str:
    """holds when the speedup's interval is at or above `threshold`, contradicted when below it."""
    interval = speedup_interval(speedups)
    if interval is None:
        return INCONCLUSIVE
    if interval["low"] >= threshold:
        return HOLDS
    if interval["high"] < threshold:
        return CONTRADICTED
    return INCONCLUSIVE


def describe_speedup(speedups: Sequence[float], subject: str) -> str:
    """'SUBJECT 1.23x as fast as ... (95% interval ...)' minus the other arm: callers append it."""
    interval = speedup_interval(speedups)
    if interval is None:
        rounds = f"{len(speedups)} interleaved round(s), too few for an interval"
        return f"{subject} {speedups[0] if speedups else float('nan'):.2f}x as fast as {{other}} ({rounds})"
    return (f"{subject} {interval['speedup']:.2f}x as fast as {{other}} ({interval['confidence']:.0%} interval "
            f"[{interval['low']:.2f}, {interval['high']:.2f}]: geometric mean of {interval['rounds']} interleaved "
            f"rounds, per round {interval['min']:.2f}-{interval['max']:.2f})")


def step_time_verdict(better: str, worse: str, speedups: list[float], threshold: float,
                      paired: dict[str, Any]) -> str:
    """Speed on the interleaved rounds' speedups (worse time / better time); quality must not be worse."""
    speed = speed_outcome(speedups, threshold)
    loss = quality(paired)
    outcome = CONTRADICTED if loss == "worse" else speed
    speed = describe_speedup(speedups, f"{better} steps").format(other=worse)
    return (f"{outcome}: {speed} (claim: >= {threshold:.2f}x); its validation loss is {loss} "
            f"({describe_paired(paired)})")


def fewer_params_verdict(better: str, worse: str, params: tuple[int, int], paired: dict[str, Any]) -> str:
    """PR-MoE-style claim: fewer parameters at about the same (or better) loss."""
    ratio = params[0] / params[1]
    if params[0] >= params[1]:
        return f"{CONTRADICTED}: {better} does not have fewer parameters than {worse}"
    loss = quality(paired)
    outcome = {"better": HOLDS, "on par": HOLDS, "worse": CONTRADICTED}.get(loss, INCONCLUSIVE)
    return (f"{outcome}: {better} has {ratio:.0%} of {worse}'s parameters and its validation loss is {loss} "
            f"(on par would need the interval, or every paired difference, within {PAR_TOLERANCE}; "
            f"{describe_paired(paired)})")


def accuracy_verdict(
    compare: str, better: str, worse: str, paired: dict[str, Any], speed: str | None = None,
) -> str:
    """The claim judged on zero-shot accuracy; `paired` holds better - worse mean accuracy per seed.

    val_loss: the expected-better arm's accuracy is higher (the loss verdict's rule). loss_per_param:
    at least on par (every paired difference within ACC_PAR_TOLERANCE) or higher. step_time: the
    speed outcome `speed`, unless the accuracy is worse."""
    detail = describe_paired(paired)
    if _needs_seeds(paired):
        return f"{INCONCLUSIVE}: {paired['n']} seed(s); a verdict needs at least {MIN_SEEDS} ({detail})"
    if compare in ("loss_per_param", "step_time"):
        level = quality(paired, ACC_PAR_TOLERANCE)
        if compare == "step_time":
            outcome = CONTRADICTED if level == "worse" else (speed or INCONCLUSIVE)
            return (f"{outcome}: the step-time outcome, as {better}'s mean accuracy vs {worse}'s is {level} "
                    f"(required: not worse; {detail})")
        outcome = {"better": HOLDS, "on par": HOLDS, "worse": CONTRADICTED}.get(level, INCONCLUSIVE)
        return (f"{outcome}: {better}'s mean accuracy is {level} vs {worse}'s (on par would need the interval, or "
                f"every paired difference, within {ACC_PAR_TOLERANCE}; {detail})")
    outcome = paired_outcome(paired)
    how = "the interval excludes zero" if paired.get("bootstrap") else "on every seed"
    if outcome == HOLDS:
        return f"{HOLDS}: {better}'s mean accuracy is higher than {worse}'s ({how}); {detail}"
    if outcome == CONTRADICTED:
        return f"{CONTRADICTED}: {better}'s mean accuracy is lower than {worse}'s ({how}); {detail}"
    why = _why_inconclusive(paired)
    return f"{INCONCLUSIVE}: {why}; {detail}"
