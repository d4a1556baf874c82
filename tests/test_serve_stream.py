"""The streaming path without a server: a choice's events that arrive before the stream reads them
become one chunk whose text, tokens and log-probabilities line up with the per-token ones, and
the chunks' pre-rendered JSON equals what `json.dumps` of the chunk's dict gives."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from pyramoe.inference import SamplingParams, TokenEvent
from pyramoe.serve.completions import _chat_chunks, _chunk, _ChunkTemplate, _completion_chunks
from pyramoe.serve.generation import ApiError, Generation
from pyramoe.serve.metrics import ServerMetrics
from pyramoe.serve.protocol import ChatRequest, CompletionRequest
from pyramoe.serve.state import ServerState

WORDS = ["Hé", " \"quoted\"", "\n", "\\", " ünï", "码", "!"]


class Words:
    def decode(self, ids: list[int]) -> str:
        return "".join(WORDS[i] for i in ids)


class FakeLoop:
    """Takes the submitted choices' sinks; the test plays the engine's thread."""

    def __init__(self):
        self.sinks: list = []

    def submit(self, prompt_ids, params, request_id, sink) -> None:
        self.sinks.append(sink)

    def abort(self, request_id: str) -> None:
        self.aborted = getattr(self, "aborted", []) + [request_id]


def _state() -> ServerState:
    state = ServerState(model_name="m")
    state.engine = SimpleNamespace(tokenizer=Words())
    return state


def _events(choice: int, tokens: list[int]) -> list[TokenEvent]:
    """A choice's events: each token with its log-probability and two alternatives, then the end."""
    events = [TokenEvent(f"r{choice}", t, WORDS[t], logprob=(-0.5 * (i + 1) - choice, [(t, -0.1), (6, -2.0)]))
              for i, t in enumerate(tokens)]
    events[-1].finished, events[-1].finish_reason = True, "length"
    return events


async def _stream(chunks_of, body, per_token: bool) -> list[dict]:
    """The stream's chunks when each event is read before the next arrives (`per_token`), or when
    all arrive before the first read (merged)."""
    state, loop = _state(), FakeLoop()
    generation = Generation(loop, ServerMetrics(), timeout_s=None, n=2)
    generation.submit([[0]], [SamplingParams(max_tokens=4, logprobs=2)] * 2)
    played = [(0, _events(0, [0, 1, 2, 3])), (1, _events(1, [4, 5, 6, 1]))]
    arrivals = [(c, e) for step in range(4) for c, events in played for e in events[step : step + 1]]
    out: list[str] = []

    async def read() -> None:
        async for event in chunks_of(state, body, generation):  # each a whole `data:` line, encoded
            assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
            out.append(event[6:-2].decode())

    if not per_token:
        for choice, event in arrivals:
            loop.sinks[choice](event)
    reader = asyncio.create_task(read())
    if per_token:
        for _ in range(10):  # the reader sends what precedes the tokens (chat's role chunks), then waits
            await asyncio.sleep(0)
        for choice, event in arrivals:
            seen = len(out)
            loop.sinks[choice](event)
            while len(out) == seen:  # one chunk per event read alone
                await asyncio.sleep(0)
    await asyncio.wait_for(reader, 10)
    assert out[-1] == "[DONE]"
    return [json.loads(data) for data in out[:-1]]


def _per_choice(chunks: list[dict], field) -> dict[int, list]:
    got: dict[int, list] = {0: [], 1: []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            got[choice["index"]].append(field(choice))
    return got


def test_merged_completion_chunks_line_up_with_their_tokens():
    body = CompletionRequest.model_validate({"prompt": "x", "max_tokens": 4, "n": 2, "logprobs": 2, "stream": True,
                                             "stream_options": {"include_usage": True}})
    merged = asyncio.run(_stream(_completion_chunks, body, per_token=False))
    content = [c for c in merged if c["choices"]]
    assert len(content) == 2  # one chunk per choice: everything arrived before the first read
    assert merged[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9}
    for index, tokens in ((0, [0, 1, 2, 3]), (1, [4, 5, 6, 1])):
        (choice,) = [c["choices"][0] for c in content if c["choices"][0]["index"] == index]
        text = "".join(WORDS[t] for t in tokens)
        assert choice["text"] == text and choice["finish_reason"] == "length"
        logprobs = choice["logprobs"]
        assert logprobs["tokens"] == [WORDS[t] for t in tokens]
        assert logprobs["token_logprobs"] == [-0.5 * (i + 1) - index for i in range(4)]
        assert logprobs["top_logprobs"] == [{WORDS[t]: -0.1, "!": -2.0} for t in tokens]
        offsets = [len("".join(WORDS[t] for t in tokens[:i])) for i in range(4)]
        assert logprobs["text_offset"] == offsets and all(text[o:].startswith(w) for o, w in
                                                          zip(offsets, logprobs["tokens"]))


def test_chat_chunks_merged_or_not_carry_the_same_text_and_logprobs():
    body = ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "n": 2,
                                       "logprobs": True, "top_logprobs": 2, "stream": True})
    merged = asyncio.run(_stream(_chat_chunks, body, per_token=False))
    single = asyncio.run(_stream(_chat_chunks, body, per_token=True))
    assert len(merged) == 4 and len(single) == 2 + 8  # two role chunks, then one per choice or per token
    for chunks in (merged, single):
        text = _per_choice(chunks, lambda c: c["delta"].get("content", ""))
        assert {i: "".join(t) for i, t in text.items()} == {0: "".join(WORDS[t] for t in [0, 1, 2, 3]),
                                                            1: "".join(WORDS[t] for t in [4, 5, 6, 1])}
        items = _per_choice(chunks, lambda c: (c["logprobs"] or {"content": []})["content"])
        for index, lists in items.items():
            flat = [item for part in lists for item in part]
            assert [item["logprob"] for item in flat] == [-0.5 * (i + 1) - index for i in range(4)]
            assert "".join(item["token"] for item in flat) == "".join(text[index])
        finish = _per_choice(chunks, lambda c: c["finish_reason"])
        assert all(f == [None] * (len(f) - 1) + ["length"] for f in finish.values())


