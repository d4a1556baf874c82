"""The native step's bf16 products on AMX tiles against the AVX512-BF16 kernel alone, interleaved round by
round in one process (`pyramoe.kernels.blocked.set_amx`): the Mixtral-shaped bench model, decode tokens/s at
each batch (as `pyramoe bench generate` times them: batch x (N - 1) / (t(N) - t(1))), prefill tokens/s, and
the engine's aggregate tokens/s with 1 and 32 requests in flight (as `pyramoe bench serve`'s in-process
figure: closed loop, 2 requests per client, prompts of 32 tokens, 64 new tokens each).
With `--quantize int8,int4` the same model also with int8 / int4 weights, each format's VNNI kernels against its
AMX-INT8 tiles (native_amx_quant.h; the same mode switch), decode at batch 16 and 32 and prefill only, and the
formats side by side on the tiles.
Usage: python benchmarks/amx_ab.py [ROUNDS [THREADS]] [--quantize FORMATS] (THREADS: torch's by default; on a
machine shared with other jobs, 1 thread keeps the OpenMP barriers from waiting on a preempted thread, which
otherwise dominates)."""

import argparse
import statistics
import sys
import time

import torch

from pyramoe.bench import generate as bench
from pyramoe.bench.serve import _prompts, in_process
from pyramoe.inference import SamplingParams
from pyramoe.kernels.blocked import amx_state, native_products, set_amx

parser = argparse.ArgumentParser()
parser.add_argument("rounds", nargs="?", type=int, default=3)
parser.add_argument("threads", nargs="?", type=int)
parser.add_argument("--quantize", default="", help="comma-separated formats besides bf16, e.g. int8,int4")
args = parser.parse_args()
rounds = args.rounds
if args.threads:
    torch.set_num_threads(args.threads)
formats = ["bf16", *[f for f in args.quantize.split(",") if f]]
engines = {}
for fmt in formats:
    options = {} if fmt == "bf16" else {"quantize": fmt}
    engines[fmt], shape = bench.bench_engine("bf16", max_batch=32, max_step_tokens=256, **options)
    engines[fmt].prepare()
    assert engines[fmt].decode_path == "native", engines[fmt].native_unavailable
engine = engines["bf16"]
if amx_state() != 1:
    sys.exit(f"no AMX here: {native_products()}")
torch.manual_seed(1)
prompts = torch.randint(1, shape.vocab, (32, 16)).tolist()
long_prompts = torch.randint(1, shape.vocab, (2, 256)).tolist()
NEW = 32


def decode(batch: int) -> float:
    def run(n: int) -> float:
        start = time.perf_counter()
        engine.generate(prompts[:batch], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - start
    return batch * (NEW - 1) / max(run(NEW) - run(1), 1e-9)


def prefill(rows: list[list[int]]) -> float:
    start = time.perf_counter()
    engine.generate(rows, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return sum(len(r) for r in rows) / (time.perf_counter() - start)


def serve(clients: int) -> float:
    return in_process(engine, clients, _prompts(shape.vocab, 2 * clients, 32, clients), 64)["tokens_per_s"]


if len(formats) > 1:  # quantized formats: each on its kernels, interleaved with bf16's
    quant_measures = {"decode b16": lambda: decode(16), "decode b32": lambda: decode(32),
                      "prefill 32x16": lambda: prefill(prompts), "prefill 2x256": lambda: prefill(long_prompts)}
    labels = {"vnni": "0", "amx": "auto"}
    for fmt in formats:
        engine = engines[fmt]
        for mode in labels.values():
            set_amx(mode)
            decode(2), prefill(prompts[:2])
    results = {}
    for r in range(rounds):
        for fmt in formats if r % 2 == 0 else reversed(formats):
            engine = engines[fmt]
            for name, fn in quant_measures.items():
                for label, mode in (labels.items() if r % 2 == 0 else reversed(labels.items())):
                    set_amx(mode)
                    results.setdefault((fmt, label, name), []).append(fn())
                    print(f"round {r} {fmt} {name:14s} {label:5s} {results[fmt, label, name][-1]:8.1f} tok/s",
                          file=sys.stderr, flush=True)
    set_amx("auto")
    median = {key: statistics.median(values) for key, values in results.items()}
    print(f"{torch.get_num_threads()} threads, median of {rounds} rounds, tok/s ('vnni' = AVX512-BF16 for bf16); "
          f"{native_products()}")
    for name in quant_measures:
        for fmt in formats:
            a, b = median[fmt, "vnni", name], median[fmt, "amx", name]
            print(f"  {name:14s} {fmt:5s} vnni {a:8.1f}  amx {b:8.1f}  amx/vnni {b / a:5.2f}x  "
                  f"amx vs bf16-amx {b / median['bf16', 'amx', name]:5.2f}x")
    sys.exit(0)

measures = {"decode b1": lambda: decode(1), "decode b16": lambda: decode(16), "decode b32": lambda: decode(32),
            "prefill 32x16": lambda: prefill(prompts), "prefill 2x256": lambda: prefill(long_prompts),
            "engine 1 client": lambda: serve(1), "engine 32 clients": lambda: serve(32)}
modes = {"avx512": "0", "amx": "auto"}
for mode in modes.values():  # warm-up: packing, the build, first touches
    set_amx(mode)
    decode(2), prefill(prompts[:2]), serve(2)
samples = {(m, name): [] for m in modes for name in measures}
for r in range(rounds):
    for name, fn in measures.items():
        for label, mode in (modes.items() if r % 2 == 0 else reversed(modes.items())):
            set_amx(mode)
            samples[label, name].append(fn())
            print(f"round {r} {name:18s} {label:6s} {samples[label, name][-1]:8.1f} tok/s", file=sys.stderr, flush=True)
set_amx("auto")
print(f"{torch.get_num_threads()} threads, median of {rounds} rounds, tok/s; {native_products()}")
median = {key: statistics.median(values) for key, values in samples.items()}
for name in measures:
    a, b = median["avx512", name], median["amx", name]
    print(f"  {name:18s} avx512 {a:8.1f}  amx {b:8.1f}  amx/avx512 {b / a:5.2f}x")
for label in modes:
    print(f"  {label}: engine 32 clients / 1 client = "
          f"{median[label, 'engine 32 clients'] / median[label, 'engine 1 client']:.2f}x")
