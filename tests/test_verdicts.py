"""The paired bootstrap behind the studies' verdicts: known values, a clear difference, no difference,
coverage, and its use on per-example accuracy outcomes and per-batch validation losses."""

from __future__ import annotations

import numpy as np
import pytest

from pyramoe.experiments import STUDIES
from pyramoe.experiments.runner import RunResult, summarize
from pyramoe.experiments.verdicts import (
    CONTRADICTED,
    HOLDS,
    INCONCLUSIVE,
    interval_outcome,
    loss_verdict,
    paired_bootstrap,
    paired_differences,
    quality,
)


def one_seed(**groups):
    return {1: {name: list(values) for name, values in groups.items()}}


def test_known_values():
    # task a: differences 1, 0 (mean 0.5); task b: 0, 0, 0, -1 (mean -0.25); the mean over tasks: 0.125
    boot = paired_bootstrap(one_seed(a=[1, 1], b=[0, 0, 1, 0]), one_seed(a=[0, 1], b=[0, 0, 1, 1]))
    assert boot["diff"] == pytest.approx(0.125) and boot["examples"] == 6 and boot["groups"] == ["a", "b"]
    assert boot["low"] <= 0.125 <= boot["high"]
    constant = paired_bootstrap(one_seed(v=[3.0] * 50), one_seed(v=[2.5] * 50))
    assert constant["diff"] == constant["low"] == constant["high"] == pytest.approx(0.5)
    assert interval_outcome(constant) == HOLDS


def test_seeds_are_pooled_per_example():
    better = {1: {"t": [1, 0, 1, 1]}, 2: {"t": [1, 1, 0, 1]}}
    worse = {1: {"t": [0, 0, 1, 0]}, 2: {"t": [1, 0, 0, 0]}}
    boot = paired_bootstrap(better, worse)
    assert boot["diff"] == pytest.approx((2 / 4 + 2 / 4) / 2) and boot["seeds"] == 2 and boot["examples"] == 4
    # a seed only one arm ran is left out
    assert paired_bootstrap({**better, 3: {"t": [0, 0, 0, 0]}}, worse)["diff"] == boot["diff"]
    with pytest.raises(ValueError, match="differing example counts"):
        paired_bootstrap({1: {"t": [1, 0]}, 2: {"t": [1]}}, {1: {"t": [1, 0]}, 2: {"t": [1]}})
    assert paired_bootstrap({1: {"t": [1]}}, {2: {"t": [1]}}) is None


def test_a_clear_difference_holds_and_its_reverse_is_contradicted():
    rng = np.random.default_rng(1)
    better = one_seed(t=(rng.random(2000) < 0.60).astype(float))
    worse = one_seed(t=(rng.random(2000) < 0.50).astype(float))
    boot = paired_bootstrap(better, worse)
    assert 0.05 < boot["diff"] < 0.15 and boot["low"] > 0 and interval_outcome(boot) == HOLDS
    assert interval_outcome(paired_bootstrap(worse, better)) == CONTRADICTED


def test_no_difference_is_inconclusive_and_intervals_cover_zero_about_95_percent():
    rng = np.random.default_rng(2)
    same = one_seed(t=(rng.random(500) < 0.3).astype(float))
    identical = paired_bootstrap(same, same)
    assert identical["diff"] == identical["low"] == identical["high"] == 0
    assert interval_outcome(identical) == INCONCLUSIVE
    covered = 0
    for _ in range(200):  # two arms of equal accuracy: the 95% interval should include 0 about 95% of the time
        a, b = (rng.random((2, 300)) < 0.4).astype(float)
        boot = paired_bootstrap(one_seed(t=a), one_seed(t=b), iters=1000, seed=int(rng.integers(1 << 30)))
        covered += boot["low"] <= 0 <= boot["high"]
    assert 0.89 <= covered / 200 <= 0.99, covered


