"""Checkpoints: a directory per step with safetensors weights, optimizer state and a JSON of the rest.

One process writes the consolidated layout:

    RUN_DIR/checkpoints/step-0000300/
        model.safetensors      weights (fp32; a tied lm_head is stored once, as tok_emb.weight)
        optimizer.safetensors  AdamW moments and step counts, keyed state.<param index>.<name>
        tokenizer.json         so that eval/generate need nothing but this directory
        state.json             step, configs, optimizer hyper-parameters, RNG states, data location

A distributed run (torchrun) writes the sharded layout instead, every rank its own files and no
tensor gathered anywhere (the Hugging Face sharded layout, for weights and optimizer alike):

        model-00001-of-00004.safetensors ...      each rank's pieces
        model.safetensors.index.json              {"metadata": {...}, "weight_map": {piece: file}}
        optimizer-00001-of-00004.safetensors ...  optimizer.safetensors.index.json
        tokenizer.json, state.json

A piece is named after the full-model tensor: expert tensors (stacked [E, ...] in the model) are
stored one expert at a time under the global expert id (`blocks.1.ffn.experts.5.w_in`),
tensor-parallel slices as `NAME.tp-R-of-S` (the index's metadata gives the split dimension and the
fused blocks), and a tensor that several ranks hold alike is written once, by the lowest of them.
Loading reads only the slices a process needs (`safe_open(...).get_slice`), so a sharded checkpoint
loads at any EP/TP size and in one process; the consolidated one loads everywhere too.

A checkpoint is written under a hidden temporary name and renamed into place, so a crash mid-save
leaves the previous checkpoints untouched; state.json is written last, and a directory without it is
never treated as a checkpoint. A sharded save renames only after every rank reported its files
written: a rank failing mid-save leaves no step-* directory.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pyramoe.config import ModelConfig
from pyramoe.models import GPT
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
    if not (path / MODEL_FILE).is_file() and not (path / MODEL_INDEX).is_file():
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


@dataclass(frozen=True)
class Part:
    """Which part of a full (single-process) tensor a process holds: experts [start, start + count)
    along dimension 0, then the tensor-parallel slice `rank` of `size` along `dim`, taken block by
    block of the fused `blocks` ([q | k | v], [gate | up])."""

    experts: tuple[int, int] | None = None  # (first global expert, count)
    tp: tuple[int, tuple[int, ...], int, int] | None = None  # (dim, full block sizes, rank, size)

    def cut(self, full: torch.Tensor) -> torch.Tensor:
        t = full
        if self.experts is not None:
            start, count = self.experts
            t = t[start : start + count]
        if self.tp is not None:
            dim, blocks, rank, size = self.tp
            t = cut_tp(t, dim, blocks, rank, size)
        return t


Parts = Callable[[str], "Part | None"]  # this process's part of each saved tensor, by name (None: whole)


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
    """Write step-NNNNNNN atomically (one process, the consolidated layout), then prune (`prune`:
    keep_last, and checkpoints after `discard_after`, an abandoned branch). `model` and `optimizer`
    may be given as the tensors to write."""
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


# -- sharded saving (every rank of a torch.distributed job) ------------------------------------------------

# What a rank holds of one full tensor: (local shape, dtype name, experts (first, count) or None,
# tensor-parallel (dim, blocks, rank, size) or None).
_Held = tuple[tuple[int, ...], str, tuple[int, int] | None, tuple[int, tuple[int, ...], int, int] | None]


def shard_file(kind: str, rank: int, world: int) -> str:
    """`model-00001-of-00004.safetensors`: rank 0's file of 4 (the Hugging Face shard names)."""
    return f"{kind}-{rank + 1:05d}-of-{world:05d}.safetensors"


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


def held_parts(tensors: dict[str, torch.Tensor], parts: dict[str, Part]) -> dict[str, _Held]:
    """What this rank holds of each full tensor, as every rank tells the others before writing."""
    out = {}
    for name, t in tensors.items():
        part = parts.get(name) if t.dim() > 0 else None
        experts = part.experts if part is not None else None
        tp = part.tp if part is not None and part.tp is not None and part.tp[3] > 1 else None
        out[name] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), experts, tp)
    return out


def _pieces(name: str, held: _Held) -> list[tuple[str, int | None]]:
    """(stored name, row of the local tensor or None for all of it) of every piece a rank holds."""
    _, _, experts, tp = held
    tp_id = (tp[2], tp[3]) if tp is not None else None
    if experts is None:
        return [(piece_key(name, None, tp_id), None)]
    first, count = experts
    return [(piece_key(name, first + i, tp_id), i) for i in range(count)]


