"""Sampling settings of one request and the choice of its next token."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature 0 is greedy. top_k 0 and top_p 1.0 keep every token. `seed` gives the request its
    own generator, so its samples do not depend on which other requests share its batch.
    It stops at `max_tokens`, at the model's EOS (unless `ignore_eos`), at any of `stop_token_ids`,
    or when its text contains one of `stop` (the text is cut before it).
    """

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self) -> None:
        checks = (
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        )
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}, got {getattr(self, name)!r}")


def sample_token(logits_V: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of logits (fp32): greedy, or temperature + top-k + top-p."""
    if params.temperature == 0:
        return int(logits_V.argmax())
    # Sampled on the CPU, where each request's generator lives, whichever device computed the logits
    # (torch.multinomial refuses a CPU generator for CUDA probabilities).
    logits_V = logits_V.float().cpu() / params.temperature
    if 0 < params.top_k < logits_V.numel():
        threshold = torch.topk(logits_V, params.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < threshold, float("-inf"))
    probs_V = torch.softmax(logits_V, dim=-1)
    if params.top_p < 1.0:
        probs_V = nucleus(probs_V, params.top_p)
    return int(torch.multinomial(probs_V, 1, generator=generator))


def nucleus(probs_V: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of likeliest tokens whose probability reaches top_p (the likeliest
    always), renormalised."""
    sorted_V, order_V = torch.sort(probs_V, descending=True)
    before_V = torch.cumsum(sorted_V, 0) - sorted_V  # mass of the strictly likelier tokens
    keep_sorted_V = before_V < top_p
    keep_V = torch.zeros_like(keep_sorted_V).scatter(0, order_V, keep_sorted_V)
    kept_V = probs_V * keep_V
    return kept_V / kept_V.sum()
