"""Zero-shot accuracy in the studies: scored once per run and stored, reused (also across studies and
from older keys), summarised per arm with chance levels, paired by seed, judged, and for a distillation
study as a percentage of the teacher's."""

from __future__ import annotations

import json

import pytest

from pyramoe.evaluation.accuracy import ACCURACY_TASKS, checkpoint_accuracy
from pyramoe.experiments import STUDIES, render_results, run_study, runner
from pyramoe.experiments.plan import config_key
from pyramoe.experiments.report import accuracy_table, direction_line
from pyramoe.experiments.runner import (
    RESULT_FILE,
    RunResult,
    accuracy_pct_of_teacher,
    add_teacher,
    checkpoint_run_dir,
    stored_settings_key,
    summarize,
)
from pyramoe.experiments.studies import Arm, Study
from pyramoe.train import checkpoint as ckpt_io

pytestmark = pytest.mark.usefixtures("tiny_run_env")

CHANCE = {"pyramoe_stdlib_cloze": 0.0, "pyramoe_stdlib_nextline": 0.25, "pyramoe_stdlib_docsig": 0.25}
SMALL = {"d_model": 32, "n_layers": 2, "max_seq_len": 32}
TINY = Study(
    name="tiny", title="tiny dense vs moe", paper_finding="MoE is better.",
    arms=(Arm("dense", "tiny-dense", SMALL), Arm("moe", "tiny-moe", SMALL)),
    expected_better="moe", expected_worse="dense", seeds=(1, 2), steps=4, timing_rounds=2, zeroshot=True,
)


def tiny_train(tmp_path) -> dict:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i % 11}\n\n" for i in range(300)))
    return dict(corpus=str(corpus), vocab_size=300, batch_size=4, seq_len=16, eval_every=2, eval_batches=1,
                val_percent=10.0, warmup=1)


def fake_settings(limit=None, dtype=None):
    return {"tasks": list(ACCURACY_TASKS), "limit": limit, "dtype": dtype or "fp32", "task_data": "fake"}


@pytest.fixture
def fake_scoring(monkeypatch):
    """Scoring replaced by a counter: accuracies that depend on the checkpoint's path, never computed."""
    calls = []

    def score(checkpoint, settings):
        calls.append(str(checkpoint))
        base = 0.1 + 0.01 * len(calls)
        tasks = settings["tasks"]
        return {task: {"acc": base + i / 10, "n": 5, "chance": CHANCE[task]} for i, task in enumerate(tasks)}

    monkeypatch.setattr(runner, "zeroshot_settings", fake_settings)
    monkeypatch.setattr(runner, "score_checkpoint", score)
    return calls


def test_stored_accuracies_are_reused_without_scoring_again(tmp_path, monkeypatch, fake_scoring):
    root, docs, train = tmp_path / "runs", tmp_path / "docs", tiny_train(tmp_path)
    first = run_study(TINY, root, docs, train=train, progress=False)
    assert len(fake_scoring) == 4  # 2 arms x 2 seeds, each final checkpoint once
    stored = [json.loads(p.read_text())["zeroshot"] for p in sorted((root / "tiny").glob(f"*/{RESULT_FILE}"))]
    assert all(z["checkpoint"].endswith("step-0000004") and z["settings"]["task_data"] == "fake" for z in stored)
    assert "accuracy_verdict" in first and first["arms"]["moe"]["accuracy"]["mean"]["mean"] > 0

    again = run_study(TINY, root, docs, train=train, progress=False)
    assert len(fake_scoring) == 4 and again["runs"] == first["runs"]  # read back: no scoring

    renamed = Study(**{**TINY.__dict__, "name": "tiny-2", "arms": (Arm("dense-2", "tiny-dense", SMALL),
                                                                   Arm("moe-2", "tiny-moe", SMALL)),
                       "expected_better": "moe-2", "expected_worse": "dense-2"})
    other = run_study(renamed, root, docs, train=train, progress=False)  # the same runs, reused from "tiny"
    assert len(fake_scoring) == 4
    assert [r["zeroshot"] for r in other["runs"]] == [r["zeroshot"] for r in first["runs"]]

    monkeypatch.setattr(runner, "zeroshot_settings", lambda: fake_settings(limit=3))  # other settings: scored again
    run_study(TINY, root, docs, train=train, progress=False)
    assert len(fake_scoring) == 8


