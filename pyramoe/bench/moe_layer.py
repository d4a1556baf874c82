"""`pyramoe bench moe-layer`: one MoE layer, pyramoe vs its peers, measured in the same run.

Rows (all top-1, the same capacity factor and min_capacity):
  pyramoe          the sparse layer (router -> sort-based dispatch -> grouped GEMM -> combine)
  pyramoe-einsum   the same router and experts with GShard/DeepSpeed-style one-hot einsum dispatch
  deepspeed        deepspeed.moe.layer.MoE (DS_ACCELERATOR=cpu, gloo world of 1), if installed
  limit            one dense FFN over all T tokens: the FLOPs every top-1 MoE layer must spend
Ratios are times over the limit in the same run; absolute times vary between runs and machines.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pyramoe.bench.common import (
    machine_info,
    native_bf16_matmul,
    summarize,
    time_call,
    write_json,
)
from pyramoe.config import MoEConfig
from pyramoe.layers import MLP, MoELayer
from pyramoe.layers.dispatch import DenseEinsumDispatcher
from pyramoe.tables import format_table

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class EinsumMoE(nn.Module):
    """pyramoe's router and experts with the dense one-hot einsum dispatch (reference)."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        routing = self.moe.router(x_TD)
        ref = DenseEinsumDispatcher(routing, self.moe.num_experts)
        return ref.combine(self.moe.experts(ref.dispatch(x_TD), None, ref.capacity))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_deepspeed() -> tuple[Any, str]:
    """DeepSpeed's MoE class, or None and why not."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in dict(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed
            from deepspeed.moe.layer import MoE

            if not torch.distributed.is_initialized():
                deepspeed.init_distributed(dist_backend="gloo")
    except Exception as exc:  # noqa: BLE001 - any failure just means the peer is skipped
        return None, f"deepspeed unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return MoE, f"deepspeed {deepspeed.__version__}"


def build_layers(args: argparse.Namespace, num_experts: int, ds_moe: Any) -> dict[str, nn.Module]:
    config = MoEConfig(
        num_experts=num_experts,
        top_k=1,
        capacity_factor=args.capacity_factor,
        eval_capacity_factor=args.capacity_factor,
        min_capacity=args.min_capacity,
    )
    moe = MoELayer(args.d_model, args.d_ff, config)
    layers: dict[str, nn.Module] = {"pyramoe": moe}
    if not args.skip_einsum:
        layers["pyramoe-einsum"] = EinsumMoE(moe)
    if ds_moe is not None:
        expert = nn.Sequential(nn.Linear(args.d_model, args.d_ff), nn.GELU(), nn.Linear(args.d_ff, args.d_model))
        layers["deepspeed"] = ds_moe(
            args.d_model,
            expert=expert,
            num_experts=num_experts,
            ep_size=1,
            k=1,
            capacity_factor=args.capacity_factor,
            eval_capacity_factor=args.capacity_factor,
            min_capacity=args.min_capacity,
            use_rts=False,  # drop by position, as pyramoe's default
        )
    layers["limit"] = MLP(args.d_model, args.d_ff)
    return layers


def _output(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def make_step(layer: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    if mode == "fwd":
        layer.eval()

        def step() -> None:
            with torch.no_grad():
                _output(layer(x))

        return step
    layer.train()
    x = x.detach().requires_grad_()

    def train_step() -> None:
        layer.zero_grad(set_to_none=True)
        _output(layer(x)).float().square().mean().backward()

    return train_step


def measure_interleaved(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, dict]:
    """Round-robin over the implementations, so that machine noise (other processes, clock changes)
    hits them alike instead of biasing whichever ran during a slow spell. On a GPU each call is
    timed to its end (synchronize), not to its launch."""
    if args.device.startswith("cuda"):
        steps = {name: _synchronized(step) for name, step in steps.items()}
    for step in steps.values():
        time_call(step, repeats=0, warmup=args.warmup)
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            samples[name].append(time_call(step, repeats=1, warmup=0)["median_ms"])
    return {name: summarize(values) for name, values in samples.items()}


def _synchronized(step: Callable[[], None]) -> Callable[[], None]:
    def run_to_end() -> None:
        step()
        torch.cuda.synchronize()

    return run_to_end


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    notes = []
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device: cuda asked for but torch sees no CUDA device")
    if args.device.startswith("cuda"):
        notes.append(f"device {torch.cuda.get_device_name()}")
    elif "bf16" in dtypes and not args.force_bf16:
        ok, detail = native_bf16_matmul()
        if not ok:
            dtypes.remove("bf16")
            notes.append(f"bf16 rows skipped: {detail} (no AVX512-BF16/AMX); --force-bf16 runs them anyway")
    ds_moe, ds_note = (None, "deepspeed skipped (--no-deepspeed)") if args.no_deepspeed else load_deepspeed()
    notes.append(ds_note)
    results = []
    for num_experts in [int(e) for e in args.experts.split(",")]:
        layers = build_layers(args, num_experts, ds_moe)
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            x = torch.randn(args.tokens, args.d_model, dtype=dtype).to(args.device)
            for layer in layers.values():
                layer.to(device=args.device, dtype=dtype)
            for mode in args.modes.split(","):
                steps = {name: make_step(layer, x, mode) for name, layer in layers.items()}
                for name, timing in measure_interleaved(steps, args).items():
                    results.append(dict(impl=name, experts=num_experts, dtype=dtype_name, mode=mode, **timing))
                    print(f"  {name:15s} E={num_experts:<3d} {dtype_name} {mode:6s} {timing['median_ms']:9.2f} ms",
                          file=sys.stderr, flush=True)
        del layers
    _add_ratios(results)
    return {
        "benchmark": "moe-layer",
        "shape": dict(tokens=args.tokens, d_model=args.d_model, d_ff=args.d_ff, top_k=1,
                      capacity_factor=args.capacity_factor, min_capacity=args.min_capacity),
        "machine": machine_info(),
        "notes": notes,
        "results": results,
    }


def _add_ratios(results: list[dict[str, Any]]) -> None:
    def key(r: dict[str, Any]) -> tuple:
        return (r["experts"], r["dtype"], r["mode"])

    limits = {key(r): r["median_ms"] for r in results if r["impl"] == "limit"}
    ours = {key(r): r["median_ms"] for r in results if r["impl"] == "pyramoe"}
    for r in results:
        r["x_limit"] = r["median_ms"] / limits[key(r)]
        r["pyramoe_speedup"] = r["median_ms"] / ours[key(r)]


def print_report(payload: dict[str, Any]) -> None:
    shape = payload["shape"]
    print(f"MoE layer: T={shape['tokens']} D={shape['d_model']} F={shape['d_ff']} top-1 "
          f"CF={shape['capacity_factor']} | torch {payload['machine']['torch']}, "
          f"{payload['machine']['threads']} threads, {payload['machine']['cpu_capability']}")
    rows = [
        [r["experts"], r["dtype"], r["mode"], r["impl"], r["median_ms"], r["x_limit"], r["pyramoe_speedup"]]
        for r in payload["results"]
    ]
    headers = ["E", "dtype", "mode", "impl", "median ms", "x limit", "time / pyramoe"]
    print(format_table(headers, rows))
    for note in payload["notes"]:
        print(f"note: {note}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--experts", default="8,64", help="comma-separated expert counts")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
    parser.add_argument("--modes", default="fwd,fwdbwd", help="comma-separated: fwd,fwdbwd")
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--min-capacity", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed peer")
    parser.add_argument("--skip-einsum", action="store_true", help="skip the dense einsum reference")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 even without native bf16 matmul")
    parser.add_argument("--out", default="bench-results/moe_layer.json", help="JSON output path")


def validate(args: argparse.Namespace) -> None:
    for name in ("tokens", "d_model", "d_ff", "repeats", "min_capacity"):
        if getattr(args, name) < (0 if name == "min_capacity" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: must be positive, got {getattr(args, name)}")
    if args.capacity_factor <= 0:
        raise ValueError(f"--capacity-factor: must be > 0, got {args.capacity_factor}")
    for dtype in args.dtypes.split(","):
        if dtype.strip() not in DTYPES:
            raise ValueError(f"--dtypes: unknown dtype {dtype!r} (fp32, bf16)")
    for mode in args.modes.split(","):
        if mode not in ("fwd", "fwdbwd"):
            raise ValueError(f"--modes: unknown mode {mode!r} (fwd, fwdbwd)")
    try:
        experts = [int(e) for e in args.experts.split(",")]
    except ValueError:
        raise ValueError(f"--experts: expected comma-separated integers, got {args.experts!r}") from None
    if any(e < 1 for e in experts):
        raise ValueError("--experts: expert counts must be >= 1")


def main(args: argparse.Namespace) -> int:
    validate(args)
    payload = run(args)
    print_report(payload)
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return 0
