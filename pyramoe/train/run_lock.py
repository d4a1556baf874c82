"""One run per run directory: an exclusive flock on RUN_DIR/.lock for the run's whole life.

Two runs in one directory would interleave their metrics and prune each other's checkpoints. The
kernel releases a flock when its holder exits, however it exits, so a crashed run leaves no stale
lock behind. Under torchrun rank 0 takes it for the job and every rank learns whether it got it.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pyramoe.parallel.launch import DistRun

LOCK_FILE = ".lock"


class RunLock:
    """The held lock (rank 0's file, None on other ranks); `release` ends it (idempotent)."""

    def __init__(self, file: object | None, created: Path | None = None):
        self._file = file
        self._created = created  # the run directory, when taking the lock made it

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def abandon(self) -> None:
        """Release after a run failed to start: a run directory the lock made, still holding
        nothing but the lock, goes too (a bad command leaves nothing on disk)."""
        self.release()
        run_dir, self._created = self._created, None
        if run_dir is not None and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            (run_dir / LOCK_FILE).unlink()
            run_dir.rmdir()


def lock_run_dir(run_dir: Path, dist_run: DistRun | None = None) -> RunLock:
    """Take RUN_DIR's lock or raise a one-line ValueError naming the directory (on every rank)."""
    held, problem = None, None
    created = None if Path(run_dir).exists() else Path(run_dir)
    if dist_run is None or dist_run.is_main:
        try:
            held = _try_lock(Path(run_dir))
        except ValueError as exc:
            problem = str(exc)
    # Every rank must fail together, or the others would wait at the next collective until timeout.
    if dist_run is not None and dist_run.any(problem is not None) and problem is None:
        if held is not None:
            held.close()
        problem = f"{run_dir}: another run is using this directory (see rank 0's message)"
    if problem is not None:
        raise ValueError(problem)
    return RunLock(held, created if held is not None else None)


def _try_lock(run_dir: Path) -> object:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = open(run_dir / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's life
    except OSError as exc:
        raise ValueError(f"{run_dir}: cannot create the run directory's lock ({exc.strerror})") from None
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "unknown"
        file.close()
        raise ValueError(
            f"{run_dir}: another run is using this directory (pid {holder}); wait for it to end or pass --run-dir"
        ) from None
    file.seek(0)
    file.truncate()
    file.write(f"{os.getpid()}\n")
    file.flush()
    return file
