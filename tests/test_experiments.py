"""The study runner on tiny models: keyed runs, resume, paired verdicts, interleaved step times, reports."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from pyramoe.cli.main import main
from pyramoe.experiments import STUDIES, render_results, run_study, runner
from pyramoe.experiments.plan import STUDENT_SEED_OFFSET, config_key, plan_arm
from pyramoe.experiments.runner import RESULT_FILE, add_teacher, retained_pct, run_arm, verdict
from pyramoe.experiments.studies import Arm, Study
from pyramoe.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def tiny_train(tmp_path) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i % 11}\n\n" for i in range(300)))
    return dict(corpus=str(corpus), vocab_size=300, batch_size=4, seq_len=16, eval_every=2, eval_batches=1,
                val_percent=10.0, warmup=1)


SMALL = {"d_model": 32, "n_layers": 2, "max_seq_len": 32}
TINY = Study(
    name="tiny", title="tiny dense vs moe", paper_finding="MoE is better.",
    arms=(Arm("dense", "tiny-dense", SMALL), Arm("moe", "tiny-moe", SMALL)),
    expected_better="moe", expected_worse="dense", seeds=(1, 2), steps=4, timing_rounds=2,
)


def _no_training(*args, **kwargs):
    raise AssertionError("a run was trained although its result was there")


def test_run_study_writes_summary_plot_timing_and_reuses_runs(tmp_path, monkeypatch):
    docs = tmp_path / "docs" / "results"
    summary = run_study(TINY, tmp_path / "runs", docs, train=tiny_train(tmp_path), progress=False)
    assert set(summary["arms"]) == {"dense", "moe"} and len(summary["runs"]) == 4
    moe, dense = summary["arms"]["moe"], summary["arms"]["dense"]
    assert moe["parameters"] > moe["active_parameters"] and moe["seeds"] == [1, 2]
    assert summary["paired"]["diffs"] == {s: dense["val_loss_by_seed"][s] - moe["val_loss_by_seed"][s] for s in (1, 2)}
    assert summary["settings"]["steps"] == 4 and summary["settings"]["tokens_per_run"] == 4 * 4 * 16
    timing = summary["step_time"]
    assert timing["baseline"] == "dense" and timing["arms"]["dense"]["ratio_to_baseline"] == [1.0, 1.0]
    assert len(timing["arms"]["moe"]["times_ms"]) == 2
    assert (docs / "tiny.png").stat().st_size > 0
    assert json.loads((docs / "tiny.json").read_text())["study"] == "tiny"
    monkeypatch.setattr(runner, "open_trainer", _no_training)
    monkeypatch.setattr("pyramoe.experiments.timing.time_interleaved", _no_training)
    again = run_study(TINY, tmp_path / "runs", docs, train=tiny_train(tmp_path), progress=False)
    assert again["runs"] == summary["runs"] and again["step_time"] == timing  # read back, not retrained or re-timed


def test_other_settings_rerun_instead_of_reusing(tmp_path):
    root, docs, train = tmp_path / "runs", tmp_path / "docs", tiny_train(tmp_path)
    first = run_study(TINY, root, docs, train=train, seeds=(1,), progress=False)
    longer = run_study(Study(**{**TINY.__dict__, "steps": 6}), root, docs, train=train, seeds=(1,), progress=False)
    assert {r["tokens"] for r in first["runs"]} == {4 * 4 * 16}
    assert {r["tokens"] for r in longer["runs"]} == {6 * 4 * 16}
    other_lr = run_study(TINY, root, docs, train={**train, "lr": 1e-3}, seeds=(1,), progress=False)
    assert other_lr["runs"] != first["runs"]
    assert len(list((root / "tiny").glob("moe-seed1-*"))) == 3


def test_identical_arm_of_another_study_is_reused_not_retrained(tmp_path, monkeypatch):
    root, train = tmp_path / "runs", tiny_train(tmp_path)
    first = run_study(TINY, root, tmp_path / "docs", train=train, seeds=(1,), progress=False)
    renamed = Study(**{**TINY.__dict__, "name": "tiny-2",
                       "arms": (Arm("dense-2", "tiny-dense", SMALL), Arm("moe-2", "tiny-moe", SMALL)),
                       "expected_better": "moe-2", "expected_worse": "dense-2"})
    monkeypatch.setattr(runner, "open_trainer", _no_training)
    second = run_study(renamed, root, tmp_path / "docs", train=train, seeds=(1,), progress=False)
    assert [r["val_loss"] for r in second["runs"]] == [r["val_loss"] for r in first["runs"]]
    assert [r["arm"] for r in second["runs"]] == ["dense-2", "moe-2"]
    saved = json.loads(next((root / "tiny-2").glob(f"moe-2-seed1-*/{RESULT_FILE}")).read_text())
    assert "/tiny/moe-seed1-" in saved["reused_from"]


def test_key_follows_the_resolved_model_not_how_it_is_spelled(tmp_path):
    spelled_out = Arm("moe", "tiny-moe", {**SMALL, "moe_placement": "every_other", "num_experts": 8})
    plans = [plan_arm(TINY, arm, 1, tmp_path, tiny_train(tmp_path), steps=4) for arm in (TINY.arms[1], spelled_out)]
    assert plans[0].key == plans[1].key
    wider = plan_arm(TINY, Arm("moe", "tiny-moe", {**SMALL, "d_model": 64}), 1, tmp_path, tiny_train(tmp_path), 4)
    assert wider.key != plans[0].key


def test_settings_at_their_defaults_do_not_change_the_key(tmp_path):
    """A setting added to the code later, at a default that changes nothing, keeps old keys - and a
    result stored under an older key is reused when its stored settings come to the same key."""
    plan = plan_arm(TINY, TINY.arms[1], 1, tmp_path / "runs", tiny_train(tmp_path), steps=4)
    older = json.loads(json.dumps(plan.config))
    del older["train"]["router_bias_rate"]  # as saved by code that did not have the setting
    for layer in older["model_config"]["layers"]:
        if layer.get("moe"):
            del layer["moe"]["shared_gate"]
    assert config_key(older) == plan.key
    changed = json.loads(json.dumps(plan.config))
    changed["train"]["router_bias_rate"] = 0.01
    assert config_key(changed) != plan.key

    old_dir = plan.run_dir.with_name("moe-seed1-0123456789")
    old_dir.mkdir(parents=True)
    stored = {"arm": "moe", "seed": 1, "train_seed": 1, "val_loss": 0.5, "val_losses": {"4": 0.5}, "parameters": 1,
              "active_parameters": 1, "n_layers": 2, "d_model": 32, "tokens": 1, "key": "0123456789",
              "config": older}
    (old_dir / RESULT_FILE).write_text(json.dumps(stored))
    assert runner.same_run_elsewhere(plan).val_loss == 0.5
    assert json.loads((plan.run_dir / RESULT_FILE).read_text())["key"] == plan.key


def test_result_with_another_key_is_not_read_back(tmp_path):
    plan = plan_arm(TINY, TINY.arms[1], 1, tmp_path / "runs", tiny_train(tmp_path), steps=4)
    plan.run_dir.mkdir(parents=True)
    fake = {"arm": "moe", "seed": 1, "train_seed": 1, "val_loss": 0.5, "val_losses": {"4": 0.5}, "parameters": 1,
            "active_parameters": 1, "n_layers": 2, "d_model": 32, "tokens": 1, "key": "something-else"}
    (plan.run_dir / RESULT_FILE).write_text(json.dumps(fake))
    result = run_arm(plan, progress=False)
    assert result.tokens == 4 * 4 * 16 and result.val_loss != 0.5
    assert json.loads((plan.run_dir / RESULT_FILE).read_text())["key"] == plan.key


def test_interrupted_arm_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    train = tiny_train(tmp_path)
    plan = plan_arm(TINY, TINY.arms[1], 1, tmp_path / "runs", train, steps=4)
    original = Trainer.fit

    def interrupted_fit(self, max_steps=None):
        result = original(self, max_steps=2)
        result.stopped_by = signal.SIGINT
        return result

    monkeypatch.setattr(Trainer, "fit", interrupted_fit)
    with pytest.raises(KeyboardInterrupt):
        run_arm(plan, progress=False)
    monkeypatch.setattr(Trainer, "fit", original)
    resumed = run_arm(plan, progress=False)
    records = [json.loads(line) for line in (plan.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "resume"] == [2]
    uninterrupted = run_arm(plan_arm(TINY, TINY.arms[1], 1, tmp_path / "other", train, steps=4), progress=False)
    assert resumed.tokens == uninterrupted.tokens == 4 * 4 * 16
    assert resumed.val_losses == pytest.approx(uninterrupted.val_losses, abs=1e-6)


def test_run_dir_without_checkpoint_restarts_cleanly(tmp_path):
    plan = plan_arm(TINY, TINY.arms[0], 1, tmp_path / "runs", tiny_train(tmp_path), steps=4)
    plan.run_dir.mkdir(parents=True)
    (plan.run_dir / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 9.0}\n')
    result = run_arm(plan, progress=False)
    assert result.tokens == 4 * 4 * 16 and sorted(result.val_losses) == [0, 2, 4]


def test_distill_study_trains_teacher_once_then_students_on_other_seeds(tmp_path):
    study = Study(
        name="tiny-mos", title="tiny MoS", paper_finding="Staged KD helps.",
        teacher=Arm("teacher", "tiny-prmoe", {**SMALL, "n_layers": 3}), teacher_steps=3,
        arms=(Arm("no-kd", "tiny-prmoe", distill={"kd_weight": 0.0}),
              Arm("staged-kd", "tiny-prmoe", distill={"kd_schedule": "stop", "kd_stop_fraction": 0.5})),
        expected_better="staged-kd", expected_worse="no-kd", seeds=(1,), steps=4,
        notes="{steps} steps, stop at {kd_stop_step}, teacher {teacher_steps} steps, {student_layers} blocks",
    )
    summary = run_study(study, tmp_path / "runs", tmp_path / "docs", train=tiny_train(tmp_path), progress=False)
    teacher = summary["teacher"]
    assert teacher["tokens"] == 3 * 4 * 16 and teacher["train_seed"] == 1
    assert {r["train_seed"] for r in summary["runs"]} == {1 + STUDENT_SEED_OFFSET}
    assert set(summary["arms"]) == {"no-kd", "staged-kd"}
    assert all(a["n_layers"] == 2 and a["parameters"] < teacher["parameters"] for a in summary["arms"].values())
    assert summary["settings"]["kd_stop_step"] == 2 and summary["settings"]["teacher_steps"] == 3
    assert summary["step_time"] is None
    text = render_results(tmp_path / "docs", {"tiny-mos": study}).read_text()
    assert "4 steps, stop at 2, teacher 3 steps, 2 blocks" in text


def _summary(better: dict[int, float], worse: dict[int, float], names=("moe-8", "dense"), params=(10, 10)):
    return {"arms": {names[0]: {"val_loss_by_seed": better, "parameters": params[0]},
                     names[1]: {"val_loss_by_seed": worse, "parameters": params[1]}}}


def test_loss_verdicts_on_paired_differences():
    study = STUDIES["moe-vs-dense"]
    consistent = _summary({1: 4.00, 2: 4.10, 3: 3.90}, {1: 4.10, 2: 4.21, 3: 4.01})
    assert verdict(study, consistent).startswith("holds")
    mixed = _summary({1: 4.00, 2: 4.10, 3: 3.90}, {1: 4.10, 2: 4.05, 3: 4.00})
    assert verdict(study, mixed).startswith("inconclusive")
    noisy = _summary({1: 4.00, 2: 4.00}, {1: 4.01, 2: 4.20})  # both positive, mean 0.105 < spread 0.19
    assert verdict(study, noisy).startswith("inconclusive")
    reversed_ = _summary({1: 4.10, 2: 4.21, 3: 4.01}, {1: 4.00, 2: 4.10, 3: 3.90})
    assert verdict(study, reversed_).startswith("contradicted")
    one_seed = _summary({1: 3.0}, {1: 5.0})
    assert verdict(study, one_seed).startswith("inconclusive")


def _timed(summary: dict, speedup: float, rounds: int = 6) -> dict:
    ratio = 1.0 / speedup
    summary["step_time"] = {"arms": {"residual": {"ratio_to_baseline": [ratio] * rounds},
                                     "top2": {"ratio_to_baseline": [1.0] * rounds}}}
    return summary


def test_step_time_verdict_uses_the_claims_threshold():
    study = STUDIES["top2-vs-residual"]
    names = ("residual", "top2")
    on_par = {1: 4.00, 2: 4.10, 3: 3.90}, {1: 4.005, 2: 4.095, 3: 3.91}
    assert verdict(study, _timed(_summary(*on_par, names=names), 1.05)).startswith("contradicted")
    fast = verdict(study, _timed(_summary(*on_par, names=names), 1.25))
    assert fast.startswith("holds") and "1.25x" in fast and "on par" in fast
    worse = {1: 4.20, 2: 4.31, 3: 4.10}, {1: 4.00, 2: 4.10, 3: 3.90}
    assert verdict(study, _timed(_summary(*worse, names=names), 1.25)).startswith("contradicted")
    straddling = _summary(*on_par, names=names)
    straddling["step_time"] = {"arms": {"residual": {"ratio_to_baseline": [1 / 1.02, 1 / 1.2] * 3},
                                        "top2": {"ratio_to_baseline": [1.0] * 6}}}
    assert verdict(study, straddling).startswith("inconclusive")


def test_fewer_parameters_verdict():
    study = STUDIES["prmoe-vs-moe"]
    names = ("prmoe-4-8", "moe-8-8")
    on_par = {1: 4.01, 2: 4.09, 3: 3.91}, {1: 4.00, 2: 4.10, 3: 3.90}
    assert verdict(study, _summary(*on_par, names=names, params=(6, 10))).startswith("holds")
    assert verdict(study, _summary(*on_par, names=names, params=(10, 10))).startswith("contradicted")
    worse = {1: 4.50, 2: 4.61, 3: 4.40}, {1: 4.00, 2: 4.10, 3: 3.90}
    assert verdict(study, _summary(*worse, names=names, params=(6, 10))).startswith("contradicted")


def test_retained_pct_is_teacher_loss_over_student_loss():
    assert retained_pct(4.0, 5.0) == pytest.approx(80.0)
    summary = {"arms": {"a": {"val_loss_mean": 5.0, "n_layers": 3}, "b": {"val_loss_mean": 3.2, "n_layers": 3}},
               "settings": {}}
    teacher = runner.RunResult("teacher", 1, 1, 4.0, {}, 10, 5, 4, 32, 100)

    class Plan:
        config = {"train": {"steps": 9}}
        arm = Arm("teacher", "tiny-prmoe")

    add_teacher(summary, teacher, Plan(), [])
    assert summary["arms"]["a"]["retained_pct"] == pytest.approx(80.0)
    assert summary["arms"]["b"]["retained_pct"] == pytest.approx(125.0)
    assert summary["settings"]["teacher_steps"] == 9 and summary["settings"]["dropped_layers"] == 1


def test_results_header_and_notes_come_from_the_settings(tmp_path):
    run_study(TINY, tmp_path / "runs", tmp_path / "docs", train=tiny_train(tmp_path), progress=False)
    text = render_results(tmp_path / "docs", {"tiny": TINY, **STUDIES}).read_text()
    assert "4 steps of 4x16 tokens per run" in text and "Not run yet" in text
    assert "120 steps" not in text and "4-block, width-256" not in text


def test_format_table_lives_outside_bench_and_torch():
    code = "import sys, pyramoe.tables as t; print(t.format_table(['a'], [[1.5]])); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["a", "----", "1.50", "False"]


def test_cli_lists_and_rejects_bad_input(capsys):
    assert main(["experiments", "--list"]) == 0
    assert "half-moe" in capsys.readouterr().out
    assert main(["experiments", "nope"]) == 2
    assert "study" in capsys.readouterr().err
    assert main(["experiments", "half-moe", "--seeds", "1,1"]) == 2
    assert capsys.readouterr().err.strip().endswith("--seeds: each seed once, got '1,1'")
    assert main(["experiments", "mos", "--teacher-steps", "0"]) == 2
    assert "--teacher-steps: must be >= 1" in capsys.readouterr().err
