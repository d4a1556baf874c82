"""Process-level CPU settings that the process owner (the CLI, a user's script) opts into."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_configured: bool | None = None


def configure_cpu_allocator() -> bool:
    """Make glibc malloc keep and reuse freed memory instead of unmapping it.

    glibc serves every block above 32 MB with a fresh mmap and unmaps it on free, so each training
    step page-faults its expert weight gradients (64 experts x 512 x 2048 fp32 = 256 MB) anew: that
    doubled the time of the weight-gradient GEMMs on a 2-core VM. The usual cure is LD_PRELOAD of
    jemalloc or tcmalloc; mallopt does the same job in-process. Returns whether it applied (glibc
    Linux only; PYRAMOE_NO_MALLOPT=1 turns it off).
    """
    global _configured
    if _configured is not None:
        return _configured
    _configured = False
    if not sys.platform.startswith("linux") or os.environ.get("PYRAMOE_NO_MALLOPT") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
    _configured = bool(ok)
    return _configured


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 weights halve the
    bytes a decode step reads and matmuls run faster; elsewhere bf16 is emulated and far slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
