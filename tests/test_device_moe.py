"""The device MoE forward (`pyramoe.layers.device_moe`) gives the current dispatch's outputs and
expert counts - softmax and DeepSeek-V3 sigmoid routing, top-1/2/3, shared experts, Residual-MoE,
biases, widths _grouped_mm must pad, fp32 and bf16, few tokens (the decode path) and many (the
sort/scatter dispatch), padding rows - with no host sync and shapes that do not depend on routing."""

from __future__ import annotations

import pytest
import torch
from host_syncs import HostSync, no_host_syncs

from pyramoe.config import MoEConfig
from pyramoe.layers import MoELayer
from pyramoe.layers.device_moe import DeviceMoE, ExpertTable

D = 64
CASES = {
    "softmax top-2 swiglu": dict(moe=dict(top_k=2), activation="swiglu", bias=False),
    "switch top-1 gelu with biases": dict(moe=dict(top_k=1), activation="gelu", bias=True),
    "deepseek-v3 sigmoid routing, shared gated expert": dict(
        moe=dict(top_k=3, router_score="sigmoid", score_correction_bias=True, expert_groups=4, topk_groups=2,
                 routed_scaling=2.5, shared_d_ff=48, shared_gate=True), activation="swiglu", bias=False),
    "residual moe": dict(moe=dict(top_k=1, use_residual=True), activation="gelu", bias=True),
    "top-3 unnormalised, unaligned widths": dict(moe=dict(top_k=3, gate_norm="softmax", expert_d_ff=30),
                                                 activation="swiglu", bias=False),
}


def _layer(case: dict, dtype: torch.dtype) -> MoELayer:
    torch.manual_seed(0)
    config = MoEConfig(**{"num_experts": 8, "dropless": True, "expert_d_ff": 40, **case["moe"]})
    layer = MoELayer(D, 96, config, activation=case["activation"], bias=case["bias"]).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 1 or name.endswith(("b_in", "b_out")):
                p.add_(torch.randn_like(p) * 0.2)
        if hasattr(layer.router, "score_bias"):
            layer.router.score_bias.normal_(0, 0.1)
    return layer.to(dtype)


@pytest.mark.parametrize("tokens", [3, 40])  # 3: the few-assignment decode path; 40: the sort/scatter dispatch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_device_moe_equals_current_dispatch(name, dtype, tokens):
    layer = _layer(CASES[name], dtype)
    x_TD = torch.randn(tokens, D).to(dtype)
    want_TD, stats = layer(x_TD)
    got_TD, routed_E = DeviceMoE(layer)(x_TD)
    tolerance = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_TD, want_TD, **tolerance)
    assert torch.equal(routed_E, stats.routed_per_expert)


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_padding_rows_count_nowhere_and_change_nothing(name):
    layer = _layer(CASES[name], torch.float32)
    x_TD = torch.randn(12, D)
    real_T = torch.tensor([True] * 7 + [False] * 5)
    want_TD, stats = layer(x_TD[:7])
    got_TD, routed_E = DeviceMoE(layer)(x_TD, real_T)
    torch.testing.assert_close(got_TD[:7], want_TD, atol=1e-5, rtol=1e-4)
    assert torch.equal(routed_E, stats.routed_per_expert)


def test_expert_table_orders_rows_by_expert_then_assignment():
    expert_TK = torch.tensor([[2, 0], [0, 3], [2, 1], [0, 2]])
    table = ExpertTable(expert_TK, num_experts=5)
    assert table.ends_E.tolist() == [3, 4, 7, 8, 8]
    assert table.expert_of_row_R.tolist() == [0, 0, 0, 1, 2, 2, 2, 3]
    # Expert 0 serves assignments 1 (token 0), 2 (token 1), 7 (token 3); expert 2 tokens 0, 2, 3.
    assert table.token_of_row_R.tolist() == [0, 1, 3, 2, 0, 2, 3, 1]
    assert table.row_of_assignment_A.tolist() == [4, 0, 1, 7, 5, 3, 2, 6]
    assert table.count(torch.tensor([True, True, False, False, True, True, False, False])).tolist() == [1, 1, 2, 0, 0]


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_device_moe_makes_no_host_sync(name):
    layer = _layer(CASES[name], torch.bfloat16)
    device_moe = DeviceMoE(layer)
    x_TD, real_T = torch.randn(40, D).to(torch.bfloat16), torch.arange(40) < 30
    with no_host_syncs():
        device_moe(x_TD, real_T)
        device_moe(x_TD[:2])
    with pytest.raises(HostSync):  # the check sees the current dispatch's syncs
        with no_host_syncs():
            layer(x_TD)


def test_unsupported_layers_are_named():
    layer = MoELayer(D, 96, MoEConfig(num_experts=4, top_k=1, dropless=False))
    with pytest.raises(ValueError, match="^device moe: the layer drops tokens"):
        DeviceMoE(layer)
