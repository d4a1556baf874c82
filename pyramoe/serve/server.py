"""Running the server: uvicorn on the app, the model loaded in the background (the server answers
503 until it is up), one engine loop, and SIGTERM/SIGINT draining - new requests get 503, running
ones finish within the grace period, then the process exits 0.

Under torchrun this runs on rank 0 only, with `lead`: its loop's steps are mirrored on the other
ranks (`pyramoe.serve.distributed`); when one of them stops responding, every request ends with an
error, one line says which rank, and the process exits 1."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass

import uvicorn

from pyramoe.inference import Engine
from pyramoe.inference.loop import EngineLoop
from pyramoe.serve.app import create_app
from pyramoe.serve.chat import ChatTemplate
from pyramoe.serve.distributed import Leader
from pyramoe.serve.state import ServerState

log = logging.getLogger("pyramoe.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_queue: int = 64
    drain_grace_s: float = 30.0
    log_level: str = "warning"
    min_step_s: float = 0.0


def run_server(state: ServerState, load: Callable[[], tuple[Engine, ChatTemplate]], options: ServeOptions,
               announce: Callable[[str], None] = print, lead: Callable[[], Leader] | None = None) -> int:
    """Serve until a signal drains the server; returns the exit status. `load` builds the engine
    (on a background thread, while the server already answers /health with 503). `lead` (rank 0 of
    a torchrun job, called once `load` joined it and the engine is prepared) gives the loop its
    replicator."""
    app = create_app(state)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            timeout_graceful_shutdown=5, lifespan="off")
    server = uvicorn.Server(config)
    failure: list[BaseException] = []
    lost: list[BaseException] = []

    def stop_serving(exc: BaseException) -> None:  # the loop's thread: a rank is gone, requests have ended
        lost.append(exc)
        state.status = "failed"
        print(f"pyramoe serve: {exc}; shutting down", file=sys.stderr, flush=True)
        server.should_exit = True

    def load_engine() -> None:
        try:
            engine, template = load()
            engine.prepare()  # packing and the native build happen here, while /health says "loading"
            # Everything loaded so far (modules, the model's objects) lives as long as the server: out of
            # the collector's reach, full collections, which the per-request objects of a stream
            # trigger every few seconds, no longer walk it (they took ~1/4 of the event loop's
            # samples at 32 clients on the Mixtral shape).
            gc.collect()
            gc.freeze()
            leader = lead() if lead is not None else None  # meets the other ranks, each prepared too
            loop = EngineLoop(engine, options.max_queue, replicate=leader, on_failure=stop_serving,
                              min_step_s=options.min_step_s).start()
            state.attach(engine, loop, template)
            announce(f"pyramoe serve: {state.model_name} ready at http://{options.host}:{_bound_port(server)} "
                     f"({engine.decode_path} step{_products(engine)}, "
                     f"{engine.max_batch} slots x {engine.max_len} positions, "
                     f"KV cache {engine.cache.bytes() / 2**20:.1f} MiB in {engine.cache.allocator.num_blocks} blocks "
                     f"of {engine.cache.block_size}, chat template: {template.name})"
                     f"{f'; {leader.layout}' if leader is not None else ''}")
        except BaseException as exc:  # noqa: BLE001 - reported and ends the server
            failure.append(exc)
            server.should_exit = True

    async def main() -> None:
        asyncio_loop = asyncio.get_running_loop()
        draining = []

        def drain() -> None:
            if draining:  # a second signal: stop now
                server.should_exit = True
                return
            draining.append(asyncio_loop.create_task(_drain(state, server, options.drain_grace_s)))

        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio_loop.add_signal_handler(sig, drain)
        threading.Thread(target=load_engine, name="pyramoe-load", daemon=True).start()
        await server.serve()

    server.capture_signals = contextlib.nullcontext  # ours (above) drain first; uvicorn's would stop at once
    _run(main())
    if state.loop is not None:
        state.loop.stop(timeout=10)  # under torchrun, its last message stops the other ranks
    if lost:
        return 1
    if failure:
        exc = failure[0]
        print(f"pyramoe serve: {exc}" if isinstance(exc, ValueError | OSError) else
              f"pyramoe serve: loading failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 0


def _products(engine: Engine) -> str:
    """", native products: ..." for a native step on bf16 weights (AMX tiles or why not), else ""."""
    return f", native products: {engine.native_products}" if engine.native_products is not None else ""


def _run(main: Coroutine) -> None:
    """On uvloop where it is installed (the `serve` extra): its event loop costs less per wake-up
    and per write than asyncio's, which a stream pays for every chunk. (uvicorn picks httptools
    over h11 by itself when it is installed.)"""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def _bound_port(server: uvicorn.Server) -> int:
    """The port the server listens on (the one the OS chose for port 0)."""
    while not server.started:
        time.sleep(0.01)
    return server.servers[0].sockets[0].getsockname()[1]


async def _drain(state: ServerState, server: uvicorn.Server, grace_s: float) -> None:
    state.status = "draining"
    log.warning("draining: new requests get 503; %d in flight get %.0f s", state.loop.in_flight if state.loop else 0,
                grace_s)
    deadline = time.monotonic() + grace_s
    while state.loop is not None and state.loop.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # the last answers leave the handlers
    server.should_exit = True
