import pytest
import torch
from torch.func import functional_call

from pyramoe.config import MoEConfig
from pyramoe.layers import MLP, MoELayer


def copy_mlp_into_expert(moe: MoELayer, mlp: MLP, expert: int = 0) -> None:
    with torch.no_grad():
        moe.experts.w_in[expert].copy_(mlp.fc_in.weight)
        moe.experts.w_out[expert].copy_(mlp.fc_out.weight)
        moe.experts.b_in[expert, 0].copy_(mlp.fc_in.bias)
        moe.experts.b_out[expert, 0].copy_(mlp.fc_out.bias)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_one_expert_equals_dense_mlp(activation):
    mlp = MLP(16, 40, activation)
    moe = MoELayer(16, 40, MoEConfig(num_experts=1, capacity_factor=1.0), activation=activation)
    copy_mlp_into_expert(moe, mlp)
    x = torch.randn(3, 11, 16, requires_grad=True)
    y_moe, stats = moe(x)
    assert stats.dropped_fraction.item() == 0.0
    torch.testing.assert_close(y_moe, mlp(x))
    g_moe = torch.autograd.grad(y_moe.sum(), x)[0]
    g_mlp = torch.autograd.grad(mlp(x).sum(), x)[0]
    torch.testing.assert_close(g_moe, g_mlp)


@pytest.mark.parametrize("top_k", [1, 2])
def test_gradcheck_experts_and_router(top_k):
    moe = MoELayer(6, 8, MoEConfig(num_experts=4, top_k=top_k, capacity_factor=1.0, min_capacity=0)).double()
    x = torch.randn(12, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: moe(inp)[0], (x,))
    params = {name: p.detach().clone().requires_grad_() for name, p in moe.named_parameters()}
    for name in ("router.weight", "experts.w_in", "experts.w_out", "experts.b_in"):
        def f(weight, name=name):
            return functional_call(moe, {**params, name: weight}, (x.detach(),))[0]

        assert torch.autograd.gradcheck(f, (params[name],)), name


def test_residual_moe_shapes_and_gradients():
    moe = MoELayer(16, 32, MoEConfig(num_experts=4, use_residual=True))
    x = torch.randn(2, 9, 16, requires_grad=True)
    y, _ = moe(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name in ("coefficient.weight", "residual_mlp.fc_in.weight", "experts.w_in", "router.weight"):
        grad = dict(moe.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_residual_moe_mixes_mlp_and_expert():
    moe = MoELayer(8, 16, MoEConfig(num_experts=2, use_residual=True, capacity_factor=2.0))
    x = torch.randn(10, 8)
    with torch.no_grad():  # all weight on the residual MLP
        moe.coefficient.weight.zero_()
        moe.coefficient.bias.copy_(torch.tensor([-30.0, 30.0]))
    torch.testing.assert_close(moe(x)[0], moe.residual_mlp(x))


def test_stats_and_router_gets_gradient_from_balance_loss():
    moe = MoELayer(8, 16, MoEConfig(num_experts=4, capacity_factor=1.0, min_capacity=0))
    x = torch.randn(40, 8)
    _, stats = moe(x)
    assert stats.tokens_per_expert.sum() <= 40 and stats.routed_per_expert.sum() == 40
    assert stats.capacity == 10
    stats.balance_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_bf16_forward_close_to_fp32():
    moe = MoELayer(32, 64, MoEConfig(num_experts=4, capacity_factor=4.0))
    x = torch.randn(64, 32)
    y32, _ = moe(x)
    y16, _ = moe.to(torch.bfloat16)(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.05, atol=0.02)


def test_empty_batch_is_a_clear_error():
    moe = MoELayer(8, 16, MoEConfig(num_experts=2))
    with pytest.raises(ValueError, match="empty batch"):
        moe(torch.randn(0, 8))
