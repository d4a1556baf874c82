"""Sampling with the model's KV cache: the prompt in one forward, then one token per forward."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pyramoe.data import Tokenizer
from pyramoe.models import GPT


def sample_next(logits_V: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """Greedy when temperature is 0; otherwise softmax(logits / temperature) over the top_k logits."""
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / temperature
    if top_k is not None and top_k < logits_V.numel():
        threshold = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < threshold, float("-inf"))
    probs = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
    stop_id: int | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids (fewer when `stop_id` comes or the context is full)."""
    if not prompt_ids:
        raise ValueError("prompt: needs at least one token")
    limit = model.config.max_seq_len
    if len(prompt_ids) >= limit:
        raise ValueError(f"prompt: {len(prompt_ids)} tokens leave no room in the model's max_seq_len={limit}")
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    steps = min(max_new_tokens, limit - len(prompt_ids))
    cache = model.new_kv_cache(batch_size=1, max_len=len(prompt_ids) + steps)
    logits = model(torch.tensor([prompt_ids]), kv_cache=cache, start_pos=0).logits[0, -1]
    pos = len(prompt_ids)
    for i in range(steps):
        token = sample_next(logits, temperature, top_k, generator)
        if token == stop_id:
            return
        yield token
        if i + 1 < steps:
            logits = model(torch.tensor([[token]]), kv_cache=cache, start_pos=pos).logits[0, -1]
            pos += 1


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    """The text generated after `prompt` (an empty prompt starts a new document)."""
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    new = list(generate_ids(model, ids, max_new_tokens, temperature, top_k, seed, stop_id=tokenizer.eos_id))
    # Decoded together with the prompt: a character may span the prompt's last token and the first new one.
    prefix, full = tokenizer.decode(ids), tokenizer.decode(ids + new)
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(new)
