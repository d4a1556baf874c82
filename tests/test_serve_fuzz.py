"""Hypothesis against a live `pyramoe serve`: malformed JSON, wrong types in every field of
/v1/completions and /v1/chat/completions, huge and negative numbers, NaN and Infinity literals, unicode
and control characters, empty and oversized prompts, nested garbage, bodies over 4 MiB.

The contract: every answer is a 4xx in OpenAI's error JSON ({"error": {"message", "type", "param",
"code"}}, code = the status) or a 200 with a well-formed completion (or stream of chunks ending in
[DONE]); never a 5xx, never a hang (every request has a timeout); the server stays up, ends idle, and a
greedy request answers the same text before and after.

Generated requests ask for at most 8 tokens (16, OpenAI's default, when a completion names none): a field
the server would read as a larger max_tokens is never sent (the huge-numbers test gives one to a prompt
at the end of the context instead).
Inputs that once hit server defects are pinned by the regression tests at the end."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from live_server import server, tiny_run  # noqa: F401
from pydantic import TypeAdapter, ValidationError

TIMEOUT = httpx.Timeout(20.0)
MODEL = "run"  # the served name: the tiny run's directory
MAX_TOKENS = 8
GREEDY = {"prompt": "def f1(x):\n", "temperature": 0, "max_tokens": 8}
ERROR_KEYS = {"message", "type", "param", "code"}
FINISH = {"stop", "length"}
ROLES = ["system", "developer", "user", "assistant", "tool"]


def fuzz_settings(examples: int) -> settings:
    """Sized for ~15 s of fuzzing in all on 2 cores; no example database (every run explores afresh)."""
    return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))


# -- what every answer must look like ------------------------------------------------------------------


def check_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] == response.status_code, error


def check_usage(usage: dict) -> None:
    assert all(isinstance(usage[k], int) and usage[k] >= 0 for k in ("prompt_tokens", "completion_tokens"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_completion(body: dict, chat: bool) -> None:
    assert body["object"] == ("chat.completion" if chat else "text_completion"), body
    assert isinstance(body["id"], str) and isinstance(body["created"], int) and isinstance(body["model"], str)
    check_usage(body["usage"])
    choices = body["choices"]
    assert choices and [c["index"] for c in choices] == list(range(len(choices))), body
    for choice in choices:
        assert choice["finish_reason"] in FINISH, choice
        if chat:
            assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        else:
            assert isinstance(choice["text"], str)
        assert choice["logprobs"] is None or isinstance(choice["logprobs"], dict)


def check_stream(text: str, chat: bool) -> None:
    events = [line[len("data:"):].strip() for line in text.splitlines() if line.startswith("data:")]
    assert events and events[-1] == "[DONE]", text[-500:]
    finished = set()
    indices = set()
    for data in events[:-1]:
        chunk = json.loads(data)
        assert "error" not in chunk, chunk  # an error in a stream is the server's failure (a 5xx in disguise)
        assert chunk["object"] == ("chat.completion.chunk" if chat else "text_completion"), chunk
        for choice in chunk["choices"]:
            indices.add(choice["index"])
            if choice.get("finish_reason") is not None:
                assert choice["finish_reason"] in FINISH, choice
                finished.add(choice["index"])
        if chunk.get("usage"):
            check_usage(chunk["usage"])
    assert indices and finished == indices == set(range(len(indices))), text[-500:]


def check(response: httpx.Response, chat: bool = False) -> None:
    """A 4xx in OpenAI's error JSON, or a 200 with a well-formed completion (or stream)."""
    if response.status_code != 200:
        check_error(response)
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        check_stream(response.text, chat)
    else:
        check_completion(response.json(), chat)


def post(client: httpx.Client, url: str, body) -> httpx.Response:
    """POST a body: a JSON value (dumped with NaN / Infinity literals allowed), text or bytes as given."""
    if isinstance(body, (bytes, str)):
        content = body.encode("utf-8") if isinstance(body, str) else body
    else:
        content = json.dumps(body, allow_nan=True).encode()
    return client.post(url, content=content, headers={"content-type": "application/json"})


def idle(client: httpx.Client, url: str) -> dict[str, float]:
    text = client.get(f"{url}/metrics").text
    return {k: float(v) for k, v in re.findall(r"^pyramoe_(queue_depth|running_requests|free_slots) (\S+)$", text,
                                               re.M)}


