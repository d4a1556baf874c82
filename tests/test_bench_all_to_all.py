"""`pyramoe bench all-to-all`: a real 4-process run (2 emulated nodes x 2, TP=2), its JSON checked
against the topology's formulas and the cost model; a run past its wall limit ends in one line; the
per-rank function `--device cuda` runs, run on gloo with every collective's tensors checked, and
`--device cuda`'s argument errors (a real NCCL run where 2 GPUs are present); a run under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from collective_check import HostBornTaint, install_collective_guard
from distributed import run_workers

from pyramoe.bench import all_to_all as a2a
from pyramoe.cli.main import main
from pyramoe.comm import Topology
from pyramoe.comm import cost_model as cm

SCHEMES = "flat,hierarchical,coordinated,coordinated-hierarchical"


@pytest.fixture(scope="module")
def payload(tmp_path_factory):
    out = tmp_path_factory.mktemp("a2a") / "a2a.json"
    argv = ["bench", "all-to-all", "--nproc", "4", "--ranks-per-node", "2", "--tp", "2", "--sizes", "4x8,16x8,64x8",
            "--schemes", SCHEMES, "--repeats", "1", "--warmup", "0", "--timeout", "60", "--out", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_every_scheme_delivers_every_row(payload):
    assert {r["scheme"] for r in payload["results"]} == set(SCHEMES.split(","))
    assert all(r["correct"] and r["median_ms"] > 0 and r["repeats"] == 1 for r in payload["results"])


def test_peer_counts_equal_the_topology_formulas(payload):
    # p = 4 ranks, G = 2 per node, N = 2 nodes, TP = 2.
    assert payload["expected_peers_per_exchange"] == {
        "flat": 3, "hierarchical": 1 + 1, "coordinated": 1 + 1, "coordinated-hierarchical": 0 + 1 + 1,
    }
    calls = {  # peers of every collective a rank called, in order
        "flat": [3, 3, 3],  # counts, rows out, rows back
        # The count table (equal splits): its two hops; then rows out and back: counts of hop 1, its
        # rows, the rows of hop 2 (their counts follow from hop 1's).
        "hierarchical": [1, 1] + [1, 1, 1] * 2,
        "coordinated": [1, 1, 1, 1],  # 2 ranks per TP index (one per node), then the TP all-gather
        # One rank of a TP index per node: hop 1 runs over a group of one (0 peers), hop 2 is the exchange.
        "coordinated-hierarchical": [0, 1] + [0, 0, 1] * 2 + [1],
    }
    for row in payload["results"]:
        for rank in row["per_rank"]:
            assert rank["peers_per_call"] == calls[row["scheme"]], row["scheme"]
            phases = cm.round_trip(row["scheme"], 4, 2, 1.0, 2)
            assert rank["collectives"] == len(phases)
            assert rank["messages"] == sum(ph.peers for ph in phases)


def test_hierarchical_moves_the_same_bytes_across_nodes_as_flat(payload):
    rows = {(r["tokens"], r["scheme"]): r for r in payload["results"]}
    for tokens in (4, 16, 64):
        flat, hier = rows[tokens, "flat"]["per_rank"], rows[tokens, "hierarchical"]["per_rank"]
        assert sum(r["inter_bytes"] for r in hier) == sum(r["inter_bytes"] for r in flat)
        # ... and the node-local share a second time.
        assert sum(r["intra_bytes"] for r in hier) > sum(r["intra_bytes"] for r in flat)
        # Flat: a row leaves its rank at most once each way (rows of 8 fp32 values, 4 ranks).
        assert sum(r["intra_bytes"] + r["inter_bytes"] for r in flat) <= 2 * 4 * tokens * 8 * 4
        assert all(r["count_bytes"] == 3 * 8 for r in flat)  # one int64 count per peer


def test_model_fit_recorded(payload):
    fit = payload["fit"]
    assert fit["points"] == 12 and fit["alpha_us"] >= 0 and fit["beta_ns_per_byte"] >= 0
    assert all("model_ms" in r and "heldout_ms" in r for r in payload["results"])
    assert payload["machine"]["load_average"] is None or len(payload["machine"]["load_average"]) == 3


def test_a_run_past_its_wall_limit_ends_in_one_line(tmp_path, capsys):
    argv = ["bench", "all-to-all", "--nproc", "2", "--ranks-per-node", "2", "--schemes", "flat", "--sizes", "4x4",
            "--repeats", "1", "--wall-timeout", "0.5", "--out", str(tmp_path / "x.json")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "still running after" in err[-1]
    assert not (tmp_path / "x.json").exists()


# -- the device-generic path and --device cuda ---------------------------------------------------------------


def _guarded_bench_worker(rank: int, world: int, out_dir: str) -> None:
    """The bench's per-rank function, as `--device cuda` runs it, on the CPU over gloo with every
    collective refusing a tensor not made for the run's device; bf16 rows as on CUDA."""
    taint = HostBornTaint()
    install_collective_guard(taint)
    cfg = dict(ranks_per_node=2, tp=2, schemes=SCHEMES.split(","), sizes=[(6, 8), (32, 8)], repeats=1, warmup=0,
               dtype="bfloat16")
    with taint:
        mine = a2a.measure_rank(cfg, rank, world, a2a.rank_device("cpu", rank))
        # The same round trip given host-made rows (no device chosen) is refused: the guard can fail.
        scheme = a2a.build_schemes(["flat"], Topology(world, rank, 1, 2), 1)["flat"]
        caught = ""
        try:
            a2a.layer_round_trip(scheme, torch.randn(4, 8), torch.randint(world, (4,)))
        except AssertionError as exc:
            caught = str(exc)
    correct = all(s["correct"] for size in mine["sizes"] for s in size["schemes"].values())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"seen": taint.seen, "correct": correct,
                                                              "caught": caught}))


