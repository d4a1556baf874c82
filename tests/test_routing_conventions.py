"""Routing conventions: gate normalisation after drops, balance-loss choices, second-expert sampling,
and golden values hand-derived from DeepSpeed's definitions (deepspeed/moe/sharded_moe.py).

The golden routers have logits log(p) for hand-picked probability rows p, so softmax(logits) == p and
every quantity below follows from the table in `PROBS` by hand. The top-2 weights and both balance
losses were also checked once against DeepSpeed 0.19.8's own `top1gating`/`top2gating` (with
`top2_2nd_expert_sampling=False`); DeepSpeed is not a test dependency.
"""

import math

import pytest
import torch

from pyramoe.config import MoEConfig
from pyramoe.layers import MoELayer
from pyramoe.layers.dispatch import dense_dispatch_tensors, plan_dispatch
from pyramoe.layers.gating import Router

# Router probabilities of 6 tokens over 4 experts; first and second choices:
# t0 e0 e1 | t1 e0 e1 | t2 e0 e2 | t3 e1 e2 | t4 e3 e2 | t5 e1 e0
PROBS = torch.tensor(
    [
        [0.5, 0.3, 0.1, 0.1],
        [0.6, 0.2, 0.1, 0.1],
        [0.4, 0.1, 0.3, 0.2],
        [0.1, 0.5, 0.3, 0.1],
        [0.2, 0.1, 0.3, 0.4],
        [0.3, 0.4, 0.1, 0.2],
    ]
)
# DeepSpeed's l_aux = E * sum_e mean_t(gates)_e * mean_t(mask1)_e with mask1 the first choices:
# me = (0.35, 0.26667, 0.2, 0.18333), ce = (3, 2, 0, 1) / 6 -> 4 * 0.294444
DS_BALANCE_LOSS = 4 * (0.35 * 3 / 6 + (1.6 / 6) * 2 / 6 + (1.1 / 6) * 1 / 6)
# GShard/Switch top-2: f over all 12 choices = (4, 4, 3, 1) / 12 -> 4 * 3.25 / 12
ALL_CHOICES_BALANCE_LOSS = 4 * (0.35 * 4 + (1.6 / 6) * 4 + 0.2 * 3 + (1.1 / 6) * 1) / 12


def golden_router(top_k: int, capacity_factor: float, **settings) -> Router:
    config = MoEConfig(
        num_experts=4, top_k=top_k, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
        min_capacity=0, **settings,
    )
    router = Router(4, config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    return router


def test_deepspeed_top2_golden_values():
    # DeepSpeed top2gating: capacity = ceil(T / E * 2 * cf) = ceil(6 / 4 * 2 * 0.5) = 2; each expert
    # serves its first choices by position, then its second choices:
    #   e0: first t0 t1 [t2 dropped]; second [t5 dropped]   e1: first t3 t5; second [t0 t1 dropped]
    #   e2: second t2 t3 [t4 dropped]                       e3: first t4
    # Surviving gates are renormalised per token: t3 keeps both (0.5, 0.3) -> (0.625, 0.375); every
    # other token keeps one choice -> weight 1.0 on it. (Eval mode: no second-expert sampling.)
    router = golden_router(2, 0.5, router_convention="deepspeed").eval()
    routing = router(PROBS.log())
    assert routing.capacity == 2
    assert routing.expert_idx_TK.tolist() == [[0, 1], [0, 1], [0, 2], [1, 2], [3, 2], [1, 0]]
    plan = plan_dispatch(routing, 4)
    kept = [[True, False], [True, False], [False, True], [True, True], [True, False], [True, False]]
    assert plan.kept_TK.tolist() == kept
    expected_weights = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0.625, 0.375], [1, 0], [1, 0]])
    torch.testing.assert_close(plan.weight_TK, expected_weights)
    assert plan.tokens_per_expert_E.tolist() == [2, 2, 2, 1]
    assert plan.routed_per_expert_E.tolist() == [4, 4, 3, 1]
    assert routing.balance_loss.item() == pytest.approx(DS_BALANCE_LOSS, rel=1e-5)
    # The dense one-hot reference builds the same kept set and combine weights on its own.
    _, combine_TEC, _, dense_kept = dense_dispatch_tensors(routing, 4)
    assert dense_kept.tolist() == kept
    torch.testing.assert_close(combine_TEC.sum(dim=(1, 2)), expected_weights.sum(dim=1))


def test_deepspeed_top1_golden_values():
    # DeepSpeed top1gating: capacity = ceil(T / E * cf) = ceil(1.5) = 2. e0 is the first choice of
    # t0 t1 t2, so one of them is dropped; random token selection (use_rts) picks which in training.
    # Combine weight = the softmax probability of the kept expert (no renormalisation for top-1);
    # l_aux counts first choices before drops, as for top-2.
    router = golden_router(1, 1.0, router_convention="deepspeed")
    dropped = set()
    for seed in range(12):
        routing = router(PROBS.log(), generator=torch.Generator().manual_seed(seed))
        assert routing.capacity == 2
        plan = plan_dispatch(routing, 4)
        kept = plan.kept_TK[:, 0]
        assert plan.tokens_per_expert_E.tolist() == [2, 2, 0, 1]
        assert kept[3:].all() and kept[:3].sum() == 2
        dropped |= {t for t in range(3) if not kept[t]}
        expected = torch.tensor([0.5, 0.6, 0.4, 0.5, 0.4, 0.4]) * kept
        torch.testing.assert_close(plan.weight_TK[:, 0], expected)
        assert routing.balance_loss.item() == pytest.approx(DS_BALANCE_LOSS, rel=1e-5)
    assert dropped == {0, 1, 2}  # random selection, not by position
    router.eval()  # pyramoe keeps by position in eval (DeepSpeed would draw at random here too)
    assert plan_dispatch(router(PROBS.log()), 4).kept_TK[:, 0].tolist() == [True, True, False, True, True, True]


