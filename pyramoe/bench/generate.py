"""`pyramoe bench generate`: generation throughput of pyramoe's engine against transformers' `generate`
on the same random weights, in one run.

The model is Mixtral-shaped (`--shape small`, the default: hidden 512, 8 layers, 8 experts top-2,
intermediate 1024, vocab 32000; `--shape large`: hidden 2048, 16 layers, 16 heads over 4 key/value
heads, intermediate 5632; each size flag overrides its shape's value), built by transformers from
its config, saved, and loaded by pyramoe from that directory, so both run identical weights.
Implementations:

- pyramoe: the continuous-batching engine (`pyramoe.inference.Engine`), greedy (`--step`, default
  auto: its native step where it builds; with `--device cuda`, its device step,
  `pyramoe.inference.device_step`, and the roofline from the GPU's memory);
- pyramoe-pytorch: the same engine with `native=False` (its PyTorch step, oneDNN-packed weights;
  on CUDA `step="pytorch"`);
- pyramoe-int8, pyramoe-int4 (`--quantize int8,int4`, CPU): the engine with quantized weights
  (`Engine(quantize=...)`), each with its roofline from the bytes its own step reads (quantized
  matrices with their scales), and with
  `--quality-checkpoint RUN` the quality that costs on a trained model (perplexity of the held-out
  split and greedy agreement with bf16: `pyramoe.bench.quantized_quality`);
- transformers: `generate(do_sample=False)` with its grouped-GEMM experts (`grouped_mm`);
- transformers-compiled (CUDA; `--no-compiled-transformers` skips it): the same with its static
  cache and `torch.compile(mode="reduce-overhead")` (`cache_implementation="static"` and a
  `CompileConfig`), decode only; dropped with a note where that transformers cannot compile it;
- plain-moe: transformers with its eager experts, a Python loop over experts (a plain PyTorch MoE);
- roofline: batch x memory bandwidth (measured in the same run) / bytes of weights one decode step
  reads (attention, norms, router, the LM head, and per MoE layer the experts the batch touches:
  top-k at batch 1, E(1 - (1 - k/E)^B) expected distinct experts at batch B under uniform routing);
- oneDNN GEMVs (batch 1): the time of that step's weight multiplies alone as oneDNN's packed GEMVs
  (the fastest PyTorch CPU kernels for them): the ceiling of any eager PyTorch decode step, which the
  engine's native step (`pyramoe.inference.native`) is not bound by.

Decode tokens/s come from two timings, N new tokens and 1, so prefill is excluded:
batch x (N - 1) / (t(N) - t(1)); prefill tokens/s: the prompt batch to its last positions' logits.
Implementations alternate round by round and the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pyramoe.bench.common import decode_bytes, machine_info, print_and_write, time_call, timed
from pyramoe.inference import Engine, SamplingParams, resolve_dtype
from pyramoe.inference.engine import STEPS
from pyramoe.inference.packing import check_quantize
from pyramoe.kernels import BlockedWeight, Int4Weight, Int8Weight, huge_page_tensors, load_library, native_read
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.packed import can_pack, pack_weight, packed_linear
from pyramoe.tables import format_table

# The two Mixtral shapes (the larger one for a GPU).
SHAPES = {
    "small": dict(hidden=512, layers=8, experts=8, top_k=2, intermediate=1024, heads=8, kv_heads=2, vocab=32000),
    "large": dict(hidden=2048, layers=16, experts=8, top_k=2, intermediate=5632, heads=16, kv_heads=4, vocab=32000),
}
COMPILED = "transformers-compiled"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="small", metavar="|".join(SHAPES),
                        help="the model's sizes (small: hidden 512, 8 layers, ffn 1024; large: hidden 2048, "
                             "16 layers, ffn 5632); the size flags below override single values")
    for name in SHAPES["small"]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="default: the shape's")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 with native bf16 matmul), bf16 or fp32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-transformers", action="store_true", help="pyramoe and the roofline only")
    parser.add_argument("--no-plain-moe", action="store_true", help="skip plain-moe (transformers' eager experts)")
    parser.add_argument("--no-compiled-transformers", action="store_true",
                        help="skip transformers-compiled (its static cache + torch.compile; CUDA only)")
    parser.add_argument("--step", default="auto", metavar="auto|pytorch|device", help="pyramoe's engine step")
    parser.add_argument("--no-pytorch-path", action="store_true",
                        help="skip pyramoe-pytorch (the engine with native=False on the same weights)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda (pyramoe: its device step; pyramoe-pytorch: its PyTorch step)")
    parser.add_argument("--quantize", default=None, metavar="FORMATS",
                        help="comma-separated formats (int8, int4, int4-g64, ...): also time the engine with "
                             "quantized weights in each (pyramoe-int8, ...), interleaved with the others")
    parser.add_argument("--quality-checkpoint", default=None, metavar="RUN",
                        help="with --quantize: perplexity and greedy agreement of this trained checkpoint, "
                             "bf16 against quantized")
    parser.add_argument("--quality-tokens", type=int, default=256, metavar="N",
                        help="greedy tokens compared for --quality-checkpoint (4 prompts)")
    parser.add_argument("--out", default="bench-results/generate.json")


def resolve_shape(args: argparse.Namespace) -> None:
    """Fill the size flags left unset from `--shape`."""
    if args.shape not in SHAPES:
        raise ValueError(f"--shape: must be one of {', '.join(SHAPES)}, got {args.shape!r}")
    for name, value in SHAPES[args.shape].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def validate(args: argparse.Namespace) -> list[int]:
    resolve_shape(args)
    if args.step not in STEPS:
        raise ValueError(f"--step: must be one of {', '.join(STEPS)}, got {args.step!r}")
    for name in ("hidden", "layers", "experts", "top_k", "intermediate", "heads", "kv_heads", "vocab",
                 "prompt_len", "rounds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.new_tokens < 2:
        raise ValueError(f"--new-tokens: must be >= 2 (decode time is t(N) - t(1)), got {args.new_tokens}")
    if args.top_k > args.experts:
        raise ValueError(f"--top-k: {args.top_k} exceeds --experts {args.experts}")
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise ValueError(f"--batches: expected comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise ValueError(f"--batches: sizes must be >= 1, got {args.batches!r}")
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        raise ValueError(f"--device: must be cpu or cuda (with CUDA available), got {args.device!r}")
    for fmt in quantize_formats(args):
        check_quantize(fmt, "--quantize")
    if args.quality_checkpoint is not None:
        if args.quantize is None:
            raise ValueError("--quality-checkpoint: compares quantized weights with bf16: add --quantize")
        if not Path(args.quality_checkpoint).exists():
            raise ValueError(f"--quality-checkpoint: {args.quality_checkpoint} does not exist")
    if args.quality_tokens < 4:
        raise ValueError(f"--quality-tokens: must be >= 4, got {args.quality_tokens}")
    if args.quantize is not None and args.device != "cpu":
        raise ValueError("--quantize: quantized weights run on the CPU; leave out --device")
    return batches


def quantize_formats(args: argparse.Namespace) -> list[str]:
    """The formats `--quantize` lists (none when left out)."""
    return [] if args.quantize is None else args.quantize.split(",")


def build_transformers(args: argparse.Namespace, dtype: torch.dtype, device: str = "cpu") -> Any:
    """Random Mixtral weights (seed 0: every call builds the same), made on `device` (the large
    shape's 4.5B parameters initialise in seconds on a GPU, minutes on its host)."""
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in its dtype: the large shape in fp32 first would be 18 GB
    try:
        with torch.device(device):
            model = transformers.MixtralForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype)


