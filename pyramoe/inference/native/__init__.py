"""The native CPU decode step: one compiled call per step (see decode_step.cpp)."""

from pyramoe.inference.native.build import build_error, load_library
from pyramoe.inference.native.step import NativeDecoder, unsupported_reason

__all__ = ["NativeDecoder", "build_error", "load_library", "unsupported_reason"]
