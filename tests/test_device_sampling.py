"""Sampling on the device (`pyramoe.inference.device_sampling`): each row samples from
`sampling_probs`'s distribution (temperature, top-k, top-p as the CPU sampler computes them), the
draws follow it (chi-square over 20,000 draws), greedy rows take the argmax, a row's token depends
on its seed and counter only (not on the other rows of its step), and no host sync happens."""

from __future__ import annotations

import math

import pytest
import torch
from host_syncs import no_host_syncs

from pyramoe.inference.device_sampling import SamplingBatch, filtered_probs, sample, uniforms, unit_interval
from pyramoe.inference.sampling import SamplingParams, sampling_probs

SETTINGS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
            SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=0.9, top_k=5, top_p=0.6),
            SamplingParams(temperature=1.0, top_k=50), SamplingParams(temperature=2.0, top_p=0.05)]


def _batch(params, seeds, counters) -> SamplingBatch:
    return SamplingBatch.build(params, seeds, counters, "cpu")


def test_rows_sample_from_the_cpu_samplers_distribution():
    logits_RV = torch.randn(len(SETTINGS), 40) * 3
    got_RV = filtered_probs(logits_RV, _batch(SETTINGS, [0] * len(SETTINGS), [0] * len(SETTINGS)))
    for probs_V, logits_V, params in zip(got_RV, logits_RV, SETTINGS):
        want_V = sampling_probs(logits_V, params)
        torch.testing.assert_close(probs_V, want_V, atol=1e-6, rtol=1e-5)
        assert torch.equal(probs_V > 0, want_V > 0)  # the same tokens kept


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability ~0.001 (z = 3.09; Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("params", SETTINGS[:4], ids=["plain", "top-k", "top-p", "top-k top-p"])
def test_draws_follow_the_distribution(params):
    draws = 20_000
    logits_V = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    probs_V = sampling_probs(logits_V, params)
    batch = _batch([params] * draws, [1234] * draws, range(draws))  # one request's 20,000 successive samples
    tokens = sample(logits_V.expand(draws, -1), batch)
    counts_V = torch.bincount(tokens, minlength=logits_V.numel()).double()
    assert counts_V[probs_V == 0].sum() == 0
    kept = probs_V > 0
    expected = probs_V[kept].double() * draws
    chi2 = float(((counts_V[kept] - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_critical(int(kept.sum()) - 1), (chi2, counts_V.tolist(), expected.tolist())


def test_uniforms_are_uniform_and_independent_of_neighbours():
    u = uniforms(torch.tensor([[7, 0], [7, 0], [8, 0]]), torch.tensor([0, 1, 0]), 50_000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    for row in u:
        assert abs(float(row.mean()) - 0.5) < 0.01 and abs(float(row.var()) - 1 / 12) < 0.005
    assert abs(float(torch.corrcoef(u)[0, 1])) < 0.02 and abs(float(torch.corrcoef(u)[0, 2])) < 0.02
    assert torch.equal(uniforms(torch.tensor([[7, 0]]), torch.tensor([1]), 50_000)[0], u[1])


def test_uniforms_stay_inside_the_open_interval_at_the_extreme_bits():
    u = unit_interval(torch.tensor([0, 1, 2**31, 2**32 - 512, 2**32 - 2, 2**32 - 1]))
    assert float(u.min()) > 0 and float(u.max()) < 1
    # Seed 766's first draw over 101 tokens hit bits 2^32 - 1 at token 17: it must still pick a kept token.
    logits_V = torch.arange(101, dtype=torch.float32) / 10
    params = SamplingParams(temperature=1.0, top_k=6)
    token = sample(logits_V[None], _batch([params], [766], [0]))
    assert int(token) in range(95, 101)


def test_a_rows_token_depends_on_its_seed_and_counter_only():
    torch.manual_seed(0)
    logits_RV = torch.randn(6, 30)
    params = [SETTINGS[i % len(SETTINGS)] for i in range(6)]
    seeds, counters = [11, 2**40 + 3, 11, 99, 5, 2**63 - 1], [0, 4, 1, 7, 7, 2]
    together = sample(logits_RV, _batch(params, seeds, counters)).tolist()
    alone = [sample(logits_RV[r : r + 1], _batch(params[r : r + 1], seeds[r : r + 1], counters[r : r + 1])).item()
             for r in range(6)]
    order = [4, 2, 0, 5, 1, 3]
    shuffled = sample(logits_RV[order], _batch([params[r] for r in order], [seeds[r] for r in order],
                                               [counters[r] for r in order])).tolist()
    assert together == alone == [shuffled[order.index(r)] for r in range(6)]


def test_seeds_and_counters_change_the_draws():
    logits_RV = torch.zeros(400, 1000)  # uniform over 1,000 tokens: two streams agree by chance ~0.1%
    params = [SamplingParams(temperature=1.0)] * 400
    first = sample(logits_RV, _batch(params, [1] * 400, range(400)))
    other_seed = sample(logits_RV, _batch(params, [2] * 400, range(400)))
    shifted = sample(logits_RV, _batch(params, [1] * 400, range(1, 401)))
    assert int((first == other_seed).sum()) < 5 and int((first[1:] == shifted[:-1]).sum()) == 399


def test_greedy_rows_take_the_argmax_and_no_host_sync_happens():
    logits_RV = torch.randn(3, 20)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9),
              SamplingParams(temperature=0.0, top_k=4)]
    batch = _batch(params, [1, 2, 3], [0, 0, 0])
    with no_host_syncs():
        tokens = sample(logits_RV, batch)
    assert tokens[0] == logits_RV[0].argmax() and tokens[2] == logits_RV[2].argmax()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_the_cpus_uniforms():
    seeds, counters = torch.tensor([[5, 9], [2**32 - 1, 0]]), torch.tensor([3, 2**32 - 1])
    assert torch.equal(uniforms(seeds.cuda(), counters.cuda(), 32000).cpu(), uniforms(seeds, counters, 32000))
