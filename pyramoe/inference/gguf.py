"""A llama.cpp GGUF file of a llama/Mixtral-style model as a pyramoe model (`Engine.load(FILE.gguf)`,
`pyramoe generate FILE.gguf`), read with the `gguf` package (`pip install pyramoe[gguf]`).

Q4_0 matrices (blocks of 32 4-bit codes u with an fp16 scale d: w = d (u - 8)) become int4 weights
with groups of 32 exactly (`pyramoe.kernels.quantized4`'s symmetric format is Q4_0's arithmetic).
Q8_0 matrices (blocks of 32 int8 with an fp16 scale) are dequantized and re-quantized to int8 with
one scale per output channel (the int8 kernels' format), which adds at most half that scale's step
per weight. Tensors of any other type the package reads (F32, F16, BF16, K-quants, ...) are
dequantized into the model's dtype; the engine's `quantize` (set from the file's matrices: int4 when
it holds Q4_0, else int8) then quantizes what stayed plain, the LM head at int8 (llama.cpp's Q4_0
files keep their output layer at Q6_K or above).

llama.cpp stores q and k projections with each head's rotary halves interleaved (its converter's
`permute`); they are put back in the half-split order pyramoe's RoPE uses. The file's own tokenizer
(`tokenizer.ggml.*`, `pyramoe.inference.gguf_tokenizer`) is read; `Engine.load` prefers a
`tokenizer.json` beside the file where there is one.

Legend: N outputs, K inputs, E experts, F expert hidden width, D model width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pyramoe.config import LayerConfig, ModelConfig, MoEConfig
from pyramoe.inference.gguf_tokenizer import tokenizer_from_gguf
from pyramoe.kernels import Int4Weight, Int8Weight, quantize_weights
from pyramoe.kernels.quantized4 import block_int4
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.packed import PackedLinear
from pyramoe.models import GPT

BLOCK = 32  # inputs per Q4_0 / Q8_0 block
ARCHITECTURES = ("llama",)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("GGUF files need the gguf package: pip install 'pyramoe[gguf]'") from None
    return gguf


def unpermute_rope_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (each head's rotary pairs interleaved) back to the half-split order,
    along dim 0 (the output rows; any trailing shape)."""
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def permute_rope_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `unpermute_rope_rows`: what llama.cpp's converter writes."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


