import math

import pytest
import torch

from pyramoe.config import MoEConfig
from pyramoe.layers.dispatch import dense_dispatch_tensors, plan_dispatch
from pyramoe.layers.gating import Router, Routing, expert_capacity, load_balancing_loss, router_z_loss


def hand_routing(experts, capacity, priority=None):
    expert_idx = torch.tensor(experts)
    return Routing(
        expert_idx_TK=expert_idx,
        weights_TK=torch.ones(expert_idx.shape),
        priority_TK=None if priority is None else torch.tensor(priority),
        balance_loss=torch.tensor(1.0),
        z_loss=torch.tensor(0.0),
        capacity=capacity,
    )


def test_capacity_formula():
    assert expert_capacity(4096, 64, 1, 1.0, 4) == 64
    assert expert_capacity(4096, 64, 2, 1.25, 4) == 160
    assert expert_capacity(10, 4, 1, 1.0, 0) == 3  # ceil(2.5)
    assert expert_capacity(10, 64, 1, 1.0, 4) == 4  # min_capacity
    assert expert_capacity(3, 2, 1, 8.0, 0) == 3  # never more than the tokens


def test_router_uses_eval_capacity_factor_and_dropless():
    router = Router(8, MoEConfig(num_experts=4, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0))
    x = torch.randn(40, 8)
    assert router(x).capacity == 10
    router.eval()
    assert router(x).capacity == 20
    dropless = Router(8, MoEConfig(num_experts=4, dropless=True))
    assert dropless(x).capacity is None


def test_drop_by_position_on_hand_built_routing():
    routing = hand_routing([[0], [0], [0], [1], [0]], capacity=2)
    plan = plan_dispatch(routing, num_experts=2)
    assert plan.kept_TK[:, 0].tolist() == [True, True, False, True, False]
    assert plan.tokens_per_expert_E.tolist() == [2, 1]
    assert plan.routed_per_expert_E.tolist() == [4, 1]
    assert plan.dropped_fraction.item() == pytest.approx(0.4)
    assert sorted(plan.token_idx_N.tolist()) == [0, 1, 3]


def test_top2_first_choices_beat_second_choices():
    routing = hand_routing([[0, 1], [0, 1], [1, 0]], capacity=2)
    plan = plan_dispatch(routing, num_experts=2)
    assert plan.kept_TK.tolist() == [[True, True], [True, False], [True, False]]
    assert plan.tokens_per_expert_E.tolist() == [2, 2]


def test_random_token_selection_follows_priority():
    routing = hand_routing([[0], [0], [0], [1], [0]], capacity=2, priority=[[0.9], [0.1], [0.5], [0.3], [0.2]])
    plan = plan_dispatch(routing, num_experts=2)
    assert plan.kept_TK[:, 0].tolist() == [False, True, False, True, True]
    *_, dense_kept = dense_dispatch_tensors(routing, 2)
    assert dense_kept.tolist() == plan.kept_TK.tolist()


def test_random_policy_drops_differently_from_position():
    config = MoEConfig(num_experts=2, capacity_factor=0.5, min_capacity=0, drop_policy="random")
    router = Router(4, config)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[10.0, 0, 0, 0], [-10.0, 0, 0, 0]]))
    x = torch.randn(64, 4).abs()  # every token prefers expert 0
    plan = plan_dispatch(router(x, generator=torch.Generator().manual_seed(1)), 2)
    kept = plan.kept_TK[:, 0]
    assert kept.sum() == 16  # capacity ceil(64 / 2 * 0.5)
    assert not kept[:16].all()  # not simply the first 16 positions
    router.eval()  # eval keeps by position
    assert plan_dispatch(router(x), 2).kept_TK[:16, 0].all()


def test_balance_and_z_loss_values():
    num_experts = 4
    probs = torch.full((8, num_experts), 1 / num_experts)
    balanced = torch.arange(8).remainder(num_experts).unsqueeze(1)
    assert load_balancing_loss(probs, balanced).item() == pytest.approx(1.0)
    collapsed_probs = torch.zeros(8, num_experts)
    collapsed_probs[:, 0] = 1.0
    collapsed = torch.zeros(8, 1, dtype=torch.long)
    assert load_balancing_loss(collapsed_probs, collapsed).item() == pytest.approx(num_experts)
    logits = torch.zeros(3, num_experts)
    assert router_z_loss(logits).item() == pytest.approx(math.log(num_experts) ** 2)


def test_router_weights_are_fp32_softmax_of_the_chosen_experts():
    router = Router(8, MoEConfig(num_experts=6, top_k=3))
    x = torch.randn(10, 8, dtype=torch.bfloat16)
    routing = router(x)
    assert routing.weights_TK.dtype == torch.float32
    probs = torch.softmax(x.float() @ router.weight.t(), -1)
    torch.testing.assert_close(routing.weights_TK, probs.gather(1, routing.expert_idx_TK))
    assert routing.expert_idx_TK.shape == (10, 3)
    assert all(len(set(row)) == 3 for row in routing.expert_idx_TK.tolist())


def test_router_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    router = Router(16, MoEConfig(num_experts=8, top_k=2))
    x = torch.randn(64, 16)
    reference = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = router(x)
    assert routed.weights_TK.dtype == torch.float32
    assert torch.equal(routed.expert_idx_TK, reference.expert_idx_TK)
    torch.testing.assert_close(routed.weights_TK, reference.weights_TK, rtol=0, atol=1e-6)
    torch.testing.assert_close(routed.balance_loss, reference.balance_loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(routed.z_loss, reference.z_loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", ["jitter", "gumbel"])
def test_noisy_gating_only_in_training(policy):
    router = Router(16, MoEConfig(num_experts=8, noisy_gate_policy=policy, jitter_eps=0.5))
    x = torch.randn(256, 16)
    router.eval()
    clean = router(x).expert_idx_TK
    assert torch.equal(router(x).expert_idx_TK, clean)
    router.train()
    noisy = router(x, generator=torch.Generator().manual_seed(0)).expert_idx_TK
    assert not torch.equal(noisy, clean)
    if policy == "gumbel":  # weights stay the clean probabilities of the chosen experts
        routing = router(x, generator=torch.Generator().manual_seed(0))
        probs = torch.softmax(x @ router.weight.t(), -1)
        torch.testing.assert_close(routing.weights_TK, probs.gather(1, routing.expert_idx_TK))
