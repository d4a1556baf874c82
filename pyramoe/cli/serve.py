"""`pyramoe serve MODEL`: an OpenAI-compatible HTTP server on the continuous-batching engine.

MODEL is what `pyramoe generate` takes: a pyramoe checkpoint or run directory, or a Hugging Face
MoE model directory. Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health, GET /metrics (Prometheus), GET / (a page: prompt box, live expert load), and
/tokenize, /detokenize, /tokenizer_info. Binds to 127.0.0.1 unless --host says otherwise. SIGTERM
or Ctrl-C drains: new requests get 503, running ones finish within --drain-grace seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    parser.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL's)")
    parser.add_argument("--dtype", default="auto", help="auto, fp32 or bf16")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                        help="a request still running after S seconds is aborted (504)")
    parser.add_argument("--drain-grace", type=float, default=30.0, metavar="S",
                        help="on SIGTERM, running requests get S seconds to finish")
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    parser.set_defaults(func=main)


DEFAULT_MAX_LEN = 4096


def main(args: argparse.Namespace) -> int:
    try:
        from pyramoe.serve.app import ServerState
        from pyramoe.serve.server import ServeOptions, run_server
    except ImportError as exc:
        print(f"pyramoe serve: needs the serving extra ({exc.name} missing): pip install 'pyramoe[serve]'",
              file=sys.stderr)
        return 2
    path = Path(args.checkpoint)
    if not path.exists():
        print(f"pyramoe serve: MODEL: {path} does not exist", file=sys.stderr)
        return 2
    for name in ("max_batch", "max_step_tokens"):
        if getattr(args, name) < 1:
            print(f"pyramoe serve: --{name.replace('_', '-')}: must be >= 1", file=sys.stderr)
            return 2
    if args.max_queue < 0 or not 0 <= args.port < 65536:
        print("pyramoe serve: --max-queue must be >= 0 and --port in [0, 65535]", file=sys.stderr)
        return 2
    name = args.served_model_name or path.resolve().name
    state = ServerState(model_name=name, api_key=args.api_key, request_timeout_s=args.request_timeout)
    options = ServeOptions(host=args.host, port=args.port, max_queue=args.max_queue, drain_grace_s=args.drain_grace,
                           log_level=args.log_level)
    return run_server(state, lambda: load(args, path), options, announce=lambda line: print(line, flush=True))


def load(args: argparse.Namespace, path: Path):
    from pyramoe.inference import Engine
    from pyramoe.serve.chat import ChatTemplate

    engine = Engine.load(path, dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                         max_len=args.max_len or DEFAULT_MAX_LEN, max_step_tokens=args.max_step_tokens)
    return engine, ChatTemplate.for_model(path)
