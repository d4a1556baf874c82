"""int4 weights with group-wise scales in the native kernels' blocked int4 layout, and products with
them: natively (VNNI dot products, or the portable kernel) or in PyTorch (the same arithmetic, for
the PyTorch step and as the native kernels' reference).

Each output's K inputs are cut into groups of `group` (32, 64 or 128) consecutive inputs; a group
holds 4-bit codes u in [0, 15] and fp16 numbers (s, m) with w = s u + m. Symmetric (the default,
llama.cpp's Q4_0): m = -8 s, s = v / -8 for the group's value v of largest magnitude, so u - 8 spans
[-8, 7] and only s is stored. Asymmetric (`asymmetric=True`, like Q4_1): s = (max - min) / 15 and
m = min, both stored. s and m are rounded to fp16 before the codes are chosen, so the codes fit the
scales the kernels read.

Layout: an [N, K] matrix as [ceil(N/16), K/8, 64] bytes (rows padded to 16 with code 8, whose
weight is 0 where m = -8 s): byte i of chunk p holds, for output i / 4 and input i % 4, the code of
input 8p + i % 4 in its low nibble and of input 8p + 4 + i % 4 in its high nibble, so a 64-byte load
and two masks give the 16 outputs x 4 inputs that one vpdpbusd multiplies. Scales (and mins) as
[ceil(N/16), K/group, 16] fp16: 16 outputs' numbers for one group in 32 bytes.

A product quantizes each row of x on the fly (q = round(x / s_x) in [-127, 127], as the int8
products do, but kept signed) with its per-group sums S_g = sum_{k in g} q_k, and computes
y_n = s_x sum_g (s_gn D_gn + m_gn S_g) + b_n, D_gn = sum_{k in g} q_k u_nk, an exact integer; the
symmetric form is s_x sum_g s_gn (D_gn - 8 S_g), integer inside the brackets.

Legend: E stacked matrices, N outputs, K inputs, M rows, G groups per row (K / group).
"""

from __future__ import annotations

import ctypes

import torch

from pyramoe.kernels.blocked import native_linear, pointer
from pyramoe.kernels.quantized import quantize_rows

FORMAT_INT4 = 2  # the native kernels' code for this format (native_products.h: kFormatInt4)
GROUP_SIZES = (32, 64, 128)


def can_quantize_int4(weight: torch.Tensor, group: int) -> bool:
    """A floating CPU matrix (or stack of matrices) whose input width is a multiple of `group`."""
    return (weight.device.type == "cpu" and weight.is_floating_point() and weight.dim() in (2, 3)
            and weight.shape[-1] % group == 0 and weight.shape[-2] >= 1)


