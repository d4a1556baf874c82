"""`pyramoe generate MODEL --prompt TEXT | --prompts-file F`: continue prompts with the engine.

MODEL is a pyramoe checkpoint or run directory (its latest checkpoint), or a Hugging Face model
directory (config.json + safetensors + tokenizer.json) of a supported MoE family. Several prompts
(one per line of F, or --prompt repeated) decode together in one continuously batched run. MoE
layers run dropless. Prints each completion, then prompt and decode tokens/s on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.engine import STEPS
from pyramoe.inference.kv_cache import KV_CACHE_DTYPES
from pyramoe.inference.packing import QUANTIZE_HELP, check_quantize
from pyramoe.parallel.launch import argv_without_nproc, relaunch_with_torchrun, world_size_from_env


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("generate", help="generate text from a checkpoint or a Hugging Face MoE directory",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="MODEL", help="checkpoint, run directory or HF model directory")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue (repeatable; default: start a new document)")
    parser.add_argument("--prompts-file", metavar="F", help="one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50, metavar="K", help="sample among the K likeliest (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (1: off)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 where the CPU multiplies bf16 natively, or on CUDA), fp32 or bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_step_argument(parser)
    add_kv_cache_dtype_argument(parser)
    parser.add_argument("--quantize", default=None, metavar="FORMAT",
                        help="quantize the linear layers and experts at load (CPU): " + QUANTIZE_HELP)
    parser.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt)")
    group = add_process_arguments(parser)
    group.add_argument("--expert-slicing", action="store_true",
                       help="with --tp: split every expert's hidden units over TP ranks instead of the MoE tokens")
    parser.set_defaults(func=main)


def add_step_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step", default="auto", metavar="|".join(STEPS),
                        help="the engine's step: auto (CPU: native, else pytorch; CUDA: device where it applies), "
                             "pytorch, or device (fixed shapes, sampling on the device, CUDA graphs on CUDA)")


def add_kv_cache_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kv-cache-dtype", default="auto", metavar="|".join(KV_CACHE_DTYPES),
                        help="the KV cache: auto (the model's dtype), bf16 (a bf16 model's), or int8 "
                             "(int8 rows with an fp32 scale each: half of bf16's bytes, for long contexts)")


def check_kv_cache_dtype_flag(value: str) -> None:
    if value not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype: must be one of {', '.join(KV_CACHE_DTYPES)}, got {value!r}")


def check_step(step: str) -> None:
    if step not in STEPS:
        raise ValueError(f"--step: must be one of {', '.join(STEPS)}, got {step!r}")


def add_process_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--ep, --tp and --nproc-per-node, shared by the commands that run the engine over torchrun ranks."""
    group = parser.add_argument_group("processes (torchrun)")
    group.add_argument("--ep", type=int, default=1, metavar="N",
                       help="spread each MoE layer's experts over min(N, experts) ranks; same tokens as one process")
    group.add_argument("--tp", type=int, default=1, metavar="N",
                       help="split attention heads and each MoE layer's tokens over N ranks")
    group.add_argument("--nproc-per-node", type=int, metavar="N", help="launch N local processes with torchrun")
    return group


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file: {path} is not a file")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file: {path} holds no prompt")
    return prompts or [""]


def main(args: argparse.Namespace) -> int:
    for name in ("max_new_tokens", "max_batch", "ep", "tp"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device: cuda asked for but torch sees no CUDA device")
    check_quantize(args.quantize, "--quantize")
    check_step(args.step)
    check_kv_cache_dtype_flag(args.kv_cache_dtype)
    prompts = read_prompts(args)
    if args.stream and len(prompts) > 1:
        raise ValueError("--stream: streams one prompt; got several")
    if args.nproc_per_node is not None and world_size_from_env() == 1:
        return relaunch_with_torchrun(args.nproc_per_node, argv_without_nproc(args.argv))
    engine = Engine.load(args.checkpoint, dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                         quantize=args.quantize, step=args.step, kv_cache_dtype=args.kv_cache_dtype)
    run = engine.distribute(args.ep, args.tp, expert_slicing=args.expert_slicing)
    engine.prepare()  # a step that cannot run this model says so before any output
    try:
        return _generate(engine, prompts, args, quiet=run is not None and not run.is_main)
    finally:
        if run is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _generate(engine: Engine, prompts: list[str], args: argparse.Namespace, quiet: bool) -> int:
    """Every rank runs the same requests (in lockstep under torchrun); `quiet` ranks print nothing."""
    if engine.tokenizer is None:
        raise ValueError(f"{args.checkpoint}: no tokenizer.json; text prompts need one")
    ids = []
    for i, prompt in enumerate(prompts):
        params = _params(args, seed=args.seed + i)
        ids.append(_add(engine, prompt, params))
    start = time.perf_counter()
    texts = {rid: "" for rid in ids}
    generated = 0
    stream = args.stream and not quiet
    if stream:
        print(prompts[0], end="", flush=True)
    for event in engine.stream():
        texts[event.request_id] += event.text
        generated += event.token_id is not None
        if stream:
            print(event.text, end="", flush=True)
    seconds = time.perf_counter() - start
    if quiet:
        return 0
    if stream:
        print()
    else:
        for prompt, rid in zip(prompts, ids):
            print(prompt + texts[rid])
    prompt_tokens = sum(len(r) for r in (engine.tokenizer.encode(p) for p in prompts))
    print(f"{len(prompts)} prompt(s), {prompt_tokens} prompt tokens, {generated} tokens generated in {seconds:.2f} s "
          f"({generated / max(seconds, 1e-9):,.1f} tok/s, {next(engine.model.parameters()).dtype}, "
          f"{f'{engine.quantize} weights, ' if engine.quantize else ''}"
          f"batch up to {engine.max_batch}, {engine.decode_path} decode step)", file=sys.stderr)
    if engine.decode_path != "native" and engine.native_unavailable:
        print(f"native step unavailable: {engine.native_unavailable}", file=sys.stderr)
    if engine.native_products is not None:
        print(f"native products: {engine.native_products}", file=sys.stderr)  # AMX or why not
    return 0


def _params(args: argparse.Namespace, seed: int) -> SamplingParams:
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=seed, stop=tuple(args.stop))
    try:
        params.validate()
    except ValueError as exc:
        raise ValueError(f"--{str(exc).replace('_', '-')}") from None
    return params


def _add(engine: Engine, prompt: str, params: SamplingParams) -> str:
    ids = engine.tokenizer.encode(prompt) if prompt else [engine.eos_id]
    try:
        return engine.add_request(ids, params)
    except ValueError as exc:
        raise ValueError(f"{exc} (the model's max_seq_len={engine.model.config.max_seq_len})") from None
