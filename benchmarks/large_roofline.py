"""Batch-1 decode of the issue's larger Mixtral shape (hidden 2048, 16 layers, 16 heads over 4
key/value heads, 8 experts top-2, ffn 5632, vocab 32000: 4.5B parameters, 9 GB in bf16) on the CPU,
against each format's memory roofline, one format per process.

`pyramoe bench generate --shape large` holds the bf16 engine and every quantized one at once and
builds the weights in fp32 first: more than a 24 GB host has. Here the random weights are built once
in bf16 by transformers (seed 0, as the bench builds them) and saved to DIR (reused by later calls),
and each call loads one engine from DIR: `python benchmarks/large_roofline.py DIR bf16|int8|int4...
[ROUNDS]`. Per format: decode tok/s at batch 1 (median of ROUNDS of N-token greedy runs minus a
1-token run, as the bench times them), the weight bytes a step reads (the chosen experts of each
layer, the LM head, attention; `pyramoe.bench.generate`), the memory read speed measured in the
same process, the fraction of the roofline (bytes / speed) reached, and how fast the engine's own
weight buffer reads (the VM's memory speed differs between allocations). Prints one line per format
and writes DIR/roofline-FORMAT.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from pyramoe.bench.common import decode_bytes, timed
from pyramoe.bench.generate import (
    SHAPES,
    add_arguments,
    build_transformers,
    measure_bandwidth,
    packed_weights_read,
    quantized_decode_bytes,
    resolve_shape,
)
from pyramoe.inference import Engine, SamplingParams

NEW_TOKENS = 32


def saved_model(directory: Path) -> Path:
    """The large shape's random bf16 weights in `directory` (built and saved the first time)."""
    if (directory / "config.json").is_file():
        return directory
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    shape = parser.parse_args(["--shape", "large"])
    resolve_shape(shape)
    model = build_transformers(shape, torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def measure(directory: Path, fmt: str, rounds: int) -> dict:
    engine = Engine.load(directory, dtype="bf16", max_batch=1, eos_id=None, prefix_caching=False,
                         quantize=None if fmt == "bf16" else fmt)
    experts = SHAPES["large"]["top_k"]
    plain_bytes = decode_bytes(engine.model, experts_read=experts)  # before the first step packs or quantizes
    torch.manual_seed(1)
    prompt = torch.randint(1, SHAPES["large"]["vocab"], (1, 16)).tolist()

    def run(n: int) -> None:
        engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

    run(2)  # packs (and quantizes) the weights
    step_bytes = plain_bytes if fmt == "bf16" else quantized_decode_bytes(engine.model, experts)
    samples = []
    for _ in range(rounds):
        long, short = timed(lambda: run(NEW_TOKENS)), timed(lambda: run(1))
        samples.append((NEW_TOKENS - 1) / max(long - short, 1e-9))
    bandwidth = measure_bandwidth()
    weights_read = packed_weights_read(engine)  # the engine's own weight buffer: allocations differ in speed
    tok_s = statistics.median(samples)
    roofline = bandwidth / step_bytes
    return {"format": fmt, "decode_tok_s": tok_s, "samples": samples, "step_bytes": step_bytes,
            "bandwidth_bytes_s": bandwidth, "roofline_tok_s": roofline, "of_roofline": tok_s / roofline,
            "weights_read_bytes_s": weights_read, "decode_path": engine.decode_path,
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("format", help="bf16, int8, int4 or an int4 variant (int4-g64, ...)")
    parser.add_argument("rounds", type=int, nargs="?", default=3)
    args = parser.parse_args()
    directory = saved_model(args.directory)
    result = measure(directory, args.format, args.rounds)
    print(f"{args.format}: {result['decode_tok_s']:.2f} tok/s at batch 1, {result['step_bytes'] / 1e9:.3f} GB per "
          f"step, memory {result['bandwidth_bytes_s'] / 1e9:.1f} GB/s -> roofline {result['roofline_tok_s']:.2f} "
          f"tok/s: {result['of_roofline']:.2f} of it ({result['decode_path']} step, {result['threads']} threads); "
          f"the engine's weight buffer reads at {(result['weights_read_bytes_s'] or 0) / 1e9:.1f} GB/s")
    out = directory / f"roofline-{args.format}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
