"""`pyramoe bench serve`: `pyramoe serve` under load, against the same engine in-process, in one run.

For each model (a tiny Mixtral-shaped one and the `bench generate` Mixtral shape: random weights
built by transformers and saved), the server runs as a subprocess and is driven by 1, 8, 32 and 64
concurrent streaming clients (closed loop: each sends its next request when the last ends; prompts
of `--prompt-len` random token ids, `--max-tokens` greedy tokens with EOS ignored). Per level:
aggregate generated tokens/s, time to first token (request sent to its first chunk), time per output
token (TPOT: per request, first chunk to last over its tokens after the first) and inter-token
latency (ITL: single gaps between chunks; a chunk holds the tokens made since the last) at p50/p99,
all client side, failed requests, and the same requests through
`Engine` in-process (the same number in flight at once, no HTTP) with its tokens/s. Then the
long-prompt phase: `--long-clients` streaming clients while one more keeps sending `--long-prompt`-
token prompts; the streams' ITL p99 against their TPOT p50 says how much prompt reading stalls them.
Writes `bench-results/serve.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pyramoe.bench.common import machine_info, positive_integers, write_json
from pyramoe.inference import Engine, SamplingParams
from pyramoe.tables import format_table

MODELS = {
    "tiny": dict(vocab=2000, hidden=128, layers=2, experts=8, top_k=2, intermediate=256, heads=4, kv_heads=2),
    "mixtral": dict(vocab=32000, hidden=512, layers=8, experts=8, top_k=2, intermediate=1024, heads=8, kv_heads=2),
}
READY = re.compile(r"ready at (http://[\d.]+:\d+)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="tiny,mixtral", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--levels", default="1,8,32,64", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=2, metavar="N", help="requests per client per level")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32, help="the server's slots (--max-batch)")
    parser.add_argument("--max-step-tokens", type=int, default=256, help="rows of one engine step (--max-step-tokens)")
    parser.add_argument("--long-prompt", type=int, default=4000, metavar="N",
                        help="tokens of the prompts sent during the long-prompt phase (0: skip it)")
    parser.add_argument("--long-clients", type=int, default=8, help="streaming clients in the long-prompt phase")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default="bench-results/serve.json")


def save_model(shape: dict[str, int], directory: Path, context: int) -> Path:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        num_local_experts=shape["experts"], num_experts_per_tok=shape["top_k"], max_position_embeddings=context,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(directory)
    return directory


def start_server(model: Path, args: argparse.Namespace, max_len: int, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "pyramoe.cli.main", "serve", str(model), "--port", "0", "--max-batch",
               str(args.max_batch), "--max-len", str(max_len), "--dtype", args.dtype, "--max-queue", "1024",
               "--max-step-tokens", str(args.max_step_tokens)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        match = READY.search(log.read_text(errors="replace"))
        if match:
            return process, match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not start: {log.read_text(errors='replace')[-2000:]}")


async def _stream(session: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request: seconds to the first chunk, gaps between chunks, tokens (from the
    usage chunk: a chunk carries every token made since the last), failure."""
    start = time.perf_counter()
    times, tokens = [], 0
    body = body | {"stream_options": {"include_usage": True}}
    try:
        async with session.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                return {"failed": f"HTTP {response.status}"}
            async for line in response.content:  # the SSE body, line by line (bytes)
                if line.startswith(b"data: {"):
                    payload = json.loads(line[6:])
                    if "error" in payload:
                        return {"failed": payload["error"]["message"]}
                    if payload["choices"]:
                        times.append(time.perf_counter())
                    elif payload.get("usage"):
                        tokens = payload["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - counted, not raised: the bench reports failures
        return {"failed": f"{type(exc).__name__}: {exc}"}
    if not times or not tokens:
        return {"failed": "no chunk or no usage"}
    return {"ttft": times[0] - start, "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": tokens,
            "tpot": (times[-1] - times[0]) / (tokens - 1) if tokens > 1 else None}


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) another process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _timed_drive(url: str, pid: int, clients: int, prompts: list[list[int]], max_tokens: int,
                 background: list[list[int]] | None = None) -> dict[str, Any]:
    """`drive` with the CPU seconds per generated token of the client (this process: nothing else
    runs here meanwhile) and of the server process: CPU time, unlike wall time, does not depend on
    what else the machine runs."""
    client, server = time.process_time(), _process_cpu(pid)
    result = asyncio.run(drive(url, clients, prompts, max_tokens, background))
    client, server = time.process_time() - client, _process_cpu(pid) - server
    tokens = max(result["tokens"], 1)
    return result | {"client_cpu_s": client, "server_cpu_s": server,
                     "client_cpu_per_token_s": client / tokens, "server_cpu_per_token_s": server / tokens}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


