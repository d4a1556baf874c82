"""The continuous-batching engine: batched, chunked, joining and leaving requests give the tokens
each request gets alone; sampling, stops, streaming and errors."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from pyramoe.config import ModelConfig, build_layers
from pyramoe.inference import Engine, SamplingParams, nucleus, sample_token
from pyramoe.models import GPT

GREEDY = dict(temperature=0.0)


class CharTokenizer:
    """Token i is chr(ord('a') + i % 26); id 0 doubles as EOS when asked."""

    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, max_seq_len=64, d_model=32, n_heads=4, tie_embeddings=False,
                         layers=build_layers(4, "every_other", 4, top_k=2, dropless=True))
    model = GPT(config).eval()  # dropless as the engine runs it: `alone` is its reference
    with torch.no_grad():  # larger weights: greedy paths that differ from prompt to prompt
        for p in model.parameters():
            p.mul_(3)
    return model


@torch.no_grad()
def alone(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by full forward passes over the growing sequence, no cache at all."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16], [20], [30, 31, 32]]
LENGTHS = [3, 8, 5, 2, 7]  # staggered: requests leave at different steps, others join their slots


def test_batched_joining_and_leaving_requests_match_each_alone(model):
    engine = Engine(model, max_batch=3, max_step_tokens=3, eos_id=None)
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in LENGTHS]
    out = engine.generate(PROMPTS, params)
    for prompt, n, completion in zip(PROMPTS, LENGTHS, out):
        assert completion.token_ids == alone(model, prompt, n)
        assert completion.finish_reason == "length"
    assert not engine.active and not engine.waiting


def test_a_request_added_while_others_decode(model):
    engine = Engine(model, max_batch=4, eos_id=None)
    first = engine.add_request(PROMPTS[2], SamplingParams(max_tokens=10, **GREEDY))
    tokens: dict[str, list[int]] = {first: []}
    for _ in range(3):
        for event in engine.step():
            tokens[event.request_id].append(event.token_id)
    late = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=6, **GREEDY))
    tokens[late] = []
    for event in engine.stream():
        tokens[event.request_id].append(event.token_id)
    assert tokens[first] == alone(model, PROMPTS[2], 10)
    assert tokens[late] == alone(model, PROMPTS[0], 6)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    solo = Engine(model, eos_id=None).generate([PROMPTS[1]], params)[0].token_ids
    others = [SamplingParams(max_tokens=n, temperature=1.0, seed=s) for n, s in ((3, 1), (8, 3))]
    crowd = Engine(model, max_batch=3, eos_id=None).generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[2]], [others[0], params, others[1]]
    )
    assert crowd[1].token_ids == solo
    assert solo != alone(model, PROMPTS[1], 8)  # it sampled, not argmax


def test_stops_eos_stop_ids_stop_strings_and_streaming(model):
    reference = alone(model, PROMPTS[3], 12)
    text = CharTokenizer().decode(reference)
    engine = Engine(model, CharTokenizer(), eos_id=None)
    # stop token id: the third token generated
    out = engine.generate([PROMPTS[3]], SamplingParams(max_tokens=12, stop_token_ids=(reference[2],), **GREEDY))[0]
    assert out.token_ids == reference[: reference.index(reference[2])] and out.finish_reason == "stop"
    # stop string: cut before it, the rest never emitted
    stop = text[4:6]
    rid = engine.add_request(PROMPTS[3], SamplingParams(max_tokens=12, stop=(stop,), **GREEDY))
    events = list(engine.stream())
    streamed = "".join(e.text for e in events if e.request_id == rid)
    assert streamed == text[: text.index(stop)] and events[-1].finished and events[-1].finish_reason == "stop"
    # EOS: the model's eos id ends the request
    eos_engine = Engine(model, CharTokenizer(), eos_id=reference[1])
    done = eos_engine.generate([PROMPTS[3]], SamplingParams(max_tokens=12, **GREEDY))[0]
    assert done.token_ids == reference[:1] and done.finish_reason == "stop"
    ignoring = eos_engine.generate([PROMPTS[3]], SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY))[0]
    assert ignoring.token_ids == reference[:4]


def test_context_limit_ends_with_length(model):
    engine = Engine(model, max_len=8, eos_id=None)
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=50, **GREEDY))[0]
    assert len(PROMPTS[0]) + len(out.token_ids) == 9 and out.finish_reason == "length"  # 8 cached + the last
    assert out.token_ids == alone(model, PROMPTS[0], 4)


def test_abort_frees_the_slot(model):
    engine = Engine(model, max_batch=2, eos_id=None)
    a = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=20, **GREEDY))
    b = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=5, **GREEDY))
    engine.step()
    assert engine.abort(a) and [r.id for r in engine.active] == [b]
    tokens = [e.token_id for e in engine.stream() if e.request_id == b]
    assert tokens == alone(model, PROMPTS[1], 5)[1:]
    assert not engine.abort("nope")


def test_top_k_top_p_and_greedy():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    probs = torch.softmax(logits, 0)
    kept = nucleus(probs, 0.8)
    # the likeliest tokens until their mass reaches 0.8: the first two (0.61 + 0.22)
    assert (kept > 0).tolist() == [True, True, False, False, False]
    torch.testing.assert_close(kept.sum(), torch.tensor(1.0))
    assert sample_token(logits, SamplingParams(temperature=0), None) == 0
    g = torch.Generator().manual_seed(0)
    draws = {sample_token(logits, SamplingParams(temperature=5.0, top_k=2), g) for _ in range(200)}
    assert draws == {0, 1}
    draws = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.5), g) for _ in range(50)}
    assert draws == {0}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (dict(max_tokens=-1), "max_tokens"),
            (dict(presence_penalty=3), "presence_penalty"),
            (dict(logprobs=21), "logprobs"),
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_bad_sampling_params_name_the_field(model, params, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        Engine(model).add_request([1, 2], SamplingParams(**params))


def test_bad_prompts(model):
    engine = Engine(model, max_len=8)
    with pytest.raises(ValueError, match="^prompt:"):
        engine.add_request(list(range(8)))
    with pytest.raises(ValueError, match="^prompt:"):
        engine.add_request([500])
    with pytest.raises(ValueError, match="^prompt: text needs a tokenizer"):
        engine.add_request("abc")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_engine_on_a_hugging_face_directory_matches_transformers(arch, tmp_path):
    from hf_models import build_hf, hf_greedy, save_hf

    hf_model = build_hf(arch)
    directory = save_hf(hf_model, tmp_path / arch)
    prompts = [[3, 14, 15, 92, 65], [35, 89], [79, 32, 38, 46]]
    expected = hf_greedy(hf_model, prompts, 6)
    engine = Engine.load(directory, dtype="fp32", max_batch=2, eos_id=None)
    got = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    assert [c.token_ids for c in got] == expected


def test_incremental_text_is_the_decoded_output_at_every_step():
    """The engine decodes a short window per token; its text must equal decoding the whole output,
    held back only while a character is incomplete (byte-level BPE splits multi-byte characters)."""
    from pyramoe.data import Tokenizer
    from pyramoe.inference.requests import Request
    from pyramoe.inference.sampling import SamplingParams as Params

    docs = ["def größe(x):\n    return 'naïve café ✓ 数据' + x\n" * 20, "print('héllo wörld — ok')\n" * 20]
    tok = Tokenizer.train(docs, vocab_size=300)
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        request = Request("r", [1], Params(), None)
        full_ids = tok.encode(docs[trial % 2][trial * 7 :][:80])
        ids = full_ids if trial % 3 else torch.randint(0, tok.vocab_size, (60,), generator=generator).tolist()
        for token in ids:
            request.output_ids.append(token)
            request.extend_text(tok.decode)
            full = tok.decode(request.output_ids)
            assert full.startswith(request.text)
            if not full.endswith("\ufffd"):
                assert request.text == full


@pytest.mark.parametrize("native", [True, False])
def test_long_prompt_is_read_in_chunks_while_others_decode(model, native):
    """A prompt longer than the step budget arrives while a request decodes: the running one gets a
    token every step, and both get the tokens they get alone."""
    engine = Engine(model, max_batch=2, max_step_tokens=4, eos_id=None, native=native)
    first = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=12, **GREEDY))
    engine.step()
    long_prompt = list(range(40, 60))
    late = engine.add_request(long_prompt, SamplingParams(max_tokens=4, **GREEDY))
    tokens: dict[str, list[int]] = {first: [], late: []}
    while engine.has_unfinished():
        events = engine.step()
        ids = {e.request_id for e in events}
        for event in events:
            tokens[event.request_id].append(event.token_id)
        if len(tokens[first]) < 11:
            assert first in ids  # never frozen by the prompt being read
    assert tokens[first] == alone(model, PROMPTS[1], 12)[1:]
    assert tokens[late] == alone(model, long_prompt, 4)


@pytest.mark.parametrize("native", [True, False])
def test_logprobs_of_tokens_and_prompt_equal_a_full_forward(model, native):
    engine = Engine(model, max_batch=2, max_step_tokens=3, eos_id=None, native=native)
    prompt = PROMPTS[2]
    rid = engine.add_request(prompt, SamplingParams(max_tokens=4, logprobs=3, prompt_logprobs=2, **GREEDY))
    events = [e for e in engine.stream() if e.request_id == rid]
    output = [e.token_id for e in events]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + output])).logits[0].float(), -1)
    scored = events[0].prompt_logprobs
    assert scored[0] is None and len(scored) == len(prompt)
    for position, (value, top) in enumerate(scored[1:]):
        assert value == pytest.approx(float(logp[position, prompt[position + 1]]), abs=1e-4)
        assert [t for t, _ in top] == logp[position].topk(2).indices.tolist()
    for i, event in enumerate(events):
        value, top = event.logprob
        row = logp[len(prompt) - 1 + i]
        assert value == pytest.approx(float(row[event.token_id]), abs=1e-4)
        assert top[0][0] == event.token_id and len(top) == 3  # greedy: the likeliest
        assert all(v == pytest.approx(float(row[t]), abs=1e-4) for t, v in top)
    assert all(e.prompt_logprobs is None for e in events[1:])


def test_max_tokens_zero_scores_the_prompt_only(model):
    engine = Engine(model, max_len=8, eos_id=None)
    prompt = list(range(1, 9))  # fills max_len: allowed when nothing is generated
    engine.add_request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    events = list(engine.stream())
    assert len(events) == 1 and events[0].token_id is None and events[0].finish_reason == "length"
    assert len(events[0].prompt_logprobs) == len(prompt)


def test_penalties_change_greedy_choices(model):
    plain = Engine(model, eos_id=None).generate([PROMPTS[3]], SamplingParams(max_tokens=12, **GREEDY))[0]
    penalised = Engine(model, eos_id=None).generate(
        [PROMPTS[3]], SamplingParams(max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0, **GREEDY))[0]
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


def test_a_failing_request_ends_with_an_error_and_the_others_go_on(model, monkeypatch):
    engine = Engine(model, max_batch=3, eos_id=None)
    good = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=5, **GREEDY))
    bad = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=5, temperature=1.0, seed=1))
    import pyramoe.inference.engine as engine_module

    real = engine_module.sample_token

    def nan_for_sampled(logits_V, params, generator):
        return real(logits_V * float("nan"), params, generator)  # multinomial refuses NaN probabilities

    monkeypatch.setattr(engine_module, "sample_token", nan_for_sampled)
    events = list(engine.stream())
    failed = [e for e in events if e.request_id == bad]
    assert len(failed) == 1 and failed[0].finish_reason == "error" and failed[0].error
    assert [e.token_id for e in events if e.request_id == good] == alone(model, PROMPTS[0], 5)
    assert not engine.active and engine.free_slots == 3
    again = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=5, **GREEDY))[0]  # the engine still works
    assert again.token_ids == alone(model, PROMPTS[0], 5)


def test_a_failed_forward_fails_its_requests_only(model, monkeypatch):
    engine = Engine(model, eos_id=None)
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=3, **GREEDY))
    engine.step()
    monkeypatch.setattr(engine.runner, "forward", lambda *rows: (_ for _ in ()).throw(RuntimeError("boom")))
    events = engine.step()
    assert [(e.finish_reason, e.error) for e in events] == [("error", "RuntimeError: boom")]
    monkeypatch.undo()
    assert engine.generate([PROMPTS[1]], SamplingParams(max_tokens=2, **GREEDY))[0].token_ids == alone(
        model, PROMPTS[1], 2)


def test_duplicate_ids_are_refused_and_abort_emits_an_event(model):
    engine = Engine(model, max_batch=1, eos_id=None)
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=9, **GREEDY), request_id="a")
    engine.add_request(PROMPTS[1], SamplingParams(max_tokens=9, **GREEDY), request_id="b")
    with pytest.raises(ValueError, match="^request_id: 'a' is already"):
        engine.add_request(PROMPTS[2], request_id="a")
    engine.step()
    assert engine.abort("a") and engine.abort("b")  # running, waiting
    events = engine.step()
    assert [(e.request_id, e.finish_reason) for e in events] == [("a", "abort"), ("b", "abort")]
    assert not engine.has_unfinished() and engine.free_slots == 1
    engine.add_request(PROMPTS[2], request_id="a")  # finished ids may be reused


@pytest.mark.parametrize("native", [True, False])
def test_requests_wait_for_kv_blocks_and_get_their_tokens(model, native):
    """A cache of 6 blocks of 4 positions: requests enter while their prompt's blocks (and one spare
    block per running request) are free, the others wait for blocks (not slots: there are 4), and
    every one gets its tokens alone."""
    engine = Engine(model, max_batch=4, eos_id=None, native=native, kv_blocks=6, block_size=4)
    params = SamplingParams(max_tokens=5, **GREEDY)
    requests = [[1, 2, 3, 4, 5], [7, 8, 9, 10], [9, 10, 11, 12, 13], [20, 21, 22, 23]]
    ids = [engine.add_request(p, params) for p in requests]
    events = engine.step()
    assert len(engine.active) == 2 and engine.cache.allocator.used == 3  # 2 + 1 prompt blocks
    tokens = {rid: [] for rid in ids}
    for event in [*events, *engine.stream()]:
        tokens[event.request_id].append(event.token_id)
    assert [tokens[rid] for rid in ids] == [alone(model, p, 5) for p in requests]
    assert engine.cache.allocator.used == 0
    with pytest.raises(ValueError, match="^prompt: .* need 7 KV-cache blocks, the cache has 6"):
        engine.add_request(list(range(1, 20)), SamplingParams(max_tokens=9))


@pytest.mark.parametrize("step", ["native", "pytorch", "device"])
def test_a_full_cache_preempts_the_latest_request_which_resumes_where_it_was(model, step):
    """Blocks are taken as sequences grow: when a running request needs one and none is left, the
    request admitted last gives its blocks back and reads its prompt and output again later. Greedy
    tokens, seeded samples, log-probabilities and prompt log-probabilities are those of a cache
    large enough for all."""
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11, 12], [9, 10, 11], [20, 21, 22, 23, 24], [30, 31]]
    params = [SamplingParams(max_tokens=12, **GREEDY),
              SamplingParams(max_tokens=10, temperature=0.9, seed=7, logprobs=2),
              SamplingParams(max_tokens=11, **GREEDY, prompt_logprobs=1, logprobs=1),
              SamplingParams(max_tokens=9, temperature=1.2, top_k=5, seed=3),
              SamplingParams(max_tokens=12, **GREEDY)]

    def run(kv_blocks):
        engine = Engine(model, max_batch=4, eos_id=None, native=step == "native", kv_blocks=kv_blocks, block_size=4,
                        step="device" if step == "device" else "auto")
        ids = [engine.add_request(p, q) for p, q in zip(prompts, params)]
        events = {rid: [] for rid in ids}
        for event in engine.stream():
            events[event.request_id].append(event)
        assert engine.cache.allocator.used == 0 and not engine.active
        return engine, [events[rid] for rid in ids]

    small, tight = run(6)
    large, roomy = run(None)
    assert small.preemptions > 0 and large.preemptions == 0 and small.decode_path == step
    for got, want in zip(tight, roomy):
        assert [e.token_id for e in got] == [e.token_id for e in want]
        assert "".join(e.text for e in got) == "".join(e.text for e in want)
        for a, b in zip(got, want):
            assert (a.logprob is None) == (b.logprob is None)
            assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
            if a.logprob is not None:
                assert a.logprob[0] == pytest.approx(b.logprob[0], abs=1e-4)
                assert [t for t, _ in a.logprob[1]] == [t for t, _ in b.logprob[1]]
            if a.prompt_logprobs is not None:
                assert len(a.prompt_logprobs) == len(b.prompt_logprobs) == 3
                want_prompt = [x[0] for x in b.prompt_logprobs[1:]]
                assert [x[0] for x in a.prompt_logprobs[1:]] == pytest.approx(want_prompt, abs=1e-4)
    assert [e.prompt_logprobs is not None for e in tight[2]].count(True) == 1


@pytest.mark.parametrize("native", [True, False])
def test_a_common_prompt_prefix_is_read_once(model, native):
    """Requests whose prompts begin with the same full blocks share them (n choices of one prompt,
    a common preamble): fewer prompt rows are computed, and the tokens are those of each alone."""
    engine = Engine(model, max_batch=4, eos_id=None, native=native, block_size=4)
    preamble = [3, 1, 4, 1, 5, 9, 2, 6]  # two full blocks
    first = engine.generate([preamble + [5, 3]], SamplingParams(max_tokens=4, **GREEDY))[0]
    assert engine.cache.allocator.hit_tokens == 0
    later = [preamble + [5, 3], preamble + [8], preamble + [9, 7, 9, 3, 2]]
    out = engine.generate(later, SamplingParams(max_tokens=4, **GREEDY))
    assert engine.cache.allocator.hit_tokens == 3 * len(preamble)
    assert first.token_ids == out[0].token_ids
    assert [o.token_ids for o in out] == [alone(model, p, 4) for p in later]
    exact = Engine(model, max_batch=2, eos_id=None, native=native, block_size=4)
    exact.generate([preamble], SamplingParams(max_tokens=1))  # the whole prompt is blocks: the last is read again
    again = exact.generate([preamble], SamplingParams(max_tokens=3, **GREEDY))[0]
    assert exact.cache.allocator.hit_tokens == 4 and again.token_ids == alone(model, preamble, 3)


@pytest.mark.parametrize("step", ["native", "pytorch", "device"])
def test_n_choices_share_the_partial_last_prompt_block_copied_on_first_write(model, step):
    """Choices of one prompt share its partial last block (every prompt row but the last), each
    copying it when it first writes into it: the tokens, samples and log-probabilities are those of
    an engine that shares nothing, and the shared rows are counted."""
    prompts = [[3, 1, 4, 1, 5, 9, 2], [7, 8, 9]]  # one full block and 2 shared rows; no full block, 2 rows
    params = [SamplingParams(max_tokens=6, **GREEDY, logprobs=2),
              SamplingParams(max_tokens=7, temperature=0.9, seed=11, logprobs=1),
              SamplingParams(max_tokens=5, temperature=1.3, top_k=6, seed=5)]

    def run(prefix_caching):
        engine = Engine(model, max_batch=8, eos_id=None, native=step == "native", block_size=4,
                        prefix_caching=prefix_caching, step="device" if step == "device" else "auto")
        ids = [engine.add_request(p, q) for p in prompts for q in params]
        events = {rid: [] for rid in ids}
        for event in engine.stream():
            events[event.request_id].append(event)
        assert engine.cache.allocator.used == 0 and engine.cache.pending_copies == 0
        return engine, [events[rid] for rid in ids]

    shared, got = run(True)
    plain, want = run(False)
    assert shared.decode_path == step
    assert plain.cache.allocator.hit_tokens == 0 and plain.cache.allocator.copies == 0
    # Two later choices per prompt: the first prompt's full block (4) and 2 partial rows, the second's 2 rows.
    assert shared.cache.allocator.hit_tokens == 2 * (4 + 2) + 2 * 2
    assert shared.cache.allocator.copies == 4
    for a_events, b_events in zip(got, want):
        assert [e.token_id for e in a_events] == [e.token_id for e in b_events]
        for a, b in zip(a_events, b_events):
            assert (a.logprob is None) == (b.logprob is None)
            if a.logprob is not None:
                assert a.logprob[0] == pytest.approx(b.logprob[0], abs=1e-4)
                assert [t for t, _ in a.logprob[1]] == [t for t, _ in b.logprob[1]]
    greedy = [events for events, q in zip(got, params * 2) if q.greedy]
    assert [[e.token_id for e in events] for events in greedy] == [alone(model, p, 6) for p in prompts]


def test_a_shared_partial_block_is_kept_without_a_copy_when_its_writer_has_left(model):
    """The writer of a shared partial block aborted before the sharer wrote: the sharer keeps the
    block (no copy) and returns the target it took; nothing leaks."""
    engine = Engine(model, max_batch=4, eos_id=None, block_size=4)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    first = engine.add_request(prompt, SamplingParams(max_tokens=4, **GREEDY))
    second = engine.add_request(prompt, SamplingParams(max_tokens=4, **GREEDY))
    engine.step()  # the first reads the prompt; the second waits to share its blocks
    engine._admit()  # the second enters, sharing the first's partial block; before it writes ...
    assert engine.cache.pending_copies == 1
    engine.abort(first)  # ... the first leaves
    events = [e for e in engine.stream() if e.request_id == second]
    assert engine.cache.allocator.copies == 0 and engine.cache.allocator.hit_tokens == 6
    assert [e.token_id for e in events] == alone(model, prompt, 4)
    assert engine.cache.allocator.used == 0


@pytest.mark.parametrize("pack_weights", [True, False])
def test_the_callers_model_and_config_are_left_as_they_were(pack_weights):
    """The engine runs eval, dropless and packed on its own view: the caller's model keeps its
    training flags, its configs, its modules and weights (none copied), and still trains."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, max_seq_len=64, d_model=32, n_heads=4, tie_embeddings=False,
                         layers=build_layers(2, "every_other", 4, top_k=2, dropless=False))
    model = GPT(config).train()
    before_config = repr(model.config)
    modules = {name: type(m) for name, m in model.named_modules()}
    tensors = {name: (t.data_ptr(), t.clone()) for name, t in model.state_dict().items()}
    engine = Engine(model, max_batch=2, eos_id=None, pack_weights=pack_weights)
    engine.generate([PROMPTS[0], PROMPTS[1]], SamplingParams(max_tokens=4, **GREEDY))
    assert all(m.training for m in model.modules()) and not any(m.training for m in engine.model.modules())
    assert repr(model.config) == before_config
    assert not any(b.ffn.config.dropless for b in model.blocks if b.is_moe)
    assert all(b.ffn.config.dropless for b in engine.model.blocks if b.is_moe)
    assert {name: type(m) for name, m in model.named_modules()} == modules
    state = model.state_dict()
    assert all(state[n].data_ptr() == ptr and torch.equal(state[n], t) for n, (ptr, t) in tensors.items())
    if not pack_weights:  # the engine's view reads the caller's tensors: nothing copied
        assert all(p is q for p, q in zip(model.parameters(), engine.model.parameters()))
    out = model(torch.tensor([PROMPTS[2]]))
    (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
    assert model.tok_emb.weight.grad is not None and out.aux_loss > 0  # training: aux losses computed


def test_requests_without_a_seed_leave_the_global_generator_alone(model):
    engine = Engine(model, max_batch=2, eos_id=None)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    sampled = SamplingParams(max_tokens=6, temperature=1.0)
    first, second = engine.generate([PROMPTS[0], PROMPTS[0]], sampled)
    assert torch.equal(torch.get_rng_state(), state)  # torch.seed() would have reseeded it
    assert first.token_ids != second.token_ids  # each unseeded request draws its own seed


def test_packing_frees_the_plain_weights_nobody_else_holds():
    """What `Engine.load` does: the engine holds the only model, so its view's packing frees them."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, max_seq_len=64, d_model=32, n_heads=4, tie_embeddings=False,
                         layers=build_layers(2, "every_other", 4, top_k=2, dropless=True))
    model = GPT(config)
    plain = [weakref.ref(model.blocks[1].ffn.experts.w_in), weakref.ref(model.lm_head.weight)]
    engine = Engine(model, max_batch=1, native=False)  # fp32 weights packed for oneDNN
    del model
    engine.prepare()
    gc.collect()
    assert engine.packed_weights > 0 and all(ref() is None for ref in plain)