def test_the_device_generic_path_gives_every_collective_a_device_tensor(tmp_path):
    run_workers(_guarded_bench_worker, 4, tmp_path, str(tmp_path))
    for rank in range(4):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["correct"]
        assert result["seen"] >= 2 * 4 * 3  # every scheme's collectives at both sizes were checked
        assert result["caught"].startswith("dist.all_to_all_single got a host-born tensor")


def test_device_picks_the_rank_gpu_and_its_backend():
    assert a2a.rank_device("cpu", 3) == torch.device("cpu") and a2a.backend_for(torch.device("cpu")) == "gloo"
    assert a2a.rank_device("cuda", 3) == torch.device("cuda", 3)
    assert a2a.backend_for(torch.device("cuda", 3)) == "nccl"
    assert a2a.resolve_dtype("auto", "cpu") == "float32" and a2a.resolve_dtype("auto", "cuda") == "bfloat16"


def _bench_argv(tmp_path, *extra: str) -> list[str]:
    return ["bench", "all-to-all", "--nproc", "2", "--ranks-per-node", "2", "--schemes", "flat", "--sizes", "4x4",
            "--repeats", "1", "--out", str(tmp_path / "x.json"), *extra]


def test_cuda_without_cuda_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_bench_argv(tmp_path, "--device", "cuda")) == 2  # a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device: cuda asked for but torch sees no CUDA device" in err[0]
    assert not (tmp_path / "x.json").exists()


def test_more_processes_than_gpus_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(_bench_argv(tmp_path, "--device", "cuda")) == 2  # a usage error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nproc: 2 processes need 2 GPUs (one each), torch sees 1" in err[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL: one rank per GPU)")
def test_cuda_nccl_run_delivers_every_row_in_bf16(tmp_path):
    out = tmp_path / "cuda.json"
    argv = ["bench", "all-to-all", "--device", "cuda", "--nproc", "2", "--ranks-per-node", "2", "--tp", "2",
            "--sizes", "4x8,64x8,256x64", "--schemes", "flat,hierarchical,coordinated", "--repeats", "2",
            "--warmup", "1", "--out", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["settings"]["dtype"] == "bfloat16" and payload["settings"]["device"] == "cuda"
    for row in payload["results"]:
        assert row["correct"] and row["median_ms"] > 0
        assert row["bytes_per_rank"] == row["tokens"] * row["width"] * 2


def test_under_torchrun_every_rank_measures_and_rank_0_reports(tmp_path):
    out = tmp_path / "tr.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pyramoe", "bench",
               "all-to-all", "--ranks-per-node", "1", "--schemes", "flat,hierarchical", "--sizes", "4x4,8x4,16x4",
               "--repeats", "1", "--warmup", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 alone prints and writes
    payload = json.loads(out.read_text())
    assert payload["settings"]["nproc"] == 2 and len(payload["results"]) == 6
    assert all(r["correct"] and len(r["per_rank"]) == 2 for r in payload["results"])


def test_a_process_count_torchrun_contradicts_is_one_line(tmp_path, capsys, monkeypatch):
    # (torchrun itself takes `--nproc` for its --nproc-per-node: set its environment here instead)
    for name, value in dict(TORCHELASTIC_RUN_ID="x", RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():
        monkeypatch.setenv(name, value)
    argv = _bench_argv(tmp_path)
    argv[argv.index("--nproc") + 1] = "4"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nproc: 4 given, but torchrun started 2 processes" in err[0]
