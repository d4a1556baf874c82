"""Prepack a model's weights before serving it on the CPU (`pyramoe.layers.packed`): for oneDNN, or
in the native kernels' blocked bf16 layout (`layout="blocked"`, what the native forward reads);
or quantize them (`quantize_model`: int8 with per-output scales, `pyramoe.kernels.quantized`, or
int4 with group-wise scales, `pyramoe.kernels.quantized4`).

The packed model is for inference only: no gradients, no resharding, no state_dict round trip. It
still runs in PyTorch. Packing drops the model's references to the plain weights, which frees them
only where nothing else holds them; the packed copies are made first, so while packing the
weights take up to twice their memory (the blocked layout: one buffer for them all).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyramoe.kernels import (
    BlockedWeight,
    Int4Weight,
    Int8Weight,
    block_weights,
    blocked_shape,
    can_block,
    can_quantize,
    can_quantize_int4,
    huge_page_tensors,
    int4_blocked_shape,
    int8_blocked_shape,
    quantize_weights,
    quantize_weights_int4,
)
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.packed import PackedLinear, can_pack, pack_weight, packing_available

QUANTIZE_FORMATS = ("int8", "int4")

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


@dataclass(frozen=True)
class QuantSpec:
    """A `--quantize` format: "int8" (per-output scales) or "int4" (groups of `group` inputs,
    symmetric unless "-asym"; the LM head at 8 bits unless "-head4"), e.g. "int4-g64-asym"."""

    bits: int
    group: int = 32
    asymmetric: bool = False
    head_bits: int = 8

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else "int4"


QUANTIZE_HELP = ("int8 (per-output-channel scales) or int4 (group-wise scales; options -g32|-g64|-g128 group size, "
                 "default 32; -asym zero points; -head4 also the LM head, else kept int8), e.g. int4-g64")


def parse_quantize(quantize: str, field: str = "quantize") -> QuantSpec:
    """The QuantSpec a `--quantize` text names; a ValueError naming `field` for anything else."""
    bad = ValueError(f"{field}: must be one of {', '.join(QUANTIZE_FORMATS)} with int4 options -g32|-g64|-g128, "
                     f"-asym, -head4 (or left out), got {quantize!r}")
    if not isinstance(quantize, str):
        raise bad
    base, *options = quantize.split("-")
    if base == "int8" and not options:
        return QuantSpec(8)
    if base != "int4" or len(set(options)) != len(options):
        raise bad
    group, asymmetric, head_bits = 32, False, 8
    for option in options:
        if option in ("g32", "g64", "g128"):
            group = int(option[1:])
        elif option == "asym":
            asymmetric = True
        elif option == "head4":
            head_bits = 4
        else:
            raise bad
    return QuantSpec(4, group, asymmetric, head_bits)


def check_quantize(quantize: str | None, field: str = "quantize") -> None:
    """A ValueError naming `field` unless `quantize` is None or a known format."""
    if quantize is not None:
        parse_quantize(quantize, field)


def quantize_model(model: nn.Module, quantize: str = "int8") -> int:
    """Quantize, in place, every plain nn.Linear with at least 16 outputs (narrower ones, Residual-MoE's
    mixing coefficients and shared-expert gates, and the routers stay as they are) and the grouped
    experts of a CPU model, where the input width is a multiple of 4; returns how many matrices it
    quantized. int4 (`parse_quantize`): matrices whose input width is not a multiple of the group
    size, and the LM head unless "-head4", take int8 (llama.cpp keeps its output layer at higher
    precision too: the head's errors go straight into the logits). The quantized matrices share one
    buffer of transparent huge pages per format; the plain weights go (a tied LM head's stays: it is
    the embedding). The model then runs in PyTorch (the products' reference) or in the native step,
    and is for inference only."""
    spec = parse_quantize(quantize)
    experts = [m for m in model.modules() if type(m) is GroupedExperts and m.packed is None and m.w_in is not None
               and can_quantize(m.w_in) and can_quantize(m.w_out)]
    linears = [(module, name, child) for module in model.modules() for name, child in module.named_children()
               if type(child) is nn.Linear and child.out_features >= MIN_BLOCKED_OUTPUTS
               and can_quantize(child.weight)]
    head = getattr(model, "lm_head", None)

    def bits(weight: torch.Tensor, is_head: bool = False) -> int:
        wide = spec.bits == 8 or (is_head and spec.head_bits == 8)
        return 8 if wide or not can_quantize_int4(weight, spec.group) else 4

    matrices = [w for e in experts for w in (e.w_in, e.w_out)] + [child.weight for _, _, child in linears]
    heads = [False] * (2 * len(experts)) + [child is head for _, _, child in linears]
    formats = [bits(w, is_head) for w, is_head in zip(matrices, heads)]
    outs = _buffers(matrices, formats)
    quantized = [_quantize(w, b, spec, out) for w, b, out in zip(matrices, formats, outs)]
    for i, module in enumerate(experts):
        module.packed = tuple([stack[e] for e in range(module.num_experts)] for stack in quantized[2 * i : 2 * i + 2])
        module.w_in = module.w_out = None
    for (module, name, child), weight in zip(linears, quantized[2 * len(experts) :]):
        setattr(module, name, PackedLinear(child, quantized=weight))
    return 2 * sum(e.num_experts for e in experts) + len(linears)


def _buffers(matrices: list[torch.Tensor], formats: list[int]) -> list[torch.Tensor]:
    """Where each quantized matrix's data goes: one huge-page buffer per format."""
    outs: list[torch.Tensor | None] = [None] * len(matrices)
    for bits, shape_of, dtype in ((8, int8_blocked_shape, torch.int8), (4, int4_blocked_shape, torch.uint8)):
        chosen = [i for i, b in enumerate(formats) if b == bits]
        for i, out in zip(chosen, huge_page_tensors([shape_of(matrices[i].shape) for i in chosen], dtype)):
            outs[i] = out
    return outs


def _quantize(weight: torch.Tensor, bits: int, spec: QuantSpec, out: torch.Tensor) -> Int8Weight | Int4Weight:
    if bits == 8:
        return quantize_weights(weight, out)
    return quantize_weights_int4(weight, spec.group, spec.asymmetric, out)
