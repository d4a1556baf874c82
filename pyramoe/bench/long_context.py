"""`pyramoe bench long-context`: decode tokens/s of the engine's native step with the KV cache filled
to 128, 1K and 4K positions, at batch 1 and 16, and each context's ratio to the shortest.

The model is Mixtral-shaped (defaults: hidden 512, 8 layers, 8 experts top-2, intermediate 1024,
8 query / 2 key-value heads, vocab 32000), built by pyramoe with random weights and a context of
the longest position the bench reaches. The engine prepares its step as for serving (blocked bf16
weights, its paged cache of 16-position blocks); every slot's blocks are then reserved and filled
with random keys and values, so a context costs no prefill (decode time does not depend on what the
cache holds). A sample is `--steps` decode steps of `batch` rows (slots 0..batch-1) at positions
context, context + 1, ...: batch x steps / seconds, logits of every row, as the engine asks them.
Each sample also reads the step's attention time from the kernels' phase timers.

`--baseline REV` builds the kernels of git revision REV beside this checkout's (the same flags) and
times them on the same model and cache, interleaved sample by sample with the current kernels: on a
shared machine only ratios within one run mean anything.

`--kv-cache-dtype bf16,int8` times the native step over a cache of each dtype (the same weights,
each cache filled alike), interleaved sample by sample: the first is the engine's ("pyramoe"), the
others "pyramoe kv DTYPE". int8 keeps each key/value row as int8 with an fp32 scale.

`--clock cpu` times samples in the process's CPU seconds instead of wall seconds (tokens per CPU
second, attention in CPU ms of its thread): on a machine shared with other work, a 2-thread step's
wall time is mostly waiting for a descheduled thread, its CPU time is not. Run it with
OMP_WAIT_POLICY=passive, or threads spinning at a barrier count as work. The attention's ms stay
wall time (the kernels' own timers).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pyramoe.bench.common import machine_info, positive_integers, print_and_write
from pyramoe.config import ModelConfig, build_layers
from pyramoe.inference import Engine, resolve_dtype
from pyramoe.inference.kv_cache import KV_CACHE_DTYPES, PagedKVCache
from pyramoe.inference.native import NativeForward
from pyramoe.inference.native.forward import struct_mismatch
from pyramoe.inference.steps import NativeStep
from pyramoe.kernels import build
from pyramoe.models import GPT
from pyramoe.tables import format_table

ATTENTION_PHASE = 2  # pm_profile's order: norms, qkv, attention, ...
PHASES = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--contexts", default="128,1024,4096", help="comma-separated cache positions")
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per sample")
    parser.add_argument("--rounds", type=int, default=3, help="samples per (context, batch); the median is reported")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 with native bf16 matmul), bf16 or fp32")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also time the native kernels of git revision REV (interleaved)")
    parser.add_argument("--kv-cache-dtype", default="auto", metavar="auto|bf16|int8[,...]",
                        help="the KV cache's dtype; several, comma-separated, are timed interleaved")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time samples in wall seconds or in the process's CPU seconds (a loaded machine)")
    parser.add_argument("--out", default="bench-results/long_context.json")


def validate(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    for name in ("hidden", "layers", "experts", "top_k", "intermediate", "heads", "kv_heads", "vocab", "steps",
                 "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        raise ValueError(f"--top-k: {args.top_k} exceeds --experts {args.experts}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise ValueError(f"--heads: {args.heads} must divide --hidden {args.hidden} and be a multiple of "
                         f"--kv-heads {args.kv_heads}")
    kv_dtypes = args.kv_cache_dtype.split(",")
    if any(d not in KV_CACHE_DTYPES for d in kv_dtypes) or len(set(kv_dtypes)) != len(kv_dtypes):
        raise ValueError(f"--kv-cache-dtype: expected distinct values among {', '.join(KV_CACHE_DTYPES)}, "
                         f"got {args.kv_cache_dtype!r}")
    return positive_integers(args.contexts, "--contexts"), positive_integers(args.batches, "--batches")


def bench_model(args: argparse.Namespace, max_len: int, dtype: torch.dtype) -> GPT:
    config = ModelConfig(vocab_size=args.vocab, max_seq_len=max_len, d_model=args.hidden, n_heads=args.heads,
                         n_kv_heads=args.kv_heads, d_ff=args.intermediate, activation="swiglu", norm="rmsnorm",
                         position="rope", bias=False, tie_embeddings=False,
                         layers=build_layers(args.layers, "all", args.experts, top_k=args.top_k, dropless=True))
    torch.manual_seed(0)
    return GPT(config).to(dtype)


def baseline_library(rev: str, workdir: Path) -> ctypes.CDLL:
    """The native kernels of git revision `rev` of this checkout (native*.cpp and native_*.h of
    pyramoe/kernels), compiled with this build's flags into `workdir`."""
    root = Path(__file__).resolve().parents[2]
    kernels = "pyramoe/kernels/"
    listing = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", rev, kernels], capture_output=True,
                             text=True, timeout=60)
    names = [line for line in listing.stdout.splitlines()
             if line.removeprefix(kernels).startswith("native") and line.endswith((".cpp", ".h"))]
    if listing.returncode != 0 or f"{kernels}native.cpp" not in names:
        raise ValueError(f"--baseline: {rev!r} is no revision with {kernels}native.cpp in the git repository at {root}")
    for name in names:
        text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:{name}"], capture_output=True, check=True,
                              timeout=60).stdout
        (workdir / Path(name).name).write_bytes(text)
    compiler = build.compiler()
    if compiler is None:
        raise ValueError("--baseline: no C++ compiler (g++ or $CXX) on PATH")
    try:
        build.compile_library(compiler, workdir / "native.cpp", workdir / "native.so")
    except RuntimeError as exc:
        raise ValueError(f"--baseline {rev}: {exc}") from None
    library = ctypes.CDLL(str(workdir / "native.so"))
    try:
        mismatch = struct_mismatch(library)
    except AttributeError:  # older kernels, without pm_sizeof
        mismatch = "its library cannot say its structs' sizes (pm_sizeof)"
    if mismatch:
        raise ValueError(f"--baseline {rev}: {mismatch}")
    return library


