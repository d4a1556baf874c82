"""Saving checkpoints: a directory per step with safetensors weights, optimizer state and a JSON of
the rest, in the layouts that `pyramoe.checkpoint` describes and reads (its names are re-exported
here, so `pyramoe.train.checkpoint.load_checkpoint` and the like keep working); resuming's optimizer
state (`load_optimizer_state`) and RNG states.

One process writes the consolidated layout (`save_checkpoint`); a distributed run (torchrun) writes
the sharded one (`save_sharded_checkpoint`), every rank its own files and no tensor gathered anywhere.

A checkpoint is written under a hidden temporary name and renamed into place, so a crash mid-save
leaves the previous checkpoints untouched; state.json is written last, and a directory without it is
never treated as a checkpoint. Every file is fsynced as it is written, and the directory before the
rename that publishes it (the parent after), so a power loss cannot publish a checkpoint whose
files are not on disk. A sharded save renames only after every rank reported its files
written: a rank failing mid-save leaves no step-* directory.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open  # noqa: F401 - kept importable from here
from safetensors.torch import save_file
from torch import nn

from pyramoe.checkpoint import (  # noqa: F401 - the reading side, re-exported for existing callers
    _NAME,
    FORMAT,
    MODEL_FILE,
    MODEL_INDEX,
    OPTIMIZER_FILE,
    OPTIMIZER_INDEX,
    SHARDED_FORMAT,
    STATE_FILE,
    TOKENIZER_FILE,
    VERSION,
    Checkpoint,
    Part,
    Parts,
    ShardedFiles,
    _cut,
    _read_safetensors,
    as_shard,
    build_model,
    checkpoint_root,
    chunk_key,
    is_sharded,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    local_part,
    model_tensors,
    piece_key,
    resolve_checkpoint,
)

_DELETING = ".del-"  # prefix of a checkpoint directory being deleted


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"



# -- saving -------------------------------------------------------------------------------------------------


ModelTensors = dict[str, torch.Tensor]
OptimizerTensors = tuple[dict[str, torch.Tensor], list[dict]]  # `state.INDEX.NAME` tensors, param groups


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
        _save_tensors(model if isinstance(model, dict) else model_tensors(model), tmp / MODEL_FILE)
        state = {"format": FORMAT, "version": VERSION, "step": step, **state}
        if optimizer is not None:
            tensors, groups = optimizer if isinstance(optimizer, tuple) else optimizer_tensors(optimizer)
            _save_tensors(tensors, tmp / OPTIMIZER_FILE)
            state["optimizer"] = {"param_groups": groups}
        if tokenizer_file is not None:
            _copy_file(tokenizer_file, tmp / TOKENIZER_FILE)
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
# tensor-parallel (dim, blocks, rank, size) or None, FSDP rows (first, end, total) or None).
_Held = tuple[tuple[int, ...], str, tuple[int, int] | None, tuple[int, tuple[int, ...], int, int] | None,
              tuple[int, int, int] | None]


def shard_file(kind: str, rank: int, world: int) -> str:
    """`model-00001-of-00004.safetensors`: rank 0's file of 4 (the Hugging Face shard names)."""
    return f"{kind}-{rank + 1:05d}-of-{world:05d}.safetensors"


def held_parts(tensors: dict[str, torch.Tensor], parts: dict[str, Part]) -> dict[str, _Held]:
    """What this rank holds of each full tensor, as every rank tells the others before writing."""
    out = {}
    for name, t in tensors.items():
        part = parts.get(name) if t.dim() > 0 else None
        experts = part.experts if part is not None else None
        tp = part.tp if part is not None and part.tp is not None and part.tp[3] > 1 else None
        rows = part.rows if part is not None else None
        out[name] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), experts, tp, rows)
    return out


