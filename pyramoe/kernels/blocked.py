"""bf16 weights in the native kernels' blocked layout, and products with them.

An [N, K] matrix becomes [ceil(N/16), K/2, 16, 2] (rows padded to 16 with zeros): each 64 bytes hold
16 outputs x 2 inputs, which an AVX512-BF16 instruction multiplies with a broadcast pair of inputs,
so a product reads each weight once whatever the number of rows, with no horizontal sums (see
native.cpp). The same layout is AMX's packed B operand, so where the CPU has AMX-BF16, products of
many rows run on tiles (native_amx.h; `set_amx` / $PYRAMOE_NATIVE_AMX choose, `native_products` says).
On the LM head's shape ([32000, 512], 2-core Zen 5 VM, 2 threads, one run, through
`blocked_linear`) 1 / 4 / 16 / 64 rows took 0.65 / 0.64 / 0.85 / 2.65 ms against 0.49 / 0.67 / 1.02 /
2.59 ms for oneDNN's packed weights; each weight was its own allocation, and this VM reads some
allocations ~1.5x faster than others, so single figures differ by that much between runs.

Legend: E stacked matrices, N outputs, K inputs, M rows.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator

import torch

from pyramoe.kernels.build import AMX_MODES, build_error, load_library

LAYOUT_FP32, LAYOUT_BF16, LAYOUT_BLOCKED = 0, 1, 2


def blocking_available() -> bool:
    """The native library is built and has the AVX512-BF16 kernels."""
    library = load_library()
    return library is not None and bool(library.pm_native_bf16())


def _library_int(name: str, *args: int) -> int:
    """The native library's int64 query `name` (0 without a library)."""
    library = load_library()
    if library is None:
        return 0
    function = getattr(library, name)
    function.restype = ctypes.c_int64
    return int(function(*(ctypes.c_int64(a) for a in args)))


def amx_state() -> int:
    """1 where blocked bf16 products with many rows run on AMX tiles, 0 where the library has no AMX
    kernel (the CPU lacks AMX-BF16, or no native library), -1 where Linux refused the tile state."""
    return _library_int("pm_native_amx")


def set_amx(mode: str) -> str:
    """Which kernel blocked bf16 products (and int8/int4 ones) use from now on, process-wide: "0"
    (AVX512-BF16; VNNI), "1" (AMX tiles at any row count, where `amx_state()` / `amx_int8_state()` is
    1) or "auto" (tiles from the measured row counts; $PYRAMOE_NATIVE_AMX at load, default auto).
    Returns the previous mode, for A/B runs and tests in one process."""
    if mode not in AMX_MODES:
        raise ValueError(f"amx mode must be one of {', '.join(AMX_MODES)}, not {mode!r}")
    library = load_library()
    if library is None:
        raise RuntimeError(f"set_amx: the native library is unavailable ({build_error()})")
    previous = int(library.pm_set_amx(ctypes.c_int64(AMX_MODES[mode])))
    return next(name for name, value in AMX_MODES.items() if value == previous)


@contextlib.contextmanager
def amx_set_to(mode: str) -> Iterator[None]:
    """`set_amx(mode)` for a block, the previous mode back after it (A/B runs and tests)."""
    previous = set_amx(mode)
    try:
        yield
    finally:
        set_amx(previous)


def amx_mode() -> str:
    """The mode `set_amx` last set (or the environment's)."""
    value = _library_int("pm_amx_mode")  # 0 ("0") without a library
    return next(name for name, v in AMX_MODES.items() if v == value)


def amx_min_rows() -> int:
    """Rows of x from which auto mode runs a product on AMX tiles."""
    return _library_int("pm_amx_min_rows")


def amx_int8_state() -> int:
    """1 where int8 and int4 products with many rows run on AMX-INT8 tiles (native_amx_quant.h), 0
    where the library has no such kernel, -1 where Linux refused the tile state."""
    return _library_int("pm_native_amx_int8")


def amx_quant_min_rows(quant: str) -> int:
    """Rows of x from which auto mode runs an int8 or int4 product on AMX tiles."""
    if quant not in ("int8", "int4"):
        raise ValueError(f"quant must be int8 or int4, not {quant!r}")
    return _library_int("pm_amx_quant_min_rows", 1 if quant == "int8" else 2)


def amx_products() -> int:
    """Products (bf16, int8 or int4) the native library ran on AMX tiles since it loaded (0 without a library)."""
    return _library_int("pm_amx_products")


