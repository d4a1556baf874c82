"""`pyramoe bench train-step --nproc 2`: the scaling report is consistent with its own timings, and
the all-to-all time it attributes is real time inside the step."""

import json

import pytest

from pyramoe.cli.main import main


def test_scaling_report_is_consistent(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    argv = ["bench", "train-step", "--nproc", "2", "--presets", "tiny-moe", "--batch-size", "2", "--seq-len", "8",
            "--vocab-size", "300", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert r["efficiency"] == pytest.approx(r["single"]["step_s"] / r["parallel"]["step_s"])
    assert r["parallel"]["tokens_per_s"] == pytest.approx(2 * 2 * 8 / r["parallel"]["step_s"])
    for rank in r["samples"]["ranks"]:
        assert all(0 < s["a2a_s"] < s["step_s"] for s in rank)  # exchanges happened, inside the step
        assert all(0 < s["after_backward_s"] < s["step_s"] for s in rank)
        assert sorted(s["overlap"] for s in rank) == [False, True]  # each round runs both, interleaved
    assert set(r["parallel"]["exposed_reduction_share"]) == {"overlapped", "after_backward"}
    assert all(s["a2a_s"] == 0 for s in r["samples"]["single"])
    assert "scaling efficiency" in capsys.readouterr().out


def test_nproc_must_be_positive(capsys):
    assert main(["bench", "train-step", "--nproc", "0"]) == 2
    assert "--nproc" in capsys.readouterr().err
