"""`pyramoe bench all-to-all`: the MoE layer's all-to-all, flat vs hierarchical vs coordinated.

Spawns `--nproc` local processes (or runs under torchrun; one torch thread each) emulating nodes of `--ranks-per-node`
ranks: gloo on the CPU (`--device cpu`, the default), or one per GPU on `cuda:<rank>` over NCCL
(`--device cuda`); every tensor, the counts included, is made on the rank's device. At each size
(tokens per rank x width; fp32 rows on the CPU, bf16 on CUDA, `--dtype` to choose) every rank
routes its tokens to uniformly drawn destination ranks and runs one MoE layer's forward
communication, as `AllToAllDispatcher` does: a counts exchange, the rows out, the rows back.
Schemes (same tokens and destinations for flat and hierarchical):
  flat                      one all_to_all over all ranks (p - 1 peers)
  hierarchical              inside the node first, then across nodes (G - 1 + N - 1 peers)
  coordinated               TP = --tp: each TP rank takes 1/TP of the tokens, the exchange runs
                            among ranks of its TP index, then an all-gather in the TP group
  coordinated-hierarchical  the same with the hierarchical exchange
Schemes run interleaved (round-robin in each repeat, a barrier before each); a repeat's time is the
slowest rank's (on CUDA the device is synchronized before and after the round trip); the table
shows the median over repeats. Messages and bytes are counted from the collectives actually called
(one extra round trip); the byte columns count rows, not the int64 counts. The alpha-beta model
(`pyramoe.comm.cost_model`) is fitted to the medians; the table shows its in-sample error
and its error when each size is predicted from a fit to the other sizes.
`--predict` prints the model's predictions for p = 8 ... 1024 with published (assumed) GPU link
figures instead of measuring.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyramoe.bench.common import machine_info, machine_label, write_json
from pyramoe.comm import ProcessGroups, Topology, build_exchange
from pyramoe.comm import cost_model as cm
from pyramoe.parallel.launch import DistributedFailure
from pyramoe.parallel.tensor import TPTokenSplit
from pyramoe.tables import format_table

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# -- what one rank runs --------------------------------------------------------------------------


@dataclass
class Scheme:
    name: str
    exchange: Any  # pyramoe.comm.Exchange
    group_ranks: list[int]  # global ranks of the exchange's group, in group order
    split: TPTokenSplit | None
    data_index: int  # ranks with the same index hold the same tokens (the TP group)


def build_schemes(names: list[str], topo: Topology, tp: int) -> dict[str, Scheme]:
    """Every rank must call this with the same arguments (group creation is collective)."""
    schemes = {}
    flat_groups = ProcessGroups(topo)
    p = topo.world_size
    for name in ("flat", "hierarchical"):
        if name in names:
            exchange = build_exchange(flat_groups, p, name == "hierarchical")
            schemes[name] = Scheme(name, exchange, list(range(p)), None, topo.rank)
    coordinated = [n for n in names if n.startswith("coordinated")]
    if coordinated:
        ctopo = Topology(p, topo.rank, tp, topo.ranks_per_node)
        groups = ProcessGroups(ctopo)
        split = TPTokenSplit(groups.tp()) if tp > 1 else None
        for name in coordinated:
            exchange = build_exchange(groups, ctopo.dp, name.endswith("hierarchical"))
            schemes[name] = Scheme(name, exchange, ctopo.ep_ranks(ctopo.dp), split, ctopo.dp_index)
    return {n: schemes[n] for n in names}


def rank_device(kind: str, local_rank: int) -> torch.device:
    """The one place a rank's device is chosen: its own GPU, or the CPU."""
    return torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def make_inputs(
    scheme: Scheme, size_index: int, tokens: int, width: int, rank: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's tokens (shared by its TP group) and the destinations of the ones it routes, on
    `device`. Drawn by a CPU generator, so every device and dtype moves the same tokens."""
    data = torch.Generator().manual_seed(10_000 * size_index + scheme.data_index)
    x = torch.randn(tokens, width, generator=data).to(device=device, dtype=dtype)
    routed = tokens if scheme.split is None else _share(tokens, scheme.split)
    route = torch.Generator().manual_seed(10_000 * size_index + 1_000 + rank)
    dest = torch.randint(len(scheme.group_ranks), (routed,), generator=route).to(device=device)
    return x, dest


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a host clock times it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _share(tokens: int, split: TPTokenSplit) -> int:
    chunk = -(-tokens // split.size)
    start = min(dist.get_rank(split.group) * chunk, tokens)
    return min(start + chunk, tokens) - start


def layer_round_trip(scheme: Scheme, x: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Counts out, rows out, rows back (identity experts), unpermuted; gathered in the TP group."""
    rows = x if scheme.split is None else scheme.split.split(x)
    size = len(scheme.group_ranks)
    order = torch.argsort(dest, stable=True)
    send = torch.bincount(dest, minlength=size)
    ones = [1] * size
    recv_counts, _ = scheme.exchange(send.view(-1, 1), ones, ones)
    send_list, recv_list = send.tolist(), recv_counts.view(-1).tolist()
    received, _ = scheme.exchange(rows.index_select(0, order), send_list, recv_list)
    back, _ = scheme.exchange(received, recv_list, send_list)
    out = torch.empty_like(rows)
    out[order] = back
    return out if scheme.split is None else scheme.split.gather(out, x.shape[0])


@contextmanager
def counting_collectives(log: list[dict[str, Any]], ranks_per_node: int):
    """Record peers and bytes of every all_to_all_single / all_gather this rank calls."""
    originals = dist.all_to_all_single, dist.all_gather
    me = dist.get_rank()

    def record(group, sizes: list[int], counts: bool) -> None:  # noqa: ANN001
        entry = dict(counts=counts, peers=0, nonempty=0, intra_peers=0, inter_peers=0, intra_bytes=0, inter_bytes=0)
        for q, nbytes in enumerate(sizes):
            peer = dist.get_global_rank(group, q) if group is not None else q
            if peer == me:
                continue
            where = "intra" if peer // ranks_per_node == me // ranks_per_node else "inter"
            entry["peers"] += 1
            entry["nonempty"] += bool(nbytes)
            entry[f"{where}_peers"] += 1
            entry[f"{where}_bytes"] += nbytes
        log.append(entry)

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):  # noqa: ANN001, A002, ANN202
        n = dist.get_world_size(group)
        row = math.prod(input.shape[1:]) * input.element_size()
        splits = input_split_sizes or [input.shape[0] // n] * n
        record(group, [s * row for s in splits], input.dtype == torch.int64)
        return originals[0](output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    def all_gather(tensor_list, tensor, group=None, **kw):  # noqa: ANN001, ANN202
        record(group, [tensor.numel() * tensor.element_size()] * dist.get_world_size(group), False)
        return originals[1](tensor_list, tensor, group=group, **kw)

    dist.all_to_all_single, dist.all_gather = all_to_all_single, all_gather
    try:
        yield
    finally:
        dist.all_to_all_single, dist.all_gather = originals


def measure_rank(cfg: dict[str, Any], rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """This rank's part of the run (every rank calls it; the process group is joined): tensors on
    `device`, which must be the process group's (gloo: the CPU, NCCL: this rank's GPU)."""
    topo = Topology(world, rank, 1, cfg["ranks_per_node"])
    schemes = build_schemes(cfg["schemes"], topo, cfg["tp"])
    dtype = DTYPES[cfg["dtype"]]
    out: dict[str, Any] = {"rank": rank, "sizes": []}
    with torch.no_grad():
        for index, (tokens, width) in enumerate(cfg["sizes"]):
            inputs = {n: make_inputs(s, index, tokens, width, rank, device, dtype) for n, s in schemes.items()}
            entry: dict[str, Any] = {"tokens": tokens, "width": width, "schemes": {}}
            for name, scheme in schemes.items():
                log: list[dict[str, Any]] = []
                with counting_collectives(log, cfg["ranks_per_node"]):
                    result = layer_round_trip(scheme, *inputs[name])
                entry["schemes"][name] = {"correct": bool(torch.equal(result, inputs[name][0])),
                                          "collectives": log, "samples_ms": []}
            for _ in range(cfg["warmup"]):
                for name, scheme in schemes.items():
                    layer_round_trip(scheme, *inputs[name])
            for _ in range(cfg["repeats"]):
                for name, scheme in schemes.items():
                    dist.barrier()
                    _synchronize(device)
                    start = time.perf_counter()
                    layer_round_trip(scheme, *inputs[name])
                    _synchronize(device)
                    entry["schemes"][name]["samples_ms"].append((time.perf_counter() - start) * 1e3)
            out["sizes"].append(entry)
    return out


def join_and_measure(cfg: dict[str, Any], rank: int, world: int, local_rank: int, **init: Any) -> list[dict[str, Any]]:
    """Join the process group (`init`: its store, or none for torchrun's environment), run this
    rank's part and return every rank's."""
    torch.set_num_threads(1)
    device = rank_device(cfg["device"], local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device), rank=rank, world_size=world, timeout=datetime.timedelta(seconds=cfg["timeout"]),
        device_id=device if device.type == "cuda" else None, **init,
    )
    try:
        mine = measure_rank(cfg, rank, world, device)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        return gathered
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, store_path: str, cfg: dict[str, Any], out_path: str) -> None:
    # One box: the local rank is the rank.
    gathered = join_and_measure(cfg, rank, world, rank, store=dist.FileStore(store_path, world))
    if rank == 0:
        Path(out_path).write_text(json.dumps(gathered))


def torchrun_rank() -> tuple[int, int, int, int] | None:
    """(rank, world size, local rank, local world size) when torchrun started this process."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    env = os.environ
    return (int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
            int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def spawn(cfg: dict[str, Any], nproc: int, wall_timeout: float) -> list[dict[str, Any]]:
    """Run the measurement on `nproc` processes; a failed or hung one ends the run in one line."""
    with tempfile.TemporaryDirectory(prefix="pyramoe-a2a-") as tmp:
        store, out = str(Path(tmp) / "store"), str(Path(tmp) / "ranks.json")
        context = mp.start_processes(_worker, args=(nproc, store, cfg, out), nprocs=nproc, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + wall_timeout
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise DistributedFailure(f"bench all-to-all: ranks still running after {wall_timeout:.0f} s")
        except mp.ProcessRaisedException as exc:
            raise DistributedFailure(f"bench all-to-all: a rank failed: {str(exc).strip().splitlines()[-1]}") from None
        except mp.ProcessExitedException as exc:
            raise DistributedFailure(f"bench all-to-all: {str(exc).strip().splitlines()[0]}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
        return json.loads(Path(out).read_text())


# -- summary, model fit, report --------------------------------------------------------------------


def summarize_ranks(ranks: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per size and scheme: median of the slowest rank per repeat, per-rank messages/bytes."""
    rows = []
    for index, (tokens, width) in enumerate(cfg["sizes"]):
        for name in cfg["schemes"]:
            per_rank = [r["sizes"][index]["schemes"][name] for r in ranks]
            slowest = [max(ms) for ms in zip(*(s["samples_ms"] for s in per_rank))]
            rows.append({
                "tokens": tokens, "width": width, "bytes_per_rank": tokens * width * DTYPES[cfg["dtype"]].itemsize,
                "scheme": name,
                "median_ms": statistics.median(slowest), "min_ms": min(slowest), "max_ms": max(slowest),
                "repeats": len(slowest),
                "correct": all(s["correct"] for s in per_rank),
                "per_rank": [_rank_totals(s["collectives"]) for s in per_rank],
            })
    return rows


def _rank_totals(log: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [c for c in log if not c["counts"]]
    totals = {k: sum(c[k] for c in rows) for k in ("intra_bytes", "inter_bytes")}  # rows only
    totals["count_bytes"] = sum(c["intra_bytes"] + c["inter_bytes"] for c in log if c["counts"])
    return dict(collectives=len(log), messages=sum(c["peers"] for c in log),
                nonempty_messages=sum(c["nonempty"] for c in log), peers_per_call=[c["peers"] for c in log], **totals)


def model_phases(row: dict[str, Any], cfg: dict[str, Any]) -> list[cm.Phase]:
    return cm.round_trip(row["scheme"], cfg["nproc"], cfg["ranks_per_node"], row["bytes_per_rank"], cfg["tp"])


def fit_report(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    """Fit (call, alpha, beta) on every measurement, and per size on the other sizes (held out)."""
    samples = [(model_phases(r, cfg), r["median_ms"] / 1e3) for r in rows]
    network = cm.fit(samples)
    for row, (phases, _) in zip(rows, samples):
        row["model_ms"] = cm.predict(network, phases) * 1e3
        row["model_error"] = row["model_ms"] / row["median_ms"] - 1
    sizes = sorted({r["bytes_per_rank"] for r in rows})
    if len(sizes) > 2:
        for size in sizes:
            train = [s for s, r in zip(samples, rows) if r["bytes_per_rank"] != size]
            held_net = cm.fit(train)
            for row, (phases, _) in zip(rows, samples):
                if row["bytes_per_rank"] == size:
                    row["heldout_ms"] = cm.predict(held_net, phases) * 1e3
                    row["heldout_error"] = row["heldout_ms"] / row["median_ms"] - 1
    errors = [abs(r["model_error"]) for r in rows]
    held = [abs(r["heldout_error"]) for r in rows if "heldout_error" in r]
    return {
        "call_us": network.call_s * 1e6,
        "alpha_us": network.intra.alpha_s * 1e6,
        "beta_ns_per_byte": network.intra.beta_s_per_byte * 1e9,
        "gb_per_s": network.intra.gb_per_s,
        "note": "one link for on- and off-node peers: the emulated nodes share this machine's "
                + ("loopback" if cfg["device"] == "cpu" else "GPU interconnect"),
        "median_abs_error": statistics.median(errors),
        "max_abs_error": max(errors),
        "within_25pct": sum(e <= 0.25 for e in errors),
        "heldout_median_abs_error": statistics.median(held) if held else None,
        "heldout_max_abs_error": max(held) if held else None,
        "heldout_within_25pct": sum(e <= 0.25 for e in held),
        "points": len(rows),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(nproc=args.nproc, ranks_per_node=args.ranks_per_node, tp=args.tp, schemes=parse_schemes(args.schemes),
               sizes=parse_sizes(args.sizes, "--sizes"), repeats=args.repeats, warmup=args.warmup,
               timeout=args.timeout, device=args.device, dtype=resolve_dtype(args.dtype, args.device))
    job = torchrun_rank()
    if job is None:
        ranks = spawn(cfg, args.nproc, args.wall_timeout)
    else:
        rank, world, local_rank, _ = job
        ranks = join_and_measure(cfg, rank, world, local_rank)
    rows = summarize_ranks(ranks, cfg)
    _add_ratios(rows)
    fit = fit_report(rows, cfg)
    return {
        "benchmark": "all-to-all",
        "settings": cfg,
        "machine": {**machine_info(), "label": machine_label(), "load_average": _load_average()},
        "expected_peers_per_exchange": {
            s: cm.peers_per_exchange(s, args.nproc, args.ranks_per_node, args.tp) for s in cfg["schemes"]
        },
        "results": rows,
        "fit": fit,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    flat = {(r["tokens"], r["width"]): r["median_ms"] for r in rows if r["scheme"] == "flat"}
    for r in rows:
        base = flat.get((r["tokens"], r["width"]))
        r["x_flat"] = r["median_ms"] / base if base else None


def _load_average() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def print_report(payload: dict[str, Any]) -> None:
    cfg, fit = payload["settings"], payload["fit"]
    where = "gloo processes (CPU)" if cfg["device"] == "cpu" else "NCCL processes (one GPU each)"
    machine = payload["machine"]
    print(f"all-to-all: {cfg['nproc']} {where}, {cfg['dtype']} rows, {cfg['ranks_per_node']} per emulated node, "
          f"TP={cfg['tp']} for coordinated | {machine['label']} | load average {machine['load_average']}")
    rows = []
    for r in payload["results"]:
        rank0 = r["per_rank"][0]
        messages = sorted({rank["messages"] for rank in r["per_rank"]})
        span = str(messages[0]) if len(messages) == 1 else f"{messages[0]}-{messages[-1]}"
        rows.append([f"{r['tokens']}x{r['width']}", f"{r['bytes_per_rank'] / 1024:.0f}", r["scheme"],
                     payload["expected_peers_per_exchange"][r["scheme"]], span,
                     f"{rank0['intra_bytes'] / 1024:.0f}", f"{rank0['inter_bytes'] / 1024:.0f}",
                     r["median_ms"], r["x_flat"], r["model_ms"], _pct(r["model_error"]), _pct(r.get("heldout_error")),
                     "yes" if r["correct"] else "NO"])
    headers = ["tokens x width", "KiB/rank", "scheme", "peers/exchange", "messages/rank", "intra KiB rows (rank 0)",
               "inter KiB rows (rank 0)", "median ms", "x flat", "model ms", "model err", "held-out err", "correct"]
    print(format_table(headers, rows))
    print(f"model (fitted, one link): {fit['call_us']:.0f} us per collective + {fit['alpha_us']:.1f} us per message + "
          f"{fit['beta_ns_per_byte']:.3f} ns per byte ({fit['gb_per_s']:.2f} GB/s); |error| median "
          f"{_pct(fit['median_abs_error'])}, max {_pct(fit['max_abs_error'])}, {fit['within_25pct']}/{fit['points']} "
          f"within 25%; held out by size: median {_pct(fit['heldout_median_abs_error'])}, max "
          f"{_pct(fit['heldout_max_abs_error'])}, {fit['heldout_within_25pct']}/{fit['points']} within 25%")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.0f}%"


def print_prediction(args: argparse.Namespace) -> None:
    ranks = [8 * 2**i for i in range(8)]  # 8 ... 1024
    print(f"predicted one MoE layer's forward all-to-all (counts, rows out, rows back; coordinated: TP={args.tp}), "
          f"G={args.gpus_per_node} per node, {args.element_bytes}-byte elements")
    print(f"assumptions: {cm.PUBLISHED_GPU_NETWORK_NOTE}; rows spread evenly over destinations")
    for tokens, width in parse_sizes(args.predict_sizes, "--predict-sizes"):
        nbytes = tokens * width * args.element_bytes
        print(f"\n{tokens} tokens x {width} per GPU ({nbytes / 1024:.0f} KiB):")
        rows = []
        for row in cm.predict_table(cm.PUBLISHED_GPU_NETWORK, ranks, args.gpus_per_node, nbytes, args.tp):
            rows.append([row["p"], *(row[f"{s} peers"] for s in cm.SCHEMES), *(row[s] * 1e6 for s in cm.SCHEMES),
                         row["flat"] / row["hierarchical"]])
        headers = ["p", *(f"{s} peers" for s in cm.SCHEMES), *(f"{s} us" for s in cm.SCHEMES), "flat / hier"]
        print(format_table(headers, rows))


# -- arguments -----------------------------------------------------------------------------------


def parse_sizes(text: str, flag: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"{flag}: expected TOKENSxWIDTH items like 256x512, got {item.strip()!r}")
        sizes.append((int(parts[0]), int(parts[1])))
    return sizes


def parse_schemes(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    for name in names:
        if name not in cm.SCHEMES:
            raise ValueError(f"--schemes: unknown scheme {name!r} (choose from {', '.join(cm.SCHEMES)})")
    if not names:
        raise ValueError("--schemes: empty")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nproc", type=int, default=None,
                        help="local processes (ranks) to spawn (default 8); under torchrun its world size")
    parser.add_argument("--ranks-per-node", type=int, default=4, help="ranks per emulated node")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree of the coordinated schemes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo processes; cuda: one process per GPU (cuda:<rank>) over NCCL")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                        help="row dtype (auto: float32 on cpu, bfloat16 on cuda)")
    parser.add_argument("--sizes", default="8x256,128x256,1024x256,1024x1024",
                        help="comma-separated TOKENSxWIDTH per rank")
    parser.add_argument("--schemes", default="flat,hierarchical,coordinated", help=", ".join(cm.SCHEMES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="collective timeout (s) of the process group")
    parser.add_argument("--wall-timeout", type=float, default=900.0, help="end the run after this many seconds")
    parser.add_argument("--out", default="bench-results/all_to_all.json", help="JSON output path")
    parser.add_argument("--predict", action="store_true",
                        help="print the cost model's predictions for p = 8..1024 (assumed GPU links); no processes")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="--predict: G")
    parser.add_argument("--predict-sizes", default="8x2048,2048x2048", help="--predict: TOKENSxWIDTH per GPU")
    parser.add_argument("--element-bytes", type=int, default=2, help="--predict: bytes per element (fp16: 2)")


def validate(args: argparse.Namespace) -> None:
    job = torchrun_rank()
    if job is not None and args.nproc not in (None, job[1]):
        raise ValueError(f"--nproc: {args.nproc} given, but torchrun started {job[1]} processes")
    args.nproc = job[1] if job is not None else args.nproc or 8
    for name in ("nproc", "ranks_per_node", "tp", "repeats", "gpus_per_node", "element_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup: must be >= 0, got {args.warmup}")
    if args.timeout <= 0 or args.wall_timeout <= 0:
        raise ValueError("--timeout/--wall-timeout: must be > 0")
    if args.predict:
        parse_sizes(args.predict_sizes, "--predict-sizes")
        cm.check_layout(8, args.gpus_per_node, args.tp)
        return
    if args.nproc < 2:
        raise ValueError(f"--nproc: an all-to-all needs >= 2 processes, got {args.nproc}")
    if args.nproc % args.ranks_per_node:
        raise ValueError(f"--ranks-per-node: {args.ranks_per_node} does not divide --nproc {args.nproc}")
    schemes = parse_schemes(args.schemes)
    if any(s.startswith("coordinated") for s in schemes) and (args.tp < 2 or args.ranks_per_node % args.tp):
        raise ValueError(f"--tp: coordinated schemes need TP >= 2 dividing --ranks-per-node {args.ranks_per_node}, "
                         f"got {args.tp}")
    parse_sizes(args.sizes, "--sizes")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device: cuda asked for but torch sees no CUDA device")
        gpus = torch.cuda.device_count()
        local = job[3] if job is not None else args.nproc  # processes on this box, one GPU each
        if local > gpus:
            raise ValueError(f"--nproc: {local} processes need {local} GPUs (one each), torch sees {gpus}")


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return name


def main(args: argparse.Namespace) -> int:
    validate(args)
    if args.predict:
        print_prediction(args)
        return 0
    payload = run(args)
    job = torchrun_rank()
    if job is not None and job[0] != 0:
        return 0  # rank 0 reports
    print_report(payload)
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return 0
