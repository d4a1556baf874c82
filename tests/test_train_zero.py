"""`pyramoe train --zero` (FSDP2 sharding) under torchrun: the same losses as one process, a
checkpoint in the unsharded layout that resumes in one process and sharded again at 2 ranks with
the same losses, and --zero with --tp refused before launching."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_train_distributed import losses, run_args, torchrun, val_losses

from pyramoe.cli.main import main

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def test_zero_training_matches_one_process_and_resumes_on_another_count(tmp_path):
    assert main(run_args(tmp_path, "one", 6, 8)) == 0
    reference = losses("one")
    done = torchrun([*run_args(tmp_path, "zero", 3, 4), "--ep", "2", "--zero"], nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.copytree("zero", "again")
    assert main([*run_args(tmp_path, "zero", 6, 8), "--resume"]) == 0  # sharded run, resumed in one process
    done = torchrun([*run_args(tmp_path, "again", 6, 4), "--resume", "--ep", "2", "--zero"], nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    for run_dir in ("zero", "again"):
        got = losses(run_dir)
        assert sorted(got) == list(range(1, 7))
        for step in got:
            assert got[step] == pytest.approx(reference[step], rel=2e-5), (run_dir, step)
        assert val_losses(run_dir)[6] == pytest.approx(val_losses("one")[6], rel=2e-5)
    assert Path("zero", "checkpoints", "step-0000003", "model.safetensors.index.json").is_file()


def test_zero_with_tp_is_refused_before_launching(tmp_path, capsys):
    assert main([*run_args(tmp_path, "x", 2, 4), "--nproc-per-node", "2", "--tp", "2", "--zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--zero: not with --tp > 1 yet" in err
