import pytest

from pyramoe.comm import Topology, layer_ep


def test_partitions_tp_innermost():
    t = Topology(world_size=8, rank=5, tp=2, ranks_per_node=4)
    assert t.dp == 4 and (t.tp_index, t.dp_index) == (1, 2)
    assert t.tp_partition() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t.dp_partition() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # all-to-all only among ranks of the same TP index (coordinated communication)
    assert t.ep_partition(2) == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert t.expert_dp_partition(2) == [[0, 4], [2, 6], [1, 5], [3, 7]]
    assert t.node_partition() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert t.ep_ranks(2) == [5, 7] and t.ep_rank(2) == 0 and t.expert_dp_ranks(2) == [1, 5]


def test_every_partition_covers_each_rank_once():
    t = Topology(world_size=12, rank=0, tp=3, ranks_per_node=6)
    partitions = (t.tp_partition(), t.dp_partition(), t.ep_partition(2), t.expert_dp_partition(4), t.node_partition())
    for partition in partitions:
        assert sorted(r for ranks in partition for r in ranks) == list(range(12))
    # ranks holding the same experts are one per EP group, and EP x expert-DP = DP
    assert all(len(g) == 2 for g in t.ep_partition(2)) and all(len(g) == 2 for g in t.expert_dp_partition(2))


def test_layer_ep_is_min_of_ep_and_experts_and_errors_name_the_layer():
    t = Topology(world_size=8, rank=0)
    assert layer_ep(64, 8, t, 3) == 8
    assert layer_ep(4, 8, t, 1) == 4  # DeepSpeed's min(ep, num_experts)
    with pytest.raises(ValueError, match=r"layers\[5\]\.ep: 6 experts do not split evenly over 4"):
        layer_ep(6, 4, t, 5)
    with pytest.raises(ValueError, match=r"layers\[2\]\.ep: expert-parallel degree 3 must divide"):
        layer_ep(3, 8, t, 2)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(world_size=6, rank=0, tp=4), "tp"),
        (dict(world_size=8, rank=8), "rank"),
        (dict(world_size=8, rank=0, ranks_per_node=3), "ranks_per_node"),
    ],
)
def test_bad_topology_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Topology(**kwargs)
