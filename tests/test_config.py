import pytest

from pyramoe.config import LayerConfig, ModelConfig, MoEConfig, build_layers, moe_layer_indices, pyramid


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_experts": 4, "top_k": 5}, "top_k"),
        ({"num_experts": 0}, "num_experts"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"eval_capacity_factor": float("nan")}, "eval_capacity_factor"),
        ({"min_capacity": -1}, "min_capacity"),
        ({"drop_policy": "oldest"}, "drop_policy"),
        ({"noisy_gate_policy": "loud"}, "noisy_gate_policy"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_moe_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"moe\.{field}"):
        MoEConfig(**kwargs).validate()


def test_model_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="activation"):
        ModelConfig(activation="relu6")
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.5)
    with pytest.raises(ValueError, match=r"layers\[1\]\.moe\.top_k"):
        ModelConfig(layers=[LayerConfig(), LayerConfig(MoEConfig(num_experts=2, top_k=3))])
    with pytest.raises(ValueError, match="layers"):
        ModelConfig(layers=[])


def test_placements():
    assert moe_layer_indices(8, "every_other") == [1, 3, 5, 7]
    assert moe_layer_indices(8, "all") == list(range(8))
    assert moe_layer_indices(8, "first_half") == [0, 1, 2, 3]
    assert moe_layer_indices(8, "second_half") == [4, 5, 6, 7]
    assert moe_layer_indices(8, [6, 2, 2]) == [2, 6]
    with pytest.raises(ValueError, match="out of range"):
        moe_layer_indices(8, [8])
    with pytest.raises(ValueError, match="moe_placement"):
        moe_layer_indices(8, "middle")


def test_pyramid_layers():
    counts = pyramid(12, (32, 64), (2,))
    assert counts == [32] * 10 + [64] * 2
    layers = build_layers(24, "every_other", counts, use_residual=True)
    moe = [layer.moe for layer in layers if layer.moe is not None]
    assert [m.num_experts for m in moe] == counts
    assert all(m.use_residual for m in moe)
    assert layers[0].moe is None and layers[23].moe.num_experts == 64
    with pytest.raises(ValueError, match="num_experts"):
        build_layers(24, "every_other", [8, 8])
    half = build_layers(8, "first_half", [2, 2, 4, 4])
    assert [layer.moe.num_experts if layer.moe else 0 for layer in half] == [2, 2, 4, 4, 0, 0, 0, 0]


def test_config_roundtrip_and_unknown_fields():
    config = ModelConfig(d_model=64, n_heads=4, layers=build_layers(4, "all", 4, top_k=2))
    again = ModelConfig.from_dict(config.to_dict())
    assert again == config
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})
    data = config.to_dict()
    data["layers"][0]["moe"]["capacity"] = 3
    with pytest.raises(ValueError, match=r"layers\[0\]\.moe\.capacity"):
        ModelConfig.from_dict(data)