async def drive(url: str, clients: int, prompts: list[list[int]], max_tokens: int,
                background: list[list[int]] | None = None) -> dict[str, Any]:
    """`clients` closed-loop streaming clients share `prompts`; with `background`, one more client
    keeps sending those (long) prompts until the others are done."""
    # aiohttp, not httpx: the client shares the server's cores, and aiohttp (C HTTP parser and
    # stream reader) took ~1/3 of httpx's CPU per streamed token (44-86 against 176-238 us, 32
    # clients on the tiny model, interleaved).
    import aiohttp

    queue = list(enumerate(prompts))
    results: list[dict[str, Any]] = []
    done = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=clients + 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as client:

        async def worker() -> None:
            while queue:
                _, prompt = queue.pop()
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                        "stream": True}
                results.append(await _stream(client, url, body))

        async def long_prompts() -> None:
            sent = 0
            while not done.is_set():
                body = {"prompt": background[sent % len(background)], "max_tokens": 1, "stream": True}
                await _stream(client, url, body)
                sent += 1

        start = time.perf_counter()
        extra = [asyncio.create_task(long_prompts())] if background else []
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - start
        done.set()
        for task in extra:
            await task
    ok = [r for r in results if "failed" not in r]
    gaps = [g for r in ok for g in r["gaps"]]
    # Per request, the mean time per token after the first (TPOT): chunks read in bursts (a client
    # slower than the server for a moment) make single gaps ~0 but leave this intact.
    tpots = [r["tpot"] for r in ok if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests": len(results), "failed": len(results) - len(ok),
        "failures": sorted({r["failed"] for r in results if "failed" in r})[:5],
        "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
        "ttft_p50_s": _percentile([r["ttft"] for r in ok], 0.5),
        "ttft_p99_s": _percentile([r["ttft"] for r in ok], 0.99),
        "tpot_p50_s": _percentile(tpots, 0.5), "tpot_p99_s": _percentile(tpots, 0.99),
        "itl_p50_s": _percentile(gaps, 0.5), "itl_p99_s": _percentile(gaps, 0.99),
    }


