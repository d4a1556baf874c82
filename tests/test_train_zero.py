"""`pyramoe train --zero` (FSDP2 sharding) under torchrun, with EP and TP: the same losses as one
process, a checkpoint written sharded (each rank its FSDP shard: no gather) that resumes in one
process and at 2 ranks, without the sharding and with it, with the same losses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_train_distributed import losses, run_args, torchrun, val_losses

from pyramoe.cli.main import main

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def test_zero_tp_training_matches_one_process_and_resumes_on_another_count(tmp_path):
    assert main(run_args(tmp_path, "one", 6, 8)) == 0
    reference = losses("one")
    # DP=2 x TP=2, EP=2: every global batch of 8 sequences as 2 x 4
    done = torchrun([*run_args(tmp_path, "zero", 3, 4), "--tp", "2", "--ep", "2", "--zero"], nproc=4)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = Path("zero", "checkpoints", "step-0000003")
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    # every rank wrote its own file, and pieces were stored as row chunks of FSDP shards
    assert sorted({*index["weight_map"].values()}) == [f"model-0000{r}-of-00004.safetensors" for r in range(1, 5)]
    assert index["metadata"]["chunks"]
    shutil.copytree("zero", "two")
    shutil.copytree("zero", "two-zero")
    assert main([*run_args(tmp_path, "zero", 6, 8), "--resume"]) == 0  # in one process, no sharding
    done = torchrun([*run_args(tmp_path, "two", 6, None), "--resume", "--ep", "2"], nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    done = torchrun([*run_args(tmp_path, "two-zero", 6, None), "--resume", "--ep", "2", "--zero"], nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    for run_dir in ("zero", "two", "two-zero"):
        got = losses(run_dir)
        assert sorted(got) == list(range(1, 7))
        for step in got:
            assert got[step] == pytest.approx(reference[step], rel=2e-5), (run_dir, step)
        assert val_losses(run_dir)[6] == pytest.approx(val_losses("one")[6], rel=2e-5)
