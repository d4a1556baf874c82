"""Sampling settings of one request and the choice of its next token."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # alternatives per position (OpenAI's limit)
# Below this temperature sampling is greedy: dividing logits by ~1e-300 overflows to inf and NaN.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 (below MIN_TEMPERATURE) is greedy. top_k 0 and top_p 1.0 keep every token. `seed`
    gives the request its own generator, so its samples do not depend on which other requests share
    its batch.
    `presence_penalty` / `frequency_penalty` (OpenAI's): subtracted from the logit of every token
    already generated, once / once per occurrence, before greedy choice or sampling.
    It stops at `max_tokens`, at the model's EOS (unless `ignore_eos`), at any of `stop_token_ids`,
    or when its text contains one of `stop` (the text is cut before it). `max_tokens` 0 only reads
    the prompt (for `prompt_logprobs`).
    `logprobs`: each generated token's log-probability under the model (fp32 log-softmax of its
    logits, before penalties, temperature and truncation) and that many likeliest alternatives;
    `prompt_logprobs`: the same for every prompt token after the first. None: not computed.
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> None:
        checks = (
            ("max_tokens", self.max_tokens >= 0, "must be >= 0"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"must be in [0, {MAX_LOGPROBS}]"),
        )
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}, got {getattr(self, name)!r}")


def sample_token(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of logits (fp32): greedy, or temperature + top-k + top-p."""
    if params.greedy:
        return int(logits_V.argmax())
    # Sampled on the CPU, where each request's generator lives, whichever device computed the logits
    # (torch.multinomial refuses a CPU generator for CUDA probabilities).
    return int(torch.multinomial(sampling_probs(logits_V.cpu(), params), 1, generator=generator))


def sampling_probs(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What a sampled (not greedy) token is drawn from: softmax(logits / temperature) over the top_k
    likeliest (ties with the k-th kept), cut to the top_p nucleus, renormalised (fp32)."""
    logits_V = logits_V.float() / params.temperature
    if 0 < params.top_k < logits_V.numel():
        threshold = torch.topk(logits_V, params.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < threshold, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if params.top_p < 1.0:
        probs_V = nucleus(probs_V, params.top_p)
    return probs_V


def nucleus(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of likeliest tokens whose probability reaches top_p (the likeliest
    always), renormalised."""
    sorted_V, order_V = torch.sort(probs_V, descending=True)
    before_V = torch.cumsum(sorted_V, 0) - sorted_V  # mass of the strictly likelier tokens
    keep_sorted_V = before_V < top_p
    keep_sorted_V[0] = True  # a top_p that rounds to 0 in fp32 still keeps the likeliest
    keep_V = torch.zeros_like(keep_sorted_V).scatter(0, order_V, keep_sorted_V)
    kept_V = probs_V * keep_V
    return kept_V / kept_V.sum()


def apply_penalties(logits_V: torch.Tensor, output_ids: list[int], params: SamplingParams) -> torch.Tensor:
    """The logits less the presence and frequency penalties of the tokens generated so far (a copy)."""
    if not output_ids or (params.presence_penalty == 0 and params.frequency_penalty == 0):
        return logits_V
    counts_V = torch.bincount(torch.tensor(output_ids, device=logits_V.device), minlength=logits_V.numel())
    counts_V = counts_V.to(logits_V.dtype)
    return logits_V - params.frequency_penalty * counts_V - params.presence_penalty * (counts_V > 0).to(logits_V.dtype)


def token_logprobs(logits_V: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability under the logits (fp32 log-softmax) and the `top` likeliest
    (token, log-probability) pairs."""
    logp_V = torch.log_softmax(logits_V.float(), dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(logp_V, min(top, logp_V.numel()))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return float(logp_V[token]), alternatives
