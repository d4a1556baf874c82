"""What the engine keeps per request, and what it hands back: events while a request runs, a
completion at its end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pyramoe.inference.sampling import SamplingParams

Logprob = tuple[float, list[tuple[int, float]]]  # a token's log-probability, the likeliest (token, log-probability)


@dataclass
class TokenEvent:
    """One new token of one request (the streaming unit)."""

    request_id: str
    token_id: int | None  # None when a request ends without a new token (EOS or stop token, abort, error)
    text: str  # text delta: what the request's text gained with this token (held back mid-character)
    finished: bool = False
    finish_reason: str | None = None  # "length", "stop" (EOS, stop token or string), "abort", "error"
    logprob: Logprob | None = None  # the token's, when the request asked (`SamplingParams.logprobs`)
    prompt_logprobs: list[Logprob | None] | None = None  # on a request's first event, when asked; [0] is None
    error: str | None = None  # why, when finish_reason is "error"


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    seed: int | None = None  # what seeded `generator`: the device step's sampling draws from it too
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already sent in events
    # Incremental detokenization: output_ids[prefix_offset:read_offset] decode to the end of `text`
    # (context for the next token's text); None: decode the whole output every step.
    prefix_offset: int | None = 0
    read_offset: int = 0
    cached: int = 0  # tokens in the KV cache
    slot: int | None = None
    finish_reason: str | None = None
    stop_ids: frozenset[int] | None = None  # token ids that end it (set at its first token)
    prompt_logprobs: list[Logprob | None] | None = None  # filled while the prompt is read, when asked
    error: str | None = None
    # After a preemption: the prompt and the tokens generated so far, read again (recomputed) before
    # the next token is sampled.
    recompute_ids: list[int] | None = None
    # The slot whose device-side output counts (the device step's penalties) hold this request's
    # tokens; None until its first penalised device step in its current slot.
    counts_slot: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def context_ids(self) -> list[int]:
        """What the KV cache must hold before the next token is sampled."""
        return self.prompt_ids if self.recompute_ids is None else self.recompute_ids

    @property
    def reading_prompt(self) -> bool:
        """Its prompt (or, after a preemption, its prompt and output) is still being read."""
        return self.cached < len(self.context_ids)

    @property
    def scoring_prompt(self) -> bool:
        """Its prompt's log-probabilities are wanted and not yet sent (they go with the first event)."""
        return self.params.prompt_logprobs is not None and not self.output_ids and self.recompute_ids is None

    def extend_text(self, decode: Callable[[list[int]], str]) -> None:
        """Add the newest token's text to `text` by decoding a short window (the last complete piece
        as context, then what follows), not the whole output: decoding everything each step cost
        0.18 ms per request at 2,000 tokens. Text of a token that ends inside a character waits until
        the character is complete. A tokenizer whose window does not extend its context's text gets
        whole-output decoding."""
        ids = self.output_ids
        if self.prefix_offset is None:
            self.text = decode(ids)
            return
        context = decode(ids[self.prefix_offset : self.read_offset])
        window = decode(ids[self.prefix_offset :])
        if not window.startswith(context):
            self.prefix_offset = None
            self.text = decode(ids)
        elif len(window) > len(context) and not window.endswith("\ufffd"):
            self.text += window[len(context) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)

    def cut_at_stop(self) -> bool:
        """Cut `text` before the first stop string it now contains (whether it did)."""
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.params.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def event(self, token: int | None, logprob: Logprob | None = None) -> TokenEvent:
        """The event for a new token (or the end): the text not yet sent, holding back while running a
        character split across tokens and what could still become a stop string."""
        end = len(self.text)
        if not self.finished:
            end = len(self.text.rstrip("\ufffd"))
            end -= max((len(s) for s in self.params.stop), default=1) - 1
        delta = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None  # sent once
        return TokenEvent(self.id, token, delta, self.finished, self.finish_reason, logprob, prompt_logprobs,
                          self.error)


@dataclass
class Completion:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    error: str | None = None
