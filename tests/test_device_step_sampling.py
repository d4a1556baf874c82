"""The engine samples on the device when the device step runs (`Engine(step="device")`): a seeded
request's tokens are the device sampler's draws (its seed, the token's index as the counter) from
the model's logits, whatever else shares its steps, across preemptions and from run to run; greedy
requests keep the argmax; the first tokens of many seeds follow the sampling distribution;
penalised requests are penalised on the device: greedy ones choose the host path's tokens, sampled
ones draw from the host path's penalised distribution, across preemptions and slot reuse."""

from __future__ import annotations

import math

import torch
from test_native_decode import CASES, _model  # noqa: I001 - the block kinds of the engine's tests

from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.device_sampling import SamplingBatch, sample
from pyramoe.inference.sampling import apply_penalties, sampling_probs

SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, top_p=0.9, seed=7, ignore_eos=True)
PROMPT = [5, 9, 2, 7, 1, 3, 8, 4, 6, 2, 11]
OTHERS = [([3, 1], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)),
          ([7, 7, 7, 2, 5], SamplingParams(max_tokens=8, temperature=1.2, seed=3, ignore_eos=True))]


def _engine(model, step: str = "device", **options) -> Engine:
    return Engine(model, **{"max_batch": 3, "max_len": 48, "max_step_tokens": 8, "block_size": 4, "step": step,
                            **options})


def _tokens(engine: Engine, requests) -> list[list[int]]:
    prompts, params = zip(*requests)
    return [c.token_ids for c in engine.generate(list(prompts), list(params))]


def test_seeded_draws_do_not_depend_on_the_batch_and_repeat():
    model = _model(CASES["mixtral"], torch.float32)
    alone = _tokens(_engine(model, max_batch=1), [(PROMPT, SAMPLED)])[0]
    # Prompt chunks and decode rows of three requests mixed in each step, in another order.
    together = _tokens(_engine(model), [OTHERS[0], (PROMPT, SAMPLED), OTHERS[1]])
    again = _tokens(_engine(model), [OTHERS[0], (PROMPT, SAMPLED), OTHERS[1]])
    assert together[1] == alone and again == together
    assert len(alone) == 12
    other_seed = SamplingParams(**{**SAMPLED.__dict__, "seed": 8})
    assert _tokens(_engine(model, max_batch=1), [(PROMPT, other_seed)])[0] != alone
    # The greedy request beside them keeps the PyTorch step's argmax tokens.
    assert together[0] == _tokens(_engine(model, step="pytorch"), [OTHERS[0]])[0]


def test_draws_are_the_device_samplers_with_the_token_index_as_counter():
    model = _model(CASES["gpt-2 top-2"], torch.float32)
    tokens = _tokens(_engine(model), [(PROMPT, SAMPLED), OTHERS[1]])[0]
    with torch.no_grad():
        logits_TV = model(torch.tensor([PROMPT + tokens[:-1]])).logits[0, len(PROMPT) - 1 :].float()
    batch = SamplingBatch.build([SAMPLED] * len(tokens), [SAMPLED.seed] * len(tokens), range(len(tokens)), "cpu")
    assert sample(logits_TV, batch).tolist() == tokens


