"""Engine decode speed on a CUDA device (CI has none; run by hand on a GPU machine): a Mixtral-shaped
model built by pyramoe alone (hidden 512, 8 layers, 8 experts top-2, intermediate 1024, 8/2 heads,
vocab 32000, random weights), bf16, greedy; tokens/s at batch 1 and 16 after warm-up, decode only
(t(N tokens) - t(1 token)). Usage: python benchmarks/gpu_decode.py [--device cuda]"""

import argparse
import time

import torch

from pyramoe.config import ModelConfig, build_layers
from pyramoe.inference import Engine, SamplingParams
from pyramoe.models import GPT

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cuda")
parser.add_argument("--tokens", type=int, default=64)
cli = parser.parse_args()
config = ModelConfig(vocab_size=32000, max_seq_len=512, d_model=512, n_heads=8, n_kv_heads=2, d_ff=1024,
                     activation="swiglu", norm="rmsnorm", position="rope", bias=False, tie_embeddings=False,
                     layers=build_layers(8, "all", 8, top_k=2, dropless=True))
torch.manual_seed(0)
model = GPT(config).to(device=cli.device, dtype=torch.bfloat16)


def timed(engine: Engine, prompts: list[list[int]], tokens: int) -> float:
    if cli.device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    if cli.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


for batch in (1, 16):
    engine = Engine(model, max_batch=batch, eos_id=None)
    prompts = torch.randint(1, 32000, (batch, 16)).tolist()
    timed(engine, prompts, 4)  # warm-up
    rates = []
    for _ in range(3):
        rates.append(batch * (cli.tokens - 1) / (timed(engine, prompts, cli.tokens) - timed(engine, prompts, 1)))
    name = torch.cuda.get_device_name(0) if cli.device.startswith("cuda") else "cpu"
    print(f"{name}: batch {batch}: {sorted(rates)[1]:.0f} tok/s decode (median of 3)")