class _Q4:
    """A Q4_0 matrix (or stack) as codes [..., N, K] and scales [..., N, K/32]."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes, scales


class _Q8:
    """A Q8_0 matrix (or stack) dequantized: [..., N, K] fp32."""

    def __init__(self, values: torch.Tensor):
        self.values = values


def _read_tensor(tensor: Any, gguf: Any, where: str) -> torch.Tensor | _Q4 | _Q8:
    kind = gguf.GGMLQuantizationType
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml lists the innermost first
    data = np.asarray(tensor.data)
    if tensor.tensor_type in (kind.Q4_0, kind.Q8_0):
        if shape[-1] % BLOCK:
            raise ValueError(f"{where}: {tensor.name}: {shape[-1]} inputs, not whole blocks of {BLOCK}")
        size = 18 if tensor.tensor_type == kind.Q4_0 else 34
        blocks = torch.from_numpy(data.reshape(*shape[:-1], shape[-1] // BLOCK, size).copy())
        scales = blocks[..., :2].contiguous().view(torch.float16)[..., 0]
        if tensor.tensor_type == kind.Q4_0:
            packed = blocks[..., 2:]  # byte j: code of input j (low nibble) and j + 16 (high)
            codes = torch.cat((packed & 15, packed >> 4), dim=-1).reshape(shape)
            return _Q4(codes, scales)
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        return _Q8((q * scales.float()[..., None]).reshape(shape))
    try:
        values = gguf.quants.dequantize(data, tensor.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as exc:
        raise ValueError(f"{where}: {tensor.name}: type {tensor.tensor_type.name} unreadable ({exc})") from None
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape)  # a writable copy


def _field(fields: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    if key not in fields:
        if default is None:
            raise ValueError(f"{where}: metadata {key} missing")
        return default
    value = fields[key].contents()
    return value


def _config(fields: dict[str, Any], tensors: dict[str, tuple[int, ...]], where: str) -> ModelConfig:
    arch = _field(fields, "general.architecture", where)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {arch!r} (pyramoe reads {', '.join(ARCHITECTURES)}: llama/Mixtral)")
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    n_layers = int(_field(fields, key("block_count"), where))
    d_model = int(_field(fields, key("embedding_length"), where))
    n_heads = int(_field(fields, key("attention.head_count"), where))
    vocab = int(tensors["token_embd.weight"][1])  # ggml shapes list the innermost (input) dim first
    experts = int(_field(fields, key("expert_count"), where, 0))
    layers = []
    for i in range(n_layers):
        if f"blk.{i}.ffn_gate_inp.weight" in tensors:
            top_k = int(_field(fields, key("expert_used_count"), where))
            expert_ff = int(tensors[f"blk.{i}.ffn_gate_exps.weight"][1])
            layers.append(LayerConfig(moe=MoEConfig(num_experts=experts, top_k=top_k, dropless=True,
                                                    expert_d_ff=expert_ff, gate_norm="after_drop")))
        else:
            layers.append(LayerConfig())
    if not any(layer.moe for layer in layers):
        raise ValueError(f"{where}: no MoE layer (blk.N.ffn_gate_inp); pyramoe reads MoE models")
    dense_ff = next((int(tensors[f"blk.{i}.ffn_up.weight"][1]) for i in range(n_layers)
                     if f"blk.{i}.ffn_up.weight" in tensors), 4 * d_model)
    rope_dim = int(_field(fields, key("rope.dimension_count"), where, d_model // n_heads))
    if rope_dim != d_model // n_heads:
        raise ValueError(f"{where}: partial rotary embeddings ({rope_dim} of {d_model // n_heads}) are not read")
    return ModelConfig(
        vocab_size=vocab, max_seq_len=int(_field(fields, key("context_length"), where, 2048)), d_model=d_model,
        n_heads=n_heads, n_kv_heads=int(_field(fields, key("attention.head_count_kv"), where, n_heads)),
        d_ff=dense_ff, activation="swiglu", bias=False, dropout=0.0, tie_embeddings="output.weight" not in tensors,
        layer_norm_eps=float(_field(fields, key("attention.layer_norm_rms_epsilon"), where, 1e-5)), position="rope",
        rope_theta=float(_field(fields, key("rope.freq_base"), where, 10000.0)), norm="rmsnorm", layers=layers)


def _linear_parts(config: ModelConfig, i: int, moe: bool) -> dict[str, list[str]]:
    """pyramoe matrix -> the GGUF tensors stacked into it (along the outputs)."""
    ours, theirs = f"blocks.{i}.", f"blk.{i}."
    parts = {ours + "attn.qkv": [theirs + f"attn_{p}.weight" for p in "qkv"],
             ours + "attn.proj": [theirs + "attn_output.weight"]}
    if moe:
        parts[ours + "ffn.experts.w_in"] = [theirs + "ffn_gate_exps.weight", theirs + "ffn_up_exps.weight"]
        parts[ours + "ffn.experts.w_out"] = [theirs + "ffn_down_exps.weight"]
    else:
        parts[ours + "ffn.fc_in"] = [theirs + "ffn_gate.weight", theirs + "ffn_up.weight"]
        parts[ours + "ffn.fc_out"] = [theirs + "ffn_down.weight"]
    return parts


def _join(pieces: list[Any], where: str, name: str) -> Any:
    """Pieces stacked along the outputs (dim -2): all of one kind."""
    kinds = {type(p) for p in pieces}
    if len(kinds) != 1:
        raise ValueError(f"{where}: {name}: its parts mix types (Q4_0, Q8_0, float)")
    if kinds == {_Q4}:
        return _Q4(torch.cat([p.codes for p in pieces], -2), torch.cat([p.scales for p in pieces], -2))
    if kinds == {_Q8}:
        return _Q8(torch.cat([p.values for p in pieces], -2))
    return torch.cat(pieces, -2)


def _matrix_weight(value: _Q4 | _Q8) -> Int4Weight | Int8Weight:
    if isinstance(value, _Q4):
        return block_int4(value.codes, value.scales, None, BLOCK)
    return quantize_weights(value.values)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[GPT, dict[str, Any]]:
    """The model in a GGUF file (eval mode, dropless) and what it held: {"formats": {pyramoe matrix:
    "q4_0" | "q8_0" | "float"}, "quantize": the engine format matching it, or None, "tokenizer": the
    file's `Tokenizer`, or None where it has none}."""
    gguf = _gguf()
    where = str(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"{where}: unreadable GGUF file ({type(exc).__name__}: {exc})") from None
    tensors = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(d) for d in t.shape.tolist()) for name, t in tensors.items()}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{where}: no token_embd.weight")
    config = _config(reader.fields, shapes, where)
    read = lambda name: _read_tensor(tensors[name], gguf, where) if name in tensors else _missing(where, name)  # noqa: E731

    def plain(name: str) -> torch.Tensor:
        value = read(name)
        if isinstance(value, _Q4):
            return (value.scales.float()[..., None] * (value.codes.float().unflatten(-1, (-1, BLOCK)) - 8)).flatten(-2)
        return value.values if isinstance(value, _Q8) else value

    state = {"tok_emb.weight": plain("token_embd.weight"), "ln_f.weight": plain("output_norm.weight")}
    matrices: dict[str, Any] = {}
    if not config.tie_embeddings:
        matrices["lm_head"] = read("output.weight")
    for i, layer in enumerate(config.layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        state[ours + "ln_attn.weight"] = plain(theirs + "attn_norm.weight")
        state[ours + "ln_ffn.weight"] = plain(theirs + "ffn_norm.weight")
        if layer.moe is not None:
            state[ours + "ffn.router.weight"] = plain(theirs + "ffn_gate_inp.weight")
        for name, parts in _linear_parts(config, i, layer.moe is not None).items():
            pieces = [read(p) for p in parts]
            if name.endswith("attn.qkv"):  # q and k rows back to pyramoe's rotary order
                heads = (config.n_heads, config.n_kv_heads)
                pieces[:2] = [_unpermute(p, h) for p, h in zip(pieces[:2], heads)]
            matrices[name] = _join(pieces, where, name)
    model = _build(config, state, matrices, dtype, where)
    formats = {name: "q4_0" if isinstance(v, _Q4) else "q8_0" if isinstance(v, _Q8) else "float"
               for name, v in matrices.items()}
    kinds = set(formats.values())
    return model, {"formats": formats, "quantize": "int4" if "q4_0" in kinds else "int8" if "q8_0" in kinds else None,
                   "tokenizer": tokenizer_from_gguf(reader.fields, where)}


def _missing(where: str, name: str):
    raise ValueError(f"{where}: tensor {name} missing")


def _unpermute(value: Any, heads: int) -> Any:
    if isinstance(value, _Q4):
        return _Q4(unpermute_rope_rows(value.codes, heads), unpermute_rope_rows(value.scales, heads))
    if isinstance(value, _Q8):
        return _Q8(unpermute_rope_rows(value.values, heads))
    return unpermute_rope_rows(value, heads)


def _build(config: ModelConfig, state: dict[str, torch.Tensor], matrices: dict[str, Any], dtype: torch.dtype,
           where: str) -> GPT:
    """The model with `state`'s float tensors and `matrices` (quantized ones swapped in as packed
    weights, float ones as plain weights); checks every shape against the config."""
    model = GPT(config).to(dtype)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, tensor in state.items():
            target = model.get_parameter(name)
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(f"{where}: {name}: shape {tuple(tensor.shape)}, the metadata implies "
                                 f"{tuple(target.shape)}")
            target.copy_(tensor)
        for name, value in matrices.items():
            owner, _, attr = name.rpartition(".")
            target = getattr(modules[owner], attr) if attr in ("w_in", "w_out") else modules[name].weight
            shape = tuple((value.codes if isinstance(value, _Q4) else value.values if isinstance(value, _Q8)
                           else value).shape)
            if shape != tuple(target.shape):
                raise ValueError(f"{where}: {name}: shape {shape}, the metadata implies {tuple(target.shape)}")
            if isinstance(value, torch.Tensor):
                target.copy_(value)
            elif attr in ("w_in", "w_out"):
                experts: GroupedExperts = modules[owner]
                stack = _matrix_weight(value)
                packed = list(experts.packed or ([], []))
                packed[0 if attr == "w_in" else 1] = [stack[e] for e in range(experts.num_experts)]
                experts.packed = tuple(packed)
            else:
                parent = modules[owner] if owner else model
                setattr(parent, attr, PackedLinear(modules[name], quantized=_matrix_weight(value)))
    for module in model.modules():  # the stacks' float copies go once their packed weights are in
        if type(module) is GroupedExperts and module.packed is not None:
            if not all(module.packed):
                raise ValueError(f"{where}: an expert stack with one projection quantized and not the other")
            module.w_in = module.w_out = None
    if config.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()
