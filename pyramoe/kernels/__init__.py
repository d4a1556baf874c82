"""Native CPU kernels compiled for the machine at first use (`native.cpp`): the engine's forward
(prefill chunks and decode steps) and bf16 or int8 products on weights in a blocked layout. Imports
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

__all__ = [
    "BlockedWeight",
    "block_weights",
    "blocked_linear",
    "blocked_shape",
    "blocking_available",
    "build_error",
    "can_block",
    "Int8Weight",
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
