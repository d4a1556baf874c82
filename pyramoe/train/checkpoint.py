"""Checkpoints: a directory per step with safetensors weights, optimizer state and a JSON of the rest.

    RUN_DIR/checkpoints/step-0000300/
        model.safetensors      weights (fp32; a tied lm_head is stored once, as tok_emb.weight)
        optimizer.safetensors  AdamW moments and step counts, keyed state.<param index>.<name>
        tokenizer.json         so that eval/generate need nothing but this directory
        state.json             step, configs, optimizer hyper-parameters, RNG states, data location

A checkpoint is written under a hidden temporary name and renamed into place, so a crash mid-save
leaves the previous checkpoints untouched; state.json is written last, and a directory without it is
never treated as a checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pyramoe.config import ModelConfig
from pyramoe.models import GPT

FORMAT = "pyramoe-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.json"
_NAME = re.compile(r"^step-(\d+)$")
_DELETING = ".del-"  # prefix of a checkpoint directory being deleted


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.state.get("tokenizer", TOKENIZER_FILE)

    def model_config(self) -> ModelConfig:
        try:
            return ModelConfig.from_dict(self.state["model_config"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{self.path}: incompatible checkpoint (model config: {exc})") from None


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory / checkpoints directory meaning its latest one."""
    path = Path(path).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    for root in (checkpoint_root(path), path):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest
    if not path.exists():
        raise ValueError(f"checkpoint not found: {path}")
    raise ValueError(f"{path}: not a checkpoint (no {STATE_FILE}) and no checkpoints under it")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check state.json (weights are loaded separately, into a model built from it)."""
    path = resolve_checkpoint(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pyramoe checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint format version {state.get('version')} (this pyramoe reads {VERSION})")
    if not (path / MODEL_FILE).is_file():
        raise ValueError(f"{path}: incomplete checkpoint ({MODEL_FILE} missing)")
    run_config = state.get("run_config")
    if not isinstance(run_config, dict) or not isinstance(run_config.get("train"), dict):
        raise ValueError(f"{path}: incompatible checkpoint (no run config)")
    if not isinstance(state.get("model_config"), dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path}: incompatible checkpoint (no model config or step)")
    return Checkpoint(path, state)


# -- saving -------------------------------------------------------------------------------------------------


ModelTensors = dict[str, torch.Tensor]
OptimizerTensors = tuple[dict[str, torch.Tensor], list[dict]]  # `state.INDEX.NAME` tensors, param groups
Slicer = Callable[[str, torch.Tensor], torch.Tensor]  # this process's part of a saved tensor, by name


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module | ModelTensors,
    optimizer: torch.optim.Optimizer | OptimizerTensors | None,
    state: dict[str, Any],
    tokenizer_file: Path | None,
    keep_last: int,
    discard_after: int | None = None,
) -> Path:
    """Write step-NNNNNNN atomically, then prune (`prune`: keep_last, and checkpoints after
    `discard_after`, an abandoned branch). `model` and `optimizer` may be given as the tensors to
    write (a distributed run passes them consolidated from every rank's shards)."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(model if isinstance(model, dict) else model_tensors(model), str(tmp / MODEL_FILE))
        state = {"format": FORMAT, "version": VERSION, "step": step, **state}
        if optimizer is not None:
            tensors, groups = optimizer if isinstance(optimizer, tuple) else optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            state["optimizer"] = {"param_groups": groups}
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
            state["tokenizer"] = TOKENIZER_FILE
        _write_json(tmp / STATE_FILE, state)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, final, keep_last, discard_after)
    return final


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))  # type: ignore[union-attr]


def prune(root: Path, written: Path, keep_last: int, discard_after: int | None = None) -> None:
    """Keep `written` and the `keep_last`-1 highest-step others; delete the rest.

    A run resumed from an earlier checkpoint passes `discard_after` (the step it resumed from): the
    checkpoints after it belong to the abandoned continuation and go first, so that "latest" (the
    highest step) is this run again and a later --resume cannot pick the abandoned one up.
    """
    others = [p for p in list_checkpoints(root) if p != written]
    if discard_after is not None:
        for path in [p for p in others if step_of(p) > discard_after]:
            remove_checkpoint(path)
            others.remove(path)
    for path in others[: max(0, len(others) - (keep_last - 1))]:
        remove_checkpoint(path)


