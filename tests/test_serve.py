"""`pyramoe serve` as a user meets it: a live server process on an ephemeral port, the official
`openai` client. Completions and chat, plain and streamed, n, logprobs, echo, usage; answers equal
the in-process engine's; 16 concurrent greedy requests equal each alone; errors in OpenAI's shapes
(400, 401, 404, 413, 429, 503); SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from live_server import server, start_server, tiny_run  # noqa: F401 - fixtures

from pyramoe.inference import Engine, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def fp32_server(tiny_run, tmp_path_factory):  # noqa: F811
    live = start_server(tiny_run, tmp_path_factory.mktemp("log") / "serve.log", "--dtype", "fp32",
                        "--max-batch", "8")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(fp32_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fp32_server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engine(tiny_run) -> Engine:  # noqa: F811
    return Engine.load(tiny_run, dtype="fp32", max_batch=1)


def model_name(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


PROMPTS = ["def f1(x):\n", "def", "    return x + 3\n\ndef f2", "import os\nimport sys\n\n\ndef main():\n    return"]


def test_models_and_health(fp32_server, client, tiny_run):  # noqa: F811
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_run.name]
    assert httpx.get(f"{fp32_server.url}/health").json() == {"status": "ready"}


def test_greedy_completion_equals_the_engine_in_process(client, engine):
    for prompt in PROMPTS:
        answer = client.completions.create(model=model_name(client), prompt=prompt, max_tokens=12, temperature=0)
        want = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
        assert answer.choices[0].text == want.text
        assert answer.choices[0].finish_reason == want.finish_reason
        assert answer.usage.prompt_tokens == len(want.prompt_ids)
        assert answer.usage.completion_tokens == len(want.token_ids)


def test_streamed_equals_plain_with_usage(client):
    name = model_name(client)
    plain = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=16, temperature=0)
    stream = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=16, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_streamed_logprobs_line_up_with_the_plain_answer(client):
    """However the stream merges tokens into chunks, its tokens, log-probabilities and text offsets
    put together are the plain answer's."""
    args = dict(model=model_name(client), prompt=PROMPTS[2], max_tokens=12, temperature=0, logprobs=2)
    plain = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert tokens == plain.logprobs.tokens and "".join(tokens) == "".join(c.text for c in chunks) == plain.text
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert values == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == plain.logprobs.text_offset
    assert [list(t) for c in chunks if c.logprobs for t in c.logprobs.top_logprobs] == \
        [list(t) for t in plain.logprobs.top_logprobs]


def test_chat_plain_and_streamed(client):
    name = model_name(client)
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def f1(x):"}]
    plain = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=name, messages=messages, max_tokens=10, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == plain.choices[0].message.content


def test_n_choices_with_a_seed_are_reproducible(client):
    name = model_name(client)
    args = dict(model=name, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=11)
    first, again = client.completions.create(**args), client.completions.create(**args)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) if c.logprobs else 0 for c in first.choices) or \
        first.usage.completion_tokens >= 3


@torch.no_grad()
def test_logprobs_and_echo_equal_the_model(client, engine, tiny_run):  # noqa: F811
    name = model_name(client)
    prompt = PROMPTS[3]
    answer = client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0, logprobs=3, echo=True)
    choice = answer.choices[0]
    ids = engine.tokenizer.encode(prompt)
    generated = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0))[0].token_ids
    logp = torch.log_softmax(engine.model(torch.tensor([ids + generated])).logits[0].float(), -1)
    want = [None] + [float(logp[i, t]) for i, t in enumerate((ids + generated)[1:])]
    got = choice.logprobs.token_logprobs
    assert len(got) == len(ids) + len(generated) and got[0] is None
    assert got[1:] == pytest.approx(want[1:], abs=1e-4)
    assert choice.text.startswith(prompt)
    top = choice.logprobs.top_logprobs[-1]
    assert len(top) <= 3 and max(top.values()) == pytest.approx(got[-1], abs=1e-6)  # greedy: the likeliest
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    scored = client.completions.create(model=name, prompt=prompt, max_tokens=0, logprobs=1, echo=True)
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(want[: len(ids)], abs=1e-4)
    assert scored.usage.completion_tokens == 0


def test_chat_logprobs(client):
    answer = client.chat.completions.create(model=model_name(client), messages=[{"role": "user", "content": "x"}],
                                            max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.logprob - 1e-6 for item in content)


def test_concurrent_greedy_requests_equal_each_alone(client):
    """16 requests of different prompt lengths at once (8 slots: some wait, prompts are read while
    others decode) get the tokens they get alone."""
    name = model_name(client)
    prompts = ["".join(f"def f{j}(x):\n" for j in range(i % 5 + 1)) + "def" * (i % 3) for i in range(16)]
    alone = [client.completions.create(model=name, prompt=p, max_tokens=10, temperature=0).choices[0].text
             for p in prompts]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda p: client.completions.create(model=name, prompt=p, max_tokens=10,
                                                                     temperature=0).choices[0].text, prompts))
    assert together == alone


