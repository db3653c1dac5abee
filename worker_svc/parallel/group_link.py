"""The engine link of a tensor-parallel group: rank 0 talks to the scheduler, and relays every message
it receives to the other ranks over the group's gloo channel; only rank 0's sends leave the group.

Every rank runs the same WorkerLoop on the same messages in the same order, so each runs the same
steps (its shard of every layer; the collectives inside the forward meet) and holds the same row
slots; the followers' results, identical to the leader's, are dropped. Rank 0 relays through the
process group rather than a second socket (vLLM uses a shared-memory queue on one host): plans are a
few KB, and one channel keeps the group's fate shared: a rank that dies breaks the next broadcast or
collective, and the others exit, so the group restarts as one.
"""

from __future__ import annotations

import logging
import struct
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from worker_svc.link import WorkerLink

log = logging.getLogger("tandem.worker.group")

HEARTBEAT_S = 60.0  # an idle leader still speaks this often, inside the collectives' timeout
_NOOP, _FRAMES, _STOP = 0, 1, 2


def _encode(kind: int, frames: list) -> torch.Tensor:
    parts = [bytes(f) for f in frames]
    head = struct.pack(f"<BI{len(parts)}Q", kind, len(parts), *(len(p) for p in parts))
    return torch.from_numpy(np.frombuffer(head + b"".join(parts), dtype=np.uint8).copy())


def _decode(buf: torch.Tensor) -> tuple[int, list[bytes]]:
    raw = buf.numpy().tobytes()
    kind, n = struct.unpack_from("<BI", raw)
    sizes = struct.unpack_from(f"<{n}Q", raw, 5)
    out, at = [], 5 + 8 * n
    for size in sizes:
        out.append(raw[at:at + size])
        at += size
    return kind, out


class LeaderLink:
    """Rank 0: the scheduler's WorkerLink, with each received message broadcast to the group."""

    def __init__(self, link: WorkerLink, control: Any) -> None:
        self._link = link
        self._control = control
        self._last = time.monotonic()

    @property
    def address(self) -> str:
        return self._link.address

    @property
    def established(self) -> bool:
        return self._link.established

    @property
    def peer_lost(self) -> bool:
        return self._link.peer_lost

    def send(self, frames: list) -> None:
        self._link.send(frames)

    def recv(self, timeout_ms: int) -> list | None:
        frames = self._link.recv(timeout_ms)
        if frames is not None:
            self._broadcast(_FRAMES, frames)
        elif time.monotonic() - self._last > HEARTBEAT_S:
            self._broadcast(_NOOP, [])
        return frames

    def _broadcast(self, kind: int, frames: list) -> None:
        payload = _encode(kind, frames)
        dist.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), 0, group=self._control)
        dist.broadcast(payload, 0, group=self._control)
        self._last = time.monotonic()

    def close(self) -> None:
        try:
            self._broadcast(_STOP, [])  # the followers end with the leader, whatever the reason
        except RuntimeError as exc:  # a follower already gone: nothing to tell
            log.warning("could not tell the group to stop: %s", exc)
        self._link.close()


class FollowerLink:
    """Ranks 1..N-1: the leader's relayed messages in, nothing out (rank 0 answers for the group)."""

    address = "the group leader (rank 0)"

    def __init__(self, control: Any) -> None:
        self._control = control
        self.established = True
        self.peer_lost = False

    def send(self, frames: list) -> None:
        pass

    def recv(self, timeout_ms: int) -> list | None:
        """Blocks until the leader's next message (a collective has no poll); None on a heartbeat."""
        size = torch.zeros(1, dtype=torch.int64)
        try:
            dist.broadcast(size, 0, group=self._control)
            payload = torch.empty(int(size.item()), dtype=torch.uint8)
            dist.broadcast(payload, 0, group=self._control)
        except RuntimeError as exc:  # the leader died, or its group broke
            log.error("lost the group leader: %s", exc)
            self.peer_lost = True
            return None
        kind, frames = _decode(payload)
        if kind == _STOP:
            log.info("the group leader stopped")
            self.peer_lost = True
            return None
        return frames if kind == _FRAMES else None

    def close(self) -> None:
        pass
