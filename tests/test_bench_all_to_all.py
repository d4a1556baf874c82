"""`pyramoe bench all-to-all`: a real 4-process run (2 emulated nodes x 2, TP=2), its JSON checked
against the topology's formulas and the cost model; a run past its wall limit ends in one line."""

import json

import pytest

from pyramoe.cli.main import main
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
