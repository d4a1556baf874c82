"""The native CPU forward: a prefill chunk, a decode step or both in one compiled call
(pyramoe/kernels/native.cpp)."""

from pyramoe.inference.native.forward import NativeForward, blockable, layout_of, unsupported_reason
from pyramoe.kernels import build_error, load_library

__all__ = ["NativeForward", "blockable", "build_error", "layout_of", "load_library", "unsupported_reason"]