def test_errors_are_openai_errors(fp32_server, client):
    url = f"{fp32_server.url}/v1/completions"
    cases = [
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"prompt": "x", "n": 0}, 400, "n"),
        ({"prompt": [10**9]}, 400, "prompt"),
        ({"prompt": "x " * 5000}, 400, "prompt"),
        ({"prompt": "x", "model": "other"}, 404, "model"),
        ({}, 400, "prompt"),
    ]
    for body, status, param in cases:
        answer = httpx.post(url, json=body, timeout=30)
        assert answer.status_code == status, (body, answer.text)
        assert answer.json()["error"]["param"] == param and answer.json()["error"]["message"]
    bad_json = httpx.post(url, content=b"{not json", timeout=30)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    huge = httpx.post(url, content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}', timeout=30)
    assert huge.status_code == 413
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x")


def test_api_key(tiny_run, tmp_path):  # noqa: F811
    live = start_server(tiny_run, tmp_path / "serve.log", "--api-key", "sesame")
    try:
        anonymous = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=30)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["type"] == "authentication_error"
        keyed = openai.OpenAI(base_url=f"{live.url}/v1", api_key="sesame", max_retries=0)
        assert keyed.completions.create(model=keyed.models.list().data[0].id, prompt="x", max_tokens=2).choices
    finally:
        assert live.stop() == 0


def test_queue_full_is_429_and_sigterm_drains(tiny_run, tmp_path):  # noqa: F811
    """One slot and room for 20 in flight: while 16 choices of a stream run one after another, 8
    more get 429 with Retry-After. SIGTERM while a stream runs: new requests get 503, the stream
    finishes, the process exits 0."""
    live = start_server(tiny_run, tmp_path / "serve.log", "--max-batch", "1", "--max-queue", "19")
    url = f"{live.url}/v1/completions"
    long_request = {"prompt": "def", "max_tokens": 200, "ignore_eos": True, "stream": True, "n": 16}

    with httpx.stream("POST", url, json=long_request, timeout=60) as running:
        lines = running.iter_lines()
        next(lines)  # 16 choices in flight, the first one generating
        busy = httpx.post(url, json={"prompt": "x", "max_tokens": 1, "n": 8}, timeout=30)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        accepted = httpx.post(url, json={"prompt": "x", "max_tokens": 1, "n": 4}, timeout=30)
        assert accepted.status_code == 200  # 20 in flight fit
        for _ in lines:
            pass

    finished = []

    def stream() -> None:
        with httpx.stream("POST", url, json=long_request, timeout=60) as answer:
            events = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
            if len(finished) == 0:
                finished.append("started")
        assert events[-1] == "[DONE]"
        finished.extend(c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"])

    thread = threading.Thread(target=stream)
    thread.start()
    deadline = time.monotonic() + 30
    while "pyramoe_running_requests 1.0" not in httpx.get(f"{live.url}/metrics").text:
        assert time.monotonic() < deadline
    live.process.send_signal(signal.SIGTERM)
    late = httpx.post(url, json={"prompt": "x", "max_tokens": 1}, timeout=30)
    thread.join(240)  # 3,200 one-slot steps: slow on a loaded machine
    assert late.status_code == 503 and late.json()["error"]["message"] == "the server is draining"
    assert finished == ["started"] + ["length"] * 16  # every choice of the running stream ran to its end
    assert live.stop() == 0


def test_kv_budget_and_prefix_cache_in_metrics(tiny_run, tmp_path):  # noqa: F811
    """A KV budget of a few blocks: requests wait for blocks and all answer; n choices of one
    prompt share its full blocks (counted in /metrics); requests that outgrow the cache together
    are preempted and answer as they do alone."""
    live = start_server(tiny_run, tmp_path / "serve.log", "--kv-cache-gib", "0.00004", "--block-size", "8")
    try:
        assert "blocks of 8" in live.output()
        blocks = int(re.search(r"in (\d+) blocks", live.output()).group(1))
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)
        name = model_name(client)
        prompt = "def f1(x):\n    return x + 1\n\ndef f2(x):\n    return x + 2\n"
        answer = client.completions.create(model=name, prompt=prompt, max_tokens=4, n=4, temperature=0)
        assert len({c.text for c in answer.choices}) == 1  # greedy: every choice alike
        metrics = httpx.get(f"{live.url}/metrics").text
        assert f"pyramoe_kv_cache_blocks {blocks}.0" in metrics and "pyramoe_kv_cache_blocks_used 0.0" in metrics
        hits = float(re.search(r"^pyramoe_prefix_cache_hit_tokens (\S+)", metrics, re.M).group(1))
        assert hits >= 8  # later choices read the prompt's full blocks from the first one's
        assert re.search(r"^pyramoe_prefix_cache_copied_blocks \d", metrics, re.M)  # partial blocks (test_engine.py)
        assert blocks * 8 < 240  # 10 blocks in fp32, 20 in bf16
        too_long = httpx.post(f"{live.url}/v1/completions", json={"prompt": "x " * 40, "max_tokens": 200}, timeout=30)
        assert too_long.status_code == 400 and "blocks" in too_long.json()["error"]["message"]
        # Together these outgrow the cache: the latest admitted are preempted, and answer as alone.
        prompts = [f"def g{i}(x):\n    return x * {i}\n" for i in range(4)]
        ask = lambda p: client.completions.create(model=name, prompt=p, max_tokens=blocks * 8 // 2, temperature=0,  # noqa: E731
                                                  extra_body={"ignore_eos": True}).choices[0].text
        alone = [ask(p) for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(ask, prompts)) == alone
        metrics = httpx.get(f"{live.url}/metrics").text
        assert float(re.search(r"^pyramoe_preemptions (\S+)", metrics, re.M).group(1)) > 0
    finally:
        assert live.stop() == 0
