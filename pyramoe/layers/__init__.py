"""Single-device building blocks: attention, MLP, router, dispatch, experts, the MoE layer."""

from pyramoe.layers.attention import CausalSelfAttention, KVCache
from pyramoe.layers.dispatch import DenseEinsumDispatcher, DispatchPlan, LocalDispatcher, plan_dispatch
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.gating import Router, Routing, expert_capacity
from pyramoe.layers.mlp import MLP
from pyramoe.layers.moe import MoELayer, MoEStats
from pyramoe.layers.norms import RMSNorm, make_norm
from pyramoe.layers.rope import RotaryEmbedding

__all__ = [
    "MLP",
    "CausalSelfAttention",
    "DenseEinsumDispatcher",
    "DispatchPlan",
    "GroupedExperts",
    "KVCache",
    "LocalDispatcher",
    "MoELayer",
    "MoEStats",
    "RMSNorm",
    "RotaryEmbedding",
    "Router",
    "Routing",
    "expert_capacity",
    "make_norm",
    "plan_dispatch",
]