def shard_index(kind: str, held_by_rank: list[dict[str, _Held]]) -> dict[str, Any]:
    """The HF-style index of one kind ("model", "optimizer") from what every rank holds: weight_map
    names each piece's file (its lowest holder's), metadata how pieces join into full tensors."""
    world = len(held_by_rank)
    weight_map: dict[str, str] = {}
    tensors: dict[str, dict[str, Any]] = {}
    total = 0
    for rank, held in enumerate(held_by_rank):
        for name, h in held.items():
            shape, dtype, experts, tp = h
            first = name not in tensors
            info = tensors.setdefault(name, {"shape": list(shape), "dtype": dtype, "experts": experts is not None,
                                             "tp": None})
            if experts is not None:  # the full expert count: the highest expert any rank holds, + 1
                info["shape"][0] = max(0 if first else info["shape"][0], sum(experts))
            if tp is not None:
                dim, blocks, _, size = tp
                info["shape"][dim] = sum(blocks)
                info["tp"] = {"dim": dim, "blocks": list(blocks), "size": size}
            itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
            per_piece = math.prod(shape) // (experts[1] if experts is not None else 1) * itemsize
            for key, _ in _pieces(name, h):
                if key not in weight_map:  # its lowest holder writes it
                    weight_map[key] = shard_file(kind, rank, world)
                    total += per_piece
    return {"metadata": {"total_size": total, "format": SHARDED_FORMAT, "tensors": tensors},
            "weight_map": weight_map}