@pytest.fixture(scope="module")
def client(server):  # noqa: F811
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        yield http


@pytest.fixture(scope="module")
def baseline(server, client):  # noqa: F811
    """The greedy answer before any fuzzing (computed once, by the first test of the module)."""
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    response = client.post("/v1/completions", json=GREEDY)
    assert response.status_code == 200
    return response.json()["choices"][0]["text"]


@pytest.fixture
def still_serving(server, client, baseline):  # noqa: F811
    """After the test: the process is up, logged no traceback, nothing is left running, and greedy
    answers the same."""
    logged = len(server.output())
    yield
    assert server.process.poll() is None, server.output()[-3000:]
    assert "Traceback" not in server.output()[logged:], server.output()[logged:][-3000:]
    assert idle(client, server.url) == {"queue_depth": 0, "running_requests": 0, "free_slots": 8}
    response = client.post("/v1/completions", json=GREEDY)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == baseline


# -- strategies ----------------------------------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8"), max_size=24)  # unicode and control characters, no lone surrogates
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | TEXT  # floats: NaN and +-Infinity too
GARBAGE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                       max_leaves=8)
HUGE = st.sampled_from([2**63, -(2**63) - 1, 2**64, 10**30, -(10**30), 2**1000, 1e308, -1e308, 1e-308, 5e-324])
_INT = TypeAdapter(int)
_FLOAT = TypeAdapter(float)


def as_int(value) -> int | None:
    """What pydantic (lax, as the server validates) makes of a value for an int field, or None."""
    try:
        return _INT.validate_python(value)
    except (ValidationError, ValueError, TypeError):
        return None


def as_float(value) -> float | None:
    try:
        return _FLOAT.validate_python(value)
    except (ValidationError, ValueError, TypeError):
        return None


def small_budget(value) -> bool:
    """Not a max_tokens the server would accept above 16 (generation stays short)."""
    number = as_int(value)
    return number is None or number <= 16


def bounded(body, chat: bool) -> bool:
    """The server would generate at most MAX_TOKENS (16 without max_tokens in a completion) per choice:
    not a null max_tokens (or, in chat, none at all), which means the whole context, nor a garbage
    value that validates to a large one."""
    if not isinstance(body, dict):
        return True
    budget = body.get("max_completion_tokens") if chat else None
    if budget is None:
        budget = body.get("max_tokens", None if chat else 16)
    return budget is not None and small_budget(budget)


BEYOND = st.sampled_from([-1, 0, 17, 21, 2**63, 2.0000001, -2.0000001, 1.5, "", "8", [], {}, [300], [[]], None])


@st.composite
def request(draw, fields: dict[str, st.SearchStrategy], required: tuple[str, ...], odds: int = 2, tie=None) -> dict:
    """A request body: each field valid (or absent unless required; `tie` makes them agree), then, one
    time in `odds`, up to 2 fields (or an unknown one) replaced by garbage of any JSON type, a huge
    number or a value just beyond a limit."""
    body = {name: draw(value) for name, value in fields.items() if name in required or draw(st.booleans())}
    if tie is not None:
        tie(body)
    if draw(st.sampled_from([False] * (odds - 1) + [True])):  # (hypothesis favours a range's ends)
        for name in draw(st.lists(st.sampled_from([*fields, "unknown"]), min_size=1, max_size=2, unique=True)):
            body[name] = draw(GARBAGE | HUGE | BEYOND)
    return body


def best_of_is_n(body: dict) -> None:
    if "best_of" in body:
        body["best_of"] = body.get("n", 1)


TOKENS = st.lists(st.integers(0, 299), min_size=1, max_size=12)  # the vocabulary is 300
PROMPT = st.one_of(
    TEXT,
    TOKENS,
    st.lists(TEXT, min_size=1, max_size=3),
    st.lists(TOKENS, min_size=1, max_size=3),
    st.integers(200, 3000).map(lambda n: "def f(x): " * n),  # over the context (or not)
    st.integers(250, 300).map(lambda n: [7] * n),
)
SAMPLING = {
    "max_tokens": st.integers(0, MAX_TOKENS),
    "temperature": st.just(0) | st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 400),
    "n": st.integers(1, 4),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": TEXT.filter(bool) | st.lists(TEXT.filter(bool), max_size=8),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "user": TEXT,
    "ignore_eos": st.booleans(),
    "model": st.just(MODEL),
}
COMPLETION = request({
    **SAMPLING,
    "prompt": PROMPT,
    "logprobs": st.integers(0, 20),
    "echo": st.booleans(),
    "best_of": st.just(1),
    "suffix": st.none(),
}, required=("prompt",), tie=best_of_is_n)
PART = request({"type": st.just("text"), "text": TEXT}, required=("type", "text"), odds=8)
MESSAGE = request({
    "role": st.sampled_from(ROLES),
    "content": TEXT | st.lists(PART, max_size=3) | st.none(),
    "name": TEXT,
}, required=("role",), odds=8)
CHAT = request({
    **SAMPLING,
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "max_completion_tokens": st.integers(1, MAX_TOKENS),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "add_generation_prompt": st.booleans(),
}, required=("messages", "max_tokens"))  # without max_tokens, chat generates up to the context


