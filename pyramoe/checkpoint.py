"""Reading checkpoints: the format, and what evaluation, export and the inference engine need to
build a model from a checkpoint directory, with nothing from training (saving, pruning, optimizer
state: `pyramoe.train.checkpoint`, which re-exports these names).

The consolidated layout, one process's save:

    RUN_DIR/checkpoints/step-0000300/
        model.safetensors      weights (fp32; a tied lm_head is stored once, as tok_emb.weight)
        optimizer.safetensors  AdamW moments and step counts, keyed state.<param index>.<name>
        tokenizer.json         so that eval/generate need nothing but this directory
        state.json             step, configs, optimizer hyper-parameters, RNG states, data location

The sharded layout, a distributed run's (torchrun), every rank its own files and no tensor gathered
anywhere (the Hugging Face sharded layout, for weights and optimizer alike):

        model-00001-of-00004.safetensors ...      each rank's pieces
        model.safetensors.index.json              {"metadata": {...}, "weight_map": {piece: file}}
        optimizer-00001-of-00004.safetensors ...  optimizer.safetensors.index.json
        tokenizer.json, state.json

A piece is named after the full-model tensor: expert tensors (stacked [E, ...] in the model) are
stored one expert at a time under the global expert id (`blocks.1.ffn.experts.5.w_in`),
tensor-parallel slices as `NAME.tp-R-of-S` (the index's metadata gives the split dimension and the
fused blocks), and a tensor that several ranks hold alike is written once, by the lowest of them.
Under --zero (FSDP) a rank holds only rows of such a piece: they are stored as `PIECE.rows-A-B`,
and the index's metadata "chunks" lists, for each piece stored so, its chunks in row order (an
expert tensor's rows are whole experts, stored as above).
Loading reads only the slices a process needs (`safe_open(...).get_slice`), so a sharded checkpoint
loads at any EP/TP size and in one process; the consolidated one loads everywhere too.

state.json is written last, so a directory without it is never treated as a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor

from pyramoe.config import ModelConfig
from pyramoe.models import GPT
from pyramoe.parallel.sharding import local_rows
from pyramoe.parallel.tensor import cut_tp

FORMAT = "pyramoe-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
OPTIMIZER_INDEX = "optimizer.safetensors.index.json"
SHARDED_FORMAT = "pyramoe-sharded"
STATE_FILE = "state.json"
TOKENIZER_FILE = "tokenizer.json"
_NAME = re.compile(r"^step-(\d+)$")


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
    if not (path / MODEL_FILE).is_file() and not (path / MODEL_INDEX).is_file():
        raise ValueError(f"{path}: incomplete checkpoint ({MODEL_FILE} missing)")
    run_config = state.get("run_config")
    if not isinstance(run_config, dict) or not isinstance(run_config.get("train"), dict):
        raise ValueError(f"{path}: incompatible checkpoint (no run config)")
    if not isinstance(state.get("model_config"), dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{path}: incompatible checkpoint (no model config or step)")
    return Checkpoint(path, state)


# -- which part of a tensor a process holds -----------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """Which part of a full (single-process) tensor a process holds: experts [start, start + count)
    along dimension 0, then the tensor-parallel slice `rank` of `size` along `dim`, taken block by
    block of the fused `blocks` ([q | k | v], [gate | up]), then (--zero, FSDP) the rows
    [first, end) of that along dimension 0, of `total`. FSDP's shard of an expert tensor is whole
    experts: `experts` says it, never `rows`."""

    experts: tuple[int, int] | None = None  # (first global expert, count)
    tp: tuple[int, tuple[int, ...], int, int] | None = None  # (dim, full block sizes, rank, size)
    rows: tuple[int, int, int] | None = None  # (first, end, total)

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        t = full
        if self.experts is not None:
            start, count = self.experts
            t = t[start : start + count]
        if self.tp is not None:
            dim, blocks, rank, size = self.tp
            t = cut_tp(t, dim, blocks, rank, size)
        if self.rows is not None:
            t = t[self.rows[0] : self.rows[1]]
        return t


Parts = Callable[[str], "Part | None"]  # this process's part of each saved tensor, by name (None: whole)


# -- model weights --------------------------------------------------------------------------------------------


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict without aliases: safetensors refuses tensors that share memory (tied embeddings)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in model.state_dict().items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor  # a sharded (FSDP) one: its shard
        ident = (local.untyped_storage().data_ptr(), local.storage_offset())
        if ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor.detach().contiguous()
    return out


def local_part(part: Part | None, like: torch.Tensor) -> Part | None:
    """`part` narrowed to the FSDP rows this rank holds of `like` (a sharded DTensor parameter or
    moment), so that a reader takes only those; `part` itself when `like` is a plain tensor."""
    rows = local_rows(like)
    return part if rows is None else dataclasses.replace(part or Part(), rows=rows)


def as_shard(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows (read by `local_part`) as a tensor sharded like `like`, with no
    communication; `local` itself when `like` is a plain tensor."""
    if not isinstance(like, DTensor):
        return local
    return DTensor.from_local(local.to(like.device), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def is_sharded(ckpt: Checkpoint) -> bool:
    return (ckpt.path / MODEL_INDEX).is_file()


def load_model_weights(model: nn.Module, ckpt: Checkpoint, parts: Parts | None = None) -> None:
    """Load weights, checking names and shapes first so a mismatch is one clear line. `parts` names
    this process's part of each saved tensor (its expert shard, its tensor-parallel slice, under
    --zero its FSDP rows of that); a sharded checkpoint is read piece by piece, only what this
    process holds."""
    expected = model_tensors(model)
    targets = {key: t.to_local() if isinstance(t, DTensor) else t for key, t in expected.items()}

    def part(name: str) -> Part | None:
        return local_part(parts(name) if parts else None, expected[name])

    if is_sharded(ckpt):
        with ShardedFiles(ckpt.path, MODEL_INDEX) as files:
            _check_names(ckpt, expected, files.tensors)
            tensors = {name: files.read(name, part(name)) for name in expected}
    else:
        tensors = _read_safetensors(ckpt.path / MODEL_FILE)
        _check_names(ckpt, expected, tensors)
        tensors = {key: _cut(part, key, tensor) for key, tensor in tensors.items()}
    for key, tensor in tensors.items():
        if tensor.shape != targets[key].shape:
            raise ValueError(
                f"{ckpt.path}: incompatible checkpoint ({key}: shape {tuple(tensor.shape)}, "
                f"model wants {tuple(targets[key].shape)})"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            targets[key].copy_(tensor)


def _check_names(ckpt: Checkpoint, expected: dict[str, Any], saved: dict[str, Any]) -> None:
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ValueError(f"{ckpt.path}: incompatible checkpoint ({what})")


def _cut(parts: Parts | None, name: str, full: torch.Tensor) -> torch.Tensor:
    part = parts(name) if parts is not None and full.dim() > 0 else None
    return full if part is None else part.cut(full)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"{path.parent}: incomplete checkpoint ({path.name} missing)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own (Rust) error types
        raise ValueError(f"{path}: unreadable safetensors file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


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


# -- sharded files ------------------------------------------------------------------------------------------


def chunk_key(piece: str, first: int, end: int) -> str:
    """The stored name of rows [first, end) of piece `piece` (a rank's FSDP shard of it)."""
    return f"{piece}.rows-{first}-{end}"


def piece_key(name: str, expert: int | None = None, tp: tuple[int, int] | None = None) -> str:
    """The stored name of one piece of tensor `name`: expert `expert` (global id) of a stacked expert
    tensor, `blocks.1.ffn.experts.5.w_in`; tensor-parallel slice `tp` = (rank, size), `NAME.tp-R-of-S`."""
    key = name
    if expert is not None:
        head, _, leaf = name.rpartition(".")
        key = f"{head}.{expert}.{leaf}" if head else f"{expert}.{leaf}"
    if tp is not None:
        key += f".tp-{tp[0]}-of-{tp[1]}"
    return key


class ShardedFiles:
    """A sharded checkpoint's index (`model.safetensors.index.json` or the optimizer's) and its
    files, opened when first needed; `read` assembles any part of a full tensor from the pieces."""

    def __init__(self, directory: Path, index_name: str):
        self.directory = directory
        path = directory / index_name
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            self.tensors: dict[str, dict[str, Any]] = dict(index["metadata"]["tensors"])
            self.weight_map: dict[str, str] = dict(index["weight_map"])
            # piece -> its row chunks [(first, end, stored name)], in order (saved under --zero)
            self.chunks: dict[str, list[tuple[int, int, str]]] = {
                piece: [(int(a), int(b), str(key)) for a, b, key in chunks]
                for piece, chunks in index["metadata"].get("chunks", {}).items()
            }
        except FileNotFoundError:
            raise ValueError(f"{directory}: incomplete checkpoint ({index_name} missing)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable checkpoint index ({type(exc).__name__}: {exc})") from None
        self._files: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()
        self.bytes_read = 0  # of tensor data taken from the files

    def __enter__(self) -> ShardedFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _file(self, key: str) -> Any:
        name = self.weight_map.get(key)
        if name is None:
            raise ValueError(f"{self.directory}: incomplete checkpoint (no file holds {key})")
        if name not in self._files:
            path = self.directory / name
            if not path.is_file():
                raise ValueError(f"{self.directory}: incomplete checkpoint ({name} missing)")
            try:
                self._files[name] = self._stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"{path}: unreadable safetensors file ({_first_line(exc)})") from None
        return self._files[name]

    def _get(self, key: str, ranges: dict[int, tuple[int, int]] | None = None) -> torch.Tensor:
        """Piece `key`, or the part of it within `ranges` (dimension -> [start, stop)): only those
        bytes are read."""
        ranges = ranges or {}
        if key in self.chunks:
            return self._get_chunked(key, ranges)
        f = self._file(key)
        try:
            if not ranges:
                t = f.get_tensor(key)
            else:
                t = f.get_slice(key)[tuple(slice(*ranges.get(d, (None, None))) for d in range(max(ranges) + 1))]
        except Exception as exc:  # noqa: BLE001
            where = self.directory / self.weight_map[key]
            raise ValueError(f"{where}: unreadable {key} ({_first_line(exc)})") from None
        self.bytes_read += t.numel() * t.element_size()
        return t

    def _get_chunked(self, key: str, ranges: dict[int, tuple[int, int]]) -> torch.Tensor:
        """Piece `key` (or its part within `ranges`) from the row chunks it was saved as."""
        chunks = self.chunks[key]
        if [a for a, _, _ in chunks] != [0] + [b for _, b, _ in chunks[:-1]]:
            raise ValueError(f"{self.directory}: incomplete checkpoint ({key}: its row chunks leave a gap)")
        if 0 not in ranges:
            return torch.cat([self._get(chunk, ranges) for _, _, chunk in chunks])
        start, stop = ranges[0]
        wanted = [(chunk, (max(start, a) - a, min(stop, b) - a)) for a, b, chunk in chunks if a < stop and start < b]
        # No row wanted (an empty FSDP share): an empty read keeps the other dimensions' shape.
        return torch.cat([self._get(chunk, {**ranges, 0: span}) for chunk, span in wanted or [(chunks[0][2], (0, 0))]])

    def read(self, name: str, part: Part | None = None) -> torch.Tensor:
        """`part` of full tensor `name` (None: all of it), reading only its bytes (its FSDP `rows`
        too, under --zero)."""
        info = self.tensors[name]
        shape = info["shape"]
        if not shape:
            part = None
        saved_tp = info.get("tp")
        want_tp = part.tp if part is not None else None
        if saved_tp is not None and want_tp is not None and (
            saved_tp["dim"] != want_tp[0] or list(saved_tp["blocks"]) != list(want_tp[1])
        ):
            raise ValueError(f"{self.directory}: incompatible checkpoint ({name}: tensor-parallel split "
                             f"{saved_tp['dim']}/{saved_tp['blocks']}, model wants {want_tp[0]}/{list(want_tp[1])})")
        if want_tp is not None:
            dim, blocks, rank, size = want_tp[0], list(want_tp[1]), want_tp[2], want_tp[3]
        elif saved_tp is not None:
            dim, blocks, rank, size = saved_tp["dim"], list(saved_tp["blocks"]), 0, 1
        else:
            dim, blocks, rank, size = None, [], 0, 1
        saved_size = saved_tp["size"] if saved_tp is not None else 1
        experts = part.experts if part is not None else None
        if info["experts"]:
            first, count = experts if experts is not None else (0, shape[0])
            if part is not None and part.rows is not None:  # FSDP rows of an expert tensor: whole experts
                first, count = first + part.rows[0], part.rows[1] - part.rows[0]
            if first + count > shape[0]:
                raise ValueError(f"{self.directory}: incompatible checkpoint ({name}: {shape[0]} experts saved, "
                                 f"model wants experts {first}..{first + count - 1})")
            inner = None if dim is None else dim - 1  # a piece is one expert: no expert dimension
            if count == 0:  # an empty FSDP share: one expert read for the shape of none
                return self._assemble(name, 0, inner, blocks, rank, size, saved_size)[None][:0]
            return torch.stack([
                self._assemble(name, e, inner, blocks, rank, size, saved_size) for e in range(first, first + count)
            ])
        rows = part.rows[:2] if part is not None and part.rows is not None else None
        t = self._assemble(name, None, dim, blocks, rank, size, saved_size, rows)
        if experts is not None:
            t = t[experts[0] : experts[0] + experts[1]]
        return t

    def _assemble(
        self, name: str, expert: int | None, dim: int | None, blocks: list[int], rank: int, size: int, saved: int,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Tensor-parallel slice `rank` of `size` (block by block along `dim`) of one tensor or expert,
        from the pieces it was saved as, slice `s` of `saved`, reading only the overlapping ranges;
        of that, only `rows` [first, end) along dimension 0 when given."""
        if dim is None or (size == 1 and saved == 1):
            return self._get(piece_key(name, expert), {0: rows} if rows is not None else None)
        for block in blocks:
            if block % size or block % saved:
                raise ValueError(f"{self.directory}: {name}: a block of {block} does not split over {size} ranks")
        segments = []  # (stored piece, its range along dim) in output order
        base = 0  # where this block's share starts inside a saved piece
        for block in blocks:
            have, want = block // saved, block // size
            lo, hi = rank * want, (rank + 1) * want
            for s in range(lo // have, -(-hi // have)):
                a, z = max(lo, s * have), min(hi, (s + 1) * have)
                offset = base + a - s * have
                segments.append((piece_key(name, expert, (s, saved) if saved > 1 else None), offset, offset + z - a))
            base += have
        if rows is None:
            return torch.cat([self._get(key, {dim: (a, z)}) for key, a, z in segments], dim=dim)
        if dim > 0:
            return torch.cat([self._get(key, {0: rows, dim: (a, z)}) for key, a, z in segments], dim=dim)
        out, at = [], 0  # split along the rows themselves: keep each segment's overlap with `rows`
        for key, a, z in segments:
            lo, hi = max(rows[0], at), min(rows[1], at + z - a)
            if hi > lo:
                out.append(self._get(key, {0: (a + lo - at, a + hi - at)}))
            at += z - a
        # No row wanted (an empty FSDP share): an empty read keeps the other dimensions' shape.
        return torch.cat(out) if out else self._get(segments[0][0], {0: (segments[0][1],) * 2})
