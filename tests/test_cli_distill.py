"""`pyramoe distill` through the CLI entry point: a run, its resume, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyramoe.cli.main import main

QUIET = ["--quiet", "--no-plot", "--sample-tokens", "0"]


pytestmark = pytest.mark.usefixtures("tiny_run_env")


def train_teacher(tmp_path: Path, run_dir: str = "runs/tiny-prmoe", vocab: int = 300, steps: int = 3) -> None:
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"def f{i}(x):\n    return x + {i % 11}\n\n" for i in range(300)))
    argv = ["train", "--preset", "tiny-prmoe", "--corpus", str(corpus), "--steps", str(steps), "--batch-size", "4",
            "--seq-len", "32", "--run-dir", run_dir, "--set", f"train.vocab_size={vocab}",
            "--set", "train.val_percent=10", "--set", "train.eval_every=0", "--set", "train.eval_batches=2",
            "--set", "model.d_model=32", "--set", "model.max_seq_len=64", *QUIET]
    assert main(argv) == 0


def one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for fragment in fragments:
        assert fragment in err, err


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["distill", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: pyramoe distill" in out and "--teacher" in out and "kd_stop_step" in out


def test_distill_resume_and_eval(tmp_path, capsys):
    train_teacher(tmp_path)
    capsys.readouterr()
    assert main(["distill", "--teacher", "runs/tiny-prmoe", "--steps", "3", "--kd-stop-step", "2", *QUIET]) == 0
    out = capsys.readouterr().out
    assert "student derived from the teacher's blocks [0, 1, 3]: 3 blocks" in out and "teacher val loss" in out
    assert "KD stop at step 2" in out
    run_dir = Path("runs/tiny-prmoe-mos")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kd_weight"] for r in records if r["type"] == "train"] == [1.0, 1.0, 0.0]

    assert main(["distill", "--teacher", "runs/tiny-prmoe", "--resume", "--steps", "4", *QUIET]) == 0
    assert "resuming at step 3" in capsys.readouterr().out
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4

    student = tmp_path / "student.toml"
    student.write_text('[model]\npreset = "tiny-mos"\nd_model = 32\nmax_seq_len = 64\n')
    assert main(["distill", "--teacher", "runs/tiny-prmoe", "--student", str(student), "--steps", "1", *QUIET]) == 0
    assert "student tiny-mos: 3 blocks" in capsys.readouterr().out and Path("runs/tiny-mos-distilled").is_dir()


def test_distill_errors_are_one_line(tmp_path, capsys):
    train_teacher(tmp_path)
    train_teacher(tmp_path, "runs/other-vocab", vocab=280, steps=1)
    assert main(["distill", "--teacher", "runs/tiny-prmoe", "--steps", "1", *QUIET]) == 0
    bad_student = tmp_path / "bad.toml"
    bad_student.write_text("[train]\nsteps = 3\n")
    teacher = ["distill", "--teacher", "runs/tiny-prmoe", "--run-dir", "runs/new", *QUIET]
    cases = [
        (["distill", *QUIET], ["--teacher: required"]),
        (["distill", "--teacher", "runs/nothing"], ["distill.teacher: checkpoint not found"]),
        ([*teacher, "--set", "train.vocab_size=280"], ["train.vocab_size: 280 differs", "(300)"]),
        ([*teacher, "--student", "gigantic"], ["--student: preset: unknown preset 'gigantic'"]),
        ([*teacher, "--student", str(bad_student)], ["[model] table only"]),
        ([*teacher, "--set", "distill.kd_schedule=cosine"], ["distill.kd_schedule: must be one of"]),
        ([*teacher, "--set", "model.n_layers=2"], ["model.n_layers", "distill.student_layers"]),
        ([*teacher, "--student-layers", "1"], ["at least 2"]),
        ([*teacher, "--set", "model.d_model=64"], ["tok_emb.weight: shape (300, 64)", "init_from_teacher=false"]),
        (["distill", "--resume", "--run-dir", "runs/tiny-prmoe-mos", "--teacher", "runs/other-vocab", "--steps", "2"],
         ["the teacher's vocabulary (280 tokens)", "share one tokenizer"]),
        (["distill", "--resume", "--run-dir", "runs/tiny-prmoe"], ["not a distillation run"]),
        (["train", "--resume", "--run-dir", "runs/tiny-prmoe-mos"], ["pyramoe distill --resume"]),
        (["train", "--set", "distill.kd_weight=2"], ["belongs to `pyramoe distill`"]),
    ]
    for argv, fragments in cases:
        one_line_error(capsys, argv, *fragments)
    assert not Path("runs/new").exists()
