"""The native CPU decode step: one compiled call per step (pyramoe/kernels/native.cpp)."""

from pyramoe.inference.native.step import NativeDecoder, blockable, layout_of, unsupported_reason
from pyramoe.kernels import build_error, load_library

__all__ = ["NativeDecoder", "blockable", "build_error", "layout_of", "load_library", "unsupported_reason"]
