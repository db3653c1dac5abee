"""uvicorn inside the scheduler process's asyncio loop, beside grpc.aio.

Owns the HTTP listener's lifetime: the socket is bound when the server is built (a port in use fails
start-up with OSError, as a gRPC address does, instead of uvicorn's sys.exit), uvicorn serves on it
from the running loop without installing signal handlers (the scheduler owns SIGINT/SIGTERM and the
drain), TLS from the same --tls-cert/--tls-key (and --tls-client-ca for mutual TLS) as gRPC, and
`stop` closes the listener, then gives open responses `grace_s` before cancelling them.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI


@dataclass(frozen=True)
class HttpConfig:
    host: str
    port: int
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    grace_s: float = 5.0


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); OSError naming the address."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # IPv4 first: "localhost" then means 127.0.0.1, which every client tries (not every one tries ::1).
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(f"cannot bind HTTP address {host}:{port}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind HTTP address {host}:{port}: {exc}") from exc
    return sock


class HttpServer:
    def __init__(self, app: FastAPI, config: HttpConfig) -> None:
        self.config = config
        self._sock = bind(config.host, config.port)
        self.port = int(self._sock.getsockname()[1])
        self._uvicorn = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, ws="none", server_header=False,
            timeout_graceful_shutdown=max(1, round(config.grace_s)),
            ssl_certfile=config.tls_cert or None, ssl_keyfile=config.tls_key or None,
            ssl_ca_certs=config.tls_client_ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if config.tls_client_ca else ssl.CERT_NONE,
        )
        self._server: uvicorn.Server | None = None
        self._ticks: asyncio.Future | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.config.tls_cert else "http"

    async def start(self) -> None:
        config = self._uvicorn
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self._sock])
        self._server = server
        self._ticks = asyncio.ensure_future(server.main_loop())  # the Date header, once a second

    async def stop(self) -> None:
        server = self._server
        if server is None:
            self._sock.close()
            return
        self._server = None
        server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        await server.shutdown(sockets=[self._sock])
