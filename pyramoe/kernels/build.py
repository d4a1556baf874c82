"""Compile the native CPU kernels (`native.cpp`: the engine's forward, blocked bf16 products) for this
machine, once, and load them.

The library is built with the system C++ compiler at first use (`-O3 -march=native -fopenmp`: the
AVX512-BF16 kernels only where the CPU has them; `PYRAMOE_NATIVE_MARCH` overrides -march) and cached
under `$PYRAMOE_CACHE/native` (default `~/.cache/pyramoe/native`) by a hash of the source, the flags,
the compiler and the CPU's flags, so a machine with other instructions builds its own. It links the
OpenMP runtime torch already loaded (libgomp.so.1), so both share one thread pool. Without a
compiler, or where the build fails, the engine keeps its PyTorch path: `load_library()` returns
None and `build_error()` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-fno-math-errno"]


def flags() -> list[str]:
    """The compiler flags: -march=native, or $PYRAMOE_NATIVE_MARCH (e.g. x86-64-v3 to build and test
    the AVX2 kernels on an AVX512 machine)."""
    return [*FLAGS, f"-march={os.environ.get('PYRAMOE_NATIVE_MARCH') or 'native'}"]

_library: ctypes.CDLL | None = None
_error: str | None = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("PYRAMOE_CACHE") or Path.home() / ".cache" / "pyramoe"
    return Path(root) / "native"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    sources = [SOURCE, *sorted(SOURCE.parent.glob("native_*.h"))]  # what native.cpp includes
    texts = [path.read_text() for path in sources]
    key = hashlib.sha256("\n".join([*texts, " ".join(flags()), version, _cpu_flags()]).encode())
    return cache_dir() / f"native-{key.hexdigest()[:16]}.so"


def build() -> Path:
    """The compiled library's path (compiling it if this machine has no cached build); raises
    RuntimeError with the compiler's message when it cannot."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    target = library_path(compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name, then a rename: a concurrent or interrupted build never leaves half a library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags(), str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library() -> ctypes.CDLL | None:
    """The native library, or None (then `build_error()` says why). Built at most once per process."""
    global _library, _error, _tried
    if not _tried:
        _tried = True
        if os.environ.get("PYRAMOE_NO_NATIVE"):
            _error = "PYRAMOE_NO_NATIVE is set"
        else:
            try:
                import torch  # noqa: F401  (its OpenMP runtime must be loaded first)

                _library = ctypes.CDLL(str(build()))
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                _error = str(exc)
    return _library


def build_error() -> str | None:
    return _error