def test_scored_accuracies_equal_a_direct_evaluation_of_the_final_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "ZEROSHOT_LIMIT", 3)
    long = {**SMALL, "max_seq_len": 256}  # the tasks' choices fit (as with the studies' presets)
    study = Study(**{**TINY.__dict__, "seeds": (1,), "arms": (Arm("dense", "tiny-dense", long),
                                                              Arm("moe", "tiny-moe", long))})
    summary = run_study(study, tmp_path / "runs", tmp_path / "docs", train=tiny_train(tmp_path), progress=False)
    assert summary["zeroshot"]["examples"] == dict.fromkeys(ACCURACY_TASKS, 3)
    assert summary["zeroshot"]["chance"] == {**CHANCE, "mean": pytest.approx(1 / 6)}
    run = summary["runs"][1]
    run_dir = next((tmp_path / "runs" / "tiny").glob("moe-seed1-*"))
    checkpoint = ckpt_io.latest_checkpoint(ckpt_io.checkpoint_root(run_dir))
    assert run["zeroshot"]["tasks"] == checkpoint_accuracy(checkpoint, limit=3)


def _run(arm: str, seed: int, accs: tuple[float, float, float], val_loss: float = 4.0) -> RunResult:
    tasks = {task: {"acc": acc, "n": 10, "chance": CHANCE[task]} for task, acc in zip(ACCURACY_TASKS, accs)}
    zeroshot = {"key": "k", "settings": fake_settings(), "seconds": 2.0, "threads": 1, "tasks": tasks}
    return RunResult(arm, seed, seed, val_loss, {10: val_loss}, 100, 50, 2, 32, 1000, zeroshot)


class _Plan:
    config = {"train": {"steps": 10, "batch_size": 2, "seq_len": 8, "grad_accum": 1, "lr": 1e-3, "min_lr": 0.0,
                        "warmup": 1, "precision": "fp32", "corpus": "x"}, "distill": {"kd_schedule": "constant",
                                                                                     "kd_weight": 1.0}}
    arm = Arm("teacher", "tiny-prmoe")


def _study_summary(study: Study, runs: list[RunResult]) -> dict:
    return summarize(study, [_Plan()], runs)


def test_accuracy_columns_and_verdict_from_a_synthetic_summary():
    study = STUDIES["moe-vs-dense"]
    runs = [_run("dense", 1, (0.10, 0.40, 0.30)), _run("moe-8", 1, (0.12, 0.44, 0.31)),
            _run("dense", 2, (0.20, 0.40, 0.36)), _run("moe-8", 2, (0.21, 0.44, 0.38))]
    summary = _study_summary(study, runs)
    moe = summary["arms"]["moe-8"]
    assert moe["accuracy"]["pyramoe_stdlib_cloze"] == pytest.approx(
        {"mean": 0.165, "min": 0.12, "max": 0.21, "spread": 0.09})
    assert moe["accuracy_by_seed"][1]["mean"] == pytest.approx((0.12 + 0.44 + 0.31) / 3)
    paired = summary["paired_accuracy"]  # moe-8 - dense, mean over tasks
    assert paired["diffs"] == pytest.approx({1: 0.07 / 3, 2: 0.07 / 3})
    assert summary["accuracy_verdict"].startswith("holds")
    table = accuracy_table(summary)
    assert "cloze (n=10)" in table and "0.165 (0.120-0.210)" in table
    assert table.splitlines()[-1].split() == ["chance", "-", "0.000", "0.250", "0.250", "0.167"]
    line = direction_line(summary)
    assert "on validation loss" in line and "on zero-shot accuracy" in line and "Accuracy: holds" in line

    reversed_ = [_run(r.arm, r.seed, tuple(r.zeroshot["tasks"][t]["acc"] for t in ACCURACY_TASKS))
                 for r in runs]
    for r in reversed_:  # swap the arms' accuracies: moe-8 now lower on every seed
        r.arm = "moe-8" if r.arm == "dense" else "dense"
    assert _study_summary(study, reversed_)["accuracy_verdict"].startswith("contradicted")
    mixed = [_run("dense", 1, (0.1, 0.4, 0.3)), _run("moe-8", 1, (0.2, 0.4, 0.3)),
             _run("dense", 2, (0.1, 0.4, 0.3)), _run("moe-8", 2, (0.0, 0.4, 0.3))]
    assert _study_summary(study, mixed)["accuracy_verdict"].startswith("inconclusive")


def test_accuracy_on_par_and_step_time_verdicts():
    prmoe = STUDIES["prmoe-vs-moe"]
    on_par = [_run("moe-8-8", 1, (0.10, 0.40, 0.30)), _run("prmoe-4-8", 1, (0.11, 0.40, 0.30)),
              _run("moe-8-8", 2, (0.20, 0.40, 0.30)), _run("prmoe-4-8", 2, (0.19, 0.40, 0.30))]
    assert _study_summary(prmoe, on_par)["accuracy_verdict"].startswith("holds: prmoe-4-8's mean accuracy is on par")
    top2 = STUDIES["top2-vs-residual"]
    worse = [_run("top2", 1, (0.20, 0.40, 0.30)), _run("residual", 1, (0.10, 0.30, 0.30)),
             _run("top2", 2, (0.20, 0.40, 0.30)), _run("residual", 2, (0.10, 0.31, 0.30))]
    assert _study_summary(top2, worse)["accuracy_verdict"].startswith("contradicted")


