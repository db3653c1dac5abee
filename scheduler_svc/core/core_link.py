"""The private link between the scheduler's two processes: front end <-> core (schema: core.proto).

Owns the socket (a ZeroMQ PAIR over ipc:// in a 0700 directory: the front end binds, the core
connects) and the typed messages: `Submit`, `Abort` and `Stats` requests go to the core; `Admitted`,
`Outputs` (one per step, the step's tokens as arrays), `Serving`, `Lost` and `Stats` come back.
Frames are [kind, protobuf header, raw array frames...] as on the engine link; nothing is pickled.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import zmq
import zmq.asyncio
from tandem import wire
from tandem.v1 import core_pb2 as cpb

KIND_SUBMIT = b"SUBMIT"
KIND_ABORT = b"ABORT"
KIND_STATS = b"STATS"
KIND_ADMITTED = b"ADMITTED"
KIND_OUTPUTS = b"OUTPUTS"
KIND_SERVING = b"SERVING"
KIND_LOST = b"LOST"
KINDS = (KIND_SUBMIT, KIND_ABORT, KIND_STATS, KIND_ADMITTED, KIND_OUTPUTS, KIND_SERVING, KIND_LOST)


def private_address() -> str:
    """A fresh ipc:// address in a directory only this user can enter."""
    return f"ipc://{tempfile.mkdtemp(prefix='tandem-core-')}/core.sock"


@dataclass
class OutputBatch:
    """One step's tokens, as the core sends them (see core.proto `Outputs`)."""

    step_id: int
    uid: np.ndarray
    token: np.ndarray
    finish: np.ndarray
    error: np.ndarray
    scheduled_at: np.ndarray
    cached_tokens: np.ndarray
    logprob: np.ndarray
    top_ids: np.ndarray | None
    top_logprobs: np.ndarray | None
    load: cpb.Load
    decode_only: bool
    compute_s: float

    def encode(self) -> list:
        arrays = {"uid": self.uid, "token": self.token, "finish": self.finish, "error": self.error,
                  "scheduled_at": self.scheduled_at, "cached_tokens": self.cached_tokens, "logprob": self.logprob}
        if self.top_ids is not None and self.top_logprobs is not None:
            arrays["top_ids"], arrays["top_logprobs"] = self.top_ids, self.top_logprobs
        specs, frames = wire.pack_arrays(arrays)
        header = cpb.Outputs(step_id=self.step_id, arrays=specs, load=self.load, decode=self.decode_only,
                             compute_s=self.compute_s)
        return [KIND_OUTPUTS, header.SerializeToString(), *frames]

    @classmethod
    def decode(cls, header: bytes, frames: list) -> OutputBatch:
        msg = cpb.Outputs.FromString(header)
        a = wire.unpack_arrays(msg.arrays, frames)
        n = a["uid"].shape[0]
        for name in ("token", "finish", "error", "scheduled_at", "cached_tokens", "logprob"):
            if a[name].shape != (n,):
                raise wire.WireError(f"outputs: {name} has shape {a[name].shape}, expected ({n},)")
        return cls(msg.step_id, a["uid"], a["token"], a["finish"], a["error"], a["scheduled_at"], a["cached_tokens"],
                   a["logprob"],
                   a.get("top_ids"), a.get("top_logprobs"), msg.load, msg.decode, msg.compute_s)


class CoreLink:
    """One end of the front end <-> core socket."""

    def __init__(self, address: str, bind: bool) -> None:
        self.address = address
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if bind:
            path = address.removeprefix("ipc://")
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            sock.bind(address)
        else:
            sock.connect(address)
        self._sock = sock

    def send(self, kind: bytes, header: bytes, frames: list | None = None) -> None:
        """Queues a message without blocking (the peer reads as fast as it can; queues are unbounded)."""
        sent = self._sock.send_multipart([kind, header, *(frames or [])], flags=zmq.NOBLOCK, copy=False)
        if sent.done():
            sent.result()

    def send_frames(self, frames: list) -> None:
        self.send(frames[0], frames[1], frames[2:])

    async def recv(self) -> tuple[bytes, bytes, list]:
        frames = await self._sock.recv_multipart(copy=False)
        return self._split(frames)

    def recv_nowait(self) -> tuple[bytes, bytes, list] | None:
        """The next message if one is already queued, else None: lets a reader drain a backlog at once."""
        try:
            fut = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            frames = fut.result()
        except zmq.Again:
            return None
        return self._split(frames)

    @staticmethod
    def _split(frames: list) -> tuple[bytes, bytes, list]:
        if len(frames) < 2 or bytes(frames[0]) not in KINDS:
            raise wire.WireError(f"core link: malformed message of {len(frames)} frames")
        return bytes(frames[0]), bytes(frames[1]), list(frames[2:])

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()
