"""`pyramoe generate` under torchrun: experts spread over ranks (EP=2), EP=2 x TP=2 (heads and
MoE tokens split) and EP=2 on the device step print the same greedy completions as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyramoe.cli.main import main

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def test_expert_and_tensor_parallel_generation_matches_one_process(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i % 13} + {i % 7}\n\n" for i in range(300)))
    train = ["train", "--corpus", str(corpus), "--steps", "20", "--batch-size", "8", "--seq-len", "32",
             "--run-dir", "run", "--quiet", "--no-plot", "--sample-tokens", "0", "--set", "train.vocab_size=300",
             "--set", "train.val_percent=10", "--set", "model.d_model=32", "--set", "model.n_layers=2"]
    assert main(train) == 0
    generate = ["generate", "run", "--prompt", "def f1", "--prompt", "return", "--prompt", "x",
                "--max-new-tokens", "12", "--temperature", "0", "--dtype", "fp32", "--max-batch", "2"]
    capsys.readouterr()
    assert main(generate) == 0
    expected = capsys.readouterr().out
    assert expected.startswith("def f1") and "\nreturn" in expected
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for layout in (["--ep", "2", "--nproc-per-node", "2"], ["--ep", "2", "--tp", "2", "--nproc-per-node", "4"],
                   ["--ep", "2", "--nproc-per-node", "2", "--step", "device"]):
        done = subprocess.run([sys.executable, "-m", "pyramoe", *generate, *layout], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout == expected, layout
