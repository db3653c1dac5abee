"""The scheduler's end of the engine link: a ZeroMQ ROUTER socket the worker connects to.

Owns the socket, its heartbeat settings and the detection of a dead worker. The scheduler binds so
that a worker can die and reconnect without the scheduler restarting; the ROUTER tells us which
connection (peer identity) a message came from, so a restarted worker is told apart from the old
one. ZMTP heartbeats run in libzmq's I/O thread and the socket monitor reports DISCONNECTED, so a
dead or wedged peer is noticed without any application-level thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio
from tandem import wire
from tandem.envargs import prepare_ipc_address
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("tandem.link")

HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5000
MAX_MESSAGE_BYTES = 256 << 20
_HANDSHAKE_WHY = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication: a key this scheduler does not hold",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol: e.g. no CURVE where CURVE is required",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no detail",
}
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def _log_send_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("engine link: send failed: %s", fut.exception())


class AddressInUse(OSError):
    """The link address is held by another live process (another scheduler)."""


def refuse_live_ipc(address: str) -> None:
    """Binding an ipc:// path takes it over from whoever holds it: a second scheduler on the same path
    would steal the first one's restarting workers. So a path that accepts a connection is in use and
    refused; one that does not is a stale file (a scheduler that died) and is removed."""
    if not address.startswith("ipc://"):
        return  # tcp:// bind fails by itself on a port in use
    path = address[len("ipc://"):]
    if not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: left behind by a process that died
        return
    finally:
        probe.close()
    raise AddressInUse(f"engine link address {address} is in use by another live scheduler; give this one "
                       f"its own --engine-address (tandem serve picks a private one unless told)")


@dataclass(frozen=True)
class Incoming:
    peer: bytes
    kind: bytes
    header: bytes
    frames: list


class EngineLink:
    """Receives HELLO/RESULT from the worker and sends PLAN/FLUSH to it."""

    def __init__(self, address: str, curve_secret: str = "", curve_clients: str = "") -> None:
        self.address = address
        self._ctx = zmq.asyncio.Context()
        self._auth = None
        sock = self._ctx.socket(zmq.ROUTER)
        if curve_secret:  # tcp:// across hosts: encrypted, and only workers whose public key we hold
            from tandem import linkkeys
            from zmq.auth.asyncio import AsyncioAuthenticator

            if not curve_clients:
                raise ValueError("--link-curve-secret needs --link-curve-clients (the workers' public keys)")
            self._auth = AsyncioAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=curve_clients)
            linkkeys.make_server(sock, curve_secret)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a vanished peer raises, never drops silently
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        prepare_ipc_address(address)
        refuse_live_ipc(address)
        sock.bind(address)
        self._sock = sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED | _HANDSHAKE_FAILED)
        self.handshake_failures = 0  # connections that never got in (CURVE: an unknown key, or no CURVE)

    async def recv(self) -> Incoming:
        """Next well-formed message; garbage is logged and skipped, never raised to the caller."""
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            peer, body = frames[0].bytes, frames[1:]
            try:
                kind, header, arrays = wire.split(body)
            except wire.WireError as exc:
                log.warning("dropping malformed message from worker: %s", exc)
                continue
            return Incoming(peer, kind, header, arrays)

    def send(self, peer: bytes, frames: list) -> None:
        """Queues a message for `peer` without blocking; raises zmq.ZMQError if the peer is gone."""
        sent = self._sock.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False)
        # zmq.asyncio reports errors through the returned future, which a non-blocking send has
        # already settled: surface them here, where the caller can act on a vanished worker.
        if sent.done():
            sent.result()
        else:
            sent.add_done_callback(_log_send_failure)

    async def watch_disconnects(self, on_disconnect: Callable[[], Awaitable[None] | None]) -> None:
        """Calls `on_disconnect` whenever a connection drops (closed socket, heartbeat timeout)."""
        while True:
            msg = parse_monitor_message(await self._monitor.recv_multipart())
            if msg["event"] & _HANDSHAKE_FAILED:
                # A peer connected but did not get in: worth a line, since it is someone else's process.
                self.handshake_failures += 1
                log.warning("engine link: a connection failed the handshake (%s, code %s): refused; "
                            "%d so far", _HANDSHAKE_WHY[msg["event"]], msg["value"], self.handshake_failures)
            elif msg["event"] == zmq.EVENT_DISCONNECTED:
                log.warning("engine link: worker connection dropped")
                result = on_disconnect()
                if asyncio.iscoroutine(result):
                    await result

    def close(self, linger_ms: int = 0) -> None:
        """`linger_ms`: how long queued messages (a BYE) may still take to leave."""
        if self._auth is not None:
            self._auth.stop()
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=linger_ms)
        self._ctx.term()
