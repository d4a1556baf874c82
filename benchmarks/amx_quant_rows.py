"""Where the AMX-INT8 tiles overtake the VNNI kernels for int8 and int4 products (kAmxInt8MinRows,
kAmxInt4MinRows in pyramoe/kernels/native_amx_quant.h): one product through the native library on the
Mixtral-shaped bench model's matrices (expert in [2048, 512], expert out [512, 1024], LM head [32000, 512]),
copies enough for ~64 MB per format so the weights come from memory as in a step, at each row count, the
two kernels interleaved in one process (`set_amx` "0" / "1"), median of ROUNDS.
Usage: python benchmarks/amx_quant_rows.py [ROUNDS [THREADS [FORMATS]]] (THREADS: 1 by default; on a machine
shared with other jobs 1 thread keeps the OpenMP barriers from waiting on a preempted thread; FORMATS: int8,int4
by default)."""

import statistics
import sys
import time

import torch

from pyramoe.kernels import int4_linear_native, int8_linear_native, quantize_weights, quantize_weights_int4
from pyramoe.kernels.blocked import amx_int8_state, native_products, set_amx

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
if amx_int8_state() != 1:
    sys.exit(f"no AMX-INT8 here: {native_products()}")
SHAPES = {"expert in": (2048, 512), "expert out": (512, 1024), "lm head": (32000, 512)}
ROWS = [1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64, 256]
FORMATS = {"int8": (quantize_weights, int8_linear_native, 1),
           "int4": (lambda w: quantize_weights_int4(w, 32), int4_linear_native, 0.5)}
if len(sys.argv) > 3:
    FORMATS = {f: FORMATS[f] for f in sys.argv[3].split(",")}
torch.manual_seed(0)
copies = {}
for fmt, (quantize, _, bytes_per_weight) in FORMATS.items():
    for name, (n, k) in SHAPES.items():
        count = max(2, int(64e6 / (n * k * bytes_per_weight)))
        copies[fmt, name] = [quantize(torch.randn(n, k) * 0.02) for _ in range(count)]


def timed(fmt: str, name: str, rows: int) -> float:
    """Seconds per product, over every copy once."""
    product = FORMATS[fmt][1]
    x = torch.randn(rows, SHAPES[name][1])
    start = time.perf_counter()
    for weight in copies[fmt, name]:
        product(x, weight, None)
    return (time.perf_counter() - start) / len(copies[fmt, name])


print(f"{torch.get_num_threads()} threads, median of {rounds} rounds, ms per product; {native_products()}")
for fmt in FORMATS:
    for name in SHAPES:
        for mode in ("0", "1"):  # warm-up
            set_amx(mode)
            timed(fmt, name, 4)
        for rows in ROWS:
            samples = {"0": [], "1": []}
            for r in range(rounds):
                for mode in ("0", "1") if r % 2 == 0 else ("1", "0"):
                    set_amx(mode)
                    samples[mode].append(timed(fmt, name, rows))
            vnni, amx = statistics.median(samples["0"]), statistics.median(samples["1"])
            print(f"  {fmt} {name:10s} rows {rows:3d}: vnni {1e3 * vnni:7.3f}  amx {1e3 * amx:7.3f}  "
                  f"amx speedup {vnni / amx:5.2f}x", flush=True)
set_amx("auto")
