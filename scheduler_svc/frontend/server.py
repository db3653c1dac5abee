"""The scheduler process: gRPC server (API, health, reflection), the OpenAI-compatible HTTP API
when asked (`--http-port`, scheduler_svc/frontend/http_api), and the core process it starts.

Owns start-up and shutdown order: start the core (which binds the engine link: core/__main__.py), start gRPC
reporting NOT_SERVING (the HTTP API's /health says 503 likewise; the Prometheus endpoint when asked),
flip to SERVING when a worker's handshake arrives (and back when it goes), on SIGINT/SIGTERM drain
(see `drain`: both APIs refuse new requests, 503 on HTTP) then stop HTTP, gRPC and the core; a core
that dies ends the process with status 1 (a supervisor restarts the scheduler). Both APIs share one
EngineClient: the same queue, limits, metrics and request-id sequence.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from tandem.v1 import api_pb2, api_pb2_grpc

from scheduler_svc.core.engine import EngineConfig
from scheduler_svc.frontend.auth import BearerAuth
from scheduler_svc.frontend.decode_guard import DecodeGuard
from scheduler_svc.frontend.engine_client import CoreConfig, EngineClient
from scheduler_svc.frontend.http_api.app import create_app
from scheduler_svc.frontend.http_api.serve import HttpConfig, HttpServer
from scheduler_svc.frontend.metrics import serve as serve_metrics
from scheduler_svc.frontend.servicer import TandemServicer
from scheduler_svc.frontend.validation import RequestLimits

log = logging.getLogger("tandem.server")

SERVICE_NAME = api_pb2.DESCRIPTOR.services_by_name["Tandem"].full_name
MAX_RECEIVE_MESSAGE_BYTES = 16 << 20


@dataclass
class ServerConfig:
    address: str
    engine_address: str
    engine: EngineConfig
    limits: RequestLimits
    shutdown_grace_s: float = 5.0
    link_curve_secret: str = ""  # CURVE on the engine link (tcp:// across hosts), see tandem.linkkeys
    link_curve_clients: str = ""
    drain_timeout_s: float = 30.0  # on SIGTERM: how long requests in flight may take to finish
    metrics_port: int = 0  # 0 = no /metrics endpoint
    metrics_host: str = "localhost"
    api_keys: tuple[bytes, ...] = ()  # bearer tokens; empty = no authentication
    health_without_auth: bool = False
    tls_cert: str = ""  # PEM files; with tls_client_ca, clients must present a certificate (mutual TLS)
    tls_key: str = ""
    tls_client_ca: str = ""
    max_concurrent_rpcs: int = 0  # 0 = no cap; past it gRPC answers RESOURCE_EXHAUSTED (HTTP: 429, its own count)
    http_port: int = 0  # 0 = no HTTP API
    http_host: str = "localhost"
    log_level: str = "INFO"  # the core's


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    def read(path: str) -> bytes:
        return Path(path).read_bytes()

    client_ca = read(config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(read(config.tls_key), read(config.tls_cert))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


class SchedulerServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.health = health_aio.HealthServicer()
        self.engine = EngineClient(
            CoreConfig(config.engine_address, config.engine, config.link_curve_secret, config.link_curve_clients,
                       config.log_level),
            on_serving_change=self._serving_changed)
        interceptors: list[grpc.aio.ServerInterceptor] = [DecodeGuard()]
        if config.api_keys:  # authentication first: an unauthenticated caller learns nothing of its body
            interceptors.insert(0, BearerAuth(config.api_keys, config.health_without_auth))
        self.grpc = grpc.aio.server(
            options=[("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES), ("grpc.so_reuseport", 0)],
            interceptors=interceptors, maximum_concurrent_rpcs=config.max_concurrent_rpcs or None,
        )
        api_pb2_grpc.add_TandemServicer_to_server(TandemServicer(self.engine, config.limits), self.grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.grpc,
        )
        if config.tls_cert:
            self.port = self.grpc.add_secure_port(config.address, server_credentials(config))
        else:
            self.port = self.grpc.add_insecure_port(config.address)
        if self.port == 0:
            self.engine.close()
            raise OSError(f"cannot bind gRPC address {config.address}")
        self.http: HttpServer | None = None
        if config.http_port:
            app = create_app(self.engine, config.limits, config.api_keys, config.health_without_auth,
                             config.max_concurrent_rpcs)
            try:
                self.http = HttpServer(app, HttpConfig(config.http_host, config.http_port, config.tls_cert,
                                                       config.tls_key, config.tls_client_ca, config.shutdown_grace_s))
            except OSError:
                self.engine.close()
                raise
        self._tasks: list[asyncio.Future] = []

    def _serving_changed(self, serving: bool) -> None:
        if self.engine.draining:
            return  # NOT_SERVING from the first moment of a shutdown, whatever the worker does
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            self._tasks.append(asyncio.ensure_future(self.health.set(name, status)))

    async def start(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()
            log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", self.http.scheme, self.config.http_host,
                     self.http.port)
        self._engine_task = asyncio.ensure_future(self.engine.run())
        if self.config.metrics_port:
            port = serve_metrics(self.engine.metrics, self.config.metrics_port, self.config.metrics_host)
            log.info("Prometheus metrics on http://%s:%d/metrics", self.config.metrics_host, port)
        log.info("gRPC on %s (port %d), engine link on %s, waiting for a worker",
                 self.config.address, self.port, self.config.engine_address)

    async def stop(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            await self.http.stop()
        await self.grpc.stop(self.config.shutdown_grace_s)
        self._engine_task.cancel()
        try:
            await self._engine_task
        except (asyncio.CancelledError, Exception):
            pass
        self.engine.close()

    async def serve_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        done, _ = await asyncio.wait(
            [asyncio.ensure_future(stop.wait()), self._engine_task], return_when=asyncio.FIRST_COMPLETED
        )
        if self._engine_task in done and self._engine_task.exception() is not None:
            log.error("engine loop died", exc_info=self._engine_task.exception())
            await self.stop()
            raise SystemExit(1)
        await self.drain()
        await self.stop()

    async def drain(self) -> None:
        """NOT_SERVING at once, new RPCs UNAVAILABLE, requests in flight get `drain_timeout_s` to
        finish; whatever remains then ends UNAVAILABLE ("shutting down"), not with a reset connection."""
        self.engine.start_drain()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("shutting down: %d requests in flight, up to %g s to finish", len(self.engine.handles),
                 self.config.drain_timeout_s)
        deadline = asyncio.get_running_loop().time() + self.config.drain_timeout_s
        while self.engine.handles and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        failed = self.engine.fail_remaining(grpc.StatusCode.UNAVAILABLE, "shutting down")
        if failed:
            log.warning("drain timeout: %d requests ended UNAVAILABLE", failed)
