"""One HTTP request's choices through the engine loop: prompts to token ids, sampling settings per
choice, events back on the server's event loop, and the usage and log-probability bookkeeping the
responses share. Aborts every choice still running when the caller goes away (a disconnect, a
timeout, a cancelled task)."""

from __future__ import annotations

import asyncio
import functools
import itertools
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pyramoe.inference import SamplingParams, TokenEvent
from pyramoe.inference.loop import EngineLoop, QueueFull
from pyramoe.serve.metrics import ServerMetrics


class ApiError(Exception):
    """An error answered in OpenAI's error JSON: status, message, the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # (token id, log-probability, alternatives) per new token
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Delta:
    """What one choice gained between two reads of its events: every event that arrived in between,
    merged (a slow reader gets fewer, larger deltas). Its tokens are the last `tokens` of the
    choice's `token_ids` (and of its `logprobs`, when asked)."""

    tokens: int = 0
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


_ids = itertools.count()


class _Handoff:
    """Events from the engine's thread to one event loop. The first event of an engine step
    schedules one wake-up; the step's other events (every request's) join it before the event loop
    runs, so a step costs the event loop one wake-up, not one per request or token."""

    def __init__(self, aio_loop: asyncio.AbstractEventLoop):
        self.aio_loop = aio_loop
        self._lock = threading.Lock()
        self._arrived: list[tuple[Generation, int, TokenEvent]] = []
        self._scheduled = False

    def post(self, generation: Generation, index: int, event: TokenEvent) -> None:
        with self._lock:
            self._arrived.append((generation, index, event))
            if self._scheduled:
                return
            self._scheduled = True
        self.aio_loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            arrived, self._arrived, self._scheduled = self._arrived, [], False
        batches: dict[Generation, list[tuple[int, TokenEvent]]] = {}
        for generation, index, event in arrived:
            batches.setdefault(generation, []).append((index, event))
        for generation, batch in batches.items():
            generation._events.put_nowait(batch)


_handoffs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Handoff] = weakref.WeakKeyDictionary()


def _handoff() -> _Handoff:
    aio_loop = asyncio.get_running_loop()
    handoff = _handoffs.get(aio_loop)
    if handoff is None:
        handoff = _handoffs[aio_loop] = _Handoff(aio_loop)
    return handoff


class Generation:
    """Submits `len(prompts) x n` choices; `events()` gives each choice's new tokens as they arrive,
    merged per read. The engine's thread hands a step's events over to the event loop in one call
    (`_Handoff`), and a choice's events that arrived together become one `Delta`: per-token work
    (a JSON chunk, a write, a client's parse) is paid per read instead."""

    def __init__(self, loop: EngineLoop, metrics: ServerMetrics, timeout_s: float | None, n: int = 1):
        self.loop, self.metrics, self.timeout_s, self.n = loop, metrics, timeout_s, n
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.choices: list[Choice] = []
        self._events: asyncio.Queue[list[tuple[int, TokenEvent]]] = asyncio.Queue()
        self._request_ids: dict[int, str] = {}
        self._open: set[int] = set()

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """`params` holds the n choices' settings; choice i of prompt p is index p * n + i. Raises
        ApiError(429) when the queue is full (nothing of this request stays queued)."""
        handoff = _handoff()
        try:
            for prompt_ids in prompts:
                for choice_params in params:
                    index = len(self.choices)
                    self.choices.append(Choice(index, prompt_ids))
                    request_id = f"{self.id}-{next(_ids)}"
                    sink = functools.partial(handoff.post, self, index)
                    self.loop.submit(prompt_ids, choice_params, request_id, sink)
                    self._request_ids[index] = request_id
                    self._open.add(index)
        except QueueFull as exc:
            self.abort()
            raise ApiError(429, f"the server is busy ({exc}); retry later", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from exc

    async def events(self) -> AsyncIterator[tuple[Choice, Delta]]:
        """Each choice's events merged per read, until every choice finished (each recorded in its
        choice before it is yielded); on timeout, raises ApiError(504) after aborting."""
        start = time.perf_counter()
        last_token: dict[int, float] = {}
        # One timer for the whole request, not `asyncio.wait_for` per read: on Python < 3.12 that
        # wraps every read in a new task and timer, and a stream reads once per engine step.
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self._events.put_nowait([])

        timer = None if self.timeout_s is None else asyncio.get_running_loop().call_later(self.timeout_s, expire)
        try:
            while self._open:
                batch = await self._events.get()
                while not self._events.empty():  # what else arrived while this reader was away
                    batch += self._events.get_nowait()
                if expired:
                    raise ApiError(504, f"the request took longer than the server's {self.timeout_s:g} s limit",
                                   kind="timeout_error")
                deltas: dict[int, Delta] = {}
                now = time.perf_counter()
                for index, event in batch:
                    delta = deltas.get(index)
                    if delta is None:
                        delta = deltas[index] = Delta()
                    self._record(self.choices[index], event, delta, now - start, now, last_token)
                for index, delta in deltas.items():
                    if delta.finished:
                        self._open.discard(index)
                    yield self.choices[index], delta
        finally:
            if timer is not None:
                timer.cancel()
            self.abort()

    def _record(self, choice: Choice, event: TokenEvent, delta: Delta, elapsed: float, now: float,
                last_token: dict[int, float]) -> None:
        if event.prompt_logprobs is not None:
            choice.prompt_logprobs = event.prompt_logprobs
        if event.token_id is not None:
            if choice.index in last_token:
                self.metrics.inter_token.observe(now - last_token[choice.index])
            else:
                self.metrics.time_to_first_token.observe(elapsed)
            last_token[choice.index] = now
            choice.token_ids.append(event.token_id)
            delta.tokens += 1
            if event.logprob is not None:
                choice.logprobs.append((event.token_id, *event.logprob))
        choice.text += event.text
        delta.text += event.text
        if event.finished:
            choice.finish_reason, choice.error = event.finish_reason, event.error
            delta.finished, delta.finish_reason, delta.error = True, event.finish_reason, event.error
            self.metrics.request_latency.observe(elapsed)
            self.metrics.generated_tokens.inc(len(choice.token_ids))

    async def complete(self) -> list[Choice]:
        async for _ in self.events():
            pass
        return self.choices

    def abort(self) -> None:
        for index in list(self._open):
            self.loop.abort(self._request_ids[index])
        self._open.clear()

    def usage(self) -> dict[str, int]:
        prompt = sum(len(c.prompt_ids) for c in self.choices if c.index % self.n == 0)  # once per prompt
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def raise_if_failed(self) -> None:
        failed = next((c for c in self.choices if c.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}", kind="server_error")