def remove_checkpoint(path: Path) -> None:
    """Rename, then delete: a crash mid-delete leaves a `.del-` directory that `clean_stale` removes,
    never a half-deleted step-* directory (weights without state.json)."""
    doomed = path.with_name(f"{_DELETING}{path.name}-{os.getpid()}")
    try:
        os.replace(path, doomed)
    except OSError:
        return  # gone already, or undeletable: nothing half-done either way
    shutil.rmtree(doomed, ignore_errors=True)


def _swap_in(tmp: Path, final: Path) -> None:
    """rename(tmp, final); an existing `final` (re-saving a step) is moved aside first."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = final.with_name(f".old-{final.name}-{os.getpid()}")
    os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def clean_stale(root: Path) -> None:
    """Remove what interrupted saves and deletions left: temporaries, checkpoints being deleted, and
    step-* directories without state.json (a deletion cut short before deletes were renames first);
    restore a checkpoint left moved aside."""
    if not root.is_dir():
        return
    for path in list(root.iterdir()):
        if _is_leftover(path):
            shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.name.startswith(".old-step-"):
            name = path.name[len(".old-") :].rsplit("-", 1)[0]
            if not (root / name).exists():
                os.replace(path, root / name)
                continue
        if path.name.startswith((".tmp-step-", ".old-step-")):
            shutil.rmtree(path, ignore_errors=True)


def _is_leftover(path: Path) -> bool:
    """A directory being deleted, or a step-* one without state.json. Saves only ever rename a
    complete directory (state.json included) to step-*, so the latter is what a deletion left."""
    if not path.is_dir():
        return False
    return path.name.startswith(_DELETING) or (_NAME.match(path.name) is not None and not (path / STATE_FILE).exists())


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


# -- model weights --------------------------------------------------------------------------------------------


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases: safetensors refuses tensors that share memory (tied embeddings)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor.detach().contiguous()
    return out


def load_model_weights(model: nn.Module, ckpt: Checkpoint, slicer: Slicer | None = None) -> None:
    """Load weights, checking names and shapes first so a mismatch is one clear line. `slicer` cuts
    this process's part (its expert shard) out of each saved tensor."""
    tensors = _read_safetensors(ckpt.path / MODEL_FILE)
    if slicer is not None:
        tensors = {key: slicer(key, tensor) for key, tensor in tensors.items()}
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ValueError(f"{ckpt.path}: incompatible checkpoint ({what})")
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{ckpt.path}: incompatible checkpoint ({key}: shape {tuple(tensor.shape)}, "
                f"model wants {tuple(expected[key].shape)})"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{path.parent}: incomplete checkpoint ({path.name} missing)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own (Rust) error types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: unreadable safetensors file ({message})") from None


# -- optimizer state -------------------------------------------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> OptimizerTensors:
    sd = optimizer.state_dict()
    tensors = {}
    for index, values in sd["state"].items():
        for name, value in values.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {name!r} is not a tensor; cannot store it in safetensors")
            tensors[f"state.{index}.{name}"] = value.detach().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Checkpoint, slicer: Slicer | None = None) -> None:
    groups = ckpt.state.get("optimizer", {}).get("param_groups")
    if groups is None:
        raise ValueError(f"{ckpt.path}: checkpoint has no optimizer state; it cannot be resumed")
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise ValueError(f"{ckpt.path}: incompatible checkpoint (optimizer parameter groups differ)")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in _read_safetensors(ckpt.path / OPTIMIZER_FILE).items():
        if slicer is not None:
            tensor = slicer(key, tensor)
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON made the tuple a list
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(f"{ckpt.path}: incompatible optimizer state ({exc})") from None


# -- RNG state -------------------------------------------------------------------------------------------------


def encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def build_model(ckpt: Checkpoint, dropless: bool = False) -> GPT:
    """The checkpoint's model with its weights, in eval mode.

    `dropless=True` lifts expert capacity: for generation, where how many tokens arrive together
    (a whole prompt, then one at a time) must not decide which tokens are dropped.
    """
    config = ckpt.model_config()
    if dropless:
        for layer in config.layers:
            if layer.moe is not None:
                layer.moe.dropless = True
    model = GPT(config)
    load_model_weights(model, ckpt)
    return model.eval()
