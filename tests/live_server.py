"""A real `pyramoe serve` process on an ephemeral port, for live-server tests: a tiny trained run
(MoE in block 1, a BPE tokenizer), the server started as a subprocess, its URL read from the line
it prints when ready. Import the fixtures into a test module: `from live_server import server, tiny_run`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pyramoe.cli.main import main

READY = re.compile(r"ready at (http://[\d.]+:\d+)")


def train_tiny_run(root: Path) -> Path:
    """A 6-step tiny-moe run on a small synthetic corpus (~5 s)."""
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i % 11}\n\n" for i in range(300)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PYRAMOE_CACHE", str(root / "cache"))
            assert main([
                "train", "--corpus", str(corpus), "--steps", "6", "--batch-size", "4", "--seq-len", "32",
                "--set", "train.vocab_size=300", "--set", "train.val_percent=10", "--set", "train.eval_every=3",
                "--set", "train.eval_batches=2", "--set", "model.d_model=32", "--set", "model.n_layers=2",
                "--run-dir", str(root / "run"), "--quiet", "--no-plot", "--sample-tokens", "0",
            ]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "run"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_server(model: Path, log: Path, *flags: str, timeout: float = 120) -> Server:
    """`pyramoe serve MODEL --port 0 FLAGS` until it prints its URL (fails with its output otherwise)."""
    return wait_ready(launch_server(model, log, *flags), log, timeout)


def launch_server(model: Path, log: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the native build cached where the user's builds are
    return subprocess.Popen([sys.executable, "-m", "pyramoe", "serve", str(model), "--port", "0", *flags],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def wait_ready(process: subprocess.Popen, log: Path, timeout: float = 120) -> Server:
    """The server's URL once it prints its ready line (fails with its output if it exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return Server(match.group(1), process, log)
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """One server per test module (greedy answers must not depend on what ran before)."""
    live = start_server(tiny_run, tmp_path_factory.mktemp("log") / "serve.log", "--max-batch", "8")
    yield live
    live.stop()
