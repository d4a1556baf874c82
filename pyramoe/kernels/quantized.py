"""int8 weights (symmetric, one scale per output channel) in the native kernels' blocked int8 layout,
and products with them: natively (VNNI dot products, or the portable kernel) or in PyTorch (the
same arithmetic, for the PyTorch step and as the native kernels' reference).

An [N, K] matrix w becomes q = round(w / s) with s_n = max_k |w_nk| / 127 (q in [-127, 127]), held
as [ceil(N/16), K/4, 16, 4] int8 (rows padded to 16 with zeros: 64 bytes hold 16 outputs x 4
inputs, what one vpdpbusd multiplies), beside s and 128 x sum_k q_nk (int32), both padded to 16.
A product quantizes each row of x on the fly (u = round(x / s_x) + 128, s_x = max |x| / 127) and
computes y = s_x s_n (sum_k u_k q_nk - 128 sum_k q_nk) + b: the products of the native kernels are
exact integer sums, so PyTorch's reference differs from them only in the fp32 rounding of sums past
2^24.

Legend: E stacked matrices, N outputs, K inputs, M rows.
"""

from __future__ import annotations

import ctypes

import torch

from pyramoe.kernels.blocked import native_linear, pointer
from pyramoe.kernels.build import load_library

FORMAT_INT8 = 1  # the native kernels' code for this format (native_products.h: kFormatInt8)
QUANT_MAX = 127


def int8_native() -> bool:
    """The native library is built with VNNI int8 dot products (else its int8 products run the
    portable kernel)."""
    library = load_library()
    return library is not None and bool(library.pm_native_int8())


def can_quantize(weight: torch.Tensor) -> bool:
    """A floating CPU matrix (or stack of matrices) whose input width is a multiple of 4."""
    return (weight.device.type == "cpu" and weight.is_floating_point() and weight.dim() in (2, 3)
            and weight.shape[-1] % 4 == 0 and weight.shape[-2] >= 1)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> (q int8 [..., N, K], scales fp32 [..., N]): per-output symmetric scales, so
    |w - s q| <= s / 2 elementwise. An all-zero row gets scale 1 (and zeros)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / QUANT_MAX, torch.ones_like(amax))
    q = torch.round(w / scales[..., None]).clamp_(-QUANT_MAX, QUANT_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """s_n q_nk in fp32."""
    return q.float() * scales[..., None]


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x [M, K] (fp32) as integers in [-127, 127] (fp32 holding them) and their scales [M],
    with the native kernels' float operations (127 / max |x|, then x times that, rounded to nearest
    even), so both pick the same integers."""
    amax = x.abs().amax(dim=-1)
    positive = amax > 0
    inverse = torch.where(positive, 127.0 / torch.where(positive, amax, torch.ones_like(amax)), torch.zeros_like(amax))
    scales = torch.where(positive, amax / 127.0, torch.ones_like(amax))
    return torch.round(x * inverse[:, None]), scales


def padded16(n: int) -> int:
    return (n + 15) // 16 * 16


class Int8Weight:
    """An [out_features, in_features] int8 matrix, or a stack of them ([E, ...] with `stacked`), in
    the blocked int8 layout (`data`: [..., ceil(N/16), K/4, 16, 4]) with `scales` fp32 and `sums`
    int32 (128 x each output's sum of q) [..., padded16(N)]."""

    def __init__(self, data: torch.Tensor, scales: torch.Tensor, sums: torch.Tensor, out_features: int,
                 in_features: int):
        if not (data.is_contiguous() and data.dtype == torch.int8 and scales.dtype == torch.float32
                and sums.dtype == torch.int32):
            raise ValueError("Int8Weight: data int8, scales fp32 and sums int32, contiguous")
        self.data, self.scales, self.sums = data, scales.contiguous(), sums.contiguous()
        self.out_features, self.in_features = out_features, in_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def __getitem__(self, e: int) -> Int8Weight:
        """Matrix e of a stack (views: the stack's memory, so the native step may address every
        matrix from the first)."""
        return Int8Weight(self.data[e], self.scales[e], self.sums[e], self.out_features, self.in_features)

    def __len__(self) -> int:
        return self.data.shape[0] if self.data.dim() == 5 else 1

    def nbytes(self) -> int:
        """Bytes a product reads: the matrix and its scales and sums."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales, self.sums))

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix (or stack) s q, [..., N, K]."""
        *stack, blocks, quads, _, _ = self.data.shape
        q = self.data.transpose(-3, -2).reshape(*stack, blocks * 16, quads * 4)[..., : self.out_features, :]
        return dequantize_int8(q, self.scales[..., : self.out_features])


def int8_blocked_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    *stack, n, k = shape
    return (*stack, (n + 15) // 16, k // 4, 16, 4)


def quantize_weights(weight: torch.Tensor, out: torch.Tensor | None = None) -> Int8Weight:
    """An [..., N, K] floating matrix (or stack) quantized to int8 and blocked (`data` written into
    `out` when given: a tensor of `int8_blocked_shape`)."""
    if not can_quantize(weight):
        raise ValueError(f"int8: a floating CPU matrix with an input width divisible by 4, got "
                         f"{weight.dtype} {tuple(weight.shape)} on {weight.device}")
    n, k = weight.shape[-2:]
    q, scales = quantize_int8(weight)
    pad = -n % 16
    sums = q.to(torch.int32).sum(dim=-1) * 128
    if pad:
        q = torch.nn.functional.pad(q, (0, 0, 0, pad))
        scales = torch.nn.functional.pad(scales, (0, pad))
        sums = torch.nn.functional.pad(sums, (0, pad))
    blocked = q.reshape(*weight.shape[:-2], (n + pad) // 16, 16, k // 4, 4).transpose(-3, -2)
    data = blocked.contiguous() if out is None else out.copy_(blocked)
    return Int8Weight(data, scales, sums.to(torch.int32), n, k)


def int8_linear(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """x . W^T + bias with the native kernels' arithmetic, in PyTorch (the weight dequantized on the
    fly), returned in x's dtype."""
    shape = x.shape
    x_MK = x.reshape(-1, shape[-1]).float()
    q_MK, scales_M = quantize_rows(x_MK)
    *_, blocks, quads, _, _ = weight.data.shape
    q_NK = weight.data.transpose(-3, -2).reshape(blocks * 16, quads * 4)[: weight.out_features]
    sums_MN = q_MK @ q_NK.float().T  # integers: exact below 2^24
    n = weight.out_features
    y_MN = sums_MN * (scales_M[:, None] * weight.scales[None, :n])
    if bias is not None:
        y_MN = y_MN + bias.float()
    return y_MN.to(x.dtype).reshape(*shape[:-1], n)


def int8_linear_native(x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`int8_linear` by the native kernels (fp32 out, cast to x's dtype)."""
    def launch(library, x_MK, b, y_MN) -> int:  # noqa: ANN001
        return library.pm_linear_quantized(
            pointer(weight.data), ctypes.c_int64(FORMAT_INT8), pointer(weight.scales), pointer(weight.sums),
            ctypes.c_int64(weight.out_features), ctypes.c_int64(weight.in_features), pointer(x_MK),
            ctypes.c_int64(x_MK.shape[0]), pointer(b), pointer(y_MN), ctypes.c_int64(torch.get_num_threads()))

    return native_linear(x, weight.out_features, bias, f"int8 weights [{weight.out_features}, {weight.in_features}]",
                         launch)
