import json

import pytest

from pyramoe.cli.main import main


def test_help_for_each_command(capsys):
    for argv in (["--help"], ["presets", "--help"], ["bench", "--help"], ["bench", "moe-layer", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        assert "usage: pyramoe" in capsys.readouterr().out


def test_presets_lists_paper_sizes(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "1.3b-moe-128" in out and "52,471" in out


def test_bench_moe_layer_small_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "moe-layer", "--tokens", "128", "--d-model", "32", "--d-ff", "64", "--experts", "2,4",
            "--dtypes", "fp32", "--repeats", "1", "--warmup", "0", "--no-deepspeed", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    impls = {r["impl"] for r in payload["results"]}
    assert impls == {"pyramoe", "pyramoe-einsum", "limit"}
    # Every ratio is against the limit (and pyramoe) row of the same experts, dtype and mode.
    rows = {(r["impl"], r["experts"], r["dtype"], r["mode"]): r for r in payload["results"]}
    for (_, experts, dtype, mode), row in rows.items():
        limit = rows[("limit", experts, dtype, mode)]["median_ms"]
        ours = rows[("pyramoe", experts, dtype, mode)]["median_ms"]
        assert row["x_limit"] == pytest.approx(row["median_ms"] / limit)
        assert row["pyramoe_speedup"] == pytest.approx(row["median_ms"] / ours)
    assert {(e, m) for _, e, _, m in rows} == {(2, "fwd"), (4, "fwd"), (2, "fwdbwd"), (4, "fwdbwd")}
    assert "x limit" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--capacity-factor", "0"], "--capacity-factor"),
        (["--dtypes", "fp8"], "--dtypes"),
        (["--experts", "8,x"], "--experts"),
        (["--modes", "bwd"], "--modes"),
    ],
)
def test_bench_bad_input_is_one_line(argv, field, capsys):
    assert main(["bench", "moe-layer", "--no-deepspeed", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and field in err
