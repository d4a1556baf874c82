"""Reading a local Hugging Face model directory: config.json and safetensors weights, one file or
shards listed by model.safetensors.index.json. Safetensors only (no pickle): a directory that holds
only pytorch_model.bin is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: missing (a Hugging Face model directory needs it)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def read_config(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    return read_json(directory / CONFIG_FILE)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or model.safetensors."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no weight_map")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{missing[0]}: missing (listed in {INDEX_FILE})")
        return files
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return [single]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    if (directory / "pytorch_model.bin").is_file():
        raise ValueError(f"{directory}: only pytorch_model.bin (pickle) found; pyramoe loads safetensors only")
    raise ValueError(f"{directory}: missing {WEIGHTS_FILE} (or {INDEX_FILE} and its shards)")


class TensorSource:
    """The tensors of a checkpoint by name, read lazily; remembers which ones were taken so the
    loader can refuse a checkpoint with tensors it does not understand."""

    def __init__(self, files: list[Path]):
        self.location: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}  # one memory-mapped reader per file, opened once
        for path in files:
            try:
                handle = self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own (Rust) error types
                raise ValueError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0]})") from None
            for name in handle.keys():
                self.location[name] = path
        self.taken: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def get(self, name: str) -> torch.Tensor:
        path = self.location.get(name)
        if path is None:
            raise ValueError(f"missing tensor {name}")
        tensor = self._handles[path].get_tensor(name)
        self.taken.add(name)
        return tensor

    def first(self, *names: str) -> str | None:
        """The first of `names` the checkpoint holds."""
        return next((n for n in names if n in self.location), None)

    def untaken(self) -> list[str]:
        return sorted(set(self.location) - self.taken)