def fill_cache(engine: Engine, cache: PagedKVCache | None = None) -> None:
    """Every slot holds blocks for the whole context, every position a random key and value (an
    int8 cache: random int8 rows with random scales)."""
    cache = cache if cache is not None else engine.cache
    for slot in range(engine.max_batch):
        if cache.reserve(slot, [slot], engine.max_len, share=False) is None:
            raise ValueError("long-context: the KV cache holds too few blocks for every slot's context")
    generator = torch.Generator().manual_seed(1)
    for buffer in (*cache.keys, *cache.values):
        if buffer.dtype == torch.int8:
            buffer.copy_(torch.randint(-127, 128, buffer.shape, generator=generator, dtype=torch.int8))
        else:
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
    if cache.int8:
        for scales in (*cache.key_scales, *cache.value_scales):
            scales.copy_(torch.rand(scales.shape, generator=generator) / 32)


def sample(step: NativeStep, context: int, batch: int, steps: int, vocab: int,
           clock: str = "wall") -> tuple[float, float]:
    """Decode tokens/s over `steps` steps of `batch` rows from position `context`, and the attention
    seconds per step the kernels' timers counted (wall seconds: with `clock` "cpu" the tokens are per
    CPU second of the process, the attention still in wall seconds)."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    library = step.native.library
    spent = (ctypes.c_double * PHASES)()
    tokens = torch.randint(1, vocab, (batch,)).tolist()
    slots, rows = list(range(batch)), list(range(batch))
    library.pm_profile(spent)  # reset
    start = now()
    for i in range(steps):
        step.forward(tokens, slots, [context + i] * batch, rows)
    seconds = now() - start
    library.pm_profile(spent)
    return batch * steps / seconds, spent[ATTENTION_PHASE] / steps


def run(args: argparse.Namespace) -> dict[str, Any]:
    contexts, batches = validate(args)
    kv_dtypes = args.kv_cache_dtype.split(",")
    dtype = resolve_dtype(args.dtype, "cpu")
    max_len = max(contexts) + args.steps
    with tempfile.TemporaryDirectory() as workdir:
        baseline = baseline_library(args.baseline, Path(workdir)) if args.baseline else None
        engine = Engine(bench_model(args, max_len, dtype), max_batch=max(batches), max_len=max_len, eos_id=None,
                        prefix_caching=False, kv_cache_dtype=kv_dtypes[0])
        engine.prepare()
        if engine.decode_path != "native":
            raise ValueError(f"long-context: the native step does not run here ({engine.native_unavailable})")
        fill_cache(engine)
        steps = {"pyramoe": engine.runner}
        caches = {"pyramoe": engine.cache}
        moe_layers = [i for i, block in enumerate(engine.model.blocks) if block.is_moe]
        for kv_dtype in kv_dtypes[1:]:  # the engine's weights over a cache of another dtype
            cache = engine.cache
            other = PagedKVCache.for_model(engine.model, cache.slots, cache.max_len, cache.allocator.num_blocks,
                                           cache.block_size, kv_dtype)
            fill_cache(engine, other)
            caches[f"pyramoe kv {kv_dtype}"] = other
            forward = NativeForward(engine.model, other, engine.runner.max_rows)
            steps[f"pyramoe kv {kv_dtype}"] = NativeStep(forward, moe_layers)
        if baseline is not None:
            caches[f"baseline {args.baseline}"] = engine.cache
            forward = NativeForward(engine.model, engine.cache, engine.runner.max_rows, library=baseline)
            steps[f"baseline {args.baseline}"] = NativeStep(forward, moe_layers)
        for step in steps.values():  # warm-up: first calls fault pages in
            sample(step, contexts[0], max(batches), 2, args.vocab)
        samples: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
        for _ in range(args.rounds):
            for context in contexts:
                for batch in batches:
                    for name, step in steps.items():
                        got = sample(step, context, batch, args.steps, args.vocab, args.clock)
                        samples.setdefault((name, context, batch), []).append(got)
                        print(f"  {name:18s} context {context:<6d} batch {batch:<3d} {got[0]:9.1f} tok/s",
                              file=sys.stderr, flush=True)
    results = []
    for (name, context, batch), values in samples.items():
        tok_s = statistics.median(v[0] for v in values)
        cache = caches[name]  # every layer's keys, values (and int8 scales) per position
        kv_bytes_per_position = cache.bytes() // (cache.allocator.num_blocks * cache.block_size)
        results.append(dict(impl=name, context=context, batch=batch, decode_tok_s=tok_s,
                            kv_cache_dtype="int8" if cache.int8 else str(cache.dtype).removeprefix("torch."),
                            attention_ms=1e3 * statistics.median(v[1] for v in values),
                            kv_bytes_per_step=batch * (context + 1) * kv_bytes_per_position,
                            samples=[v[0] for v in values]))
    shortest = {(r["impl"], r["batch"]): r["decode_tok_s"] for r in results if r["context"] == contexts[0]}
    for r in results:
        r["of_shortest"] = r["decode_tok_s"] / shortest[(r["impl"], r["batch"])]
    notes = [f"dtype {str(dtype).removeprefix('torch.')}", f"{torch.get_num_threads()} threads",
             f"{args.steps} steps per sample, median of {args.rounds}"]
    if args.clock == "cpu":
        notes.append("tok/s per CPU second of the process (--clock cpu); attention ms in wall time")
    return {"benchmark": "long-context", "shape": {k: getattr(args, k) for k in (
        "hidden", "layers", "experts", "top_k", "intermediate", "heads", "kv_heads", "vocab")},
        "contexts": contexts, "batches": batches, "machine": machine_info(), "notes": notes, "results": results}


def report(payload: dict[str, Any]) -> str:
    results = payload["results"]
    current = {(r["context"], r["batch"]): r["decode_tok_s"] for r in results if r["impl"] == "pyramoe"}
    rows = []
    for r in sorted(results, key=lambda r: (r["batch"], r["impl"] != "pyramoe", r["impl"], r["context"])):
        vs = current[(r["context"], r["batch"])] / r["decode_tok_s"] if r["impl"] != "pyramoe" else float("nan")
        rows.append([r["impl"], r["batch"], r["context"], r["decode_tok_s"], r["of_shortest"], r["attention_ms"],
                     r["kv_bytes_per_step"] / 1e6, vs])
    shortest = payload["contexts"][0]
    return format_table(["impl", "batch", "context", "decode tok/s", f"x at {shortest}", "attention ms/step",
                         "KV MB/step", "pyramoe x this"], rows)


def main(args: argparse.Namespace) -> int:
    payload = run(args)
    return print_and_write(report(payload), payload, args.out)
