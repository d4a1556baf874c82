"""The HTTP layer: OpenAI's completions, chat completions and models endpoints, health, Prometheus
metrics, tokenizer endpoints (what lm-evaluation-harness's remote tokenizer reads) and the page,
over one `EngineLoop`. Thin: parse and validate, submit, shape the answer. Errors are OpenAI's
error JSON with the right status (400 naming the field, 401, 404, 413, 429, 503, 504)."""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from pyramoe.serve import completions as answers
from pyramoe.serve.generation import ApiError
from pyramoe.serve.protocol import ChatRequest, CompletionRequest
from pyramoe.serve.state import (
    ServerState,
    authorize,
    error_response,
    json_object,
    parse_body,
    require_ready,
    require_tokenizer,
)

log = logging.getLogger("pyramoe.serve")


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
        authorize(state, request)
        card = {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "pyramoe"}
        if state.engine is not None:
            card["max_model_len"] = state.engine.max_len
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(state, request, CompletionRequest)
        return await answers.completions(state, request, body)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await parse_body(state, request, ChatRequest)
        return await answers.chat(state, request, body)

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
        authorize(state, request)
        require_ready(state)
        tokenizer = require_tokenizer(state)
        eos = state.engine.eos_id
        return JSONResponse({"tokenizer_class": "pyramoe", "model_max_length": state.engine.max_len,
                             "eos_token_id": eos, "eos_token": tokenizer.decode([eos]) if eos is not None else None,
                             "vocab_size": state.engine.model.config.vocab_size})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        payload = await json_object(state, request)
        text = payload.get("prompt", payload.get("text"))
        if not isinstance(text, str):
            raise ApiError(400, "prompt: must be a string", "prompt")
        tokens = require_tokenizer(state).encode(text)
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_len})

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        payload = await json_object(state, request)
        tokens = payload.get("tokens")
        vocab = state.engine.model.config.vocab_size if state.engine is not None else 0
        if not isinstance(tokens, list) or not all(isinstance(t, int) and 0 <= t < vocab for t in tokens):
            raise ApiError(400, f"tokens: must be a list of token ids in [0, {vocab})", "tokens")
        return JSONResponse({"prompt": require_tokenizer(state).decode(tokens)})

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("pyramoe.serve").joinpath("page.html").read_text(encoding="utf-8"))

    return app