# -- fuzzing -------------------------------------------------------------------------------------------


def test_completions_fuzz(server, client, still_serving):  # noqa: F811
    @fuzz_settings(400)
    @given(body=COMPLETION | GARBAGE)
    def fuzz(body):
        assume(bounded(body, chat=False))
        response = post(client, "/v1/completions", body)
        statuses[response.status_code] += 1
        check(response)

    statuses = Counter()
    fuzz()
    print(statuses)
    assert statuses[200] >= 400 // 5, statuses  # the fuzzing reaches generation, not only validation


def test_chat_fuzz(server, client, still_serving):  # noqa: F811
    @fuzz_settings(300)
    @given(body=CHAT | GARBAGE)
    def fuzz(body):
        assume(bounded(body, chat=True))
        response = post(client, "/v1/chat/completions", body)
        statuses[response.status_code] += 1
        check(response, chat=True)

    statuses = Counter()
    fuzz()
    print(statuses)
    assert statuses[200] >= 300 // 5, statuses  # the fuzzing reaches generation, not only validation


def test_malformed_bodies(server, client, still_serving):  # noqa: F811
    """Raw bytes, valid requests cut short or with bytes spliced in, raw text inside a JSON string."""
    valid = json.dumps({"prompt": "def f(x):", "max_tokens": 2})
    mangled = st.one_of(
        st.binary(max_size=64),
        st.integers(0, len(valid) - 1).map(lambda cut: valid[:cut]),
        st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=8)).map(
            lambda t: valid.encode()[: t[0]] + t[1] + valid.encode()[t[0]:]),
        TEXT.map(lambda text: '{"prompt": "' + text + '", "max_tokens": 2}'),  # raw quotes, controls, backslashes
        st.sampled_from(["", " ", "null", "NaN", "-Infinity", "[]", "{}", '"x"', "1e999", "{" * 50, "]" * 50]),
    )

    @fuzz_settings(200)
    @given(body=mangled, endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    def fuzz(body, endpoint):
        response = post(client, endpoint, body)
        check(response, chat=endpoint.endswith("chat/completions"))
        if response.status_code == 200:
            json.loads(body)  # only a valid body may pass

    fuzz()


def test_tokenizer_endpoints_fuzz(server, client, still_serving):  # noqa: F811
    body = st.one_of(
        request({"prompt": TEXT, "text": TEXT}, required=()),
        request({"tokens": TOKENS}, required=("tokens",)),
        st.dictionaries(TEXT, GARBAGE, max_size=3),
    )  # a body that is not an object: test_tokenizer_endpoints_refuse_a_body_that_is_not_an_object

    @fuzz_settings(150)
    @given(body=body, endpoint=st.sampled_from(["/tokenize", "/detokenize"]))
    def fuzz(body, endpoint):
        response = post(client, endpoint, body)
        if response.status_code != 200:
            check_error(response)
        elif endpoint == "/tokenize":
            answer = response.json()
            assert all(isinstance(t, int) and 0 <= t < 300 for t in answer["tokens"])
            assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == context(client)
        else:
            assert isinstance(response.json()["prompt"], str)

    fuzz()


# -- explicit edge cases -------------------------------------------------------------------------------


def context(client: httpx.Client) -> int:
    return client.get("/v1/models").json()["data"][0]["max_model_len"]


def test_huge_and_negative_numbers_in_every_numeric_field(client, still_serving):
    """Each numeric field at +-2**64, +-1e308 and -1: a 400 naming the field, or (top_k, max_tokens) a
    valid answer; a huge max_tokens stops at the end of the context."""
    end = context(client) - 3
    fields = ["max_tokens", "temperature", "top_p", "top_k", "n", "seed", "logprobs", "best_of", "presence_penalty",
              "frequency_penalty"]
    valid = {("max_tokens", 2**64), ("top_k", 2**64), ("top_k", -1), ("seed", -1), ("presence_penalty", -1),
             ("frequency_penalty", -1)}
    for name in fields:
        for value in (2**64, -(2**64), 1e308, -1e308, -1, math.inf):
            body = {"prompt": [7] * end, "max_tokens": 1, "ignore_eos": True, name: value}
            response = post(client, "/v1/completions", body)
            check(response)
            if (name, value) in valid:
                assert response.status_code == 200, (name, value, response.text)
                assert response.json()["usage"]["completion_tokens"] <= 4
            else:
                assert response.status_code == 400 and response.json()["error"]["param"] == name, response.text
        chat = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": 1, name: -(2**64)})
        check(chat, chat=True)


def test_empty_and_oversized_prompts(client, still_serving):
    size = context(client)
    for prompt, status in [("", 200), ([0], 200), ([], 400), ([[]], 400), ([""], 200), ([7] * (size - 1), 200),
                           ([7] * size, 400), ("def f(x): " * 2000, 400), (["x", [7] * (size + 5)], 400)]:
        response = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        check(response)
        assert response.status_code == status, (str(prompt)[:40], response.text)
        if status == 400:
            assert response.json()["error"]["param"] == "prompt"
    # max_tokens 0 reads the prompt only: the whole context fits (scoring with echo + logprobs)
    response = post(client, "/v1/completions", {"prompt": [7] * size, "max_tokens": 0, "echo": True, "logprobs": 0})
    check(response)
    assert response.status_code == 200 and len(response.json()["choices"][0]["logprobs"]["tokens"]) == size
    chat = post(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 2000}],
                                                 "max_tokens": 1})
    check(chat, chat=True)
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_body_over_4_mib_is_413(client, still_serving, declared):
    body = b'{"prompt": "' + b"a" * (4 * 1024 * 1024) + b'", "max_tokens": 1}'
    content = body if declared else iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    check_error(response)
    assert response.status_code == 413


