"""Sparse dispatch == the dense one-hot einsum reference: outputs, gradients and dropped tokens."""

import pytest
import torch

from pyramoe.config import MoEConfig
from pyramoe.layers import MoELayer
from pyramoe.layers.dispatch import DenseEinsumDispatcher, plan_dispatch


def reference_forward(moe: MoELayer, x: torch.Tensor, generator=None):
    routing = moe.router(x, generator=generator)
    ref = DenseEinsumDispatcher(routing, moe.num_experts)
    y = ref.combine(moe.experts(ref.dispatch(x), None, ref.capacity))
    if moe.residual_mlp is not None:
        coef = torch.softmax(moe.coefficient(x), dim=-1)
        y = y * coef[:, :1] + moe.residual_mlp(x) * coef[:, 1:]
    return y, ref.kept_TK


def grads(moe, x):
    return [x.grad] + [p.grad for p in moe.parameters() if p.grad is not None]


CASES = [
    dict(num_experts=4, top_k=1, capacity_factor=1.0),
    dict(num_experts=8, top_k=1, capacity_factor=0.5),
    dict(num_experts=8, top_k=2, capacity_factor=1.0),
    dict(num_experts=6, top_k=3, capacity_factor=0.75),
    dict(num_experts=8, top_k=2, capacity_factor=2.0),  # compact layout (too much padding)
    dict(num_experts=8, top_k=2, dropless=True),
    dict(num_experts=8, top_k=1, capacity_factor=0.5, drop_policy="random"),
    dict(num_experts=4, top_k=1, capacity_factor=1.0, use_residual=True),
]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_sparse_matches_dense_einsum(case, activation):
    moe = MoELayer(16, 24, MoEConfig(min_capacity=0, **case), activation=activation)
    x = torch.randn(50, 16, requires_grad=True)

    y, stats = moe(x, generator=torch.Generator().manual_seed(3))
    y.pow(2).sum().backward()
    sparse_grads = grads(moe, x)
    plan = plan_dispatch(moe.router(x, generator=torch.Generator().manual_seed(3)), moe.num_experts)

    moe.zero_grad()
    x.grad = None
    y_ref, kept_ref = reference_forward(moe, x, generator=torch.Generator().manual_seed(3))
    y_ref.pow(2).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(plan.kept_TK, kept_ref)
    for g, g_ref in zip(sparse_grads, grads(moe, x)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)
    if case.get("dropless"):
        assert stats.dropped_fraction.item() == 0.0
    assert stats.tokens_per_expert.sum().item() == int(plan.kept_TK.sum())


def test_dropless_processes_every_token_under_imbalance():
    moe = MoELayer(8, 16, MoEConfig(num_experts=4, top_k=2, dropless=True))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 50.0  # nearly every token prefers expert 0
    x = torch.randn(64, 8).abs() + 0.1
    y, stats = moe(x)
    assert stats.capacity is None and stats.dropped_fraction.item() == 0.0
    assert stats.tokens_per_expert.sum().item() == 128 and stats.tokens_per_expert[0].item() == 64
    y_ref, _ = reference_forward(moe, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)


def test_padded_and_compact_layouts_agree():
    moe = MoELayer(16, 32, MoEConfig(num_experts=8, top_k=2, capacity_factor=1.0, min_capacity=0))
    x = torch.randn(64, 16)
    routing = moe.router(x)
    outputs = []
    for waste_limit in (10.0, 0.0):  # padded, then compact
        plan = plan_dispatch(routing, 8, padded_waste_limit=waste_limit)
        assert (plan.rows_per_expert is None) == (waste_limit == 0.0)
        batch = moe.dispatcher.dispatch(x, plan)
        rows = moe.experts(batch.rows, batch.tokens_per_expert, batch.rows_per_expert)
        outputs.append(moe.dispatcher.combine(rows, batch, plan))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_dropped_tokens_get_zero_output():
    moe = MoELayer(8, 16, MoEConfig(num_experts=2, capacity_factor=0.25, min_capacity=0))
    x = torch.randn(32, 8)
    y, stats = moe(x)
    plan = plan_dispatch(moe.router(x), 2)
    dropped = ~plan.kept_TK[:, 0]
    assert dropped.sum() >= 16
    assert torch.all(y[dropped] == 0) and torch.all(y[~dropped].abs().sum(-1) > 0)
