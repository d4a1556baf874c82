"""Compile the native CPU kernels (`native.cpp`: the engine's forward, blocked bf16 products) for this
machine, once, and load them.

The library is built with the system C++ compiler at first use (`-O3 -march=native -fopenmp`: the
AVX512-BF16 kernels only where the CPU has them; `PYRAMOE_NATIVE_MARCH` overrides -march) and cached
under `$PYRAMOE_CACHE/native` (default `~/.cache/pyramoe/native`) by a hash of the source, the flags,
the compiler and the CPU's flags, so a machine with other instructions builds its own. It links the
OpenMP runtime torch already loaded (libgomp.so.1), so both share one thread pool. Without a
compiler, or where the build fails, the engine keeps its PyTorch path: `load_library()` returns
None and `build_error()` says why (the compiler's first errors) and what runs instead. The library
is written under a temporary name, made readable by all (0755: a cache may be shared), synced and
renamed into place, so no process ever loads half of one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
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
# One thread builds and loads; the others wait for it rather than read `_library` before it is set.
_load_lock = threading.Lock()
FALLBACK = "the engine runs its PyTorch step instead"
ERROR_LINES = 3  # compiler error lines quoted in build_error()


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


def compiler() -> str | None:
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
    compiler_path = compiler()
    if compiler_path is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    target = library_path(compiler_path)
    if not target.exists():
        compile_library(compiler_path, SOURCE, target)
    return target


def compile_library(compiler: str, source: Path, target: Path) -> None:
    """Compile `source` (and the headers beside it) with flags() into `target`; RuntimeError with
    the compiler's first errors when it cannot (also used by `pyramoe bench long-context
    --baseline` for another revision's kernels)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name, then a rename: a concurrent or interrupted build never leaves half a library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags(), str(source), "-o", tmp], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} could not build {source.name}: {first_errors(result.stderr)}")
        # mkstemp made it 0600 and the linker only adds execute bits: readable by every user of the cache.
        os.chmod(tmp, 0o755)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
        _sync_directory(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def first_errors(stderr: str) -> str:
    """The compiler's first error lines (its last is often only "compilation terminated."), else its
    first lines, joined by " | "."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines
    quoted = " | ".join(errors[:ERROR_LINES]) or "no message"
    more = len(errors) - ERROR_LINES
    return quoted + (f" (and {more} more)" if more > 0 else "")


def _sync_directory(path: Path) -> None:
    """Make a rename in `path` durable (where the platform lets a directory be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_library() -> ctypes.CDLL | None:
    """The native library, or None (then `build_error()` says why). Built at most once per process;
    threads calling it together all get the one result."""
    if _tried:  # after the first load: no lock on the hot path
        return _library
    with _load_lock:
        if not _tried:
            _load()
    return _library


def _load() -> None:
    global _library, _error, _tried
    if os.environ.get("PYRAMOE_NO_NATIVE"):
        _error = f"PYRAMOE_NO_NATIVE is set; {FALLBACK}"
    else:
        try:
            import torch  # noqa: F401  (its OpenMP runtime must be loaded first)

            mode = amx_mode_from_env()  # a bad value is the user's error, raised before any build
            _library = ctypes.CDLL(str(build()))
            _library.pm_set_amx.restype = ctypes.c_int64
            _library.pm_set_amx(ctypes.c_int64(mode))
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            _error = f"{exc}; {FALLBACK}"
    _tried = True  # last: a thread that sees it set finds the result set too


AMX_MODES = {"0": 0, "1": 1, "auto": 2}  # pm_set_amx's modes: AVX512-BF16 only, AMX always, AMX for many rows


def amx_mode_from_env() -> int:
    """$PYRAMOE_NATIVE_AMX as pm_set_amx's mode: 0 (blocked bf16 products on the AVX512-BF16 kernel
    only, int8/int4 ones on VNNI), 1 (on AMX tiles at any row count, where the CPU has them) or auto
    (the default: AMX from the library's row thresholds)."""
    value = os.environ.get("PYRAMOE_NATIVE_AMX", "auto").strip().lower() or "auto"
    if value not in AMX_MODES:
        raise ValueError(f"PYRAMOE_NATIVE_AMX must be 0, 1 or auto, not {value!r}")
    return AMX_MODES[value]


def build_error() -> str | None:
    return _error
