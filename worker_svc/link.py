"""The worker's end of the engine link: a ZeroMQ DEALER connected to the scheduler's ROUTER.

Owns the socket, its ZMTP heartbeats and the verdict "the scheduler is gone". Heartbeats run in
libzmq's I/O thread, so they keep flowing while a long forward pass holds the Python thread; a
peer that stops answering (or a closed ROUTER) drops the connection and the socket monitor reports
DISCONNECTED. The worker never reconnects to a new scheduler: once a connection was established,
losing it is final, and the worker exits so that a supervisor restarts it cleanly.
"""

from __future__ import annotations

import logging

import zmq
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("tandem.worker.link")

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
MAX_MESSAGE_BYTES = 256 << 20

_ESTABLISHED = zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED


class WorkerLink:
    """Sends HELLO/RESULT, receives PLAN/FLUSH; `peer_lost` turns true for good when the scheduler goes."""

    def __init__(self, address: str, curve_secret: str = "", curve_server: str = "") -> None:
        self.address = address
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        if curve_secret or curve_server:
            from tandem import linkkeys

            if not (curve_secret and curve_server):
                raise ValueError("--link-curve-secret and --link-curve-server go together")
            linkkeys.make_client(sock, curve_secret, curve_server)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        # Unbounded queues: a result must never be dropped or block the step loop; the scheduler
        # keeps at most `depth` steps in flight, which bounds what can pile up.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        self._monitor = sock.get_monitor_socket(_ESTABLISHED | zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        self._sock = sock
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.established = False
        self.peer_lost = False

    def send(self, frames: list) -> None:
        """Queues a message; a vanished peer marks the link lost instead of blocking."""
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # A DEALER with no pipe left (the connection dropped) would block forever.
            log.error("engine link: cannot send, no connection to the scheduler")
            self.peer_lost = True

    def recv(self, timeout_ms: int) -> list | None:
        """The next message (multipart frames), or None after `timeout_ms`. Once the peer is lost, the
        messages that arrived before the drop are still returned (the BYE of an orderly shutdown
        comes right before the scheduler closes its socket, often in the same poll); then None."""
        if self.peer_lost:
            return self._received()
        events = dict(self._poller.poll(timeout_ms))
        if self._monitor in events:
            self._drain_monitor()
        if self._sock in events:
            return self._sock.recv_multipart(copy=False)
        return None

    def _received(self) -> list | None:
        try:
            return self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None

    def _drain_monitor(self) -> None:
        while True:
            try:
                raw = self._monitor.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(raw)["event"]
            if event & _ESTABLISHED and not self.established:
                log.info("engine link: connected to %s", self.address)
                self.established = True
            elif event == zmq.EVENT_DISCONNECTED:
                # A drop before the first connection is a failed attempt libzmq retries; after it,
                # the scheduler closed the socket, died, or stopped answering heartbeats.
                if self.established:
                    log.error("engine link: scheduler at %s went away", self.address)
                    self.peer_lost = True

    def close(self) -> None:
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()
