"""Sampling a whole step's rows on the device, in a few batched ops and no host sync: the chosen
token ids are the only thing that comes back, once per step.

Randomness is counter-based, not a generator per request: row r draws its V uniforms from a hash
of (its request's seed, a counter - the index of the token it samples - and the vocabulary index),
computed on the device in 32-bit integer lanes (murmur3's finaliser, exact in int64 arithmetic,
so the same bits on every device). A request's samples therefore depend on its seed and its own
progress only: not on which rows share its step, their order, or a preemption that replays it.
The token is drawn by an exponential race, argmax_v p_v / E_v with E_v = -log(u_v) ~ Exp(1),
which picks v with probability p_v / sum(p) exactly and never a token of probability 0.

The distribution each row samples from is `sampling.sampling_probs`'s (temperature, then top-k
with ties kept, softmax, then the top-p nucleus), computed for all rows at once.

Legend: R rows, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pyramoe.inference.sampling import MIN_TEMPERATURE, SamplingParams

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters and vocabulary indices


@dataclass
class SamplingBatch:
    """Per-row settings on the device. `truncates`: some row has top-k or top-p (known on the host,
    so steps without them skip the sort)."""

    temperature_R: torch.Tensor  # fp32; rows below MIN_TEMPERATURE are greedy
    top_k_R: torch.Tensor  # int64, 0: all
    top_p_R: torch.Tensor  # fp32, 1: all
    seed_R: torch.Tensor  # int64: the seed's low 32 bits, then high 32 bits, per row ([R, 2])
    counter_R: torch.Tensor  # int64: which of its request's samples the row draws
    truncates: bool

    @classmethod
    def build(cls, params_R: Sequence[SamplingParams], seeds_R: Sequence[int], counters_R: Sequence[int],
              device: torch.device | str) -> SamplingBatch:
        """From each row's request settings, seed (any int; taken mod 2^64) and counter: two host
        tensors, two copies to the device."""
        floats = torch.tensor([[p.temperature for p in params_R], [p.top_p for p in params_R]], dtype=torch.float32)
        ints = torch.tensor([[p.top_k for p in params_R], [s & MASK32 for s in seeds_R],
                             [(s >> 32) & MASK32 for s in seeds_R], [c & MASK32 for c in counters_R]],
                            dtype=torch.int64)
        floats, ints = floats.to(device, non_blocking=True), ints.to(device, non_blocking=True)
        truncates = any(p.top_k > 0 or p.top_p < 1.0 for p in params_R)
        return cls(floats[0], ints[0], floats[1], ints[1:3].t(), ints[3], truncates)


def sample(logits_RV: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token id per row (int64, on the logits' device): the argmax for greedy rows, else a
    draw from the row's filtered distribution."""
    greedy_R = batch.temperature_R < MIN_TEMPERATURE
    probs_RV = filtered_probs(logits_RV, batch)
    exponential_RV = -torch.log(uniforms(batch.seed_R, batch.counter_R, logits_RV.shape[1]))
    drawn_R = (probs_RV / exponential_RV).argmax(-1)
    return torch.where(greedy_R, logits_RV.argmax(-1), drawn_R)


def filtered_probs(logits_RV: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Each row's `sampling_probs` (fp32 [R, V]); greedy rows get those of temperature 1 (unused)."""
    greedy_R = batch.temperature_R < MIN_TEMPERATURE
    temperature_R = torch.where(greedy_R, torch.ones_like(batch.temperature_R), batch.temperature_R)
    scaled_RV = logits_RV.float() / temperature_R.unsqueeze(1)
    if not batch.truncates:
        return torch.softmax(scaled_RV, dim=-1)
    vocab = scaled_RV.shape[1]
    sorted_RV = torch.sort(scaled_RV, dim=-1, descending=True).values
    k_R = torch.where((batch.top_k_R > 0) & (batch.top_k_R < vocab), batch.top_k_R, vocab)
    threshold_R1 = sorted_RV.gather(1, (k_R - 1).unsqueeze(1))
    probs_RV = torch.softmax(scaled_RV.masked_fill(scaled_RV < threshold_R1, float("-inf")), dim=-1)
    sorted_probs_RV, order_RV = torch.sort(probs_RV, dim=-1, descending=True)
    before_RV = torch.cumsum(sorted_probs_RV, dim=-1) - sorted_probs_RV  # mass of the strictly likelier
    keep_sorted_RV = (before_RV < batch.top_p_R.unsqueeze(1)) | (batch.top_p_R >= 1.0).unsqueeze(1)
    keep_sorted_RV[:, 0] = True  # the likeliest always stays
    keep_RV = torch.zeros_like(keep_sorted_RV).scatter(1, order_RV, keep_sorted_RV)
    kept_RV = probs_RV * keep_RV
    return kept_RV / kept_RV.sum(dim=-1, keepdim=True)


def uniforms(seed_R2: torch.Tensor, counter_R: torch.Tensor, width: int) -> torch.Tensor:
    """[R, width] fp32 uniforms in (0, 1), a pure function of (seed, counter, column)."""
    key_R = _fmix32(seed_R2[:, 0] ^ _fmix32(seed_R2[:, 1] ^ GOLDEN32))
    key_R = _fmix32(key_R ^ _mul32(counter_R, GOLDEN32))
    column_V = _mul32(torch.arange(width, dtype=torch.int64, device=seed_R2.device), GOLDEN32)
    bits_RV = _fmix32(_fmix32(key_R.unsqueeze(1) ^ column_V) ^ key_R.unsqueeze(1))
    # 24 bits: exact in fp32, and +0.5 keeps them off 0 and 1.
    return ((bits_RV >> 8).to(torch.float32) + 0.5) * 2.0**-24


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), in 16-bit halves so no int64 product overflows."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)