def save_sharded_checkpoint(
    root: Path,
    step: int,
    model: ModelTensors,
    model_parts: dict[str, Part],
    optimizer: OptimizerTensors,
    optimizer_parts: dict[str, Part],
    state: dict[str, Any],
    tokenizer_file: Path | None,
    keep_last: int,
    discard_after: int | None = None,
) -> Path:
    """Write step-NNNNNNN in the sharded layout; every rank of the default process group calls it
    with its own tensors and their `Part`s of the full tensors (names absent: whole on this rank).

    Every rank writes its pieces into one temporary directory; after all reported, rank 0 writes the
    indexes, the tokenizer and state.json, renames the directory into place and prunes. A failure
    on any rank (its exception, or one naming the rank on the others) is raised on every rank and
    leaves no new step-* directory. Returns the checkpoint's path on every rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final = checkpoint_path(root, step)
    opt_tensors, groups = optimizer
    setup: list[Any] = [None, None]
    if rank == 0:
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            setup = [tmp.name, None]
        except OSError as exc:
            setup = [None, f"{type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(setup, src=0)
    if setup[1] is not None:
        raise RuntimeError(f"checkpoint step {step}: rank 0 could not create the directory ({setup[1]})")
    tmp = root / setup[0]
    held = {"model": held_parts(model, model_parts), "optimizer": held_parts(opt_tensors, optimizer_parts)}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, held)

    failure: BaseException | None = None
    try:
        for kind, tensors in (("model", model), ("optimizer", opt_tensors)):
            write_shard(tmp, kind, rank, [h[kind] for h in everyone], tensors)
    except BaseException as exc:  # noqa: BLE001 - reported to every rank, then re-raised
        failure = exc
    _all_ok(failure, f"checkpoint step {step}", tmp if rank == 0 else None)

    failure = None
    if rank == 0:
        try:
            for kind, index in (("model", MODEL_INDEX), ("optimizer", OPTIMIZER_INDEX)):
                _write_json(tmp / index, shard_index(kind, [h[kind] for h in everyone]))
            record = {"format": FORMAT, "version": VERSION, "step": step, **state,
                      "optimizer": {"param_groups": groups}, "layout": "sharded", "world_size": world}
            if tokenizer_file is not None:
                shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
                record["tokenizer"] = TOKENIZER_FILE
            _write_json(tmp / STATE_FILE, record)
            _swap_in(tmp, final)
        except BaseException as exc:  # noqa: BLE001
            failure = exc
    _all_ok(failure, f"checkpoint step {step}", tmp if rank == 0 else None)
    if rank == 0:
        prune(root, final, keep_last, discard_after)
    return final


def write_shard(
    directory: Path, kind: str, rank: int, held_by_rank: list[dict[str, _Held]], tensors: dict[str, torch.Tensor]
) -> None:
    """Rank `rank`'s file of `kind`: the pieces of `tensors` it is the lowest holder of (an empty file
    when it holds none of its own, so that the file set is always 1..world)."""
    owner = _owners(held_by_rank)
    mine = {}
    for name, h in held_by_rank[rank].items():
        for key, row in _pieces(name, h):
            if owner[key] == rank:
                mine[key] = (tensors[name] if row is None else tensors[name][row]).detach().clone()
    save_file(mine, str(directory / shard_file(kind, rank, len(held_by_rank))), metadata={"format": "pt"})


def _owners(held_by_rank: list[dict[str, _Held]]) -> dict[str, int]:
    """Stored name -> the lowest rank holding that piece: the one that writes it."""
    owner: dict[str, int] = {}
    for rank, held in enumerate(held_by_rank):
        for name, h in held.items():
            for key, _ in _pieces(name, h):
                owner.setdefault(key, rank)
    return owner


def _all_ok(failure: BaseException | None, what: str, cleanup: Path | None) -> None:
    """Every rank learns whether every rank succeeded; on a failure `cleanup` is deleted and every
    rank raises (a failed rank its own exception)."""
    report = None if failure is None else f"{type(failure).__name__}: {failure}".splitlines()[0]
    reports: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if not failed:
        return
    if cleanup is not None:
        shutil.rmtree(cleanup, ignore_errors=True)
    if failure is not None:
        raise failure
    rank, msg = failed[0]
    raise RuntimeError(f"{what}: rank {rank} failed ({msg}); nothing was saved")


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


def is_sharded(ckpt: Checkpoint) -> bool:
    return (ckpt.path / MODEL_INDEX).is_file()


def load_model_weights(model: nn.Module, ckpt: Checkpoint, parts: Parts | None = None) -> None:
    """Load weights, checking names and shapes first so a mismatch is one clear line. `parts` names
    this process's part of each saved tensor (its expert shard, its tensor-parallel slice); a
    sharded checkpoint is read piece by piece, only what this process holds."""
    expected = model_tensors(model)
    if is_sharded(ckpt):
        with ShardedFiles(ckpt.path, MODEL_INDEX) as files:
            _check_names(ckpt, expected, files.tensors)
            tensors = {name: files.read(name, parts(name) if parts else None) for name in expected}
    else:
        tensors = _read_safetensors(ckpt.path / MODEL_FILE)
        _check_names(ckpt, expected, tensors)
        tensors = {key: _cut(parts, key, tensor) for key, tensor in tensors.items()}
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{ckpt.path}: incompatible checkpoint ({key}: shape {tuple(tensor.shape)}, "
                f"model wants {tuple(expected[key].shape)})"
            )
    with torch.no_grad():
        for key, tensor in tensors.items():
            expected[key].copy_(tensor)


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
        except FileNotFoundError:
            raise ValueError(f"{directory}: incomplete checkpoint ({index_name} missing)") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: unreadable checkpoint index ({type(exc).__name__}: {exc})") from None
        self._files: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

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

    def _get(self, key: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """Piece `key`, or its [start, stop) along `dim` (only those bytes are read)."""
        f = self._file(key)
        try:
            if dim is None:
                return f.get_tensor(key)
            return f.get_slice(key)[(slice(None),) * dim + (slice(start, stop),)]
        except Exception as exc:  # noqa: BLE001
            where = self.directory / self.weight_map[key]
            raise ValueError(f"{where}: unreadable {key} ({_first_line(exc)})") from None

    def read(self, name: str, part: Part | None = None) -> torch.Tensor:
        """`part` of full tensor `name` (None: all of it)."""
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
            if first + count > shape[0]:
                raise ValueError(f"{self.directory}: incompatible checkpoint ({name}: {shape[0]} experts saved, "
                                 f"model wants experts {first}..{first + count - 1})")
            inner = None if dim is None else dim - 1  # a piece is one expert: no expert dimension
            return torch.stack([
                self._assemble(name, e, inner, blocks, rank, size, saved_size) for e in range(first, first + count)
            ])
        t = self._assemble(name, None, dim, blocks, rank, size, saved_size)
        if experts is not None:
            t = t[experts[0] : experts[0] + experts[1]]
        return t

    def _assemble(
        self, name: str, expert: int | None, dim: int | None, blocks: list[int], rank: int, size: int, saved: int
    ) -> torch.Tensor:
        """Tensor-parallel slice `rank` of `size` (block by block along `dim`) of one tensor or expert,
        from the pieces it was saved as, slice `s` of `saved`, reading only the overlapping ranges."""
        if dim is None or (size == 1 and saved == 1):
            return self._get(piece_key(name, expert))
        for block in blocks:
            if block % size or block % saved:
                raise ValueError(f"{self.directory}: {name}: a block of {block} does not split over {size} ranks")
        out = []
        base = 0  # where this block's share starts inside a saved piece
        for block in blocks:
            have, want = block // saved, block // size
            lo, hi = rank * want, (rank + 1) * want
            for s in range(lo // have, -(-hi // have)):
                a, z = max(lo, s * have), min(hi, (s + 1) * have)
                key = piece_key(name, expert, (s, saved) if saved > 1 else None)
                offset = base + a - s * have
                out.append(self._get(key, dim, offset, offset + z - a))
            base += have
        return torch.cat(out, dim=dim)


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


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Checkpoint, parts: Parts | None = None) -> None:
    """AdamW state; `parts` names this process's part of each saved `state.INDEX.NAME` tensor."""
    groups = ckpt.state.get("optimizer", {}).get("param_groups")
    if groups is None:
        raise ValueError(f"{ckpt.path}: checkpoint has no optimizer state; it cannot be resumed")
    current = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in current]:
        raise ValueError(f"{ckpt.path}: incompatible checkpoint (optimizer parameter groups differ)")
    if is_sharded(ckpt):
        with ShardedFiles(ckpt.path, OPTIMIZER_INDEX) as files:
            saved = {key: files.read(key, parts(key) if parts else None) for key in files.tensors}
    else:
        saved = {key: _cut(parts, key, t) for key, t in _read_safetensors(ckpt.path / OPTIMIZER_FILE).items()}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in saved.items():
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
