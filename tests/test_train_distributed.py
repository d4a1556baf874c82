"""`pyramoe train` under torchrun (gloo, CPU): expert, tensor and data parallel training follows the
same loss curve as one process on the same global batch, and a checkpoint saved (sharded) at one
layout resumes at another (EP=2 -> 1 process, EP=2 -> EP=4, EP=2 -> EP=2 x TP=2 -> 1 process) with the
same losses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyramoe.cli.main import main
from pyramoe.train.metrics import read_metrics, records_of

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def run_args(tmp_path: Path, run_dir: str, steps: int, batch: int | None) -> list[str]:
    """None: no --batch-size (a resumed run derives it from the checkpoint's global batch)."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"def f{i}(x):\n    return x * {i % 13} + {i % 7}\n\n" for i in range(400)))
    return [
        "train", "--corpus", str(corpus), "--steps", str(steps), "--seq-len", "32",
        *(["--batch-size", str(batch)] if batch is not None else []),
        "--run-dir", run_dir, "--quiet", "--no-plot", "--sample-tokens", "0",
        "--set", "train.vocab_size=300", "--set", "train.val_percent=10", "--set", "train.eval_every=3",
        "--set", "train.eval_batches=2", "--set", "train.save_every=3", "--set", "train.threads=1",
        "--set", "model.d_model=32", "--set", "model.n_layers=2",
        # Dropless and no balance loss: both depend on how many tokens one router sees at once, so
        # only then is a step on 2 x 4 sequences the same computation as one on 8.
        "--set", "model.moe.dropless=true", "--set", "train.aux_loss_coef=0",
    ]


def torchrun(argv: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pyramoe", *argv, "--nproc-per-node", str(nproc)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records_of(read_metrics(Path(run_dir) / "metrics.jsonl"), "train")}


def val_losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records_of(read_metrics(Path(run_dir) / "metrics.jsonl"), "eval")}


def test_expert_parallel_training_matches_one_process_and_reshards_on_resume(tmp_path, capsys):
    assert main(run_args(tmp_path, "one", 8, 8)) == 0
    reference = losses("one")

    done = torchrun([*run_args(tmp_path, "ep2", 3, 4), "--ep", "2"], nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("val loss") == 1  # rank 0 alone prints the summary
    saved = Path("ep2", "checkpoints", "step-0000003")  # sharded: each rank its files, no gather
    assert sorted(p.name for p in saved.glob("*.safetensors*")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
        "optimizer-00001-of-00002.safetensors", "optimizer-00002-of-00002.safetensors",
        "optimizer.safetensors.index.json",
    ]
    capsys.readouterr()
    assert main(["eval", str(saved), "--batch-size", "8", "--json"]) == 0  # one process reads the pieces
    assert json.loads(capsys.readouterr().out)["val_loss"] == pytest.approx(val_losses("ep2")[3], rel=2e-5)
    shutil.copytree("ep2", "ep4")
    shutil.copytree("ep2", "tp")
    shutil.copytree("ep2", "slice")
    assert main([*run_args(tmp_path, "ep2", 6, 8), "--resume"]) == 0  # saved at EP=2, resumed in one process

    # EP=4 over two emulated nodes of two ranks, hierarchical all-to-all; the micro-batch derived
    # from the checkpoint's global batch (8 sequences: 2 per rank)
    done = torchrun(
        [*run_args(tmp_path, "ep4", 6, None), "--resume", "--ep", "4", "--all-to-all", "hierarchical",
         "--ranks-per-node", "2"],
        nproc=4,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # EP=2 x TP=2: heads, MLP units and MoE tokens split over TP; saved consolidated, resumed in one process
    done = torchrun([*run_args(tmp_path, "tp", 6, 4), "--resume", "--ep", "2", "--tp", "2"], nproc=4)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main([*run_args(tmp_path, "tp", 8, 8), "--resume"]) == 0
    # EP=2 x TP=2 with expert-slicing: experts' hidden units split over TP (EP shard x TP slice saved)
    done = torchrun([*run_args(tmp_path, "slice", 6, 4), "--resume", "--ep", "2", "--tp", "2", "--expert-slicing"],
                    nproc=4)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main([*run_args(tmp_path, "slice", 8, 8), "--resume"]) == 0

    resumed = records_of(read_metrics(Path("ep4") / "metrics.jsonl"), "resume")[-1]
    assert (resumed["global_batch"], resumed["batch_size"], resumed["grad_accum"]) == (8, 2, 1)
    for run_dir, last in (("ep2", 6), ("ep4", 6), ("tp", 8), ("slice", 8)):
        got = losses(run_dir)
        assert sorted(got) == list(range(1, last + 1))
        for step in range(1, last + 1):
            assert got[step] == pytest.approx(reference[step], rel=2e-5), (run_dir, step)
        assert val_losses(run_dir)[6] == pytest.approx(val_losses("one")[6], rel=2e-5)
    assert reference[8] < reference[1]


def test_ep_without_processes_is_one_line(tmp_path, capsys):
    assert main([*run_args(tmp_path, "x", 2, 4), "--ep", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "EP 2 x TP 1 needs at least 2 processes" in err


def _worker_pids(rank: int) -> list[int]:
    """Processes of this test's torchrun job with RANK=rank (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pyramoe" in cmdline and b"killtest" in cmdline and f"RANK={rank}".encode() in environ:
            pids.append(int(entry.name))
    return pids


def test_a_killed_rank_ends_the_job_quickly(tmp_path):
    import signal
    import time

    argv = [*run_args(tmp_path, "killtest", 100000, 4), "--ep", "2", "--set", "train.eval_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pyramoe", *argv, "--nproc-per-node", "2"]
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        metrics = Path("killtest") / "metrics.jsonl"
        while not (metrics.is_file() and '"train"' in metrics.read_text()):
            assert job.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        victims = _worker_pids(1)
        assert victims, "no rank-1 worker found"
        os.kill(victims[0], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = job.communicate(timeout=90)
        assert time.monotonic() - killed_at < 60
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    assert "a rank failed" in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("layout", "fragment"),
    [
        (["--ep", "3"], "layers[1].ep: expert-parallel degree 3"),
        (["--tp", "3"], "--tp: 3 does not divide world size 2"),
        (["--tp", "2", "--set", "model.n_kv_heads=1"], "--tp: model.n_kv_heads=1 does not split over 2 ranks"),
        # EP groups of 2 over nodes of 3 ranks: the group of ranks 2 and 3 straddles two nodes.
        (["--nproc-per-node", "6", "--ep", "2", "--all-to-all", "hierarchical", "--ranks-per-node", "3"],
         "--all-to-all hierarchical: layers[1].ep: groups of degree 2 are spread unevenly over nodes of 3 ranks"),
    ],
)
def test_a_layout_that_cannot_fit_is_refused_before_launching(tmp_path, capsys, layout, fragment):
    assert main([*run_args(tmp_path, "x", 2, 4), "--nproc-per-node", "2", *layout]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and fragment in err
