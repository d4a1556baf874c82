"""`pyramoe bench long-context` on a tiny shape: every (kernels, context, batch) measured, ratios to
the shortest context, the KV bytes a step reads, a baseline revision's kernels built beside these;
bad input is one line."""

import json
import subprocess
from pathlib import Path

import pytest

from pyramoe.cli.main import main
from pyramoe.inference.native import load_library

pytestmark = pytest.mark.skipif(load_library() is None, reason="no C++ compiler: the native step is not built")

TINY = ["--hidden", "32", "--layers", "2", "--experts", "4", "--intermediate", "48", "--heads", "4", "--kv-heads",
        "2", "--vocab", "64", "--contexts", "16,100", "--batches", "1,2", "--steps", "2", "--rounds", "1",
        "--dtype", "fp32"]


def _in_git_checkout() -> bool:
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode == 0


def test_bench_long_context_tiny(tmp_path, capsys):
    out = tmp_path / "long_context.json"
    baseline = ["--baseline", "HEAD"] if _in_git_checkout() else []
    assert main(["bench", "long-context", *TINY, *baseline, "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    impls = {"pyramoe"} | ({"baseline HEAD"} if baseline else set())
    got = {(r["impl"], r["context"], r["batch"]): r for r in payload["results"]}
    assert set(got) == {(i, c, b) for i in impls for c in (16, 100) for b in (1, 2)}
    for (impl, context, batch), r in got.items():
        assert r["decode_tok_s"] > 0 and r["attention_ms"] > 0
        assert r["of_shortest"] == pytest.approx(r["decode_tok_s"] / got[(impl, 16, batch)]["decode_tok_s"])
        # keys and values, 2 layers x 2 heads x head width 8, fp32, over the row's context + 1 positions
        assert r["kv_bytes_per_step"] == batch * (context + 1) * 2 * 2 * 2 * 8 * 4
    printed = capsys.readouterr().out
    assert "x at 16" in printed and "attention ms/step" in printed


@pytest.mark.parametrize(("flag", "value"), [("--contexts", "16,x"), ("--batches", "0"), ("--heads", "3"),
                                             ("--baseline", "no-such-revision")])
def test_bench_long_context_bad_input_is_one_line(flag, value, capsys):
    assert main(["bench", "long-context", *TINY, flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and flag in err


def test_bench_long_context_cpu_clock(tmp_path):
    """--clock cpu: tokens per CPU second of the process, said so in the notes."""
    out = tmp_path / "long_context.json"
    assert main(["bench", "long-context", *TINY, "--clock", "cpu", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert any("--clock cpu" in note for note in payload["notes"])
    assert all(r["decode_tok_s"] > 0 for r in payload["results"])