def test_deepspeed_convention_resolves_each_setting():
    top1 = MoEConfig(num_experts=4, top_k=1, router_convention="deepspeed").router_rules()
    top2 = MoEConfig(num_experts=4, top_k=2, router_convention="deepspeed").router_rules()
    assert (top1.drop_policy, top1.noisy_gate_policy) == ("random", "off")
    assert (top2.drop_policy, top2.noisy_gate_policy, top2.gate_norm, top2.balance_loss) == (
        "position", "gumbel_second", "after_drop", "first",
    )
    # An explicit setting wins over the convention's.
    explicit = MoEConfig(top_k=2, router_convention="deepspeed", noisy_gate_policy="off")
    assert explicit.router_rules().noisy_gate_policy == "off"
    ours = MoEConfig(top_k=2).router_rules()
    assert (ours.drop_policy, ours.noisy_gate_policy, ours.gate_norm, ours.balance_loss) == (
        "position", "off", "after_drop", "all",
    )
    with pytest.raises(ValueError, match="router_convention"):
        MoEConfig(num_experts=8, top_k=3, router_convention="deepspeed").validate()


@pytest.mark.parametrize(
    ("gate_norm", "expected"),
    [
        ("after_drop", [[1.0, 0], [1, 0], [0, 1], [0.625, 0.375], [1, 0], [1, 0]]),
        # normalised over both choices, then the dropped one zeroed: outputs shrink
        ("before_drop", [[0.625, 0], [0.75, 0], [0, 3 / 7], [0.625, 0.375], [4 / 7, 0], [4 / 7, 0]]),
        ("softmax", [[0.5, 0], [0.6, 0], [0, 0.3], [0.5, 0.3], [0.4, 0], [0.4, 0]]),
    ],
)
def test_gate_norm_conventions(gate_norm, expected):
    router = golden_router(2, 0.5, gate_norm=gate_norm).eval()
    plan = plan_dispatch(router(PROBS.log()), 4)
    torch.testing.assert_close(plan.weight_TK, torch.tensor(expected))


def test_default_top2_sends_full_weight_to_the_surviving_expert():
    """End to end: a token whose second choice overflowed gets exactly its first expert's output."""
    moe = MoELayer(4, 8, MoEConfig(num_experts=4, top_k=2, eval_capacity_factor=0.5, min_capacity=0)).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    x_TD = PROBS.log()
    y_TD, stats = moe(x_TD)
    assert stats.capacity == 2
    for token, expert in ((0, 0), (1, 0), (2, 2), (4, 3), (5, 1)):  # one kept choice each
        alone = moe.experts(x_TD[token : token + 1], _one_hot_counts(expert, 4), None)
        torch.testing.assert_close(y_TD[token], alone[0])


def _one_hot_counts(expert: int, num_experts: int) -> torch.Tensor:
    counts = torch.zeros(num_experts, dtype=torch.int64)
    counts[expert] = 1
    return counts


@pytest.mark.parametrize(("choices", "expected"), [("first", DS_BALANCE_LOSS), ("all", ALL_CHOICES_BALANCE_LOSS)])
def test_balance_loss_choices(choices, expected):
    router = golden_router(2, 0.5, balance_loss=choices).eval()
    assert router(PROBS.log()).balance_loss.item() == pytest.approx(expected, rel=1e-5)


def test_second_choice_sampling_keeps_the_first_choice_clean():
    torch.manual_seed(0)
    x = torch.randn(512, 16)
    second_only = Router(16, MoEConfig(num_experts=8, top_k=2, noisy_gate_policy="gumbel_second"))
    both = Router(16, MoEConfig(num_experts=8, top_k=2, noisy_gate_policy="gumbel"))
    both.load_state_dict(second_only.state_dict())
    clean = second_only.eval()(x).expert_idx_TK
    second_only.train()
    sampled = second_only(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampled.expert_idx_TK[:, 0], clean[:, 0])
    assert (sampled.expert_idx_TK[:, 1] != clean[:, 1]).float().mean() > 0.2
    assert (sampled.expert_idx_TK[:, 0] != sampled.expert_idx_TK[:, 1]).all()
    probs = torch.softmax(x @ second_only.weight.t(), -1)  # weights stay the clean probabilities
    torch.testing.assert_close(sampled.weights_TK, probs.gather(1, sampled.expert_idx_TK))
    noisy_first = both(x, generator=torch.Generator().manual_seed(1)).expert_idx_TK[:, 0]
    assert (noisy_first != clean[:, 0]).any()  # the plain gumbel policy noises the first choice too


def test_gumbel_second_needs_top2():
    with pytest.raises(ValueError, match="noisy_gate_policy"):
        MoEConfig(num_experts=4, top_k=1, noisy_gate_policy="gumbel_second").validate()


def test_legacy_normalize_top_k_loads_as_before_drop():
    from pyramoe.config import ModelConfig, build_layers

    data = ModelConfig(vocab_size=16, max_seq_len=8, d_model=8, n_heads=2, layers=build_layers(2, "all", 2)).to_dict()
    for layer in data["layers"]:
        del layer["moe"]["gate_norm"]
        layer["moe"]["normalize_top_k"] = True
    config = ModelConfig.from_dict(data)
    assert config.layers[0].moe.gate_norm == "before_drop"
    assert math.isclose(config.layers[0].moe.capacity_factor, 1.0)
