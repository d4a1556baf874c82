"""The native step's bf16 products on AMX tiles against the AVX512-BF16 kernel alone, interleaved round by
round in one process (`pyramoe.kernels.blocked.set_amx`): the Mixtral-shaped bench model, decode tokens/s at
each batch (as `pyramoe bench generate` times them: batch x (N - 1) / (t(N) - t(1))), prefill tokens/s, and
the engine's aggregate tokens/s with 1 and 32 requests in flight (as `pyramoe bench serve`'s in-process
figure: closed loop, 2 requests per client, prompts of 32 tokens, 64 new tokens each).
Usage: python benchmarks/amx_ab.py [ROUNDS [THREADS]] (THREADS: torch's by default; on a machine shared with other
jobs, 1 thread keeps the OpenMP barriers from waiting on a preempted thread, which otherwise dominates)."""

import statistics
import sys
import time

import torch

from pyramoe.bench import generate as bench
from pyramoe.bench.serve import _prompts, in_process
from pyramoe.inference import SamplingParams
from pyramoe.kernels.blocked import amx_state, native_products, set_amx

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
if len(sys.argv) > 2:
    torch.set_num_threads(int(sys.argv[2]))
engine, shape = bench.bench_engine("bf16", max_batch=32, max_step_tokens=256)
engine.prepare()
assert engine.decode_path == "native", engine.native_unavailable
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
