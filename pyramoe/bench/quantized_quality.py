"""What quantized weights cost in quality, on a trained checkpoint (`pyramoe bench generate
--quantize int8 --quality-checkpoint RUN`): perplexity on its held-out split with its weights in bf16
and quantized (computed by the PyTorch step's int8 arithmetic, which the native step's equals: see
tests/test_quantize.py), and the engine's greedy tokens with quantized weights against bf16's over
the same prompts (held-out text): the share of generated positions with the same token, and the
mean length of the common prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pyramoe.checkpoint import build_model, load_checkpoint
from pyramoe.inference import Engine, SamplingParams
from pyramoe.inference.packing import quantize_model
from pyramoe.train import evaluate
from pyramoe.train.config import run_config_from_dict
from pyramoe.train.session import load_data

PROMPT_TOKENS = 16


def quantized_quality(checkpoint: str | Path, quantize: str, tokens: int = 256, prompts: int = 4,
                      eval_batches: int | None = None) -> dict[str, Any]:
    """Perplexities (bf16, quantized, their ratio) and greedy agreement over `tokens` generated
    tokens (`prompts` prompts of PROMPT_TOKENS held-out tokens, tokens / prompts new tokens each)."""
    ckpt = load_checkpoint(checkpoint)
    run = run_config_from_dict({"train": ckpt.state["run_config"]["train"],
                                "model": ckpt.state["run_config"].get("model", {})})
    cfg = run.train
    data = load_data(run, ckpt, progress=False)

    def model(quantized: bool) -> torch.nn.Module:
        built = build_model(ckpt, dropless=True).to(torch.bfloat16).eval()
        if quantized:
            quantize_model(built, quantize)
        return built

    batches = eval_batches or cfg.eval_batches
    models = {"bf16": model(False), quantize: model(True)}
    perplexity = {name: evaluate(m, data.val_dataset(), cfg.batch_size, cfg.seq_len, batches).perplexity
                  for name, m in models.items()}
    new_tokens = tokens // prompts
    if PROMPT_TOKENS + new_tokens > models["bf16"].config.max_seq_len:
        raise ValueError(f"--quality-tokens: {new_tokens} new tokens per prompt exceed the model's context "
                         f"({models['bf16'].config.max_seq_len} positions)")
    x, _ = next(iter(data.val_dataset().iter_eval_batches(prompts, PROMPT_TOKENS, 1)))
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    outputs = {}
    for name, quantized in (("bf16", False), (quantize, True)):
        engine = Engine(model(False), max_batch=prompts, eos_id=None, prefix_caching=False,
                        quantize=quantize if quantized else None)
        outputs[name] = [c.token_ids for c in engine.generate(x.tolist(), params)]
        decode_path = engine.decode_path
    same = sum(a == b for ours, theirs in zip(outputs["bf16"], outputs[quantize]) for a, b in zip(ours, theirs))
    prefixes = [next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
                for ours, theirs in zip(outputs["bf16"], outputs[quantize])]
    return {"checkpoint": str(ckpt.path), "step": ckpt.step, "perplexity": perplexity,
            "perplexity_ratio": perplexity[quantize] / perplexity["bf16"], "eval_batches": batches,
            "greedy_tokens": prompts * new_tokens, "greedy_agreement": same / (prompts * new_tokens),
            "greedy_common_prefix": sum(prefixes) / len(prefixes), "decode_path": decode_path}
