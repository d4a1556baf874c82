"""Where the native decode step's time goes, by phase (timers inside pyramoe/kernels/native.cpp): the engine on
the Mixtral-shaped benchmark model, after warm-up. Usage: python benchmarks/native_breakdown.py [BATCH]"""

import ctypes
import sys
import time

import torch

from pyramoe.bench import generate as bench
from pyramoe.inference import SamplingParams
from pyramoe.inference.native import load_library

PHASES = ["norms", "qkv", "attention", "out proj", "routing", "expert in", "activation", "expert out",
          "combine", "lm head"]
batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
engine, shape = bench.bench_engine("bf16", max_batch=batch)
for prompt in torch.randint(1, shape.vocab, (batch, 16)).tolist():
    engine.add_request(prompt, SamplingParams(max_tokens=int(sys.argv[2]) if len(sys.argv) > 2 else 200, temperature=0))
for _ in range(4):
    engine.step()
assert engine.decode_path == "native", engine.native_unavailable
library = load_library()
spent = (ctypes.c_double * len(PHASES))()
library.pm_profile(spent)
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 50
start = time.perf_counter()
for _ in range(steps):
    engine.step()
total = (time.perf_counter() - start) / steps
library.pm_profile(spent)
print(f"decode step, batch {batch}, {torch.get_num_threads()} threads: {total * 1e3:.2f} ms "
      f"({batch / total:,.0f} tok/s), in the native call {sum(spent) / steps * 1e3:.2f} ms")
for name, seconds in zip(PHASES, spent):
    print(f"  {name:12s} {seconds / steps * 1e3:6.3f} ms")