def bench_engine(dtype: str = "bf16", **engine_options: Any) -> tuple[Engine, argparse.Namespace]:
    """The engine on the bench's default Mixtral-shaped model (random weights built by transformers,
    loaded from a saved directory as `run` does), and that shape: for the scripts in benchmarks/."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    shape = parser.parse_args([])
    resolve_shape(shape)
    reference = build_transformers(shape, resolve_dtype(dtype, "cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        engine_options.setdefault("prefix_caching", False)  # scripts time the same prompts again and again
        return Engine.load(tmp, dtype=dtype, eos_id=None, **engine_options), shape


def _set_experts(model: Any, implementation: str) -> bool:
    setter = getattr(model, "set_experts_implementation", None)
    if setter is None:
        return False
    try:
        setter(implementation)
    except (ValueError, KeyError):
        return False
    return True


def experts_touched(args: argparse.Namespace, batch: int) -> float:
    """Expected distinct experts per MoE layer that `batch` tokens choose top-k of, under uniform
    routing (the random-weight bench model routes nearly uniformly)."""
    return args.experts * (1 - (1 - args.top_k / args.experts) ** batch)


def measure_bandwidth(gib: float = 1.0, repeats: int = 5, buffers: int = 3) -> float:
    """Bytes per second of a streaming read of a large fp32 buffer: the best, over `buffers` fresh
    buffers of ordinary pages and as many of transparent huge pages (what the engine's blocked
    weights use), of the median of `repeats` reads by torch's sum and by the native read loop
    (`pyramoe.kernels.native_read`, where it builds). On the shared VM one buffer read at 46 GB/s
    and the next at 72, huge pages read ~10% faster than ordinary ones, and the native loop ~10%
    faster than torch's sum: the best makes the roofline the harder bar."""
    readers = [lambda x: x.sum()] + ([native_read] if load_library() is not None else [])
    best = 0.0
    for i in range(2 * buffers):
        elements = int(gib * 2**30 / 4) // 16 * 16
        x = torch.ones(elements) if i % 2 == 0 else huge_page_tensors([(elements,)], torch.float32)[0].fill_(1.0)
        best = max([best] + [read_speed(read, x, repeats) for read in readers])
        del x
    return best


