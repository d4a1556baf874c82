"""One thread owns an engine: requests and aborts reach it through a thread-safe command queue that
it drains between steps, and each request's events go back through the callback it came with.

`Engine.step`, `add_request` and `abort` touch the running batch and the KV cache, so only the
loop's thread calls them; a server's handlers (any thread, any event loop) call `submit` and
`abort` here, which only enqueue. The loop sleeps while there is no work.

Under torchrun (experts spread over ranks), rank 0's loop has a `Replicator`: before every step it
is sent the commands the loop applied since the last one, and while idle an empty heartbeat at
least every `heartbeat_s`; the other ranks apply the same commands and step with it
(`pyramoe.serve.distributed.follow`). A replicator or step that fails there is fatal: every request
ends with an error, later submissions too, and `on_failure` is told.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pyramoe.inference.engine import Engine, TokenEvent
from pyramoe.inference.sampling import SamplingParams

log = logging.getLogger("pyramoe.loop")

EventSink = Callable[[TokenEvent], None]


class QueueFull(Exception):
    """More requests than the engine's slots plus the queue's bound are in flight."""


class Replicator(Protocol):
    """Where rank 0's loop sends what it does, for the other ranks to do the same.

    `send(commands, step)`: the commands applied since the last send, in order - ("add",
    prompt_ids, params, request_id) and ("abort", request_id) - and whether a step follows.
    `close()`: the loop ended normally. Either raises when the other ranks cannot be reached."""

    heartbeat_s: float

    def send(self, commands: list[tuple], step: bool) -> None: ...

    def close(self) -> None: ...


@dataclass
class LoopStats:
    """What the loop has done, read by metrics (ints and floats: reading them needs no lock)."""

    steps: int = 0
    step_seconds: float = 0.0
    running: int = 0  # requests holding a KV-cache slot after the last step
    waiting: int = 0  # admitted to the engine, no slot yet
    generated_tokens: int = 0
    prompt_tokens: int = 0
    failed_steps: int = 0


class EngineLoop:
    """Runs `engine.step()` on its own thread while any request is unfinished.

    `max_queue`: requests that may wait for a slot; beyond `engine.max_batch + max_queue` in flight,
    `submit` raises `QueueFull` (backpressure, a 429 for a server). `on_step(events)` is called on
    the loop's thread after every step (metrics). `replicate` (rank 0 of a torchrun job) mirrors
    the loop on the other ranks; `on_failure(exc)` is called on the loop's thread when it or a step
    fails, after every request got an error event. `min_step_s`: steps start at least this far
    apart (a slowed loop: streaming tests see each step's tokens arrive on their own)."""

    def __init__(self, engine: Engine, max_queue: int = 64, on_step: Callable[[list[TokenEvent]], None] | None = None,
                 replicate: Replicator | None = None, on_failure: Callable[[BaseException], None] | None = None,
                 min_step_s: float = 0.0):
        if max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {max_queue}")
        if min_step_s < 0:
            raise ValueError(f"min_step_s: must be >= 0, got {min_step_s}")
        self.min_step_s = min_step_s
        self.engine, self.max_queue, self.on_step = engine, max_queue, on_step
        self.replicate, self.on_failure = replicate, on_failure
        self.failure: BaseException | None = None  # set when replication or a replicated step failed
        self._applied: list[tuple] = []  # commands applied since the last send (replicated loops only)
        self._last_send = time.monotonic()
        self._last_step = 0.0
        self.stats = LoopStats()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, EventSink] = {}  # the loop thread's: request id -> where its events go
        self._in_flight = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pyramoe-engine", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished."""
        return self._in_flight

    @property
    def capacity(self) -> int:
        return self.engine.max_batch + self.max_queue

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str, sink: EventSink) -> None:
        """Queue a request (token ids, validated by the caller); its events go to `sink`, called on
        the loop's thread, the last one with `finished`."""
        with self._lock:
            failure = self.failure
            if failure is None:
                if self._in_flight >= self.capacity:
                    raise QueueFull(f"{self._in_flight} requests in flight, the limit is {self.capacity}")
                self._in_flight += 1
                self._commands.put(("add", prompt_ids, params, request_id, sink))
        if failure is not None:  # the loop has ended: no step would ever answer
            sink(TokenEvent(request_id, None, "", True, "error", error=str(failure)))

    def abort(self, request_id: str) -> None:
        """Drop a request (a client went away); its sink gets an "abort" event unless it finished."""
        self._commands.put(("abort", request_id))

    def stop(self, timeout: float | None = None) -> None:
        """Abort everything unfinished and end the thread."""
        self._stopping.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    # -- the loop's thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except Exception as exc:
            if self.replicate is None:
                raise
            self._fail_everything(exc)  # the ranks are out of step: nothing more can run

    def _serve(self) -> None:
        engine = self.engine
        while not self._stopping.is_set():
            idle = not engine.has_unfinished()
            try:
                command = self._commands.get(timeout=self._idle_wait()) if idle else self._commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                self._apply(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if engine.has_unfinished():
                self._send(step=True)
                self._step()
            elif self.replicate is not None and (
                    self._applied or time.monotonic() - self._last_send >= self.replicate.heartbeat_s):
                self._send(step=False)  # a heartbeat: the other ranks wait inside a collective
        for request_id in list(self._sinks):
            self._apply(("abort", request_id))
        if engine.has_unfinished():
            self._send(step=True)
            self._deliver(engine.step())
        if self.replicate is not None:
            self.replicate.close()

    def _idle_wait(self) -> float:
        """How long an idle loop waits for a command: until the next heartbeat is due, at most 0.5 s."""
        if self.replicate is None:
            return 0.5
        return min(0.5, max(0.001, self._last_send + self.replicate.heartbeat_s - time.monotonic()))

    def _send(self, step: bool) -> None:
        if self.replicate is not None:
            commands, self._applied = self._applied, []
            self.replicate.send(commands, step)
            self._last_send = time.monotonic()

    def _fail_everything(self, exc: BaseException) -> None:
        """Replication failed: every request (running, or still in the queue) ends with an error."""
        with self._lock:
            self.failure = exc
        events = [TokenEvent(request_id, None, "", True, "error", error=str(exc)) for request_id in self._sinks]
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                self._sinks[command[3]] = command[4]
                events.append(TokenEvent(command[3], None, "", True, "error", error=str(exc)))
        self._deliver(events)
        if self.on_failure is not None:
            self.on_failure(exc)

    def _apply(self, command: tuple) -> None:
        if command[0] == "add":
            _, prompt_ids, params, request_id, sink = command
            if self.replicate is not None and not params.greedy and params.seed is None:
                # Each rank would seed its generator differently: rank 0 chooses for all.
                params = dataclasses.replace(params, seed=random.getrandbits(63))
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except ValueError as exc:
                self._finish(request_id)
                sink(TokenEvent(request_id, None, "", True, "error", error=str(exc)))
                return
            self._sinks[request_id] = sink
            self.stats.prompt_tokens += len(prompt_ids)
            if self.replicate is not None:
                self._applied.append(("add", prompt_ids, params, request_id))
        elif command[0] == "abort":
            self.engine.abort(command[1])
            if self.replicate is not None:
                self._applied.append(command)

    def _step(self) -> None:
        start = time.perf_counter()
        if self.min_step_s:
            wait = self._last_step + self.min_step_s - start
            if wait > 0:
                time.sleep(wait)
                start = time.perf_counter()
            self._last_step = start
        try:
            events = self.engine.step()
        except Exception:  # a defect outside any one request: fail them all, keep serving
            if self.replicate is not None:  # ... unless other ranks step with this one: they are out of step
                raise
            log.exception("engine step failed; ending every request in it")
            self.stats.failed_steps += 1
            events = []
            for request_id in list(self._sinks):
                self.engine.abort(request_id)
            for event in self.engine.step() if self.engine.has_unfinished() else []:
                events.append(TokenEvent(event.request_id, None, "", True, "error", error="engine step failed"))
        self.stats.steps += 1
        self.stats.step_seconds += time.perf_counter() - start
        self.stats.running, self.stats.waiting = len(self.engine.active), len(self.engine.waiting)
        self._deliver(events)

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            self.stats.generated_tokens += event.token_id is not None
            sink = self._sinks.get(event.request_id)
            if event.finished:
                self._sinks.pop(event.request_id, None)
                self._finish(event.request_id)
            if sink is not None:
                try:
                    sink(event)
                except Exception:  # a broken sink (its client's loop closed) loses its own events only
                    log.exception("event sink of %s failed", event.request_id)
        if self.on_step is not None:
            self.on_step(events)

    def _finish(self, request_id: str) -> None:
        with self._lock:
            self._in_flight -= 1
