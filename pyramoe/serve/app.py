"""The HTTP layer: OpenAI's completions, chat completions and models endpoints, health, Prometheus
metrics, tokenizer endpoints (what lm-evaluation-harness's remote tokenizer reads) and the page,
over one `EngineLoop`. Thin: parse and validate, submit, shape the answer. Errors are OpenAI's
error JSON with the right status (400 naming the field, 401, 404, 413, 429, 503, 504)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse

from pyramoe.data import Tokenizer
from pyramoe.inference import Engine
from pyramoe.inference.loop import EngineLoop
from pyramoe.serve.chat import ChatTemplate, ChatTemplateError
from pyramoe.serve.generation import ApiError, Choice, Generation
from pyramoe.serve.metrics import ServerMetrics
from pyramoe.serve.protocol import ChatRequest, CompletionRequest

MAX_BODY_BYTES = 4 * 1024 * 1024

log = logging.getLogger("pyramoe.serve")


@dataclass
class ServerState:
    """What the handlers share. `status`: "loading" until the engine is up, "ready", "draining"."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout_s: float | None = 600.0
    status: str = "loading"
    engine: Engine | None = None
    loop: EngineLoop | None = None
    template: ChatTemplate = field(default_factory=lambda: ChatTemplate.for_model(None))
    metrics: ServerMetrics | None = None
    started: float = field(default_factory=time.time)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer if self.engine is not None else None

    def attach(self, engine: Engine, loop: EngineLoop, template: ChatTemplate) -> None:
        self.engine, self.loop, self.template = engine, loop, template
        self.metrics = ServerMetrics(self.expert_counts, self.gauges)
        self.status = "ready"

    def expert_counts(self):
        moe = [i for i, block in enumerate(self.engine.model.blocks) if block.is_moe]
        return moe, self.engine.expert_counts()

    def gauges(self) -> dict[str, float]:
        stats = self.loop.stats
        allocator = self.engine.cache.allocator
        return {"queue_depth": max(0, self.loop.in_flight - stats.running), "running_requests": stats.running,
                "free_slots": self.engine.free_slots, "engine_steps": stats.steps,
                "kv_cache_blocks_used": allocator.used, "kv_cache_blocks": allocator.num_blocks,
                "prefix_cache_hit_tokens": allocator.hit_tokens,
                "prefix_cache_copied_blocks": allocator.copies, "preemptions": self.engine.preemptions}