def test_nan_and_infinity_literals(client, still_serving):
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "max_tokens", "n", "seed"):
        for literal in ("NaN", "Infinity", "-Infinity"):
            response = post(client, "/v1/completions", f'{{"prompt": "x", "max_tokens": 1, "{name}": {literal}}}')
            check_error(response)
            assert response.status_code == 400 and response.json()["error"]["param"] == name
    response = post(client, "/v1/completions", '{"prompt": [1, NaN], "max_tokens": 1}')
    check_error(response)


# -- defects found by fuzzing, fixed: regression tests -------------------------------------------------


@pytest.mark.parametrize(("endpoint", "body"), [
    ("/v1/completions", {"prompt": "x\ud800", "max_tokens": 1}),
    ("/v1/completions", {"prompt": ["ok", "\udfff"], "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud83d"}], "max_tokens": 1}),
    ("/tokenize", {"prompt": "\ud800"}),
], ids=["prompt", "prompt-list", "chat", "tokenize"])
def test_lone_surrogates_are_a_400(client, endpoint, body):
    response = post(client, endpoint, json.dumps(body))  # json.dumps escapes them: "\ud800", valid JSON
    check(response, chat="chat" in endpoint)


@pytest.mark.parametrize("extra", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 5e-324},
                                   {"temperature": 1e-40, "stream": True}], ids=["1e-300", "denormal", "top_p",
                                                                                 "stream"])
def test_tiny_temperature_or_top_p_samples(client, extra):
    check(post(client, "/v1/completions", {"prompt": "def", "max_tokens": 2, "seed": 1, **extra}))


@pytest.mark.parametrize("depth", [100_000, 5_000])
def test_deeply_nested_json_is_a_400(client, depth):
    check(post(client, "/v1/completions", '{"prompt": "x", "max_tokens": 1, "x": ' + "[" * depth + "]" * depth + "}"))


@pytest.mark.parametrize("endpoint", ["/tokenize", "/detokenize"])
@pytest.mark.parametrize("body", ["[1]", '"x"', "null"])
def test_tokenizer_endpoints_refuse_a_body_that_is_not_an_object(client, endpoint, body):
    check_error(post(client, endpoint, body))