def in_process(engine: Engine, clients: int, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """The same requests through the engine in this process, `clients` in flight at once."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    pending = list(prompts)
    tokens = 0
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(min(clients, len(pending))):
        engine.add_request(pending.pop(), params)
    while engine.has_unfinished():
        for event in engine.step():
            tokens += event.token_id is not None
            if event.finished and pending:
                engine.add_request(pending.pop(), params)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "cpu_per_token_s": cpu / tokens}


def bench_model(name: str, args: argparse.Namespace, levels: list[int], work: Path) -> dict[str, Any]:
    shape = MODELS[name]
    max_len = max(args.prompt_len + args.max_tokens, args.long_prompt + 2)
    model_dir = save_model(shape, work / name, max_len)
    engine = Engine.load(model_dir, dtype=args.dtype, max_batch=args.max_batch, max_len=max_len, eos_id=None,
                         max_step_tokens=args.max_step_tokens, prefix_caching=False)  # the warm-up's prompts come again
    engine.prepare()
    process, url = start_server(model_dir, args, max_len, work / f"{name}.log")
    rows = []
    try:
        asyncio.run(drive(url, 2, _prompts(shape["vocab"], 4, args.prompt_len, 99), 8))  # warm-up
        in_process(engine, 2, _prompts(shape["vocab"], 4, args.prompt_len, 99), 8)
        for level in levels:
            prompts = _prompts(shape["vocab"], level * args.requests, args.prompt_len, level)
            served = _timed_drive(url, process.pid, level, prompts, args.max_tokens)
            local = in_process(engine, level, prompts, args.max_tokens)
            served["in_process_tokens_per_s"] = local["tokens_per_s"]
            served["in_process_cpu_per_token_s"] = local["cpu_per_token_s"]
            served["vs_in_process"] = served["tokens_per_s"] / local["tokens_per_s"]
            rows.append(served)
            print(f"  {name}: {level} clients: {served['tokens_per_s']:.0f} tok/s served, "
                  f"{local['tokens_per_s']:.0f} in-process, {served['failed']} failed; CPU per token: "
                  f"client {_us(served['client_cpu_per_token_s'])}, server {_us(served['server_cpu_per_token_s'])}, "
                  f"in-process {_us(local['cpu_per_token_s'])}", file=sys.stderr)
        long_phase = None
        if args.long_prompt:
            prompts = _prompts(shape["vocab"], args.long_clients * args.requests, args.prompt_len, 7)
            quiet = _timed_drive(url, process.pid, args.long_clients, prompts, args.max_tokens)
            loaded = _timed_drive(url, process.pid, args.long_clients, prompts, args.max_tokens,
                                  background=_prompts(shape["vocab"], 64, args.long_prompt, 5))
            # The stall a prompt chunk adds to a decode step, against the typical time per token.
            # None where every stream came as one merged chunk (no gap to measure: a slow client).
            itl, tpot = loaded["itl_p99_s"], loaded["tpot_p50_s"]
            long_phase = {"without": quiet, "with_long_prompts": loaded,
                          "itl_p99_over_tpot_p50": itl / tpot if itl is not None and tpot else None}
    finally:
        process.terminate()
        process.wait(60)
    return {"model": name, "shape": shape, "levels": rows, "long_prompt_phase": long_phase,
            "decode_path": engine.decode_path}


def run(args: argparse.Namespace) -> dict[str, Any]:
    levels = positive_integers(args.levels, "--levels")
    names = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown[0]!r}; known: {', '.join(MODELS)}")
    for flag in ("requests", "prompt_len", "max_tokens", "max_batch", "long_clients", "max_step_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(name, args, levels, Path(tmp)) for name in names]
    return {"benchmark": "serve", "machine": machine_info(), "settings": vars(args) | {"func": None},
            "models": results}


def report(payload: dict[str, Any]) -> str:
    lines = []
    for result in payload["models"]:
        rows = [[r["clients"], f"{r['tokens_per_s']:.0f}", f"{r['in_process_tokens_per_s']:.0f}",
                 f"{r['vs_in_process']:.2f}", _ms(r["ttft_p50_s"]), _ms(r["ttft_p99_s"]), _ms(r["tpot_p50_s"]),
                 _ms(r["tpot_p99_s"]), _ms(r["itl_p99_s"]), r["failed"], _us(r["client_cpu_per_token_s"]),
                 _us(r["server_cpu_per_token_s"]), _us(r["in_process_cpu_per_token_s"])] for r in result["levels"]]
        lines.append(f"{result['model']} ({result['decode_path']} step)")
        lines.append(format_table(["clients", "tok/s", "in-process", "served/in-process", "TTFT p50", "TTFT p99",
                                   "TPOT p50", "TPOT p99", "ITL p99", "failed", "client CPU/tok",
                                   "server CPU/tok", "in-process CPU/tok"], rows))
        levels = {r["clients"]: r for r in result["levels"]}
        if 1 in levels and 32 in levels:
            lines.append(f"32 clients / 1 client: {levels[32]['tokens_per_s'] / levels[1]['tokens_per_s']:.2f}x")
        phase = result["long_prompt_phase"]
        if phase:
            loaded = phase["with_long_prompts"]
            quiet = phase["without"]
            lines.append(f"{loaded['clients']} streams while long prompts arrive: "
                         f"TPOT p50 {_ms(loaded['tpot_p50_s'])}, "
                         f"ITL p99 {_ms(loaded['itl_p99_s'])} ({_times(phase['itl_p99_over_tpot_p50'])} TPOT p50); "
                         f"without them TPOT p50 {_ms(quiet['tpot_p50_s'])}, ITL p99 {_ms(quiet['itl_p99_s'])}")
        lines.append("")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.0f} us"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def main(args: argparse.Namespace) -> int:
    payload = run(args)
    print(report(payload))
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    return 0