def quantize_int4(weight: torch.Tensor, group: int = 32, asymmetric: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """[..., N, K] -> (codes uint8 [..., N, K] in [0, 15], scales fp16 [..., N, G], mins fp16 [..., N, G]
    or None for symmetric)."""
    *lead, n, k = weight.shape
    w = weight.detach().float().reshape(*lead, n, k // group, group)
    if asymmetric:
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scales = ((high - low) / 15).half()
        mins = low.half()
        safe = torch.where(scales != 0, scales.float(), torch.ones_like(low))
        codes = torch.round((w - mins.float()[..., None]) / safe[..., None])
    else:
        index = w.abs().argmax(dim=-1, keepdim=True)
        peak = w.gather(-1, index).squeeze(-1)  # signed: the value of largest magnitude
        scales = (peak / -8).half()
        mins = None
        safe = torch.where(scales != 0, scales.float(), torch.ones_like(peak))
        codes = torch.round(w / safe[..., None]) + 8
    codes = codes.clamp_(0, 15).to(torch.uint8).reshape(*lead, n, k)
    return codes, scales, mins


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group: int) -> torch.Tensor:
    """s u + m in fp32, [..., N, K] (codes [..., N, K], scales and mins [..., N, G])."""
    *lead, n, k = codes.shape
    u = codes.float().reshape(*lead, n, k // group, group)
    s = scales.float()[..., None]
    m = -8 * s if mins is None else mins.float()[..., None]
    return (u * s + m).reshape(*lead, n, k)


class Int4Weight:
    """An [out_features, in_features] int4 matrix, or a stack of them ([E, ...] with `stacked`), in
    the blocked int4 layout (`data` uint8 [..., ceil(N/16), K/8, 64]) with fp16 `scales` and, where
    asymmetric, `mins` ([..., ceil(N/16), K/group, 16])."""

    def __init__(self, data: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group: int,
                 out_features: int, in_features: int):
        if not (data.is_contiguous() and data.dtype == torch.uint8 and scales.dtype == torch.float16
                and (mins is None or mins.dtype == torch.float16)):
            raise ValueError("Int4Weight: data uint8 and contiguous, scales and mins fp16")
        if group not in GROUP_SIZES or in_features % group:
            raise ValueError(f"Int4Weight: group {group} must be one of {GROUP_SIZES} and divide {in_features}")
        self.data, self.scales = data, scales.contiguous()
        self.mins = None if mins is None else mins.contiguous()
        self.group, self.out_features, self.in_features = group, out_features, in_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def asymmetric(self) -> bool:
        return self.mins is not None

    def __getitem__(self, e: int) -> Int4Weight:
        """Matrix e of a stack (views of the stack's memory)."""
        return Int4Weight(self.data[e], self.scales[e], None if self.mins is None else self.mins[e], self.group,
                          self.out_features, self.in_features)

    def __len__(self) -> int:
        return self.data.shape[0] if self.data.dim() == 4 else 1

    def nbytes(self) -> int:
        """Bytes a product reads: the codes, scales and mins."""
        parts = [self.data, self.scales] + ([] if self.mins is None else [self.mins])
        return sum(t.numel() * t.element_size() for t in parts)

    def codes(self) -> torch.Tensor:
        """The codes [..., N, K] (uint8 in [0, 15]) out of the blocked layout."""
        *stack, blocks, chunks, _ = self.data.shape
        pairs = self.data.reshape(*stack, blocks, chunks, 16, 4)
        quads = torch.stack((pairs & 15, pairs >> 4), dim=-3)  # [..., blocks, chunks, 2, 16, 4]
        u = quads.reshape(*stack, blocks, chunks * 2, 16, 4).transpose(-3, -2)
        return u.reshape(*stack, blocks * 16, chunks * 8)[..., : self.out_features, :]

    def group_numbers(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales and mins as [..., N, G] (out of their blocked layout)."""
        def unblock(t: torch.Tensor) -> torch.Tensor:
            *stack, blocks, groups, _ = t.shape
            return t.transpose(-2, -1).reshape(*stack, blocks * 16, groups)[..., : self.out_features, :]
        return unblock(self.scales), None if self.mins is None else unblock(self.mins)

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix (or stack) s u + m, [..., N, K]."""
        scales, mins = self.group_numbers()
        return dequantize_int4(self.codes(), scales, mins, self.group)


def int4_blocked_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    *stack, n, k = shape
    return (*stack, (n + 15) // 16, k // 8, 64)


def block_int4(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None, group: int,
               out: torch.Tensor | None = None) -> Int4Weight:
    """Codes [..., N, K] and their group numbers [..., N, G] in the blocked int4 layout (`data`
    written into `out` when given: a uint8 tensor of `int4_blocked_shape`)."""
    *lead, n, k = codes.shape
    pad = -n % 16
    if pad:  # padded outputs: code 8, scale 0 (weight 0 whether or not mins are stored)
        codes = torch.nn.functional.pad(codes, (0, 0, 0, pad), value=8)
        scales = torch.nn.functional.pad(scales, (0, 0, 0, pad))
        mins = None if mins is None else torch.nn.functional.pad(mins, (0, 0, 0, pad))
    blocks = (n + pad) // 16
    quads = codes.reshape(*lead, blocks, 16, k // 4, 4).transpose(-3, -2)  # [..., blocks, K/4, 16, 4]
    pairs = quads.reshape(*lead, blocks, k // 8, 2, 64)
    packed = pairs[..., 0, :] | (pairs[..., 1, :] << 4)
    data = packed.contiguous() if out is None else out.copy_(packed)

    def blocked(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(*lead, blocks, 16, k // group).transpose(-2, -1).contiguous()
    return Int4Weight(data, blocked(scales), None if mins is None else blocked(mins), group, n, k)


def quantize_weights_int4(weight: torch.Tensor, group: int = 32, asymmetric: bool = False,
                          out: torch.Tensor | None = None) -> Int4Weight:
    """An [..., N, K] floating matrix (or stack) quantized to int4 and blocked."""
    if group not in GROUP_SIZES:
        raise ValueError(f"int4: group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group}")
    if not can_quantize_int4(weight, group):
        raise ValueError(f"int4: a floating CPU matrix with an input width divisible by {group}, got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    codes, scales, mins = quantize_int4(weight, group, asymmetric)
    return block_int4(codes, scales, mins, group, out)


def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x . W^T + bias with the native kernels' arithmetic, in PyTorch, returned in x's dtype."""
    shape = x.shape
    x_MK = x.reshape(-1, shape[-1]).float()
    q_MK, scales_M = quantize_rows(x_MK)
    m_rows, k, group = x_MK.shape[0], weight.in_features, weight.group
    groups = k // group
    n = weight.out_features
    q_GMg = q_MK.reshape(m_rows, groups, group).transpose(0, 1)
    u_GgN = weight.codes().float().reshape(n, groups, group).permute(1, 2, 0)
    dots_GMN = torch.bmm(q_GMg, u_GgN)  # integers: exact below 2^24 (|q| <= 127, u <= 15, group <= 128)
    sums_GM1 = q_GMg.sum(-1, keepdim=True)
    scales_NG, mins_NG = weight.group_numbers()
    s_G1N = scales_NG.float().T[:, None, :]
    if mins_NG is None:
        per_group = s_G1N * (dots_GMN - 8 * sums_GM1)
    else:
        per_group = s_G1N * dots_GMN + mins_NG.float().T[:, None, :] * sums_GM1
    y_MN = per_group.sum(0) * scales_M[:, None]
    if bias is not None:
        y_MN = y_MN + bias.float()
    return y_MN.to(x.dtype).reshape(*shape[:-1], n)


class _Quant(ctypes.Structure):  # PmQuant (native.cpp); mirrored again by the native forward's binding
    _fields_ = [("format", ctypes.c_int64), ("scales", ctypes.c_void_p), ("sums", ctypes.c_void_p),
                ("group", ctypes.c_int64), ("group_scales", ctypes.c_void_p), ("group_mins", ctypes.c_void_p)]


def int4_linear_native(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`int4_linear` by the native kernels (fp32 out, cast to x's dtype)."""
    described = _Quant(FORMAT_INT4, None, None, weight.group, weight.scales.data_ptr(),
                       None if weight.mins is None else weight.mins.data_ptr())

    def launch(library, x_MK, b, y_MN) -> int:  # noqa: ANN001
        library.pm_linear_described.restype = ctypes.c_int64
        return library.pm_linear_described(
            pointer(weight.data), ctypes.byref(described), ctypes.c_int64(weight.out_features),
            ctypes.c_int64(weight.in_features), pointer(x_MK), ctypes.c_int64(x_MK.shape[0]), pointer(b),
            pointer(y_MN), ctypes.c_int64(torch.get_num_threads()))

    return native_linear(x, weight.out_features, bias, f"int4 weights [{weight.out_features}, {weight.in_features}]",
                         launch)
