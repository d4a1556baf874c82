"""A client no one here wrote: lm-evaluation-harness's `local-completions` model (its OpenAI completions
client, with the server's /tokenize, /detokenize and /tokenizer_info as its "remote" tokenizer) against
`pyramoe serve --dtype fp32`, scored beside the in-process harness model "pyramoe" (PyramoeLM) on the
same checkpoint: the same tokens, the same accuracies, and every request's log-likelihood within 1e-4.

The harness asks the server for `echo` + `logprobs` + `max_tokens: 1`, so it keeps the last
max_length - 1 = context - 1 tokens of a pair; the in-process scorer keeps max_seq_len + 1. The task
comparison gives the in-process scorer the server's window (`windowed`); the direct comparison uses
pairs that fit either way."""

from __future__ import annotations

import copy
import logging

import httpx
import pytest
import torch
from live_server import start_server, tiny_run  # noqa: F401

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api] (tenacity)")

import lm_eval  # noqa: E402
import lm_eval.tasks  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

from pyramoe.evaluation.harness import TASKS_DIR  # noqa: E402
from pyramoe.evaluation.lm import PyramoeLM  # noqa: E402
from pyramoe.evaluation.scoring import Scorer  # noqa: E402
from pyramoe.evaluation.taskdata import read_task  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DISABLE_MULTIPROC": "1"}
TASKS = ["pyramoe_stdlib_nextline", "pyramoe_stdlib_docsig"]
LIMIT = 40
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def env(tiny_run):  # noqa: F811
    """Task files built into the run's PYRAMOE_CACHE (the server's too), offline, quiet harness logs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYRAMOE_CACHE", str(tiny_run.parent / "cache"))
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        yield tiny_run


@pytest.fixture(scope="module")
def fp32_server(env, tmp_path_factory):
    live = start_server(env, tmp_path_factory.mktemp("lmeval") / "serve.log", "--dtype", "fp32", "--max-batch", "8")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def card(fp32_server) -> dict:
    """The served model's name and context, from /v1/models."""
    (model,) = httpx.get(f"{fp32_server.url}/v1/models", timeout=10).json()["data"]
    return model


def api_model(url: str, card: dict, tokenized_requests: bool = True) -> LocalCompletionsAPI:
    """The harness's client as a user would configure it: the tokenizer backend left on auto-detection."""
    return LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=card["id"], tokenizer_backend="auto",
                               tokenized_requests=tokenized_requests, max_length=card["max_model_len"], batch_size=8,
                               max_retries=1, timeout=60)


@pytest.fixture(scope="module")
def api(fp32_server, card) -> LocalCompletionsAPI:
    return api_model(fp32_server.url, card)


@pytest.fixture(scope="module")
def local(env, card) -> PyramoeLM:
    # The server's context (the model's), not the length the run trained on (the in-process default).
    return PyramoeLM(checkpoint=str(env), dtype="fp32", batch_size=8, max_length=card["max_model_len"])


def windowed(lm: PyramoeLM, window: int) -> PyramoeLM:
    """A copy of `lm` scoring the last `window` tokens of each pair (context cut on the left), as the
    harness's API models do with max_length = window + 1."""
    scorer = lm.scorer
    cls = type("WindowedScorer", (Scorer,), {"max_len": property(lambda self: window - 1)})
    out = copy.copy(lm)
    out.scorer = cls(scorer.model, scorer.pad_id, scorer.batch_size, scorer.dtype)
    return out


def instances(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def assert_same_loglikelihoods(got: list[tuple[float, bool]], want: list[tuple[float, bool]], what: list) -> None:
    assert len(got) == len(want) == len(what)
    for (logp, greedy), (want_logp, want_greedy), item in zip(got, want, what):
        assert logp == pytest.approx(want_logp, abs=TOLERANCE), item
        assert greedy == want_greedy, item


def test_the_harness_detects_and_uses_the_remote_tokenizer(api, local):
    assert api.tokenizer_backend == "remote"  # /tokenizer_info and /tokenize answer as lm-eval expects
    assert api.max_length == local.max_length - 1  # the server's context - 1 (room for the 1 token it asks for)
    assert api.eot_token_id == local.eot_token_id and api.prefix_token_id == local.prefix_token_id
    for text in ["def f1(x):\n    return x + 1\n", "  ünïcödé → λ 🙂\t", "x" * 300, "\x00\x1f\r\n"]:
        ids = api.tok_encode(text)
        assert ids == local.tok_encode(text)
        assert api.tokenizer.decode(ids) == local.tok_decode(ids) == text


@pytest.mark.parametrize("tokenized_requests", [True, False], ids=["token-ids", "text"])
def test_loglikelihood_per_request_equals_the_in_process_model(fp32_server, card, env, local, tokenized_requests):
    """The harness's loglikelihood() on the same Instances, through the server and in process; pairs that
    fit the server's window whole (no truncation on either side)."""
    api = api_model(fp32_server.url, card, tokenized_requests)
    pairs = [("def f1(x):\n    return", " x + 1"), ("def f2", "(x):\n"), ("", "def f3(x):"),  # empty: prefix token
             ("# ünïcödé → λ\n", "x = 'ß'\n"), ("x", " " * 9)]
    for doc in read_task("pyramoe_stdlib_docsig")[:12]:
        pairs += [(doc["context"], choice) for choice in doc["choices"]]
    fits = [p for p in pairs if len(local.tok_encode(p[0] + p[1])) < api.max_length]
    assert len(fits) > 40
    want = local.loglikelihood(instances(fits), disable_tqdm=True)
    got = api.loglikelihood(instances(fits), disable_tqdm=True)
    assert_same_loglikelihoods(got, want, fits)


def test_tasks_score_the_same_through_the_server(api, local, card):
    """simple_evaluate on two local tasks, --limit 40, both models: equal accuracies, and each
    example's log-likelihood per choice (the logged samples) within 1e-4."""
    in_process = windowed(local, api.max_length)
    long_docs = sum(len(local.tok_encode(d["context"] + c)) > api.max_length
                    for d in read_task("pyramoe_stdlib_nextline")[:LIMIT] for c in d["choices"])
    assert long_docs > 0  # the truncation path runs on both sides
    manager = lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, model in (("in_process", in_process), ("server", api)):
            results[name] = lm_eval.simple_evaluate(model=model, tasks=TASKS, limit=LIMIT, task_manager=manager,
                                                    log_samples=True, bootstrap_iters=0)
    finally:
        torch.set_num_threads(threads)
    for task in TASKS:
        mine, theirs = results["in_process"]["results"][task], results["server"]["results"][task]
        assert theirs["acc,none"] == mine["acc,none"] and theirs["acc_norm,none"] == mine["acc_norm,none"]
        samples = results["in_process"]["samples"][task], results["server"]["samples"][task]
        assert [s["doc_id"] for s in samples[0]] == [s["doc_id"] for s in samples[1]] == list(range(LIMIT))
        for want, got in zip(*samples):
            assert got["arguments"] == want["arguments"]
            assert_same_loglikelihoods([r[0] for r in got["resps"]], [r[0] for r in want["resps"]],
                                       [(task, want["doc_id"], i) for i in range(len(want["resps"]))])
