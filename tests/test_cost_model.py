"""The alpha-beta all-to-all cost model on hand-computed cases (pyramoe/comm/cost_model.py)."""

import pytest

from pyramoe.cli.main import main
from pyramoe.comm import cost_model as cm


@pytest.mark.parametrize("p,g", [(8, 4), (64, 8), (1024, 8)])
def test_peers_flat_p_minus_1_hierarchical_g_plus_p_over_g(p, g):
    assert cm.peers_per_exchange("flat", p, g) == p - 1
    assert cm.peers_per_exchange("hierarchical", p, g) == (g - 1) + (p // g - 1)


def test_peers_coordinated_exchange_among_one_tp_index_plus_all_gather():
    # 8 ranks, 4 per node, TP=2: the exchange among the 4 ranks of a TP index, then 1 all-gather peer.
    assert cm.peers_per_exchange("coordinated", 8, 4, tp=2) == 3 + 1
    # ... hierarchical inside: 2 per node over 2 nodes -> 1 + 1, plus the all-gather.
    assert cm.peers_per_exchange("coordinated-hierarchical", 8, 4, tp=2) == 1 + 1 + 1
    assert cm.peers_per_exchange("coordinated", 1024, 8, tp=2) == 511 + 1


def test_bytes_flat_vs_hierarchical_same_bytes_cross_nodes():
    flat = cm.flat_exchange(8, 4, 800.0)
    assert (flat.intra_peers, flat.inter_peers, flat.intra_bytes, flat.inter_bytes) == (3, 4, 300.0, 400.0)
    hop1, hop2 = cm.hierarchical_exchange(8, 4, 800.0)
    assert (hop1.intra_peers, hop1.inter_peers, hop1.intra_bytes, hop1.inter_bytes) == (3, 0, 600.0, 0.0)
    assert (hop2.intra_peers, hop2.inter_peers, hop2.intra_bytes, hop2.inter_bytes) == (0, 1, 0.0, 400.0)
    assert hop1.inter_bytes + hop2.inter_bytes == flat.inter_bytes  # the node-local share moves twice


def test_one_node_hierarchical_is_flat():
    assert cm.round_trip("hierarchical", 8, 8, 1000.0) == cm.round_trip("flat", 8, 8, 1000.0)


def test_round_trip_collectives_as_the_dispatcher_runs_them():
    assert [ph.what for ph in cm.round_trip("flat", 8, 4, 1.0)] == ["counts", "dispatch", "combine"]
    # The count table's two hops (equal splits: no counts); rows out and back: counts of hop 1, two data hops.
    assert [ph.what for ph in cm.round_trip("hierarchical", 8, 4, 1.0)] == [
        "counts hop1", "counts hop2", "dispatch counts hop1", "dispatch hop1", "dispatch hop2",
        "combine counts hop1", "combine hop1", "combine hop2"]
    coordinated = cm.round_trip("coordinated", 8, 4, 800.0, tp=2)
    assert [ph.what for ph in coordinated][-1] == "tp all-gather"
    assert coordinated[1].intra_bytes + coordinated[1].inter_bytes == 800.0 / 2 * 3 / 4  # 1/TP, 3 of 4 peers


def test_predict_hand_computed():
    network = cm.Network(intra=cm.Link(1.0, 0.1), inter=cm.Link(10.0, 1.0), call_s=100.0)
    # flat, p=8, G=4, B=800: 100 + 3*1 + 300*0.1 + 4*10 + 400*1
    assert cm.predict(network, [cm.flat_exchange(8, 4, 800.0)]) == pytest.approx(573.0)
    # hierarchical: (100 + 3*1 + 600*0.1) + (100 + 1*10 + 400*1)
    assert cm.predict(network, cm.hierarchical_exchange(8, 4, 800.0)) == pytest.approx(673.0)


def test_hierarchical_wins_at_scale_for_small_messages_with_published_links():
    table = cm.predict_table(cm.PUBLISHED_GPU_NETWORK, [8, 1024], 8, 8 * 2048 * 2)
    assert table[0]["flat"] == pytest.approx(table[0]["hierarchical"])  # one node
    assert table[1]["hierarchical"] < table[1]["flat"] / 2


def test_fit_recovers_the_parameters_of_synthetic_measurements():
    truth = cm.Network(cm.Link(2e-4, 3e-9), cm.Link(2e-4, 3e-9), call_s=1e-3)
    samples = [(cm.round_trip(s, 8, 4, b, 2), cm.predict(truth, cm.round_trip(s, 8, 4, b, 2)))
               for s in ("flat", "hierarchical", "coordinated") for b in (1e3, 1e5, 1e7)]
    fitted = cm.fit(samples)
    assert fitted.call_s == pytest.approx(1e-3, rel=1e-6)
    assert fitted.intra.alpha_s == pytest.approx(2e-4, rel=1e-6)
    assert fitted.intra.beta_s_per_byte == pytest.approx(3e-9, rel=1e-6)


def test_fit_keeps_coefficients_non_negative():
    # Times that fall with the message count would need a negative alpha: it is fixed at 0.
    samples = [(cm.round_trip("flat", 8, 4, 1e3), 1.0), (cm.round_trip("hierarchical", 8, 4, 1e3), 0.5)]
    fitted = cm.fit(samples)
    assert min(fitted.call_s, fitted.intra.alpha_s, fitted.intra.beta_s_per_byte) >= 0


@pytest.mark.parametrize("call,match", [
    (lambda: cm.round_trip("ring", 8, 4, 1.0), "scheme"),
    (lambda: cm.round_trip("coordinated", 8, 4, 1.0, tp=3), "tp"),
    (lambda: cm.round_trip("flat", 12, 8, 1.0), "gpus-per-node"),
    (lambda: cm.fit([]), "fit"),
])
def test_bad_input_one_line_value_error(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_cli_predict_table(capsys):
    assert main(["bench", "all-to-all", "--predict"]) == 0
    out = capsys.readouterr().out
    assert "ASSUMED" in out and "InfiniBand" in out
    assert any(line.split()[:1] == ["1024"] for line in out.splitlines())


@pytest.mark.parametrize("argv,flag", [
    (["--sizes", "8"], "--sizes"),
    (["--schemes", "flat,ring"], "--schemes"),
    (["--nproc", "6", "--ranks-per-node", "4"], "--ranks-per-node"),
    (["--tp", "3"], "--tp"),
    (["--predict", "--predict-sizes", "x"], "--predict-sizes"),
])
def test_cli_bad_flags_exit_2(argv, flag, capsys):
    assert main(["bench", "all-to-all", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert flag in err and "\n" not in err