def test_a_preempted_request_draws_the_same_tokens():
    model = _model(CASES["mixtral"], torch.float32)
    requests = [(PROMPT, SAMPLED), OTHERS[1], ([4, 4, 9], SamplingParams(max_tokens=10, temperature=0.7, seed=1,
                                                                         ignore_eos=True))]
    roomy = _engine(model)
    tight = _engine(model, kv_blocks=9)  # 13 blocks wanted at the end: the last admitted gives its back
    assert _tokens(tight, requests) == _tokens(roomy, requests)
    assert tight.preemptions > 0 and roomy.preemptions == 0


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_first_tokens_of_many_seeds_follow_the_distribution():
    model = _model(CASES["mixtral"], torch.float32)
    params = SamplingParams(max_tokens=1, temperature=1.5, top_k=6, ignore_eos=True)
    draws = 1200
    engine = Engine(model, max_batch=64, max_len=16, max_step_tokens=256, step="device")
    first = _tokens(engine, [(PROMPT[:5], SamplingParams(**{**params.__dict__, "seed": s})) for s in range(draws)])
    with torch.no_grad():
        probs_V = sampling_probs(model(torch.tensor([PROMPT[:5]])).logits[0, -1].float(), params)
    counts_V = torch.bincount(torch.tensor([t[0] for t in first]), minlength=probs_V.numel()).double()
    kept = probs_V > 0
    assert counts_V[~kept].sum() == 0 and int(kept.sum()) == 6
    expected = probs_V[kept].double() * draws
    chi2 = float(((counts_V[kept] - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_critical(5), (chi2, counts_V[kept].tolist(), expected.tolist())


# Negative penalties: drawn tokens come back, so counts above 1 matter.
PENALISED = SamplingParams(max_tokens=10, temperature=1.0, seed=5, presence_penalty=-2.0, frequency_penalty=-1.0,
                           ignore_eos=True)


def test_penalised_greedy_requests_equal_the_host_path_token_for_token():
    """Penalties on the device (counts kept per slot, counted in the step) choose the tokens the
    host's `apply_penalties` does; slots are reused (5 requests, 2 slots), so counts restart."""
    model = _model(CASES["mixtral"], torch.float32)
    greedy = [SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=p, frequency_penalty=f, ignore_eos=True)
              for p, f in ((1.5, 0.0), (0.0, 2.0), (-0.5, 1.0), (2.0, 2.0))]
    requests = [(PROMPT, greedy[0]), ([3, 1], greedy[1]), OTHERS[0], ([7, 7, 7, 2, 5], greedy[2]), ([4, 9], greedy[3])]
    got = _tokens(_engine(model, max_batch=2), requests)
    assert got == _tokens(_engine(model, step="pytorch", max_batch=2), requests)
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    unpenalised = _tokens(_engine(model, step="pytorch", max_batch=2), [(prompt, plain) for prompt, _ in requests])
    changed = [a != b[: len(a)] for a, b in zip(got, unpenalised)]
    assert not changed[2] and sum(changed) >= 2  # the penalties changed some choices: the test can tell


def test_penalised_draws_are_the_device_samplers_from_the_host_penalised_logits():
    """A penalised sampled request draws on the device from exactly the host path's distribution:
    each token is the device sampler's draw from `apply_penalties` (host) of the model's logits."""
    model = _model(CASES["gpt-2 top-2"], torch.float32)
    tokens = _tokens(_engine(model), [(PROMPT, PENALISED), OTHERS[1]])[0]
    with torch.no_grad():
        logits_TV = model(torch.tensor([PROMPT + tokens[:-1]])).logits[0, len(PROMPT) - 1 :].float()
    scored_TV = torch.stack([apply_penalties(logits_TV[t], tokens[:t], PENALISED) for t in range(len(tokens))])
    batch = SamplingBatch.build([PENALISED] * len(tokens), [PENALISED.seed] * len(tokens), range(len(tokens)), "cpu")
    assert sample(scored_TV, batch).tolist() == tokens
    assert len(set(tokens)) < len(tokens) - 2  # tokens repeat: counts above 1
    assert sample(logits_TV, batch).tolist() != tokens  # unpenalised draws differ: the penalty is applied


def test_a_preempted_penalised_request_counts_its_output_again():
    model = _model(CASES["mixtral"], torch.float32)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, frequency_penalty=1.5, ignore_eos=True)
    requests = [(PROMPT, PENALISED), OTHERS[1], ([4, 4, 9], greedy)]
    tight = _engine(model, kv_blocks=9)  # the last admitted gives its blocks back, is read again
    assert _tokens(tight, requests) == _tokens(_engine(model), requests)
    assert tight.preemptions > 0
    assert _tokens(_engine(model, step="pytorch", kv_blocks=9), requests)[2] == _tokens(tight, requests)[2]


def test_step_flag_of_generate_and_serve(tmp_path, capsys):
    from live_server import train_tiny_run

    from pyramoe.cli.main import main

    run = str(train_tiny_run(tmp_path))
    capsys.readouterr()
    argv = ["generate", run, "--step", "device", "--prompt", "def f", "--max-new-tokens", "6", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr()
    assert "device decode step" in first.err
    assert main(argv) == 0 and capsys.readouterr().out == first.out  # seeded draws on the device repeat
    for command, extra, field in [("generate", ["--step", "cuda-graphs"], "--step"),
                                  ("serve", ["--step", "cuda-graphs"], "--step"),
                                  ("generate", ["--step", "device", "--quantize", "int8"], "device step")]:
        assert main([command, run, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and field in err, err


def _events(engine: Engine, requests) -> dict[str, list]:
    ids = [engine.add_request(prompt, params) for prompt, params in requests]
    events = {request_id: [] for request_id in ids}
    for event in engine.stream():
        events[event.request_id].append(event)
    return [events[request_id] for request_id in ids]


def _close(ours, theirs) -> None:
    """Two Logprobs: the same alternatives' ids, values within fp32 tolerance of each other's logits."""
    assert ours is not None and theirs is not None
    assert abs(ours[0] - theirs[0]) < 1e-4
    assert [t for t, _ in ours[1]] == [t for t, _ in theirs[1]]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(ours[1], theirs[1]))


def test_logprobs_come_from_the_device_step_equal_the_host_paths(monkeypatch):
    """Generated tokens' and prompt tokens' log-probabilities with alternatives, computed inside the
    device step (never from the logits on the host: `token_logprobs` is made to fail), equal the
    PyTorch step's host values; sampled, penalised and greedy requests mixed, prompts in chunks."""
    model = _model(CASES["mixtral"], torch.float32)
    requests = [(PROMPT, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, prompt_logprobs=2, ignore_eos=True)),
                ([3, 1, 4, 1, 5], SamplingParams(**{**SAMPLED.__dict__, "logprobs": 20, "max_tokens": 5})),
                ([7, 7, 7, 2, 5], SamplingParams(**{**PENALISED.__dict__, "logprobs": 0, "prompt_logprobs": 5})),
                OTHERS[0]]
    want = _events(_engine(model, step="pytorch"), requests)
    import pyramoe.inference.engine as engine_module

    def on_the_host(*args):
        raise AssertionError("log-probabilities read from the logits on the host")

    monkeypatch.setattr(engine_module, "token_logprobs", on_the_host)
    got = _events(_engine(model), requests)
    for (prompt, params), ours, theirs in zip(requests, got, want):
        if params.greedy:  # sampled ones draw otherwise on each path: compare their own tokens' values below
            assert [e.token_id for e in ours] == [e.token_id for e in theirs]
        if params.prompt_logprobs is not None:
            assert len(ours[0].prompt_logprobs) == len(theirs[0].prompt_logprobs) == len(prompt)
            assert ours[0].prompt_logprobs[0] is None
            for a, b in zip(ours[0].prompt_logprobs[1:], theirs[0].prompt_logprobs[1:]):
                _close(a, b)
                assert len(a[1]) == params.prompt_logprobs
        for event in ours:
            assert (event.logprob is None) == (params.logprobs is None or event.token_id is None)
        if params.greedy and params.logprobs is not None:
            for a, b in zip(ours, theirs):
                _close(a.logprob, b.logprob)
                assert len(a.logprob[1]) == params.logprobs


def test_sampled_tokens_logprobs_are_the_models():
    """A sampled request's token log-probabilities (device) are the full forward's log-softmax at
    its own tokens, before temperature and penalties."""
    model = _model(CASES["gpt-2 top-2"], torch.float32)
    params = SamplingParams(**{**PENALISED.__dict__, "logprobs": 2})
    events = _events(_engine(model), [(PROMPT, params), OTHERS[1]])[0]
    tokens = [e.token_id for e in events]
    with torch.no_grad():
        logits_TV = model(torch.tensor([PROMPT + tokens[:-1]])).logits[0, len(PROMPT) - 1 :].float()
    logp_TV = torch.log_softmax(logits_TV, dim=-1)
    for t, event in enumerate(events):
        assert abs(event.logprob[0] - float(logp_TV[t, tokens[t]])) < 1e-4
        assert [i for i, _ in event.logprob[1]] == torch.topk(logp_TV[t], 2).indices.tolist()
