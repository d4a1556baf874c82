"""The routing measurement of trained checkpoints (pyramoe/experiments/routing.py)."""

from __future__ import annotations

import pytest

from pyramoe.experiments.plan import plan_arm
from pyramoe.experiments.routing import main, routing_report, token_determinism
from pyramoe.experiments.runner import run_arm
from pyramoe.experiments.studies import Arm, Study

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def test_token_determinism_counts_repeated_ids_only():
    # id 1: 3 copies, 2 on expert 0; id 2: both on expert 3; id 3 occurs once and is ignored.
    assert token_determinism([1, 1, 1, 2, 2, 3], [0, 0, 1, 3, 3, 5]) == pytest.approx(4 / 5)
    assert token_determinism([1, 1, 2, 2], [0, 1, 2, 3]) == pytest.approx(0.5)


def test_routing_report_of_a_trained_first_half_moe(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i % 11}\n\n" for i in range(300)))
    train = dict(corpus=str(corpus), vocab_size=300, batch_size=4, seq_len=16, eval_every=2, eval_batches=1,
                 val_percent=10.0, warmup=1)
    arm = Arm("first-half", "tiny-moe", {"d_model": 32, "n_layers": 4, "max_seq_len": 32,
                                         "moe_placement": "first_half", "num_experts": 4})
    study = Study("t", "t", "t", (arm,), "first-half", "first-half", steps=3)
    plan = plan_arm(study, arm, 1, tmp_path / "runs", train, steps=3)
    run_arm(plan, progress=False)
    report = routing_report(str(plan.run_dir), batches=1)
    assert sorted(report) == [0, 1]
    for row in report.values():
        assert row["experts"] == 4 and 0 <= row["drop_rate"] < 1 and row["max_load"] >= 1
        assert 0.25 <= row["token_determinism"] <= 1
    assert main([str(plan.run_dir), "--batches", "1"]) == 0
    assert "token determinism" in capsys.readouterr().out
