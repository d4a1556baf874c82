"""Text in, text out: one prompt completed by the engine (the CLI's sample after training)."""

from __future__ import annotations

from pyramoe.data import Tokenizer
from pyramoe.inference.engine import Engine
from pyramoe.inference.sampling import SamplingParams
from pyramoe.models import GPT


def complete(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> str:
    """The text generated after `prompt` (an empty prompt starts a new document), up to EOS."""
    # Unpacked: one short sample, during or after training; packing would copy every weight for it.
    engine = Engine(model, tokenizer, max_batch=1, pack_weights=False)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0, seed=seed)
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    new = engine.generate([ids], params)[0].token_ids
    # Decoded together with the prompt: a character may span the prompt's last token and the first new one.
    prefix, full = tokenizer.decode(ids), tokenizer.decode(ids + new)
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(new)