def _pieces(name: str, held: _Held) -> list[tuple[str, int | None]]:
    """(stored name, row of the local tensor or None for all of it) of every piece a rank holds."""
    _, _, experts, tp, rows = held
    tp_id = (tp[2], tp[3]) if tp is not None else None
    if rows is not None:
        first, end, _ = rows
        return [(chunk_key(piece_key(name, None, tp_id), first, end), None)] if end > first else []
    if experts is None:
        return [(piece_key(name, None, tp_id), None)]
    first, count = experts
    return [(piece_key(name, first + i, tp_id), i) for i in range(count)]


def shard_index(kind: str, held_by_rank: list[dict[str, _Held]]) -> dict[str, Any]:
    """The HF-style index of one kind ("model", "optimizer") from what every rank holds: weight_map
    names each piece's file (its lowest holder's), metadata how pieces join into full tensors
    (and, under --zero, which row chunks make each piece)."""
    world = len(held_by_rank)
    weight_map: dict[str, str] = {}
    tensors: dict[str, dict[str, Any]] = {}
    chunks: dict[str, dict[str, tuple[int, int]]] = {}  # piece -> chunk's stored name -> its rows
    total = 0
    for rank, held in enumerate(held_by_rank):
        for name, h in held.items():
            shape, dtype, experts, tp, rows = h
            first = name not in tensors
            info = tensors.setdefault(name, {"shape": list(shape), "dtype": dtype, "experts": experts is not None,
                                             "tp": None})
            if experts is not None:  # the full expert count: the highest expert any rank holds, + 1
                info["shape"][0] = max(0 if first else info["shape"][0], sum(experts))
            if rows is not None:
                info["shape"][0] = rows[2]
                tp_id = (tp[2], tp[3]) if tp is not None else None
                piece = piece_key(name, None, tp_id)
                if rows[1] > rows[0]:
                    chunks.setdefault(piece, {})[chunk_key(piece, rows[0], rows[1])] = rows[:2]
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
    metadata: dict[str, Any] = {"total_size": total, "format": SHARDED_FORMAT, "tensors": tensors}
    if chunks:
        metadata["chunks"] = {piece: [[a, b, key] for key, (a, b) in sorted(found.items(), key=lambda kv: kv[1])]
                              for piece, found in chunks.items()}
    return {"metadata": metadata, "weight_map": weight_map}


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
                _copy_file(tokenizer_file, tmp / TOKENIZER_FILE)
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
    _save_tensors(mine, directory / shard_file(kind, rank, len(held_by_rank)))


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
    """rename(tmp, final), durably: `tmp`'s entries are flushed before the rename, the parent's
    after; an existing `final` (re-saving a step) is moved aside first."""
    fsync_path(tmp)
    if final.exists():
        aside = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, aside)
        os.replace(tmp, final)
        fsync_path(final.parent)
        shutil.rmtree(aside, ignore_errors=True)
        return
    os.replace(tmp, final)
    fsync_path(final.parent)


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


def fsync_path(path: Path) -> None:
    """Flush a written file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json_atomically(path: Path, obj: dict[str, Any]) -> None:
    """Write, fsync, rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_json(tmp, obj)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    fsync_path(path)


def _copy_file(source: Path, target: Path) -> None:
    shutil.copyfile(source, target)
    fsync_path(target)


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
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def like(key: str) -> torch.Tensor | None:
        """The parameter whose moments `key` holds (split like it under --zero)."""
        index = int(key.split(".", 2)[1])
        return params[index] if index < len(params) else None

    def part(key: str) -> Part | None:  # this rank's part, only its FSDP rows under --zero
        mine = parts(key) if parts else None
        return mine if like(key) is None else local_part(mine, like(key))

    if is_sharded(ckpt):
        with ShardedFiles(ckpt.path, OPTIMIZER_INDEX) as files:
            saved = {key: files.read(key, part(key)) for key in files.tensors}
    else:
        saved = {key: _cut(part, key, t) for key, t in _read_safetensors(ckpt.path / OPTIMIZER_FILE).items()}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in saved.items():
        _, index, name = key.split(".", 2)
        if tensor.dim() > 0 and like(key) is not None:
            tensor = as_shard(tensor, like(key))
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
