"""Native CPU kernels compiled for the machine at first use (`native.cpp`): the engine's forward
(prefill chunks and decode steps) and bf16, int8 or int4 products on weights in a blocked layout. Imports
only torch, so layers may use it."""

from pyramoe.kernels.blocked import (
    BlockedWeight,
    block_weights,
    blocked_linear,
    blocked_shape,
    blocking_available,
    can_block,
)
from pyramoe.kernels.build import build_error, load_library
from pyramoe.kernels.memory import huge_page_tensors, native_read
from pyramoe.kernels.quantized import (
    Int8Weight,
    can_quantize,
    int8_blocked_shape,
    int8_linear,
    int8_linear_native,
    int8_native,
    quantize_weights,
)
from pyramoe.kernels.quantized4 import (
    GROUP_SIZES,
    Int4Weight,
    can_quantize_int4,
    int4_blocked_shape,
    int4_linear,
    int4_linear_native,
    quantize_weights_int4,
)

__all__ = [
    "BlockedWeight",
    "block_weights",
    "blocked_linear",
    "blocked_shape",
    "blocking_available",
    "build_error",
    "can_block",
    "GROUP_SIZES",
    "Int4Weight",
    "Int8Weight",
    "can_quantize_int4",
    "int4_blocked_shape",
    "int4_linear",
    "int4_linear_native",
    "quantize_weights_int4",
    "can_quantize",
    "huge_page_tensors",
    "int8_blocked_shape",
    "int8_linear",
    "int8_linear_native",
    "int8_native",
    "quantize_weights",
    "load_library",
    "native_read",
]