def measure_device_bandwidth(device: str, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of a streaming read (torch's sum) of a large fp32 buffer on an accelerator,
    median of `repeats` reads after one, each waited for."""
    elements = int(gib * 2**30 / 4)
    x = torch.ones(elements, device=device)
    return read_speed(lambda t: (t.sum(), torch.cuda.synchronize(device)), x, repeats)


def read_speed(read: Callable[[torch.Tensor], Any], x: torch.Tensor, repeats: int) -> float:
    """Bytes per second of `read(x)`: x's bytes over the median of `repeats` reads after one."""
    median_ms = time_call(lambda: read(x), repeats=repeats, warmup=1)["median_ms"]
    return x.numel() * x.element_size() / (median_ms / 1e3)


def packed_weights_read(engine: Engine, repeats: int = 5) -> float | None:
    """Bytes per second of the native read over the buffer that holds the engine's blocked (or int8 /
    int4) weights (the memory its steps stream), median of `repeats`; None where nothing is packed."""
    head = getattr(engine.model.lm_head, "packed_weight", None)
    if not isinstance(head, (BlockedWeight, Int8Weight, Int4Weight)) or load_library() is None:
        return None
    storage = head.data.untyped_storage()
    whole = torch.empty(0, dtype=torch.uint8).set_(storage)
    return read_speed(native_read, whole[: whole.numel() // 4 * 4].view(torch.float32), repeats)


def quantized_decode_bytes(model: torch.nn.Module, experts_read: float) -> int:
    """`decode_bytes` of a model after `quantize_model`: its remaining parameters, and each int8 or
    int4 matrix with its scales (of each MoE layer's experts, `experts_read` of them)."""
    total = float(decode_bytes(model, experts_read))
    for module in model.modules():
        weight = getattr(module, "packed_weight", None)
        if isinstance(weight, (Int8Weight, Int4Weight)):
            total += weight.nbytes()
        packed = getattr(module, "packed", None) if isinstance(module, GroupedExperts) else None
        if packed is not None and isinstance(packed[0][0], (Int8Weight, Int4Weight)):
            total += sum(w.nbytes() for per_expert in packed for w in per_expert) * experts_read / module.num_experts
    return int(total)


def decode_gemv_shapes(model: torch.nn.Module, top_k: int) -> list[tuple[int, int]]:
    """[out, in] of every weight multiply of a batch-1 decode step: each nn.Linear (the LM head
    included) and, per MoE layer, top_k experts' two projections. Call before the engine packs."""
    shapes = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shapes.append(tuple(module.weight.shape))
        elif isinstance(module, GroupedExperts):
            shapes += [tuple(module.w_in.shape[1:]), tuple(module.w_out.shape[1:])] * top_k
    return shapes


def measure_gemv_floor(shapes: list[tuple[int, int]], dtype: torch.dtype, repeats: int = 9) -> float:
    """Seconds that the step's weight multiplies alone take at batch 1 (fresh random weights, packed
    as the engine packs them where it can): the floor below which no eager decode step can go with
    these kernels, against the roofline's pure memory read."""
    weights = [torch.randn(shape).to(dtype) for shape in shapes]
    if all(can_pack(w) for w in weights):
        weights = [pack_weight(w) for w in weights]
        multiply = functools.partial(packed_linear, bias_O=None)
    else:
        multiply = torch.nn.functional.linear
    inputs = [torch.randn(1, shape[1]).to(dtype) for shape in shapes]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for x, w in zip(inputs, weights):
            multiply(x, w)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def runners(args: argparse.Namespace, batch: int, prompts: torch.Tensor, engines: dict[str, Engine],  # noqa: ANN201
            hf: dict[str, Any]):
    """name -> fn(new_tokens) that generates greedily for `batch` prompts."""
    ids = prompts[:batch].tolist()
    out: dict[str, Callable[[int], Any]] = {}
    for name, engine in engines.items():
        def ours(n: int, engine: Engine = engine) -> Any:
            engine.max_batch = batch
            return engine.generate(ids, SamplingParams(max_tokens=n, temperature=0))
        out[name] = ours
    ids_hf = prompts[:batch].to(args.device)
    for name, model in hf.items():
        options = compiled_generate_options() if name == COMPILED else {}

        def theirs(n: int, model: Any = model, options: dict = options) -> Any:
            with torch.no_grad():
                tokens = model.generate(input_ids=ids_hf, attention_mask=torch.ones_like(ids_hf), max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False, **options)
            return tokens.tolist()  # waits for the device
        out[name] = theirs
    return out


def compiled_generate_options() -> dict[str, Any] | None:
    """`generate` arguments for transformers' static cache with its forward compiled (CUDA graphs
    through reduce-overhead), or None where this transformers has no `CompileConfig`."""
    import transformers

    if not hasattr(transformers, "CompileConfig"):
        return None
    return {"cache_implementation": "static",
            "compile_config": transformers.CompileConfig(fullgraph=False, mode="reduce-overhead")}


def warm_up(fns: dict[str, Callable[[int], Any]], new_tokens: int, notes: list[str]) -> None:
    """One call of each (the quantized engine quantizes at its first step; the compiled peer
    compiles for the longest call, whose static cache the shorter ones reuse). A compiled peer
    that fails is dropped with a note; anything else that fails is a failure of the bench."""
    for name, fn in list(fns.items()):
        try:
            fn(new_tokens if name == COMPILED else 2)
        except Exception as exc:  # noqa: BLE001 - torch.compile's failures have many types
            if name != COMPILED:
                raise
            del fns[name]
            notes.append(f"{COMPILED} dropped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def prefill_runners(
    prompts: torch.Tensor, engines: dict[str, Engine], hf: dict[str, Any]
) -> dict[str, Callable[[], Any]]:
    """Prompt batch -> the logits of each prompt's last position (what generation needs; transformers'
    `generate` asks its prefill for those alone too, `logits_to_keep=1`). The engine prefills
    prompts of one length together."""
    out: dict[str, Callable[[], Any]] = {}
    hf = {name: model for name, model in hf.items() if name != COMPILED}  # its prefill is transformers' own

    for name, engine in engines.items():
        def ours(engine: Engine = engine) -> Any:
            engine.max_batch = prompts.shape[0]
            for row in prompts.tolist():
                engine.add_request(row, SamplingParams(max_tokens=1, temperature=0))
            return list(engine.stream())
        out[name] = ours
    prompts_hf = prompts.to(next(iter(hf.values())).device) if hf else prompts
    for name, model in hf.items():
        def theirs(model: Any = model) -> Any:
            with torch.no_grad():
                return model(input_ids=prompts_hf, logits_to_keep=1).logits.argmax(-1).tolist()  # waits
        out[name] = theirs
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    batches = validate(args)
    device = args.device
    on_cpu = device == "cpu"
    dtype = resolve_dtype(args.dtype, device)
    notes = [f"dtype {str(dtype).removeprefix('torch.')}", f"{torch.get_num_threads()} threads"]
    if not on_cpu:
        notes.append(f"device {torch.cuda.get_device_name(device)}")
    hf: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = build_transformers(args, dtype, device)
        reference.save_pretrained(tmp)
        # Every round feeds the same prompts: without prefix caching each reads them anew, as transformers does.
        load = functools.partial(Engine.load, tmp, dtype="bf16" if dtype == torch.bfloat16 else "fp32",
                                 max_batch=max(batches), eos_id=None, prefix_caching=False, device=device,
                                 step=args.step)
        engine = load()
        engines = {"pyramoe": engine}
        if not args.no_pytorch_path and (load_library() is not None or not on_cpu):  # the same weights
            engines["pyramoe-pytorch"] = load(step="pytorch")
        for fmt in quantize_formats(args):
            engines[f"pyramoe-{fmt}"] = load(quantize=fmt)
    if not args.no_transformers:
        if _set_experts(reference, "grouped_mm"):
            hf["transformers"] = reference.to(device)
            eager = None if args.no_plain_moe else build_transformers(args, dtype, device)
            if eager is not None and _set_experts(eager, "eager"):
                hf["plain-moe"] = eager.to(device)
        else:
            hf["transformers"] = reference.to(device)
            notes.append("transformers has no set_experts_implementation: its default experts ran")
        if on_cpu or args.no_compiled_transformers:
            notes.append(f"{COMPILED}: not run ({'CUDA only' if on_cpu else '--no-compiled-transformers'})")
        elif compiled_generate_options() is None:
            notes.append(f"{COMPILED}: not run (this transformers has no CompileConfig)")
        else:
            hf[COMPILED] = hf["transformers"]  # the same model: generate compiles its forward for the static cache
    torch.manual_seed(1)
    prompts = torch.randint(1, args.vocab, (max(batches), args.prompt_len))
    bandwidth = measure_bandwidth() if on_cpu else measure_device_bandwidth(device)
    assert not engine.packed_weights, "decode bytes are counted from the plain weights, before packing"
    rooflines = {b: b * bandwidth / decode_bytes(engine.model, experts_read=experts_touched(args, b)) for b in batches}
    roofline = bandwidth / decode_bytes(engine.model, experts_read=args.top_k)
    notes.append(f"memory read {bandwidth / 1e9:.1f} GB/s -> roofline "
                 + ", ".join(f"{rooflines[b]:.0f} tok/s at batch {b}" for b in batches))
    gemv_floor = None  # oneDNN's GEMVs: a CPU bound
    if on_cpu:
        gemv_floor = 1.0 / measure_gemv_floor(decode_gemv_shapes(engine.model, args.top_k), dtype)
        notes.append(f"the batch-1 step's weight multiplies alone as oneDNN packed GEMVs: {gemv_floor:.0f} tok/s")
    results = []
    for batch in batches:
        fns = runners(args, batch, prompts, engines, hf)
        warm_up(fns, args.new_tokens, notes)
        hf = {name: model for name, model in hf.items() if name in fns}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                long, short = timed(lambda fn=fn: fn(args.new_tokens)), timed(lambda fn=fn: fn(1))
                samples[name].append(batch * (args.new_tokens - 1) / max(long - short, 1e-9))
                print(f"  {name:12s} batch {batch:<3d} {samples[name][-1]:9.1f} tok/s", file=sys.stderr, flush=True)
        for name, values in samples.items():
            row = dict(impl=name, batch=batch, decode_tok_s=statistics.median(values), samples=values)
            if name in engines and engines[name].quantize is not None:  # its own bytes per step
                step_bytes = quantized_decode_bytes(engines[name].model, experts_touched(args, batch))
                row.update(step_bytes=step_bytes, roofline_tok_s=batch * bandwidth / step_bytes)
            results.append(row)
        if batch == batches[0]:
            why = f" ({engine.native_unavailable})" if engine.native_unavailable else ""
            notes.append(f"pyramoe decode step: {engine.decode_path}{why}")
    prefill = {}
    fns = prefill_runners(prompts, engines, hf)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    for name, values in times.items():
        prefill[name] = prompts.numel() / statistics.median(values)
    qualities = []
    if args.quality_checkpoint is not None:
        from pyramoe.bench.quantized_quality import quantized_quality
        from pyramoe.checkpoint import resolve_checkpoint

        # One checkpoint for every format, resolved once: a run still training writes new ones meanwhile.
        checkpoint = resolve_checkpoint(args.quality_checkpoint)
        qualities = [quantized_quality(checkpoint, fmt, args.quality_tokens) for fmt in quantize_formats(args)]
    weights_read = packed_weights_read(engine)
    if weights_read is not None:
        notes.append(f"the engine's packed weights read at {weights_read / 1e9:.1f} GB/s (the VM's memory speed "
                     f"differs between allocations: the roofline takes the bench's best buffer)")
    return {"weights_read_bytes_s": weights_read, "benchmark": "generate", "shape": {k: getattr(args, k) for k in (
        "shape", "hidden", "layers", "experts", "top_k", "intermediate", "heads", "kv_heads", "vocab", "prompt_len",
        "new_tokens")}, "device": device, "machine": machine_info(), "notes": notes, "roofline_tok_s": roofline,
        "rooflines_tok_s": {str(b): v for b, v in rooflines.items()}, "decode_path": engine.decode_path,
        "bandwidth_bytes_s": bandwidth, "gemv_floor_tok_s": gemv_floor, "results": results,
        "prefill_tok_s": prefill, "quality": qualities[0] if qualities else None, "qualities": qualities}


def report(payload: dict[str, Any]) -> str:
    rows = []
    base = {r["batch"]: r["decode_tok_s"] for r in payload["results"] if r["impl"] == "transformers"}
    ours = {r["batch"]: r["decode_tok_s"] for r in payload["results"] if r["impl"] == "pyramoe"}
    for r in payload["results"]:
        vs = r["decode_tok_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        roofline = r.get("roofline_tok_s", payload["rooflines_tok_s"][str(r["batch"])])
        floor = float("nan")
        if r["batch"] == 1 and payload["gemv_floor_tok_s"]:
            floor = r["decode_tok_s"] / payload["gemv_floor_tok_s"]
        native = r["decode_tok_s"] / ours[r["batch"]] if r["batch"] in ours else float("nan")
        rows.append([r["impl"], r["batch"], r["decode_tok_s"], vs, native, roofline, r["decode_tok_s"] / roofline,
                     floor])
    table = format_table(["impl", "batch", "decode tok/s", "x transformers", "x pyramoe", "roofline tok/s",
                          "of roofline", "x oneDNN GEMVs (b1)"], rows)
    prefill = payload["prefill_tok_s"]
    ratio = lambda v: f" ({v / prefill['pyramoe']:.2f}x pyramoe)" if "pyramoe" in prefill else ""  # noqa: E731
    lines = [table, f"prefill tok/s ({payload['shape']['prompt_len']}-token prompts): "
             + ", ".join(f"{name} {value:,.0f}{ratio(value) if name.startswith('pyramoe-int') else ''}"
                         for name, value in prefill.items())]
    for quality in payload.get("qualities") or ([payload["quality"]] if payload.get("quality") else []):
        q = next(name for name in quality["perplexity"] if name != "bf16")
        lines.append(f"quality ({quality['checkpoint']}, step {quality['step']}): held-out perplexity bf16 "
                     f"{quality['perplexity']['bf16']:.4f}, {q} {quality['perplexity'][q]:.4f} "
                     f"({(quality['perplexity_ratio'] - 1) * 100:+.2f}%); greedy tokens equal to bf16's "
                     f"{quality['greedy_agreement']:.1%} of {quality['greedy_tokens']} (common prefix "
                     f"{quality['greedy_common_prefix']:.0f} tokens per prompt on average)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    payload = run(args)
    return print_and_write(report(payload), payload, args.out)
