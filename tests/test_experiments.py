"""The study runner on tiny models: runs arms x seeds, writes summaries/plots/results.md, resumes."""

from __future__ import annotations

import json

import pytest

from pyramoe.cli.main import main
from pyramoe.experiments import STUDIES, render_results, run_study
from pyramoe.experiments.runner import verdict
from pyramoe.experiments.studies import Arm, Study

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def tiny_train(tmp_path) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i % 11}\n\n" for i in range(300)))
    return dict(corpus=str(corpus), vocab_size=300, batch_size=4, seq_len=16, eval_every=2, eval_batches=1,
                val_percent=10.0, warmup=1)


SMALL = {"d_model": 32, "n_layers": 2, "max_seq_len": 32}


def test_run_study_writes_summary_plot_and_reuses_runs(tmp_path):
    study = Study(
        name="tiny", title="tiny dense vs moe", paper_finding="MoE is better.",
        arms=(Arm("dense", "tiny-dense", SMALL), Arm("moe", "tiny-moe", SMALL)),
        expected_better="moe", expected_worse="dense", seeds=(1, 2), steps=4,
    )
    docs = tmp_path / "docs" / "results"
    summary = run_study(study, tmp_path / "runs", docs, train=tiny_train(tmp_path), progress=False)
    assert set(summary["arms"]) == {"dense", "moe"} and len(summary["runs"]) == 4
    moe = summary["arms"]["moe"]
    assert moe["parameters"] > moe["active_parameters"] and moe["seeds"] == [1, 2]
    assert summary["verdict"].split(":")[0] in ("holds", "does not hold", "inconclusive")
    assert (docs / "tiny.png").stat().st_size > 0
    assert json.loads((docs / "tiny.json").read_text())["study"] == "tiny"
    again = run_study(study, tmp_path / "runs", docs, train=tiny_train(tmp_path), progress=False)
    assert again["runs"] == summary["runs"]  # finished runs are read back, not retrained
    text = render_results(docs, {"tiny": study, **STUDIES}).read_text()
    assert "tiny dense vs moe" in text and "Not run yet" in text


def test_distill_study_trains_teacher_once_then_students(tmp_path):
    study = Study(
        name="tiny-mos", title="tiny MoS", paper_finding="Staged KD helps.",
        teacher=Arm("teacher", "tiny-prmoe", {**SMALL, "n_layers": 3}), teacher_steps=3,
        arms=(Arm("no-kd", "tiny-prmoe", distill={"kd_weight": 0.0}),
              Arm("staged-kd", "tiny-prmoe", distill={"kd_schedule": "stop", "kd_stop_step": 1})),
        expected_better="staged-kd", expected_worse="no-kd", seeds=(1,), steps=2,
    )
    summary = run_study(study, tmp_path / "runs", tmp_path / "docs", train=tiny_train(tmp_path), progress=False)
    teacher = summary["teacher"]
    assert teacher["tokens"] == 3 * 4 * 16
    students = summary["arms"]
    assert set(students) == {"no-kd", "staged-kd"}
    assert all(a["parameters"] < teacher["parameters"] for a in students.values())  # one block fewer
    assert all(a["retained_pct"] > 0 for a in students.values())


def _arm(mean, spread, params=10, seconds=1.0):
    return {"val_loss_mean": mean, "val_loss_spread": spread, "parameters": params, "step_seconds": seconds}


def test_verdicts():
    study = STUDIES["moe-vs-dense"]
    assert verdict(study, {"moe-8": _arm(4.0, 0.02), "dense": _arm(4.2, 0.02)}).startswith("holds")
    assert verdict(study, {"moe-8": _arm(4.3, 0.02), "dense": _arm(4.2, 0.02)}).startswith("does not hold")
    assert verdict(study, {"moe-8": _arm(4.19, 0.05), "dense": _arm(4.2, 0.05)}).startswith("inconclusive")
    speed = STUDIES["top2-vs-residual"]
    fast = verdict(speed, {"residual": _arm(4.0, 0.01, seconds=0.8), "top2": _arm(4.0, 0.01, seconds=1.0)})
    assert fast.startswith("holds") and "1.25x" in fast
    pr = STUDIES["prmoe-vs-moe"]
    assert verdict(pr, {"prmoe-4-8": _arm(4.01, 0.02, 6), "moe-8-8": _arm(4.0, 0.02, 10)}).startswith("holds")
    assert verdict(pr, {"prmoe-4-8": _arm(4.5, 0.02, 6), "moe-8-8": _arm(4.0, 0.02, 10)}).startswith("does not")


def test_cli_lists_and_rejects_unknown_study(capsys):
    assert main(["experiments", "--list"]) == 0
    assert "half-moe" in capsys.readouterr().out
    assert main(["experiments", "nope"]) == 2
    assert "study" in capsys.readouterr().err
