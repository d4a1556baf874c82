"""Serving over a torchrun job (experts spread over ranks): rank 0 serves HTTP and schedules, the
other ranks follow.

Rank 0's `EngineLoop` sends, through `Leader`, the commands it applied (adds with prompt ids,
sampling settings and request id; aborts) right before each step, an empty heartbeat at least every
`heartbeat_s` while idle, and "stop" when it ends; each message is one `broadcast_object_list` from
rank 0. `follow` runs on every other rank: it applies the same commands to its engine in the same
order and steps when rank 0 steps, so the collectives inside the steps meet. Collectives time out
after the process group's timeout (`Engine.distribute(timeout_s=...)`); a rank that died is usually
seen at once (its sockets close). Rank 0 then names the rank (`Leader` knows every rank's host and
process id) and the server stops; a follower whose leader died raises `DistributedFailure`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import torch
import torch.distributed as dist

from pyramoe.inference import Engine
from pyramoe.parallel.launch import DistributedFailure

HEARTBEAT_S = 1.0


def collective_device() -> torch.device:
    """Where the process group's collectives want their tensors: the current CUDA device under NCCL."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _places() -> list[tuple[str, int]]:
    """Every rank's (host, process id), gathered once when the ranks meet."""
    places: list = [None] * dist.get_world_size()
    dist.all_gather_object(places, (socket.gethostname(), os.getpid()))
    return places


def _reason(exc: BaseException) -> str:
    """The first sentence of a collective's error, without gloo's source location."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]
    return text[:160] or type(exc).__name__


def _gone(pid: int) -> bool:
    """True when the local process `pid` has ended (or is a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


class Leader:
    """Rank 0's `Replicator` (pyramoe.inference.loop): a broadcast to the followers per message."""

    def __init__(self, layout: str = "", heartbeat_s: float = HEARTBEAT_S):
        self.layout, self.heartbeat_s = layout, heartbeat_s
        self.device = collective_device()
        try:
            self.places = _places()
        except Exception as exc:  # noqa: BLE001 - a rank that never came: one line
            raise DistributedFailure(f"a rank did not join ({_reason(exc)})") from exc

    def send(self, commands: list[tuple], step: bool) -> None:
        self._broadcast(("step" if step else "idle", commands))

    def close(self) -> None:
        self._broadcast(("stop", []))

    def _broadcast(self, message: tuple) -> None:
        try:
            dist.broadcast_object_list([message], src=0, device=self.device)
        except Exception as exc:  # noqa: BLE001 - which rank is gone is what the operator needs
            raise self.lost(exc) from exc

    def lost(self, exc: BaseException) -> DistributedFailure:
        """The failure of a collective, as one line naming the rank that stopped where it can tell."""
        host = socket.gethostname()
        for _ in range(10):  # a killed process closes its sockets a moment before it is gone
            dead = [rank for rank, (where, pid) in enumerate(self.places) if rank and where == host and _gone(pid)]
            if dead:
                ranks = f"rank {dead[0]}" if len(dead) == 1 else f"ranks {', '.join(map(str, dead))}"
                return DistributedFailure(f"{ranks} stopped responding")
            time.sleep(0.1)
        return DistributedFailure(f"a rank stopped responding ({_reason(exc)})")


def follow(engine: Engine) -> None:
    """A follower's loop: rank 0's commands applied in its order, a step whenever it steps, until
    "stop". SIGTERM/SIGINT are left to rank 0 (it drains, then stops everyone). Raises
    `DistributedFailure` when rank 0 cannot be heard or the ranks fell out of step."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    device, rank = collective_device(), dist.get_rank()
    try:
        _places()  # the leader's roll call
    except Exception as exc:  # noqa: BLE001 - rank 0 died or hung: one line, exit 1
        raise DistributedFailure(f"rank {rank}: lost rank 0 ({_reason(exc)})") from exc
    while True:
        message: list = [None]
        try:
            dist.broadcast_object_list(message, src=0, device=device)
        except Exception as exc:  # noqa: BLE001 - as above
            raise DistributedFailure(f"rank {rank}: lost rank 0 ({_reason(exc)})") from exc
        kind, commands = message[0]
        if kind == "stop":
            return
        for command in commands:
            if command[0] == "add":
                _, prompt_ids, params, request_id = command
                try:
                    engine.add_request(prompt_ids, params, request_id)
                except ValueError as exc:  # rank 0 took it: this rank is out of step
                    raise DistributedFailure(f"rank {rank}: request {request_id}: {exc}") from exc
            else:
                engine.abort(command[1])
        if kind == "step":
            try:
                engine.step()
            except Exception as exc:  # noqa: BLE001 - rank 0 would step on without this rank
                raise DistributedFailure(f"rank {rank}: step failed: {type(exc).__name__}: {exc}") from exc
