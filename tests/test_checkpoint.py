"""Checkpoint pruning: deletions that a crash cannot leave half-done, and pruning that follows the
run being trained rather than the highest step on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_train import start, tiny_sources
from torch import nn

from pyramoe.train import checkpoint as ckpt_io
from pyramoe.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.usefixtures("tiny_run_env")


def save(root: Path, step: int, keep_last: int = 5) -> Path:
    return ckpt_io.save_checkpoint(root, step, nn.Linear(4, 4), None, {}, None, keep_last)


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_a_crash_while_pruning_leaves_nothing_that_cleanup_misses(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        save(root, step)
    real_rmtree = ckpt_io.shutil.rmtree

    def killed_midway(path, ignore_errors=False):
        if Path(path).name.startswith(".tmp-"):  # the save clearing its own temporary name
            return real_rmtree(path, ignore_errors=ignore_errors)
        (Path(path) / ckpt_io.STATE_FILE).unlink()  # a prune's rmtree got this far, then kill -9
        raise SystemExit(137)

    monkeypatch.setattr(ckpt_io.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        save(root, 3, keep_last=2)
    monkeypatch.setattr(ckpt_io.shutil, "rmtree", real_rmtree)
    # The remains are under a temporary name, never a step-* directory without state.json.
    assert all(p.name.startswith(".del-") or (p / ckpt_io.STATE_FILE).is_file() for p in root.iterdir())
    assert [p.name for p in list_checkpoints(root)] == ["step-0000002", "step-0000003"]
    ckpt_io.clean_stale(root)
    assert names(root) == ["step-0000002", "step-0000003"]


def test_cleanup_removes_half_deleted_checkpoints_of_older_versions(tmp_path):
    root = tmp_path / "checkpoints"
    save(root, 1)
    save(root, 2)
    (root / "step-0000001" / ckpt_io.STATE_FILE).unlink()  # what an interrupted rmtree left
    (root / ".del-step-0000007-123").mkdir()
    (root / ".del-step-0000007-123" / ckpt_io.MODEL_FILE).write_bytes(b"x" * 100)
    ckpt_io.clean_stale(root)
    assert names(root) == ["step-0000002"]


def test_resuming_an_earlier_checkpoint_prunes_the_abandoned_continuation(tmp_path):
    start(tiny_sources(tmp_path, steps=6, save_every=2, keep_last=3, eval_every=0)).fit()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-0000002", "step-0000004", "step-0000006"]
    overrides = [{"train": {"run_dir": str(tmp_path / "run"), "keep_last": 2, "save_every": 1}}]
    with start(overrides, resume=str(root / "step-0000002")) as trainer:  # then the directory is free again
        trainer.fit(max_steps=3)
    # Kept: the checkpoint just written and the one resumed from; 4 and 6 were another continuation.
    assert [p.name for p in list_checkpoints(root)] == ["step-0000002", "step-0000003"]
    assert start(overrides, resume="latest").step == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r["type"] == "resume"]
    assert resumes[0]["discarding"] == ["step-0000004", "step-0000006"] and "discarding" not in resumes[1]


def test_keep_last_one_never_deletes_the_checkpoint_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        save(root, step)
    written = save(root, 150, keep_last=1)
    assert written.is_dir() and names(root) == ["step-0000150"]


def record_durability(monkeypatch) -> list[tuple[str, str]]:
    """("fsync", path) and ("replace", target) events, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = ckpt_io.os.fsync, ckpt_io.os.replace

    def fsync(fd):
        events.append(("fsync", ckpt_io.os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(Path(dst).resolve())))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_io.os, "fsync", fsync)
    monkeypatch.setattr(ckpt_io.os, "replace", replace)
    return events


def check_published_durably(events: list[tuple[str, str]], final: Path) -> None:
    """Every file of `final` and its directory reached the disk before the rename that published
    it, and the parent directory (the new entry) after."""
    published = events.index(("replace", str(final.resolve())))
    synced_before = {Path(path).name for kind, path in events[:published] if kind == "fsync"}
    assert {p.name for p in final.iterdir()} <= synced_before
    tmp_dirs = [Path(path) for kind, path in events[:published]
                if kind == "fsync" and Path(path).name.startswith(".tmp-step-")]
    assert tmp_dirs, "the directory's entries were not flushed before the rename"
    assert ("fsync", str(final.parent.resolve())) in events[published:]


def test_every_checkpoint_file_and_its_directory_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    events = record_durability(monkeypatch)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    module = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    final = ckpt_io.save_checkpoint(tmp_path / "checkpoints", 1, module, optimizer, {}, tokenizer, 3)
    assert {p.name for p in final.iterdir()} == {ckpt_io.MODEL_FILE, ckpt_io.OPTIMIZER_FILE, ckpt_io.STATE_FILE,
                                                  ckpt_io.TOKENIZER_FILE}
    check_published_durably(events, final)
