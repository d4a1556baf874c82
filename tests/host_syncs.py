"""Catch host syncs on the CPU: inside `no_host_syncs()`, every torch call that would make a CUDA
device wait for the host (or the host for the device) raises `HostSync`. CUDA has its own check
(`torch.cuda.set_sync_debug_mode("error")`); this one lets a CPU-only machine test the same code.

Counted as syncs: reading a value back (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool(t)`,
`int(t)`, `float(t)`, a tensor used as a Python index), ops whose output size depends on values
(`nonzero`, `masked_select`, boolean-mask indexing, `unique`, `bincount`, `repeat_interleave`
without `output_size`), and tensors made from Python data (`torch.tensor`: a host-to-device copy)."""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

T = torch.Tensor
ALWAYS = {T.item, T.tolist, T.cpu, T.numpy, T.__bool__, T.__int__, T.__float__, T.__index__, T.nonzero,
          torch.nonzero, T.masked_select, torch.masked_select, torch.unique, T.unique, torch.bincount,
          T.bincount, torch.tensor}


class HostSync(AssertionError):
    pass


def _bool_index(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class _Guard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if func in ALWAYS:
            raise HostSync(f"host sync: {name}")
        if func in (T.__getitem__, T.__setitem__) and _bool_index(args[1]):
            raise HostSync(f"host sync: boolean-mask {name}")
        if func in (torch.repeat_interleave, T.repeat_interleave) and kwargs.get("output_size") is None \
                and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor):
            raise HostSync("host sync: repeat_interleave without output_size")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_syncs():
    with _Guard():
        yield
