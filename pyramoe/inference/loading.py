"""Models in from disk for the engine: a pyramoe checkpoint or run directory, a quantized model
directory (`pyramoe quantize`), a llama.cpp GGUF file, or a Hugging Face model directory, with the
tokenizer that goes with each and the engine settings the source fixes (EOS, weight format)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pyramoe.data import Tokenizer
from pyramoe.inference.quantized_checkpoint import is_quantized_directory, load_quantized
from pyramoe.models import GPT
from pyramoe.runtime import cpu_has_native_bf16


def load_model(path: str | Path, dtype: str, device: str, kwargs: dict[str, Any]
               ) -> tuple[GPT, Tokenizer | None, dict[str, Any]]:
    """The model at `path` on `device` in `dtype` ("auto": `resolve_dtype`), its tokenizer (None
    where it has none), and the engine's keyword arguments with what the source sets added."""
    path, kwargs = Path(path), dict(kwargs)
    torch_dtype = resolve_dtype(dtype, device)
    if is_hf_directory(path):
        from pyramoe.hf import load_hf_model

        hf = load_hf_model(path, dtype=torch_dtype, dropless=True)
        tokenizer = Tokenizer.from_file(hf.tokenizer_path) if hf.tokenizer_path else None
        eos = hf.hf_config.get("eos_token_id")
        kwargs.setdefault("eos_id", eos[0] if isinstance(eos, list) else eos)
        return hf.model.to(device), tokenizer, kwargs
    if path.suffix == ".gguf":  # llama.cpp's file: Q4_0 / Q8_0 matrices kept, the rest quantized at load
        from pyramoe.inference.gguf import load_gguf

        model, held = load_gguf(path, torch_dtype)
        if kwargs.get("quantize") is None:  # what stayed plain (a float LM head) in the file's format
            kwargs["quantize"] = held["quantize"]
        sibling = path.parent / "tokenizer.json"
        tokenizer = Tokenizer.from_file(sibling) if sibling.is_file() else held["tokenizer"]
        return model.to(device), tokenizer, kwargs
    if is_quantized_directory(path):  # `pyramoe quantize`'s output: no quantizing at load
        model, meta = load_quantized(path, torch_dtype)
        if kwargs.get("quantize") not in (None, meta["quantize"]):
            raise ValueError(f"quantize: {path} holds {meta['quantize']} weights already; leave it out "
                             f"(asked for {kwargs['quantize']})")
        kwargs["quantize"] = meta["quantize"]
        tokenizer = Tokenizer.from_file(path / meta["tokenizer"]) if meta.get("tokenizer") else None
        return model.to(device), tokenizer, kwargs
    from pyramoe.checkpoint import build_model, load_checkpoint

    ckpt = load_checkpoint(path)
    model = build_model(ckpt, dropless=True).to(device=device, dtype=torch_dtype)
    return model, Tokenizer.from_file(ckpt.tokenizer_path), kwargs


def is_hf_directory(path: Path) -> bool:
    """A Hugging Face model directory: config.json, and neither a pyramoe checkpoint (state.json) nor
    a run directory (checkpoints/)."""
    pyramoe_markers = (path / "state.json", path / "checkpoints")
    return (path / "config.json").is_file() and not any(p.exists() for p in pyramoe_markers)


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """"auto": bf16 on CUDA and on CPUs with native bf16 matmul (AVX512-BF16/AMX), else fp32."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype == "auto":
        native = str(device).startswith("cuda") or cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    if dtype not in table:
        raise ValueError(f"dtype: must be auto, fp32 or bf16, got {dtype!r}")
    return table[dtype]