def test_mos_students_accuracy_as_a_percentage_of_the_teachers():
    assert accuracy_pct_of_teacher(0.40, 0.398) == pytest.approx(99.5)
    study = STUDIES["mos"]
    runs = [_run(arm, seed, (0.1 * k, 0.40, 0.30 + 0.01 * seed)) for seed in (1, 2)
            for k, arm in enumerate(("no-kd", "full-kd", "staged-kd"), start=1)]
    summary = _study_summary(study, runs)
    teacher = _run("teacher", 1, (0.30, 0.45, 0.33))  # mean 0.36
    add_teacher(summary, teacher, _Plan(), [])
    staged = summary["arms"]["staged-kd"]["accuracy_pct_of_teacher"]
    assert staged["mean"] == pytest.approx(100 * ((0.3 + 0.4 + 0.315) / 3) / 0.36)
    assert staged["min"] == pytest.approx(100 * ((0.3 + 0.4 + 0.31) / 3) / 0.36)
    assert staged["max"] == pytest.approx(100 * ((0.3 + 0.4 + 0.32) / 3) / 0.36)
    table = accuracy_table(summary)
    assert "% of teacher" in table and "teacher (seed 1)" in table and f"{staged['mean']:.1f}%" in table


def test_report_without_accuracy_still_renders(tmp_path):
    study = Study(**{**TINY.__dict__, "zeroshot": False, "seeds": (1,)})
    summary = run_study(study, tmp_path / "runs", tmp_path / "docs", train=tiny_train(tmp_path), progress=False)
    assert "paired_accuracy" not in summary and summary["runs"][0]["zeroshot"] is None
    text = render_results(tmp_path / "docs", {"tiny": study}).read_text()
    assert "zero-shot accuracy not measured" in text


def test_a_student_keyed_by_an_older_teacher_key_is_found(tmp_path):
    root = tmp_path / "runs"
    teacher_config = {"train": {"steps": 8, "seed": 1}, "model_config": {"d_model": 32}}
    old_teacher = root / "mos" / "teacher-seed1-0123456789"
    old_teacher.mkdir(parents=True)
    (old_teacher / RESULT_FILE).write_text(json.dumps({"key": "0123456789", "config": teacher_config}))
    student = {"train": {"steps": 4, "seed": 1001}, "distill": {"teacher": "0123456789", "kd_weight": 0.0}}
    now = {**student, "distill": {**student["distill"], "teacher": config_key(teacher_config)}}
    assert stored_settings_key(student, root) == config_key(now) != config_key(student)


def test_checkpoint_dir_follows_reused_from(tmp_path):
    root = tmp_path / "runs"
    origin = root / "a" / "moe-seed1-aaa"
    (origin / "checkpoints" / "step-0000004").mkdir(parents=True)
    (origin / "checkpoints" / "step-0000004" / "state.json").write_text("{}")
    middle, last = root / "b" / "moe-seed1-bbb", root / "c" / "moe-seed1-ccc"
    for run_dir, source in ((middle, "elsewhere/a/moe-seed1-aaa"), (last, "other/b/moe-seed1-bbb")):
        run_dir.mkdir(parents=True)
        (run_dir / RESULT_FILE).write_text(json.dumps({"reused_from": source}))
    assert checkpoint_run_dir(last) == origin
    (middle / RESULT_FILE).write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint_run_dir(last)


def test_accuracy_table_with_an_unscored_arm():
    base = STUDIES["moe-vs-dense"]
    study = Study(**{**base.__dict__, "arms": (*base.arms, Arm("extra", "tiny-dense"))})
    runs = [_run("dense", 1, (0.10, 0.40, 0.30)), _run("moe-8", 1, (0.12, 0.44, 0.31)),
            _run("dense", 2, (0.20, 0.40, 0.36)), _run("moe-8", 2, (0.21, 0.44, 0.38))]
    runs += [RunResult("extra", seed, seed, 4.0, {10: 4.0}, 100, 50, 2, 32, 1000, None) for seed in (1, 2)]
    summary = _study_summary(study, runs)
    assert "accuracy" not in summary["arms"]["extra"] and summary["accuracy_verdict"].startswith("holds")
    extra_row = next(line for line in accuracy_table(summary).splitlines() if line.strip().startswith("extra"))
    assert extra_row.split() == ["extra", "2", "-", "-", "-", "-"]
