"""The native attention's VNNI kernel over an int8 KV cache (`attend_part_vnni` in
pyramoe/kernels/native_attention.h: integer dot products of 24-bit queries with the stored int8 keys)
on any x86 CPU: tests/native_emulated/attention_check.cpp builds the attention header over SIMDe's
portable AVX-512 (libsimde-dev) with the AVX-512/VNNI macros defined, so the kernel runs here even
where the CPU lacks them (the native library's tests cover it only on CPUs with VNNI). Against a
double-precision softmax over the dequantized rows, its outputs stay within fp32 rounding, as the fp32
kernel's (measured: at most 8.5e-7 of the largest output, the fp32 kernel 9.2e-7; 16-bit queries
with 16-bit weights gave 3.4e-5 to 8.6e-5): head widths 16-128 (one to eight 16-byte pieces of a
row transposed), GQA with 1-8 query heads per key/value head and MHA, blocks of 16, 24 and 32, rows
split over 2 threads, a prefill chunk among decode rows, rows of 1 to 1500 keys."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent / "native_emulated"
KERNELS = Path(__file__).parents[1] / "pyramoe" / "kernels"
SIMDE = Path("/usr/include/simde/x86/avx512.h")


@pytest.mark.skipif(shutil.which("g++") is None or not SIMDE.exists(), reason="needs g++ and libsimde-dev")
def test_vnni_kernel_within_fp32_rounding(tmp_path):
    binary = tmp_path / "attention_check"
    build = subprocess.run(["g++", "-O1", "-std=c++17", "-fopenmp", f"-I{HERE}", f"-I{KERNELS}", "-D__AVX512F__",
                            "-D__AVX512BW__", "-D__AVX512VNNI__", str(HERE / "attention_check.cpp"), "-o",
                            str(binary)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(binary), "5e-6"], capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and len(lines) == 11, run.stdout + run.stderr
    for line in lines:
        ours, fp32 = (float(x) for x in re.findall(r"error ([\d.e+-]+), fp32 kernel ([\d.e+-]+)", line)[0])
        assert ours <= max(4 * fp32, 2e-6), line  # no worse than the fp32 kernel's rounding