def test_loss_verdict_and_on_par_use_the_interval():
    paired = paired_differences({1: 4.1, 2: 4.0}, {1: 4.0, 2: 4.1})  # seeds disagree
    assert quality(paired) == "unclear"
    paired["bootstrap"] = {"diff": 0.03, "low": 0.01, "high": 0.05, "confidence": 0.95, "examples": 40, "seeds": 2}
    text = loss_verdict("moe", "dense", paired)
    assert text.startswith("holds: moe is lower than dense (the interval excludes zero)")
    assert "[+0.0100, +0.0500]" in text
    paired["bootstrap"].update(diff=0.001, low=-0.01, high=0.012)
    assert loss_verdict("moe", "dense", paired).startswith("inconclusive: the interval includes zero")
    assert quality(paired) == "on par" and quality(paired, tolerance=0.005) == "unclear"


def _run(arm, seed, outcomes, batch_losses):
    tasks = {"pyramoe_stdlib_nextline": {"acc": outcomes.count("1") / len(outcomes), "n": len(outcomes),
                                         "chance": 0.25, "baseline": 0.5, "outcomes": outcomes}}
    zeroshot = {"key": "k", "settings": {"limit": None, "dtype": "fp32"}, "seconds": 1.0, "threads": 1,
                "tasks": tasks}
    loss = float(np.mean(batch_losses))
    return RunResult(arm, seed, seed, loss, {10: loss}, 100, 50, 2, 32, 1000, zeroshot, list(batch_losses))


class _Plan:
    config = {"train": {"steps": 10, "batch_size": 2, "seq_len": 8, "grad_accum": 1, "lr": 1e-3, "min_lr": 0.0,
                        "warmup": 1, "precision": "fp32", "corpus": "x"}}


def test_study_summary_pairs_examples_and_batches_across_arms():
    """Per-seed means that disagree in sign (the old rule: inconclusive) but a consistent per-example
    and per-batch advantage: the verdicts hold, with the interval in the text."""
    rng = np.random.default_rng(3)
    runs = []
    for seed in (1, 2):
        base = rng.random(400) < 0.5
        gain = rng.random(400) < 0.15
        dense = "".join("1" if x else "0" for x in base)
        moe = "".join("1" if x or g else "0" for x, g in zip(base, gain))
        losses = 4.0 + rng.normal(0, 0.3, 30) + (0.2 if seed == 2 else 0.0)  # seed 2's batches harder for both
        runs += [_run("dense", seed, dense, losses + 0.05), _run("moe-8", seed, moe, losses)]
    summary = summarize(STUDIES["moe-vs-dense"], [_Plan()], runs)
    assert summary["paired"]["bootstrap"]["diff"] == pytest.approx(0.05) and summary["verdict"].startswith(HOLDS)
    assert "the interval excludes zero" in summary["verdict"]  # the loss verdict uses the per-batch bootstrap
    accuracy = summary["paired_accuracy"]["bootstrap"]
    assert accuracy["examples"] == 400 and accuracy["low"] > 0 and summary["accuracy_verdict"].startswith(HOLDS)
    assert "paired bootstrap over 400 examples x 2 seeds" in summary["accuracy_verdict"]
    # a run without per-example data: the seed rule, and no bootstrap
    runs[0].val_batch_losses = None
    assert summarize(STUDIES["moe-vs-dense"], [_Plan()], runs)["paired"]["bootstrap"] is None


def test_a_run_records_its_final_per_batch_validation_losses(tmp_path):
    from live_server import train_tiny_run

    from pyramoe.experiments.runner import eval_curve, final_batch_losses

    run_dir = train_tiny_run(tmp_path)  # eval_batches=2, batches of equal size
    losses = final_batch_losses(run_dir)
    curve = eval_curve(run_dir)
    assert len(losses) == 2 and float(np.mean(losses)) == pytest.approx(curve[max(curve)], rel=1e-6)
