"""Profile the engine's PyTorch decode step (native=False) on the Mixtral-shaped benchmark model
(batch 1), top functions by own time. Usage: python benchmarks/profile_decode.py [--dtype bf16|fp32] [--tokens N]"""

import argparse
import cProfile
import pstats
import time

import torch

from pyramoe.bench import generate as bench
from pyramoe.inference import SamplingParams

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="bf16")
parser.add_argument("--tokens", type=int, default=33)
parser.add_argument("--batch", type=int, default=1)
cli = parser.parse_args()
engine, shape = bench.bench_engine(cli.dtype, max_batch=cli.batch, native=False)
prompts = torch.randint(1, shape.vocab, (cli.batch, 16)).tolist()
params = SamplingParams(max_tokens=cli.tokens, temperature=0)
engine.generate(prompts, SamplingParams(max_tokens=3, temperature=0))
start = time.perf_counter()
engine.generate(prompts, params)
rate = cli.batch * cli.tokens / (time.perf_counter() - start)
print(f"{rate:.1f} tok/s ({cli.dtype}, {torch.get_num_threads()} threads)")
profile = cProfile.Profile()
profile.enable()
engine.generate(prompts, params)
profile.disable()
pstats.Stats(profile).sort_stats("tottime").print_stats(28)
