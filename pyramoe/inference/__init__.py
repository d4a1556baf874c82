"""Inference: a continuous-batching engine over a paged KV cache, and sampling."""

from pyramoe.inference.engine import Completion, Engine, TokenEvent
from pyramoe.inference.kv_cache import SlotKVCache
from pyramoe.inference.loading import resolve_dtype
from pyramoe.inference.sampling import SamplingParams, nucleus, sample_token
from pyramoe.inference.text import complete

__all__ = [
    "Completion",
    "Engine",
    "SamplingParams",
    "SlotKVCache",
    "TokenEvent",
    "complete",
    "nucleus",
    "resolve_dtype",
    "sample_token",
]
