"""Prepack a model's weights for oneDNN before serving it on the CPU (`pyramoe.layers.packed`).

The packed model is for inference only: no gradients, no resharding, no state_dict round trip
(the plain weights are freed, so packing costs no memory).
"""

from __future__ import annotations

from torch import nn

from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.packed import PackedLinear, can_pack, pack_weight, packing_available


def pack_experts(experts: GroupedExperts) -> None:
    """One packed weight per expert and projection (`experts.packed`); the stacked weights go."""
    experts.packed = (
        [pack_weight(w_FD) for w_FD in experts.w_in],
        [pack_weight(w_DF) for w_DF in experts.w_out],
    )
    experts.w_in = experts.w_out = None


def pack_model(model: nn.Module) -> int:
    """Prepack every plain nn.Linear (subclasses, e.g. tensor-parallel ones, are left alone) and the
    grouped experts of a CPU model in fp32 or bf16, in place; returns how many weights it packed
    (0 where oneDNN packing is unavailable, or all were packed before)."""
    if not packing_available():
        return 0
    count = 0
    for module in list(model.modules()):
        if type(module) is GroupedExperts and module.packed is None and _packable_experts(module):
            count += 2 * module.num_experts
            pack_experts(module)
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and can_pack(child.weight) and _same_dtype(child):
                setattr(module, name, PackedLinear(child))
                count += 1
    return count


def _same_dtype(linear: nn.Linear) -> bool:
    return linear.bias is None or linear.bias.dtype == linear.weight.dtype


def _packable_experts(experts: GroupedExperts) -> bool:
    return can_pack(experts.w_in[0]) and experts.w_in.dtype == experts.w_out.dtype
