"""Where the PyTorch decode step's time goes, by module (forward hooks; the hooks add a little): the
engine with native=False (oneDNN-packed weights) on the Mixtral-shaped benchmark model, after
warm-up. The native step's phases: benchmarks/native_breakdown.py.
Usage: python benchmarks/decode_breakdown.py [BATCH]"""

import collections
import sys
import time

import torch

from pyramoe.bench import generate as bench
from pyramoe.inference import SamplingParams

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
engine, shape = bench.bench_engine("bf16", max_batch=batch, native=False)
for prompt in torch.randint(1, shape.vocab, (batch, 16)).tolist():
    engine.add_request(prompt, SamplingParams(max_tokens=200, temperature=0))
for _ in range(4):
    engine.step()
model = engine.model
groups = {
    "embedding": [model.tok_emb],
    "norms": [b.ln_attn for b in model.blocks] + [b.ln_ffn for b in model.blocks] + [model.ln_f],
    "attention": [b.attn for b in model.blocks],
    "moe (with router)": [b.ffn for b in model.blocks],
    "router": [b.ffn.router for b in model.blocks if b.is_moe],
    "lm head": [model.lm_head],
}
spent: collections.Counter = collections.Counter()
started: dict[int, float] = {}
for name, modules in groups.items():
    for module in modules:
        module.register_forward_pre_hook(lambda m, a: started.__setitem__(id(m), time.perf_counter()))
        module.register_forward_hook(
            lambda m, a, o, name=name: spent.__setitem__(name, spent[name] + time.perf_counter() - started[id(m)]))
steps = 50
start = time.perf_counter()
for _ in range(steps):
    engine.step()
total = (time.perf_counter() - start) / steps
print(f"decode step, batch {batch}, {torch.get_num_threads()} threads: {total * 1e3:.2f} ms")
for name, seconds in spent.items():
    print(f"  {name:18s} {seconds / steps * 1e3:6.3f} ms")
