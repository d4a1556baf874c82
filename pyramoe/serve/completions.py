"""OpenAI's completions and chat completions over the engine loop: plain answers and Server-Sent
Event streams (one chunk per choice per hand-over, built around a pre-rendered head), log-probabilities
in OpenAI's two shapes, echo for scoring."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from pyramoe.serve.chat import ChatTemplateError
from pyramoe.serve.generation import ApiError, Choice, Generation
from pyramoe.serve.protocol import ChatRequest, CompletionRequest
from pyramoe.serve.state import ServerState, budget, checked_prompt, token_text


async def completions(state: ServerState, request: Request, body: CompletionRequest) -> Response:
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of: only best_of == n is supported", "best_of")
    max_tokens = budget(state, body.max_tokens)
    prompts = [checked_prompt(state, p, max_tokens > 0) for p in body.prompts()]
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
        tokens.append(token_text(state, token))
        offset += len(tokens[-1])
    return {
        "tokens": tokens, "token_logprobs": [value for _, value, _ in entries],
        "top_logprobs": [None if top is None else {token_text(state, t): v for t, v in top} for _, _, top in entries],
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
                yield _event(_chunk(generation, state, "text_completion", choice.index,
                                    text=_echoed(state, body, choice)))
        async for choice, delta in generation.events():
            index, error = choice.index, delta.finish_reason == "error"
            logprobs = None
            if body.logprobs is not None and len(choice.logprobs) > sent_logprobs[index]:
                logprobs = _completion_logprobs(state, body, choice, sent_logprobs[index], sent_chars[index])
                sent_logprobs[index] = len(choice.logprobs)
            sent_chars[index] += len(delta.text)
            if delta.tokens or delta.text or (delta.finished and not error):
                yield _event(chunks.render(index, '"text": ' + json.dumps(delta.text), logprobs,
                                           None if error else delta.finish_reason))
            if error:
                yield _event(_stream_error(delta.error))
    except ApiError as exc:
        yield _event(_stream_error(exc.message))
    if include_usage:
        yield _event(json.dumps(_base(generation, state, "text_completion") | {"choices": [],
                                                                               "usage": generation.usage()}))
    yield _event("[DONE]")


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


def _event(data: str) -> bytes:
    """One server-sent event, encoded here rather than by sse-starlette (which builds a
    `ServerSentEvent` and splits the text on line breaks per chunk): `json.dumps` escapes every
    line break, so the text is one `data:` line."""
    return b"data: " + data.encode() + b"\n\n"


def _stream_error(message: str | None) -> str:
    return json.dumps({"error": {"message": message or "generation failed", "type": "server_error", "param": None,
                                 "code": 500}})


# -- chat ---------------------------------------------------------------------------------------------


async def chat(state: ServerState, request: Request, body: ChatRequest) -> Response:
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    try:
        prompt = state.template.render(messages, body.add_generation_prompt)
    except ChatTemplateError as exc:
        raise ApiError(400, str(exc), "messages") from exc
    max_tokens = budget(state, body.generation_budget())
    prompt_ids = checked_prompt(state, prompt, generating=True)
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
        text = token_text(state, token)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {"content": [item(token, value) | {"top_logprobs": [item(t, v) for t, v in top]}
                        for token, value, top in entries]}


async def _chat_chunks(state: ServerState, body: ChatRequest, generation: Generation):
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    kind = "chat.completion.chunk"
    chunks = _ChunkTemplate(generation, state, kind, include_usage)
    sent_logprobs = [0] * len(generation.choices)
    for choice in generation.choices:
        yield _event(_chunk(generation, state, kind, choice.index, usage=include_usage,
                            delta={"role": "assistant", "content": ""}, logprobs=None, finish_reason=None))
    try:
        async for choice, delta in generation.events():
            index, error = choice.index, delta.finish_reason == "error"
            logprobs = None
            if body.logprobs and len(choice.logprobs) > sent_logprobs[index]:
                logprobs = _chat_logprobs(state, choice.logprobs[sent_logprobs[index]:])
                sent_logprobs[index] = len(choice.logprobs)
            if delta.tokens or delta.text or (delta.finished and not error):
                content = '"delta": {"content": ' + json.dumps(delta.text) + "}" if delta.text else '"delta": {}'
                yield _event(chunks.render(index, content, logprobs, None if error else delta.finish_reason))
            if error:
                yield _event(_stream_error(delta.error))
    except ApiError as exc:
        yield _event(_stream_error(exc.message))
    if include_usage:
        yield _event(json.dumps(_base(generation, state, kind) | {"choices": [], "usage": generation.usage()}))
    yield _event("[DONE]")
