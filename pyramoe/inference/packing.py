"""Prepack a model's weights before serving it on the CPU (`pyramoe.layers.packed`): for oneDNN, or
in the native kernels' blocked bf16 layout (`layout="blocked"`, what the native forward reads);
or quantize them (`quantize_model`: int8 with per-output scales, `pyramoe.kernels.quantized`).

The packed model is for inference only: no gradients, no resharding, no state_dict round trip. It
still runs in PyTorch. Packing drops the model's references to the plain weights, which frees them
only where nothing else holds them; the packed copies are made first, so while packing the
weights take up to twice their memory (the blocked layout: one buffer for them all).
"""

from __future__ import annotations

import torch
from torch import nn

from pyramoe.kernels import (
    BlockedWeight,
    block_weights,
    blocked_shape,
    can_block,
    can_quantize,
    huge_page_tensors,
    int8_blocked_shape,
    quantize_weights,
)
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.packed import PackedLinear, can_pack, pack_weight, packing_available

QUANTIZE_FORMATS = ("int8",)

# Blocked layout: outputs are padded to 16, so narrower layers (Residual-MoE's 2 mixing
# coefficients, a shared expert's 1 gate) stay as they are; the native step reads those in fp32.
MIN_BLOCKED_OUTPUTS = 16


def pack_experts(experts: GroupedExperts, blocked: bool = False, out: list[torch.Tensor] | None = None) -> None:
    """One packed weight per expert and projection (`experts.packed`); the stacked weights go.
    Blocked: views of one stacked tensor per projection (written into `out` when given), expert
    after expert."""
    if blocked:
        outs = out or [None, None]
        stacks = [block_weights(w, o) for w, o in zip((experts.w_in, experts.w_out), outs)]
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
    experts = [m for m in model.modules() if type(m) is GroupedExperts and m.packed is None
               and _packable_experts(m, blocked)]
    linears = [(module, name, child) for module in model.modules() for name, child in module.named_children()
               if type(child) is nn.Linear and _same_dtype(child) and _packable(child, blocked)]
    outs: list[torch.Tensor | None] = [None] * (2 * len(experts) + len(linears))
    if blocked:  # every blocked matrix in one buffer of transparent huge pages
        shapes = [blocked_shape(w.shape) for e in experts for w in (e.w_in, e.w_out)]
        outs = huge_page_tensors(shapes + [blocked_shape(child.weight.shape) for _, _, child in linears])
    for i, module in enumerate(experts):
        pack_experts(module, blocked, outs[2 * i : 2 * i + 2] if blocked else None)
    for (module, name, child), out in zip(linears, outs[2 * len(experts) :]):
        setattr(module, name, PackedLinear(child, blocked, out))
    return 2 * sum(e.num_experts for e in experts) + len(linears)


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


def check_quantize(quantize: str | None, field: str = "quantize") -> None:
    """A ValueError naming `field` unless `quantize` is None or a known format."""
    if quantize is not None and quantize not in QUANTIZE_FORMATS:
        raise ValueError(f"{field}: must be one of {', '.join(QUANTIZE_FORMATS)} (or left out), got {quantize!r}")


def quantize_model(model: nn.Module, quantize: str = "int8") -> int:
    """Quantize, in place, every plain nn.Linear with at least 16 outputs (narrower ones, Residual-MoE's
    mixing coefficients and shared-expert gates, and the routers stay as they are) and the grouped
    experts of a CPU model, where the input width is a multiple of 4; returns how many matrices it
    quantized. The int8 matrices share one buffer of transparent huge pages; the plain weights go
    (a tied LM head's stays: it is the embedding). The model then runs in PyTorch (the int8 products'
    reference) or in the native step, and is for inference only."""
    check_quantize(quantize)
    experts = [m for m in model.modules() if type(m) is GroupedExperts and m.packed is None and m.w_in is not None
               and can_quantize(m.w_in) and can_quantize(m.w_out)]
    linears = [(module, name, child) for module in model.modules() for name, child in module.named_children()
               if type(child) is nn.Linear and child.out_features >= MIN_BLOCKED_OUTPUTS
               and can_quantize(child.weight)]
    shapes = [int8_blocked_shape(w.shape) for e in experts for w in (e.w_in, e.w_out)]
    shapes += [int8_blocked_shape(child.weight.shape) for _, _, child in linears]
    outs = huge_page_tensors(shapes, torch.int8)
    for i, module in enumerate(experts):
        stacks = [quantize_weights(w, out) for w, out in zip((module.w_in, module.w_out), outs[2 * i : 2 * i + 2])]
        module.packed = tuple([stack[e] for e in range(module.num_experts)] for stack in stacks)
        module.w_in = module.w_out = None
    for (module, name, child), out in zip(linears, outs[2 * len(experts) :]):
        setattr(module, name, PackedLinear(child, quantized=quantize_weights(child.weight, out)))
    return 2 * sum(e.num_experts for e in experts) + len(linears)