def native_products() -> str:
    """One line on the kernels the native bf16 (and int8/int4) products run on, for reports (`pyramoe generate`)."""
    library = load_library()
    if library is None:
        return "none (no native library)"
    if not library.pm_native_bf16():
        return "portable (no AVX512-BF16)"
    state = amx_state()
    if state == 0:
        return "AVX512-BF16 (no AMX-BF16 on this CPU)"
    if state < 0:
        return "AVX512-BF16 (AMX-BF16 present, but Linux refused the tile state: no AMX)"
    mode = amx_mode()
    if mode == "0":
        return "AVX512-BF16 (AMX off: PYRAMOE_NATIVE_AMX=0)"
    rows = "any row count" if mode == "1" else f"{amx_min_rows()}+ rows"
    if amx_int8_state() != 1:
        return f"AVX512-BF16, AMX-BF16 tiles at {rows}"
    quant = ("any row count" if mode == "1" else
             f"int8 {amx_quant_min_rows('int8')}+ / int4 {amx_quant_min_rows('int4')}+ rows")
    return f"AVX512-BF16, AMX-BF16 tiles at {rows}, AMX-INT8 tiles at {quant}"


def can_block(weight: torch.Tensor) -> bool:
    """A bf16 CPU matrix (or stack of matrices) with an even input width, on a machine that can."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() in (2, 3)
            and weight.shape[-1] % 2 == 0 and blocking_available())


class BlockedWeight:
    """An [out_features, in_features] bf16 matrix held in the blocked layout (`data`)."""

    def __init__(self, data: torch.Tensor, out_features: int, in_features: int):
        assert data.is_contiguous() and data.dtype == torch.bfloat16
        self.data, self.out_features, self.in_features = data, out_features, in_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)


def blocked_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    *stack, n, k = shape
    return (*stack, (n + 15) // 16, k // 2, 16, 2)


def block_weights(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[..., N, K] -> [..., ceil(N/16), K/2, 16, 2]: a new contiguous tensor, or written into `out`."""
    n, k = weight.shape[-2:]
    pad = -n % 16
    w = torch.nn.functional.pad(weight.detach(), (0, 0, 0, pad)) if pad else weight.detach()
    w = w.reshape(*weight.shape[:-2], (n + pad) // 16, 16, k // 2, 2).transpose(-3, -2)
    if out is None:
        return w.contiguous()
    return out.copy_(w)


def native_linear(x: torch.Tensor, out_features: int, bias: torch.Tensor | None, what: str,
                  launch: Callable[..., int]) -> torch.Tensor:
    """x . W^T + bias by one of the native library's products, in fp32, returned in x's dtype:
    `launch(library, x_MK, bias or None, y_MN)` makes the call and returns its status (0: done);
    `what` names the weight in errors."""
    library = load_library()
    if library is None:
        raise RuntimeError(f"{what}: the native library is unavailable ({build_error()})")
    shape = x.shape
    x_MK = x.reshape(-1, shape[-1]).float().contiguous()
    y_MN = torch.empty(x_MK.shape[0], out_features)
    if x_MK.shape[0]:
        b = None if bias is None else bias.detach().float().contiguous()
        status = launch(library, x_MK, b, y_MN)
        if status != 0:  # a real check, not an assert: `python -O` would skip it and return garbage
            raise RuntimeError(f"{what}: the native library refused the product (status {status})")
    return y_MN.to(x.dtype).reshape(*shape[:-1], out_features)


def pointer(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def blocked_linear(x: torch.Tensor, weight: BlockedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """x . W^T + bias in fp32 (x rounded to bf16 on the way in, as a bf16 F.linear does), returned in
    x's dtype."""
    def launch(library, x_MK, b, y_MN) -> int:  # noqa: ANN001
        return library.pm_linear(
            pointer(weight.data), ctypes.c_int64(LAYOUT_BLOCKED), ctypes.c_int64(weight.out_features),
            ctypes.c_int64(weight.in_features), pointer(x_MK), ctypes.c_int64(x_MK.shape[0]), pointer(b),
            pointer(y_MN), ctypes.c_int64(torch.get_num_threads()))

    what = (f"blocked weights [{weight.out_features}, {weight.in_features}] (AVX512-BF16 and an even input "
            "width needed)")
    return native_linear(x, weight.out_features, bias, what, launch)
