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
with ties kept, softmax, then the top-p nucleus), computed for all rows at once. Presence and
frequency penalties (`penalise`) are subtracted from the logits before, as
`sampling.apply_penalties` does on the host, from per-request output token counts the step keeps on
the device.

A step hands its rows' settings to the device as `FIELDS` int64 rows (`sampling_fields`: floats as
their fp32 bits), so they can ride in the same host buffer as the rest of the step's plan: one copy.

Legend: R rows, V vocabulary.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from pyramoe.inference.sampling import MIN_TEMPERATURE, SamplingParams

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive counters and vocabulary indices


class RowSampling(NamedTuple):
    """How one row draws its token: its request's settings and seed (any int; taken mod 2^64), and
    the counter (which of the request's samples this is)."""

    params: SamplingParams
    seed: int
    counter: int


# Rows of `sampling_fields`: temperature, top_p, presence and frequency penalties (fp32 bits), then
# top_k, seed low / high 32 bits, counter.
FIELDS = 8
_FLOATS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
GREEDY = SamplingParams(temperature=0.0)


def sampling_fields(rows_R: Sequence[RowSampling | None]) -> list[list[int]]:
    """The rows' settings as FIELDS lists of R ints (None: a greedy row). Floats travel as their fp32
    bit patterns (signed 32-bit ints, exact in int64) so every field fits one int64 buffer."""
    rows = [row if row is not None else RowSampling(GREEDY, 0, 0) for row in rows_R]
    temperature, top_p, presence, frequency = (_fp32_bits([getattr(r.params, name) for r in rows]) for name in _FLOATS)
    return [temperature, top_p, presence, frequency, [r.params.top_k for r in rows], [r.seed & MASK32 for r in rows],
            [(r.seed >> 32) & MASK32 for r in rows], [r.counter & MASK32 for r in rows]]


def _fp32_bits(values: list[float]) -> list[int]:
    """Each value rounded to fp32, as its bit pattern read as a signed 32-bit int."""
    return list(array.array("i", array.array("f", values).tobytes()))


def penalised(params: SamplingParams) -> bool:
    """The request's logits are penalised by the tokens it has generated (presence or frequency)."""
    return params.presence_penalty != 0 or params.frequency_penalty != 0


def sampling_mode(rows_R: Sequence[RowSampling | None]) -> int:
    """0: every row greedy (argmax only); 1: some row samples, none truncates; 2: some row has top-k
    or top-p (the sort runs). Known on the host, so a step's ops (and its CUDA graph) follow it."""
    sampled = [r.params for r in rows_R if r is not None and not r.params.greedy]
    if not sampled:
        return 0
    return 2 if any(p.top_k > 0 or p.top_p < 1.0 for p in sampled) else 1


def penalty_mode(rows_R: Sequence[RowSampling | None]) -> bool:
    """Some row is penalised (`penalise` runs): known on the host, part of a step's ops as `sampling_mode`."""
    return any(r is not None and penalised(r.params) for r in rows_R)


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
    presence_R: torch.Tensor | None = None  # fp32 presence / frequency penalties (0: none)
    frequency_R: torch.Tensor | None = None

    @classmethod
    def build(cls, params_R: Sequence[SamplingParams], seeds_R: Sequence[int], counters_R: Sequence[int],
              device: torch.device | str) -> SamplingBatch:
        """From each row's request settings, seed (any int; taken mod 2^64) and counter: one host
        tensor, one copy to the device."""
        rows = [RowSampling(p, s, c) for p, s, c in zip(params_R, seeds_R, counters_R)]
        fields = torch.tensor(sampling_fields(rows), dtype=torch.int64).to(device, non_blocking=True)
        return cls.from_fields(fields, truncates=sampling_mode(rows) == 2)

    @classmethod
    def from_fields(cls, fields_FR: torch.Tensor, truncates: bool) -> SamplingBatch:
        """Views of `sampling_fields` already on the device (no copy, no sync)."""
        floats = fields_FR[:4].to(torch.int32).view(torch.float32)
        return cls(floats[0], fields_FR[4], floats[1], fields_FR[5:7].t(), fields_FR[7], truncates, floats[2],
                   floats[3])


def sample(logits_RV: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """One token id per row (int64, on the logits' device): the argmax for greedy rows, else a
    draw from the row's filtered distribution."""
    greedy_R = batch.temperature_R < MIN_TEMPERATURE
    probs_RV = filtered_probs(logits_RV, batch)
    exponential_RV = -torch.log(uniforms(batch.seed_R, batch.counter_R, logits_RV.shape[1]))
    drawn_R = (probs_RV / exponential_RV).argmax(-1)
    return torch.where(greedy_R, logits_RV.argmax(-1), drawn_R)


def penalise(logits_RV: torch.Tensor, counts_RV: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """`sampling.apply_penalties` for every row at once: the logits (fp32) less each row's frequency
    penalty per occurrence and presence penalty once, of the tokens counted in `counts_RV` (its
    request's output so far). Rows without penalties come back unchanged (their penalties are 0)."""
    counts_RV = counts_RV.to(logits_RV.dtype)
    return (logits_RV - batch.frequency_R.unsqueeze(1) * counts_RV
            - batch.presence_R.unsqueeze(1) * (counts_RV > 0).to(logits_RV.dtype))


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
    return unit_interval(bits_RV)


def unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """32-bit integers to fp32 in (0, 1): their top 23 bits k as (k + 0.5) / 2^23, every value
    exact. (24 bits would not be: (2^24 - 1) + 0.5 rounds to 2^24 in fp32, a uniform of exactly 1,
    an exponential of 0, and p / 0 picked a token of probability 0 about once per 2^24 draws.)"""
    return ((bits >> 9).to(torch.float32) + 0.5) * 2.0**-23


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
