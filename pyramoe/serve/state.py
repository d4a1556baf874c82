"""What the HTTP handlers share: the server's state, OpenAI's error JSON, and parsing and checking a
request (key, readiness, body size, JSON, the pydantic model, the prompt's tokens)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from pyramoe.data import Tokenizer
from pyramoe.inference import Engine
from pyramoe.inference.loop import EngineLoop
from pyramoe.serve.chat import ChatTemplate
from pyramoe.serve.generation import ApiError
from pyramoe.serve.metrics import ServerMetrics

MAX_BODY_BYTES = 4 * 1024 * 1024


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


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    if header != f"Bearer {state.api_key}":
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", kind="authentication_error")


def require_ready(state: ServerState) -> None:
    if state.status != "ready":
        raise ApiError(503, f"the server is {state.status}", kind="service_unavailable",
                       headers={"Retry-After": "1"})


async def json_body(state: ServerState, request: Request) -> Any:
    authorize(state, request)
    require_ready(state)
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


async def json_object(state: ServerState, request: Request) -> dict:
    payload = await json_body(state, request)
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object")
    return payload


async def parse_body(state: ServerState, request: Request, model: type[BaseModel]) -> Any:
    payload = await json_object(state, request)
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


def require_tokenizer(state: ServerState) -> Tokenizer:
    if state.tokenizer is None:
        raise ApiError(400, "this model has no tokenizer: send token ids", "prompt")
    return state.tokenizer


def checked_prompt(state: ServerState, prompt: str | list[int], generating: bool) -> list[int]:
    engine = state.engine
    if isinstance(prompt, str):
        empty = [engine.eos_id if engine.eos_id is not None else 0]  # an empty prompt starts a new document
        ids = require_tokenizer(state).encode(prompt) if prompt else empty
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


def budget(state: ServerState, requested: int | None) -> int:
    """max_tokens: as asked, or (None) up to the context."""
    return requested if requested is not None else state.engine.max_len


def token_text(state: ServerState, token: int) -> str:
    return state.tokenizer.decode([token]) if state.tokenizer is not None else f"<{token}>"
