"""`pyramoe serve MODEL`: an OpenAI-compatible HTTP server on the continuous-batching engine.

MODEL is what `pyramoe generate` takes: a pyramoe checkpoint or run directory, or a Hugging Face
MoE model directory. Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health, GET /metrics (Prometheus), GET / (a page: prompt box, live expert load), and
/tokenize, /detokenize, /tokenizer_info. Binds to 127.0.0.1 unless --host says otherwise. SIGTERM
or Ctrl-C drains: new requests get 503, running ones finish within --drain-grace seconds.

Expert parallel: `pyramoe serve MODEL --nproc-per-node N --ep N` (or `torchrun --nproc-per-node N
-m pyramoe serve MODEL --ep N`) spreads each MoE layer's experts over N processes; rank 0 serves
HTTP and schedules, the others step with it. Answers are the same as one process's. When a rank
dies, running requests end with an error and the server exits 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pyramoe.cli.generate import (
    add_kv_cache_dtype_argument,
    add_process_arguments,
    add_step_argument,
    check_kv_cache_dtype_flag,
    check_step,
)
from pyramoe.inference.packing import QUANTIZE_HELP
from pyramoe.parallel.launch import argv_without_nproc, world_size_from_env

LEADER_PID_FILE = "PYRAMOE_SERVE_LEADER_PID_FILE"  # where rank 0 writes its pid for `--nproc-per-node`


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible API, metrics, a page)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="MODEL", help="checkpoint, run directory or HF model directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free one)")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N", help="requests decoded together (KV slots)")
    parser.add_argument("--max-len", type=int, default=None, metavar="N",
                        help="prompt + generated tokens per request (default: the model's context, at most 4096)")
    parser.add_argument("--max-step-tokens", type=int, default=256, metavar="N",
                        help="rows of one engine step: decode rows plus prompt chunks")
    parser.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="requests that may wait for a slot; beyond it, 429")
    parser.add_argument("--kv-cache-gib", type=float, default=None, metavar="G",
                        help="KV-cache memory (default: every slot's --max-len positions); requests wait for blocks")
    parser.add_argument("--block-size", type=int, default=16, metavar="N", help="positions per KV-cache block")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="do not share the cached blocks of common prompt prefixes between requests")
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL's)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32 or bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    add_step_argument(parser)
    add_kv_cache_dtype_argument(parser)
    parser.add_argument("--quantize", default=None, metavar="FORMAT",
                        help="quantize the linear layers and experts at load (CPU): " + QUANTIZE_HELP)
    parser.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                        help="a request still running after S seconds is aborted (504)")
    parser.add_argument("--drain-grace", type=float, default=30.0, metavar="S",
                        help="on SIGTERM, running requests get S seconds to finish")
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    parser.add_argument("--min-step-ms", type=float, default=0.0, metavar="MS",
                        help="at least MS between engine steps (a slowed server, for demos and streaming tests)")
    group = add_process_arguments(parser)
    group.add_argument("--dist-timeout", type=float, default=60.0, metavar="S",
                       help="a collective waiting longer than S seconds for a rank ends the server")
    parser.set_defaults(func=main)


DEFAULT_MAX_LEN = 4096


def main(args: argparse.Namespace) -> int:
    try:
        from pyramoe.serve.server import ServeOptions, run_server
        from pyramoe.serve.state import ServerState
    except ImportError as exc:
        print(f"pyramoe serve: needs the serving extra ({exc.name} missing): pip install 'pyramoe[serve]'",
              file=sys.stderr)
        return 2
    path = Path(args.checkpoint)
    if not path.exists():
        print(f"pyramoe serve: MODEL: {path} does not exist", file=sys.stderr)
        return 2
    for name in ("max_batch", "max_step_tokens", "ep", "tp", "block_size"):
        if getattr(args, name) < 1:
            print(f"pyramoe serve: --{name.replace('_', '-')}: must be >= 1", file=sys.stderr)
            return 2
    if args.max_queue < 0 or not 0 <= args.port < 65536:
        print("pyramoe serve: --max-queue must be >= 0 and --port in [0, 65535]", file=sys.stderr)
        return 2
    if args.dist_timeout <= 0:
        print("pyramoe serve: --dist-timeout: must be > 0", file=sys.stderr)
        return 2
    if args.min_step_ms < 0:
        print("pyramoe serve: --min-step-ms: must be >= 0", file=sys.stderr)
        return 2
    try:
        check_step(args.step)
        check_kv_cache_dtype_flag(args.kv_cache_dtype)
    except ValueError as exc:
        print(f"pyramoe serve: {exc}", file=sys.stderr)
        return 2
    from pyramoe.inference.packing import check_quantize

    try:
        check_quantize(args.quantize, "--quantize")
    except ValueError as exc:
        print(f"pyramoe serve: {exc}", file=sys.stderr)
        return 2
    world = world_size_from_env()
    if args.nproc_per_node is not None and world == 1:
        return relaunch(args.nproc_per_node, argv_without_nproc(args.argv))
    if world == 1 and args.ep * args.tp > 1:
        print(f"pyramoe serve: --ep/--tp: EP {args.ep} x TP {args.tp} needs {args.ep * args.tp} processes: add "
              f"--nproc-per-node {args.ep * args.tp} or launch with torchrun", file=sys.stderr)
        return 2
    if world > 1 and int(os.environ.get("RANK", "0")) != 0:
        return follower(args, path)
    if os.environ.get(LEADER_PID_FILE):
        Path(os.environ[LEADER_PID_FILE]).write_text(str(os.getpid()))
    name = args.served_model_name or path.resolve().name
    state = ServerState(model_name=name, api_key=args.api_key, request_timeout_s=args.request_timeout)
    options = ServeOptions(host=args.host, port=args.port, max_queue=args.max_queue, drain_grace_s=args.drain_grace,
                           log_level=args.log_level, min_step_s=args.min_step_ms / 1000)
    lead = None
    if world > 1:
        from pyramoe.serve.distributed import Leader

        layout = f"EP {args.ep}{f' x TP {args.tp}' if args.tp > 1 else ''} over {world} ranks"
        lead = lambda: Leader(layout)  # noqa: E731
    try:
        return run_server(state, lambda: load(args, path, world), options,
                          announce=lambda line: print(line, flush=True), lead=lead)
    finally:
        _leave_job(failed=state.loop is not None and state.loop.failure is not None)


def load(args: argparse.Namespace, path: Path, world: int = 1):
    """The engine (spread over the torchrun job's ranks when there is one) and the chat template."""
    from pyramoe.inference import Engine
    from pyramoe.serve.chat import ChatTemplate

    device = args.device
    if world > 1 and device == "cuda":  # one GPU per local rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    kv_bytes = None if args.kv_cache_gib is None else int(args.kv_cache_gib * 2**30)
    engine = Engine.load(path, dtype=args.dtype, device=device, max_batch=args.max_batch,
                         max_len=args.max_len or DEFAULT_MAX_LEN, max_step_tokens=args.max_step_tokens,
                         kv_cache_bytes=kv_bytes, block_size=args.block_size,
                         prefix_caching=not args.no_prefix_caching, quantize=args.quantize, step=args.step,
                         kv_cache_dtype=args.kv_cache_dtype)
    if world > 1:
        engine.distribute(args.ep, args.tp, timeout_s=args.dist_timeout)
    return engine, ChatTemplate.for_model(path)


def follower(args: argparse.Namespace, path: Path) -> int:
    """A rank other than 0: no HTTP, the engine steps with rank 0's until it says stop."""
    from pyramoe.serve.distributed import follow

    engine, _ = load(args, path, world_size_from_env())
    engine.prepare()
    follow(engine)  # raises DistributedFailure (one line, exit 1) when rank 0 is gone
    _leave_job(failed=False)
    return 0


def _leave_job(failed: bool) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and not failed:  # a dead peer could hang the goodbye
        dist.destroy_process_group()


def relaunch(nproc: int, argv: list[str]) -> int:
    """`pyramoe serve` under torchrun with `nproc` local processes. SIGTERM, SIGINT and SIGHUP go to
    rank 0 (it drains, then stops the other ranks), not to torchrun (which would stop every rank at
    once); torchrun runs in its own process group so that Ctrl-C reaches rank 0 once."""
    if nproc < 1:
        raise ValueError(f"--nproc-per-node: must be >= 1, got {nproc}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "pyramoe", *argv]
    prctl = None
    if sys.platform == "linux":
        import ctypes

        prctl = ctypes.CDLL(None).prctl

    def own_group() -> None:  # in the child: its own process group, and SIGTERM when this process dies
        os.setpgrp()
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    with tempfile.TemporaryDirectory(prefix="pyramoe-serve-") as tmp:
        pid_file = Path(tmp) / "leader.pid"
        process = subprocess.Popen(command, env={**os.environ, LEADER_PID_FILE: str(pid_file)}, preexec_fn=own_group)

        def forward(sig: int, frame: object) -> None:
            try:
                os.kill(int(pid_file.read_text()), sig)
            except (OSError, ValueError):  # rank 0 not started (or gone): torchrun stops them all
                process.send_signal(sig)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            status = process.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if status != 0:
        print(f"pyramoe serve: torchrun exited with status {status}: a rank failed (its error is above)",
              file=sys.stderr)
    return status
