"""Memory for the native kernels: buffers of transparent huge pages, and a streaming read of one
(what the bench's roofline measures the memory with).

Legend: N elements.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch

from pyramoe.kernels.build import load_library

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def huge_page_tensors(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """Empty tensors of `shapes` carved from one buffer aligned to 2 MB and marked for transparent
    huge pages (Linux madvise; elsewhere, or where it fails, ordinary pages): streaming a matrix
    then misses the TLB 512x less often. On the project's VM (THP "madvise" mode) a 1 GiB read went
    from 41-42 to 46-49 GB/s. Each tensor starts on a 64-byte boundary."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    offsets, total = [], 0
    for shape in shapes:
        offsets.append(total)
        total += -(-math.prod(shape) * itemsize // 64) * 64
    raw = torch.empty(total + HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    arena = raw[start : start + total]
    _advise_huge_pages(arena)
    return [arena[o : o + math.prod(shape) * itemsize].view(dtype).view(shape) for o, shape in zip(offsets, shapes)]


def _advise_huge_pages(buffer: torch.Tensor) -> bool:
    if not sys.platform.startswith("linux"):  # MADV_HUGEPAGE (14) is Linux's
        return False
    try:
        libc = ctypes.CDLL(None)
        return libc.madvise(ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(buffer.numel()), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def native_read(x: torch.Tensor) -> float:
    """Stream a contiguous CPU tensor's bytes (a multiple of 4) through the native read loop on
    torch's thread count: 4 KB prefetched ahead, 64 lanes of float sums, each thread its own
    contiguous share. On the project's VM it read a 1 GiB huge-page buffer at 49 GB/s where torch's
    sum read it at 45. Returns the sum of the bytes read as floats."""
    library = load_library()
    if library is None:
        raise RuntimeError("native_read: the native library is unavailable")
    assert x.is_contiguous() and x.device.type == "cpu" and x.numel() * x.element_size() % 4 == 0
    library.pm_read.restype = ctypes.c_double
    return library.pm_read(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(x.numel() * x.element_size()),
                           ctypes.c_int64(torch.get_num_threads()))
