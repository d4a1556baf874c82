"""Building and loading the native library (`pyramoe.kernels.build`): the cached file's mode, a failed
compile's message, one load shared by threads starting together, the ctypes structs checked against
the C ones, and the blocked product's status checked without `assert`."""

from __future__ import annotations

import ctypes
import stat
import threading
import time

import pytest
import torch

from pyramoe.kernels import BlockedWeight, blocked, build
from pyramoe.kernels.blocked import blocked_linear

needs_library = pytest.mark.skipif(build.load_library() is None, reason="no C++ compiler: the native step is not built")


@pytest.fixture
def fresh_load(monkeypatch):
    """The process's load state as before any load (restored after the test)."""
    for name, value in (("_tried", False), ("_library", None), ("_error", None)):
        monkeypatch.setattr(build, name, value)


@needs_library
def test_cached_library_is_readable_by_every_user_and_nothing_else_is_left(tmp_path, monkeypatch):
    monkeypatch.setenv("PYRAMOE_CACHE", str(tmp_path))
    path = build.build()
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert [p.name for p in path.parent.iterdir()] == [path.name]


@needs_library
def test_failed_compile_gives_the_first_error_and_the_fallback(tmp_path, monkeypatch, fresh_load):
    monkeypatch.setenv("PYRAMOE_CACHE", str(tmp_path))
    monkeypatch.setenv("PYRAMOE_NATIVE_MARCH", "no-such-cpu")  # gcc: "error: bad value ... for '-march='"
    with pytest.raises(RuntimeError) as failure:
        build.build()
    message = str(failure.value)
    assert "error" in message and "no-such-cpu" in message and "valid arguments" not in message
    assert not list((tmp_path / "native").iterdir())  # no temporary left behind
    assert build.load_library() is None
    assert build.build_error().startswith(message) and "PyTorch step instead" in build.build_error()


def test_first_errors_skips_context_and_the_last_line():
    stderr = ("In file included from native.cpp:29:\n"
              "native_products.h:3:10: fatal error: missing.h: No such file or directory\n"
              "    3 | #include \"missing.h\"\n"
              "compilation terminated.\n")
    assert build.first_errors(stderr) == "native_products.h:3:10: fatal error: missing.h: No such file or directory"
    many = "".join(f"native.cpp:{i}:1: error: e{i}\n" for i in range(5))
    assert build.first_errors(many) == ("native.cpp:0:1: error: e0 | native.cpp:1:1: error: e1 | "
                                        "native.cpp:2:1: error: e2 (and 2 more)")


@needs_library
def test_threads_loading_together_all_get_the_library(monkeypatch, fresh_load):
    real_build, calls = build.build, []

    def slow_build():  # a first compile takes seconds: the other threads arrive meanwhile
        calls.append(1)
        time.sleep(0.3)
        return real_build()

    monkeypatch.setattr(build, "build", slow_build)
    start, results = threading.Barrier(4), []

    def load():
        start.wait()
        results.append(build.load_library())

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(r is not None and r is results[0] for r in results)
    assert len(calls) == 1 and build.build_error() is None


@needs_library
def test_ctypes_structs_are_checked_against_the_c_structs(monkeypatch):
    from pyramoe.inference.kv_cache import SlotKVCache
    from pyramoe.inference.native import NativeForward, forward, unsupported_reason
    from pyramoe.models import GPT
    from pyramoe.presets import get_preset

    assert forward.struct_mismatch(build.load_library()) is None  # the shipped mirrors agree
    model = GPT(get_preset("tiny-moe")).eval()
    for layer in model.blocks:
        if layer.is_moe:
            layer.ffn.config.dropless = True
    cache = SlotKVCache.for_model(model, 1, 8)
    assert unsupported_reason(model, cache) is None
    # A field added on the Python side only.
    grown = type("_Model", (ctypes.Structure,), {"_fields_": [*forward._Model._fields_, ("extra", ctypes.c_int64)]})
    monkeypatch.setitem(forward.MIRRORS, "PmModel", grown)
    assert "PmModel" in unsupported_reason(model, cache)
    with pytest.raises(RuntimeError, match="struct PmModel is .* bytes in native.cpp"):
        NativeForward(model, cache, 1)


def test_generate_prints_why_the_native_step_did_not_run(tmp_path, monkeypatch, fresh_load, capsys):
    from live_server import train_tiny_run

    from pyramoe.cli.main import main

    run = train_tiny_run(tmp_path)
    monkeypatch.setenv("PYRAMOE_NO_NATIVE", "1")
    assert main(["generate", str(run), "--prompt", "def f1", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "pytorch decode step" in err
    assert "native step unavailable: native library unavailable: PYRAMOE_NO_NATIVE is set; the engine runs its " \
           "PyTorch step instead" in err


class _RefusingLibrary:
    @staticmethod
    def pm_linear(*args: object) -> int:
        return 1  # what native.cpp returns for blocked weights on a CPU without AVX512-BF16


def test_blocked_product_raises_when_the_library_refuses(monkeypatch):
    weight = BlockedWeight(torch.zeros(1, 2, 16, 2, dtype=torch.bfloat16), 16, 4)
    monkeypatch.setattr(blocked, "load_library", lambda: _RefusingLibrary())
    with pytest.raises(RuntimeError, match="status 1"):  # an assert would vanish under python -O
        blocked_linear(torch.ones(2, 4), weight, None)
    monkeypatch.setattr(blocked, "load_library", lambda: None)
    with pytest.raises(RuntimeError, match="unavailable"):
        blocked_linear(torch.ones(2, 4), weight, None)