@pytest.mark.parametrize("usage", [True, False])
@pytest.mark.parametrize("kind", ["text_completion", "chat.completion.chunk"])
def test_the_chunk_template_renders_what_json_dumps_gives(usage, kind):
    generation = SimpleNamespace(id="abc", created=123)
    state = ServerState(model_name='a "model" ü')
    template = _ChunkTemplate(generation, state, kind, usage)
    logprobs = {"tokens": ["é"], "token_logprobs": [-0.25], "top_logprobs": [{"é": -0.25}], "text_offset": [3]}
    for text, lp, finish in (("x\"\\\n😀", None, None), ("", logprobs, "length"), ("ü", None, "stop")):
        if kind == "text_completion":
            fields, content = {"text": text}, '"text": ' + json.dumps(text)
        else:
            fields = {"delta": {"content": text} if text else {}}
            content = '"delta": ' + json.dumps(fields["delta"])
        want = _chunk(generation, state, kind, 3, usage=usage, **fields, logprobs=lp, finish_reason=finish)
        assert json.loads(template.render(3, content, lp, finish)) == json.loads(want)


def test_min_step_s_spaces_the_engine_loops_steps():
    """A slowed loop (`--min-step-ms`, what the page test streams against): steps start at least
    `min_step_s` apart, so a 5-token answer takes at least 4 intervals; a negative one is refused."""
    import threading
    import time

    import torch

    from pyramoe.config import ModelConfig, build_layers
    from pyramoe.inference import Engine
    from pyramoe.inference.loop import EngineLoop
    from pyramoe.models import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, max_seq_len=32, d_model=32, n_heads=4,
                            layers=build_layers(2, "every_other", 4, top_k=2, dropless=True))).eval()
    engine = Engine(model, max_batch=2, eos_id=None)
    with pytest.raises(ValueError, match="min_step_s"):
        EngineLoop(engine, min_step_s=-1)
    loop = EngineLoop(engine, min_step_s=0.3).start()  # far longer than a step of this model
    done, tokens = threading.Event(), []

    def sink(event: TokenEvent) -> None:
        tokens.append(event.token_id)
        if event.finished:
            done.set()

    start = time.perf_counter()
    loop.submit([1, 2, 3], SamplingParams(max_tokens=5, temperature=0), "a", sink)
    assert done.wait(60)
    elapsed = time.perf_counter() - start
    loop.stop(10)
    assert len([t for t in tokens if t is not None]) == 5
    assert elapsed >= 4 * 0.3


def test_a_stream_past_the_request_timeout_ends_with_504_and_aborts():
    """The request's one timer: tokens that arrive in time are delivered, then the limit ends the
    stream with 504 and aborts the choice still running."""

    async def run() -> tuple[list[int], ApiError, list[str]]:
        loop = FakeLoop()
        generation = Generation(loop, ServerMetrics(), timeout_s=0.2, n=1)
        generation.submit([[0]], [SamplingParams(max_tokens=4)])
        loop.sinks[0](TokenEvent("r0", 3, "x"))
        got = []

        async def read() -> None:
            async for _, delta in generation.events():
                got.append(delta.tokens)

        with pytest.raises(ApiError) as caught:
            await asyncio.wait_for(read(), 10)  # a timer that never fires fails here, not hangs
        return got, caught.value, loop.aborted

    got, error, aborted = asyncio.run(run())
    assert got == [1] and error.status == 504 and "0.2 s limit" in error.message and len(aborted) == 1
