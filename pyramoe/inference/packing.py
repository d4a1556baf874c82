"""Prepack a model's weights before serving it on the CPU (`pyramoe.layers.packed`): for oneDNN, or
in the native kernels' blocked bf16 layout (`layout="blocked"`, what the native decode step reads).

The packed model is for inference only: no gradients, no resharding, no state_dict round trip
(the plain weights are freed, so packing costs no memory). It still runs in PyTorch.
"""

from __future__ import annotations

from torch import nn

from pyramoe.kernels import BlockedWeight, block_weights, can_block
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.packed import PackedLinear, can_pack, pack_weight, packing_available

# Blocked layout: outputs are padded to 16, so narrower layers (Residual-MoE's 2 mixing
# coefficients, a shared expert's 1 gate) stay as they are; the native step reads those in fp32.
MIN_BLOCKED_OUTPUTS = 16


def pack_experts(experts: GroupedExperts, blocked: bool = False) -> None:
    """One packed weight per expert and projection (`experts.packed`); the stacked weights go.
    Blocked: views of one stacked tensor per projection, expert after expert."""
    if blocked:
        stacks = [block_weights(w) for w in (experts.w_in, experts.w_out)]
        experts.packed = tuple(
            [BlockedWeight(stack[e], w.shape[1], w.shape[2]) for e in range(experts.num_experts)]
            for stack, w in zip(stacks, (experts.w_in, experts.w_out)))
    else:
        experts.packed = (
            [pack_weight(w_FD) for w_FD in experts.w_in],
            [pack_weight(w_DF) for w_DF in experts.w_out],
        )
    experts.w_in = experts.w_out = None


def pack_model(model: nn.Module, layout: str = "onednn") -> int:
    """Prepack every plain nn.Linear (subclasses, e.g. tensor-parallel ones, are left alone) and the
    grouped experts of a CPU model, in place; returns how many weights it packed (0 where the layout
    is unavailable, or all were packed before). "onednn": fp32 or bf16; "blocked": bf16 matrices with
    an even input width and at least 16 outputs, on a CPU with AVX512-BF16."""
    if layout not in ("onednn", "blocked"):
        raise ValueError(f"layout: must be onednn or blocked, got {layout!r}")
    blocked = layout == "blocked"
    if not blocked and not packing_available():
        return 0
    count = 0
    for module in list(model.modules()):
        if type(module) is GroupedExperts and module.packed is None and _packable_experts(module, blocked):
            count += 2 * module.num_experts
            pack_experts(module, blocked)
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear and _same_dtype(child) and _packable(child, blocked):
                setattr(module, name, PackedLinear(child, blocked))
                count += 1
    return count


def _packable(linear: nn.Linear, blocked: bool) -> bool:
    if blocked:
        return linear.out_features >= MIN_BLOCKED_OUTPUTS and can_block(linear.weight)
    return can_pack(linear.weight)


def _same_dtype(linear: nn.Linear) -> bool:
    return linear.bias is None or linear.bias.dtype == linear.weight.dtype


def _packable_experts(experts: GroupedExperts, blocked: bool = False) -> bool:
    if experts.w_in.dtype != experts.w_out.dtype:
        return False
    return can_block(experts.w_in) and can_block(experts.w_out) if blocked else can_pack(experts.w_in[0])
