"""A quantized model on disk (`pyramoe quantize RUN --quantize int4 --out DIR`): the packed int8 and
int4 matrices with their scales as they sit in memory, so loading (`Engine.load(DIR)`, `pyramoe
generate DIR`, `pyramoe serve DIR`) skips quantizing, and the rest of the model's tensors.

DIR holds `quantized.json` (format, version, the `--quantize` text, the model config, the source
checkpoint and step, and one entry per quantized module: its format, widths, group and expert count),
`model.safetensors` (tensors not quantized under their state_dict names; a quantized module's under
"<module>.q.data", ".q.scales" and ".q.sums" (int8) or ".q.mins" (asymmetric int4); expert stacks
[E, ...]) and the tokenizer. The directory is written under a temporary name, every file fsynced,
then renamed into place, so a DIR that exists is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pyramoe.config import ModelConfig
from pyramoe.inference.packing import parse_quantize, quantize_model
from pyramoe.kernels import Int4Weight, Int8Weight, huge_page_tensors
from pyramoe.layers.experts import GroupedExperts
from pyramoe.layers.packed import PackedLinear
from pyramoe.models import GPT

FORMAT = "pyramoe-quantized"
VERSION = 1
META_FILE = "quantized.json"
TENSOR_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def is_quantized_directory(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def _weight_tensors(weight: Int8Weight | Int4Weight) -> dict[str, torch.Tensor]:
    if isinstance(weight, Int8Weight):
        return {"data": weight.data, "scales": weight.scales, "sums": weight.sums}
    parts = {"data": weight.data, "scales": weight.scales}
    return parts if weight.mins is None else {**parts, "mins": weight.mins}


def _describe(weight: Int8Weight | Int4Weight, experts: int) -> dict[str, Any]:
    entry = {"format": "int8" if isinstance(weight, Int8Weight) else "int4", "out_features": weight.out_features,
             "in_features": weight.in_features, "experts": experts}
    if isinstance(weight, Int4Weight):
        entry.update(group=weight.group, asymmetric=weight.asymmetric)
    return entry


def quantized_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """A quantized model's tensors (as `model.safetensors` stores them) and its matrices' entries."""
    tensors: dict[str, torch.Tensor] = {}
    matrices: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules():
        if type(module) is PackedLinear and isinstance(module.packed_weight, (Int8Weight, Int4Weight)):
            pieces = {path: module.packed_weight}
            counts = {path: 0}
        elif type(module) is GroupedExperts and module.packed is not None and isinstance(
                module.packed[0][0], (Int8Weight, Int4Weight)):
            pieces = {f"{path}.{name}": per_expert for name, per_expert in zip(("w_in", "w_out"), module.packed)}
            counts = dict.fromkeys(pieces, module.num_experts)
        else:
            continue
        for name, weight in pieces.items():
            if counts[name]:  # a stack, saved whole
                parts = [_weight_tensors(w) for w in weight]
                stacked = {k: torch.stack([p[k] for p in parts]) for k in parts[0]}
                matrices[name] = _describe(weight[0], counts[name])
            else:
                stacked = _weight_tensors(weight)
                matrices[name] = _describe(weight, 0)
            tensors.update({f"{name}.q.{k}": t.contiguous() for k, t in stacked.items()})
    seen: set[tuple[int, int]] = set()
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident not in seen:  # safetensors refuses aliases (a tied embedding)
            seen.add(ident)
            tensors[key] = tensor.detach().contiguous()
    return tensors, matrices


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_quantized(model: GPT, quantize: str, out: str | Path, tokenizer_path: str | Path | None,
                   source: dict[str, Any] | None = None) -> Path:
    """Quantize `model` in place (unless it already is) and write it to `out` (which must not exist
    or be empty). Returns the directory."""
    spec = parse_quantize(quantize, "--quantize")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: {out} exists and is not an empty directory")
    quantize_model(model, quantize)
    tensors, matrices = quantized_tensors(model)
    meta = {"format": FORMAT, "version": VERSION, "quantize": quantize, "bits": spec.bits,
            "model_config": model.config.to_dict(), "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
            "tokenizer": TOKENIZER_FILE if tokenizer_path else None, "source": source or {}, "matrices": matrices}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if tokenizer_path:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        for name in os.listdir(tmp):
            _fsync(tmp / name)
        _fsync(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """quantized.json, checked; a ValueError naming the file for anything wrong."""
    file = Path(path) / META_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{file}: not a pyramoe quantized model")
    if meta.get("version") != VERSION:
        raise ValueError(f"{file}: format version {meta.get('version')} (this pyramoe reads {VERSION})")
    if not isinstance(meta.get("matrices"), dict) or not isinstance(meta.get("model_config"), dict):
        raise ValueError(f"{file}: no matrices or model config")
    parse_quantize(meta.get("quantize"), f"{file}: quantize")
    return meta


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own (Rust) error types
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{file}: unreadable safetensors file ({first})") from None


def _checked(entry: dict[str, Any], parts: dict[str, torch.Tensor], where: str) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype of a saved int8 or int4 matrix's data (a stack where entry["experts"]),
    after checking its tensors against its entry; a ValueError naming `where` when they do not fit."""
    try:
        n, k, experts = int(entry["out_features"]), int(entry["in_features"]), int(entry["experts"])
        blocks = (n + 15) // 16
        lead = (experts,) if experts else ()
        if entry["format"] == "int8":
            padded = (*lead, blocks * 16)
            shapes = {"data": (*lead, blocks, k // 4, 16, 4), "scales": padded, "sums": padded}
            dtypes = {"data": torch.int8, "scales": torch.float32, "sums": torch.int32}
        elif entry["format"] == "int4":
            numbers = (*lead, blocks, k // int(entry["group"]), 16)
            shapes = {"data": (*lead, blocks, k // 8, 64), "scales": numbers}
            if entry.get("asymmetric"):
                shapes["mins"] = numbers
            dtypes = {"data": torch.uint8, "scales": torch.float16, "mins": torch.float16}
        else:
            raise ValueError(f"format {entry['format']!r}")
        if set(parts) != set(shapes):
            raise ValueError(f"tensors {sorted(parts)}, expected {sorted(shapes)}")
        for name, shape in shapes.items():
            if tuple(parts[name].shape) != shape or parts[name].dtype != dtypes[name]:
                raise ValueError(f"{name}: {parts[name].dtype} {tuple(parts[name].shape)}, expected "
                                 f"{dtypes[name]} {shape}")
        return shapes["data"], dtypes["data"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: bad quantized matrix ({exc})") from None


def _weights(entries: list[tuple[dict[str, Any], dict[str, torch.Tensor]]], where: list[str]
             ) -> list[Int8Weight | Int4Weight]:
    """The saved matrices as weights, their data copied into one buffer of huge pages per format
    (as `quantize_model` places them)."""
    checked = [_checked(entry, parts, w) for (entry, parts), w in zip(entries, where)]
    datas: list[torch.Tensor | None] = [None] * len(entries)
    for dtype in (torch.int8, torch.uint8):
        chosen = [i for i, (_, d) in enumerate(checked) if d == dtype]
        for i, out in zip(chosen, huge_page_tensors([checked[i][0] for i in chosen], dtype)):
            datas[i] = out.copy_(entries[i][1]["data"])
    weights = []
    for (entry, parts), data in zip(entries, datas):
        n, k = int(entry["out_features"]), int(entry["in_features"])
        if entry["format"] == "int8":
            weights.append(Int8Weight(data, parts["scales"], parts["sums"], n, k))
        else:
            weights.append(Int4Weight(data, parts["scales"], parts.get("mins"), int(entry["group"]), n, k))
    return weights


def load_quantized(path: str | Path, dtype: torch.dtype | None = None) -> tuple[GPT, dict[str, Any]]:
    """The model a quantized directory holds (eval mode, dropless), and its metadata."""
    path = Path(path)
    meta = read_meta(path)
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path / META_FILE}: incompatible model config ({exc})") from None
    for layer in config.layers:
        if layer.moe is not None:
            layer.moe.dropless = True
    saved_dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    model = GPT(config).to(dtype or (saved_dtype if isinstance(saved_dtype, torch.dtype) else torch.float32))
    tensors = _read_tensors(path / TENSOR_FILE)
    modules = dict(model.named_modules())
    entries = []
    for name, entry in meta["matrices"].items():
        prefix = f"{name}.q."
        entries.append((entry, {key[len(prefix):]: tensors.pop(key) for key in [k for k in tensors
                                                                                if k.startswith(prefix)]}))
    names = list(meta["matrices"])
    weights = _weights(entries, [f"{path / TENSOR_FILE}: {n}" for n in names])
    for name, (entry, _), weight in zip(names, entries, weights):
        owner, _, attr = name.rpartition(".")
        experts = modules.get(owner)
        if entry.get("experts") and type(experts) is GroupedExperts and attr in ("w_in", "w_out"):
            packed = list(experts.packed or ([], []))
            packed[0 if attr == "w_in" else 1] = [weight[e] for e in range(experts.num_experts)]
            experts.packed = tuple(packed)
            setattr(experts, attr, None)
        elif not entry.get("experts") and type(modules.get(name)) is nn.Linear:
            setattr(modules[owner] if owner else model, attr, PackedLinear(modules[name], quantized=weight))
        else:
            raise ValueError(f"{path / META_FILE}: {name} is no linear layer or expert projection of the model")
    if any(type(m) is GroupedExperts and m.packed is not None and not all(m.packed) for m in model.modules()):
        raise ValueError(f"{path / META_FILE}: an expert stack with one projection quantized and not the other")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ValueError(f"{path / TENSOR_FILE}: does not fit its model config ({what})")
    with torch.no_grad():
        for key, tensor in tensors.items():
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ValueError(f"{path / TENSOR_FILE}: {key}: shape {tuple(tensor.shape)}, model wants "
                                 f"{tuple(expected[key].shape)}")
            expected[key].copy_(tensor)
    return model.eval(), meta