class _CountRequests:
    """Requests by endpoint and status, as a plain ASGI middleware: Starlette's `BaseHTTPMiddleware`
    would hide a client's disconnect from the handlers (they could not abort its generation)."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_and_note(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if self.state.metrics is not None:
                self.state.metrics.requests.labels(scope["path"], str(status[0])).inc()


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="pyramoe", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.kind, exc.headers)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(404, f"no route {request.method} {request.url.path}", kind="not_found_error")

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", kind="server_error")

    app.add_middleware(_CountRequests, state=state)

    @app.get("/health")
    async def health() -> JSONResponse:
        code = 200 if state.status == "ready" else 503
        return JSONResponse({"status": state.status}, status_code=code)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(state, request)
        card = {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "pyramoe"}
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_len
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(state, request, CompletionRequest)
        return await _completions(state, request, body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _parse(state, request, ChatRequest)
        return await _chat(state, request, body)

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return Response("", media_type="text/plain")
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/stats")
    async def stats() -> JSONResponse:
        """What the page draws: expert load per MoE layer, throughput, queue."""
        if state.engine is None:
            return JSONResponse({"status": state.status})
        layers, counts = state.expert_counts()
        loop_stats = state.loop.stats
        return JSONResponse({
            "status": state.status, "model": state.model_name, "decode_path": state.engine.decode_path,
            "moe_layers": layers, "expert_counts": counts.tolist(),
            "num_experts": [state.engine.model.blocks[i].ffn.config.num_experts for i in layers],
            "running": loop_stats.running,
            "queue": max(0, state.loop.in_flight - loop_stats.running), "steps": loop_stats.steps,
            "generated_tokens": loop_stats.generated_tokens, "prompt_tokens": loop_stats.prompt_tokens,
            "step_seconds": loop_stats.step_seconds, "max_batch": state.engine.max_batch,
        })

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        _authorize(state, request)
        _ready(state)
        tokenizer = _require_tokenizer(state)
        eos = state.engine.eos_id
        return JSONResponse({"tokenizer_class": "pyramoe", "model_max_length": state.engine.max_len,
                             "eos_token_id": eos, "eos_token": tokenizer.decode([eos]) if eos is not None else None,
                             "vocab_size": state.engine.model.config.vocab_size})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        payload = await _json_object(state, request)
        text = payload.get("prompt", payload.get("text"))
        if not isinstance(text, str):
            raise ApiError(400, "prompt: must be a string", "prompt")
        tokens = _require_tokenizer(state).encode(text)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_len})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        payload = await _json_object(state, request)
        tokens = payload.get("tokens")
        vocab = state.engine.model.config.vocab_size if state.engine is not None else 0
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ApiError(400, f"tokens: must be a list of token ids in [0, {vocab})", "tokens")
        return JSONResponse({"prompt": _require_tokenizer(state).decode(tokens)})

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("pyramoe.serve").joinpath("page.html").read_text(encoding="utf-8"))

    return app


# -- request parsing ---------------------------------------------------------------------------------


def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    if header != f"Bearer {state.api_key}":
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", kind="authentication_error")


def _ready(state: ServerState) -> None:
    if state.status != "ready":
        raise ApiError(503, f"the server is {state.status}", kind="service_unavailable",
                       headers={"Retry-After": "1"})


async def _json_body(state: ServerState, request: Request) -> Any:
    _authorize(state, request)
    _ready(state)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise ApiError(413, f"the body is over {state.max_body_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > state.max_body_bytes:
            raise ApiError(413, f"the body is over {state.max_body_bytes} bytes")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    try:  # JSON may escape lone surrogates ("\\ud800"), which no text encoding holds
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the body holds a lone UTF-16 surrogate, which is not text") from None
    return payload


async def _json_object(state: ServerState, request: Request) -> dict:
    payload = await _json_body(state, request)
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object")
    return payload


async def _parse(state: ServerState, request: Request, model: type[BaseModel]) -> Any:
    payload = await _json_object(state, request)
    try:
        body = model.model_validate(payload)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ApiError(400, f"{where}: {error['msg']}", str(error["loc"][0]) if error["loc"] else None) from None
    if body.model is not None and body.model != state.model_name:
        raise ApiError(404, f"model {body.model!r} does not exist; this server serves {state.model_name!r}",
                       "model", kind="not_found_error")
    return body


def _require_tokenizer(state: ServerState) -> Tokenizer:
    if state.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer: send token ids", "prompt")
    return state.tokenizer


def _prompt_ids(state: ServerState, prompt: str | list[int], generating: bool) -> list[int]:
    engine = state.engine
    if isinstance(prompt, str):
        empty = [engine.eos_id if engine.eos_id is not None else 0]  # an empty prompt starts a new document
        ids = _require_tokenizer(state).encode(prompt) if prompt else empty
    else:
        ids = prompt
    vocab = engine.model.config.vocab_size
    if not ids or any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"prompt: needs at least one token, each in [0, {vocab})", "prompt")
    room = engine.max_len - (1 if generating else 0)
    if len(ids) > room:
        raise ApiError(400, f"prompt: {len(ids)} tokens do not fit the server's context of {engine.max_len} tokens"
                       f"{' with room to generate' if generating else ''}", "prompt")
    return ids


def _budget(state: ServerState, requested: int | None) -> int:
    """max_tokens: as asked, or (None) up to the context."""
    return requested if requested is not None else state.engine.max_len


def _token_text(state: ServerState, token: int) -> str:
    return state.tokenizer.decode([token]) if state.tokenizer is not None else f"<{token}>"


# -- completions --------------------------------------------------------------------------------------


async def _completions(state: ServerState, request: Request, body: CompletionRequest) -> Response:
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of: only best_of == n is supported", "best_of")
    max_tokens = _budget(state, body.max_tokens)
    prompts = [_prompt_ids(state, p, max_tokens > 0) for p in body.prompts()]
    scoring = body.echo and body.logprobs is not None
    params = [body.sampling(max_tokens, i, body.logprobs, body.logprobs if scoring else None) for i in range(body.n)]
    generation = _start(state, prompts, params, body.n)
    if body.stream:
        return EventSourceResponse(_completion_chunks(state, body, generation), sep="\n")
    choices = await _collect(request, generation)
    return JSONResponse(_base(generation, state, "text_completion") | {
        "usage": generation.usage(),
        "choices": [{"index": c.index, "text": _echoed(state, body, c) + c.text,
                     "logprobs": _completion_logprobs(state, body, c), "finish_reason": c.finish_reason}
                    for c in choices],
    })


def _start(state: ServerState, prompts: list[list[int]], params: list, n: int) -> Generation:
    for prompt_ids in prompts:
        try:
            state.engine.check_fits(len(prompt_ids), params[0])
        except ValueError as exc:
            raise ApiError(400, str(exc), "prompt") from None
    generation = Generation(state.loop, state.metrics, state.request_timeout_s, n)
    generation.submit(prompts, params)
    state.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    return generation


async def _collect(request: Request, generation: Generation) -> list[Choice]:
    """Every choice to its end; a client that goes away (waiting or running) aborts them."""

    async def watch() -> None:  # the body is read: what comes next is the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        generation.abort()

    watcher = asyncio.create_task(watch())
    try:
        await generation.complete()
    finally:
        watcher.cancel()
    generation.raise_if_failed()
    return generation.choices


def _echoed(state: ServerState, body: CompletionRequest, choice: Choice) -> str:
    if not body.echo:
        return ""
    prompt = body.prompts()[choice.index // body.n]
    return prompt if isinstance(prompt, str) else (state.tokenizer.decode(prompt) if state.tokenizer else "")


def _completion_logprobs(state: ServerState, body: CompletionRequest, choice: Choice,
                         start: int = 0, offset: int = 0) -> dict | None:
    """OpenAI's completion logprobs: tokens, their log-probabilities, the top alternatives as
    {token text: log-probability}, and each token's character offset in the answer's text."""
    if body.logprobs is None:
        return None
    entries: list[tuple[int, float | None, list]] = []
    if body.echo and start == 0:
        scored = choice.prompt_logprobs or [None] * len(choice.prompt_ids)
        entries += [(t, s[0] if s else None, s[1] if s else None) for t, s in zip(choice.prompt_ids, scored)]
    entries += choice.logprobs[start:]
    tokens, offsets = [], []
    for token, _, _ in entries:
        offsets.append(offset)
        tokens.append(_token_text(state, token))
        offset += len(tokens[-1])
    return {
        "tokens": tokens, "token_logprobs": [value for _, value, _ in entries],
        "top_logprobs": [None if top is None else {_token_text(state, t): v for t, v in top} for _, _, top in entries],
        "text_offset": offsets,
    }


async def _completion_chunks(state: ServerState, body: CompletionRequest, generation: Generation):
    """Server-sent events: a chunk per choice per read of its events (every token made since the
    last; OpenAI's clients take multi-token deltas), the finish reason on the last of each choice,
    the usage (when asked) and [DONE]."""
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    chunks = _ChunkTemplate(generation, state, "text_completion", include_usage)
    sent_logprobs = [0] * len(generation.choices)
    sent_chars = [0] * len(generation.choices)
    try:
        if body.echo:
            for choice in generation.choices:
                yield _chunk(generation, state, "text_completion", choice.index, text=_echoed(state, body, choice))
        async for choice, delta in generation.events():
            index, error = choice.index, delta.finish_reason == "error"
            logprobs = None
            if body.logprobs is not None and len(choice.logprobs) > sent_logprobs[index]:
                logprobs = _completion_logprobs(state, body, choice, sent_logprobs[index], sent_chars[index])
                sent_logprobs[index] = len(choice.logprobs)
            sent_chars[index] += len(delta.text)
            if delta.tokens or delta.text or (delta.finished and not error):
                yield chunks.render(index, '"text": ' + json.dumps(delta.text), logprobs,
                                    None if error else delta.finish_reason)
            if error:
                yield _stream_error(delta.error)
    except ApiError as exc:
        yield _stream_error(exc.message)
    if include_usage:
        yield json.dumps(_base(generation, state, "text_completion") | {"choices": [], "usage": generation.usage()})
    yield "[DONE]"


class _ChunkTemplate:
    """A stream's chunks as JSON text around what changes from one to the next (the choice's index,
    its content, log-probabilities and finish reason): `_chunk`'s output, built without a dict and
    a full `json.dumps` per chunk."""

    def __init__(self, generation: Generation, state: ServerState, kind: str, usage: bool):
        self.head = json.dumps(_base(generation, state, kind))[:-1] + ', "choices": [{"index": '
        self.tail = '}], "usage": null}' if usage else "}]}"

    def render(self, index: int, content: str, logprobs: dict | None, finish_reason: str | None) -> str:
        return (f'{self.head}{index}, {content}, "logprobs": {"null" if logprobs is None else json.dumps(logprobs)}, '
                f'"finish_reason": {"null" if finish_reason is None else json.dumps(finish_reason)}{self.tail}')


def _base(generation: Generation, state: ServerState, kind: str) -> dict:
    prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
    return {"id": f"{prefix}-{generation.id}", "object": kind, "created": generation.created,
            "model": state.model_name}


def _chunk(generation: Generation, state: ServerState, kind: str, index: int, usage: bool = False,
           **choice: Any) -> str:
    payload = _base(generation, state, kind) | {"choices": [{"index": index, **choice}]}
    if usage:
        payload["usage"] = None
    return json.dumps(payload)


def _stream_error(message: str | None) -> str:
    return json.dumps({"error": {"message": message or "generation failed", "type": "server_error", "param": None,
                                 "code": 500}})


# -- chat ---------------------------------------------------------------------------------------------


async def _chat(state: ServerState, request: Request, body: ChatRequest) -> Response:
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    try:
        prompt = state.template.render(messages, body.add_generation_prompt)
    except ChatTemplateError as exc:
        raise ApiError(400, str(exc), "messages") from exc
    max_tokens = _budget(state, body.generation_budget())
    prompt_ids = _prompt_ids(state, prompt, generating=True)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = [body.sampling(max_tokens, i, top, None) for i in range(body.n)]
    generation = _start(state, [prompt_ids], params, body.n)
    if body.stream:
        return EventSourceResponse(_chat_chunks(state, body, generation), sep="\n")
    choices = await _collect(request, generation)
    return JSONResponse(_base(generation, state, "chat.completion") | {
        "usage": generation.usage(),
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": _chat_logprobs(state, c.logprobs) if body.logprobs else None,
                     "finish_reason": c.finish_reason} for c in choices],
    })


def _chat_logprobs(state: ServerState, entries: list) -> dict:
    def item(token: int, value: float) -> dict:
        text = _token_text(state, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(token, value) | {"top_logprobs": [item(t, v) for t, v in top]}
                        for token, value, top in entries]}


async def _chat_chunks(state: ServerState, body: ChatRequest, generation: Generation):
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    kind = "chat.completion.chunk"
    chunks = _ChunkTemplate(generation, state, kind, include_usage)
    sent_logprobs = [0] * len(generation.choices)
    for choice in generation.choices:
        yield _chunk(generation, state, kind, choice.index, usage=include_usage,
                     delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None)
    try:
        async for choice, delta in generation.events():
            index, error = choice.index, delta.finish_reason == "error"
            logprobs = None
            if body.logprobs and len(choice.logprobs) > sent_logprobs[index]:
                logprobs = _chat_logprobs(state, choice.logprobs[sent_logprobs[index]:])
                sent_logprobs[index] = len(choice.logprobs)
            if delta.tokens or delta.text or (delta.finished and not error):
                content = '"delta": {"content": ' + json.dumps(delta.text) + "}" if delta.text else '"delta": {}'
                yield chunks.render(index, content, logprobs, None if error else delta.finish_reason)
            if error:
                yield _stream_error(delta.error)
    except ApiError as exc:
        yield _stream_error(exc.message)
    if include_usage:
        yield json.dumps(_base(generation, state, kind) | {"choices": [], "usage": generation.usage()})
    yield "[DONE]"
