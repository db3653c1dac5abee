"""Who may call the API: bearer-token authentication and the bind-address guard.

Owns:
- `load_keys`: API keys from `--api-keys-file` (one per line, `#` comments) and/or `--api-keys`
  (comma-separated; also the `TANDEM_API_KEYS` environment variable);
- `BearerAuth`: a grpc.aio server interceptor that admits an RPC only with metadata
  `authorization: Bearer <key>` for a configured key, compared in constant time against every key
  (no early exit, so timing says nothing about which or how much matched); otherwise the RPC ends
  UNAUTHENTICATED before any handler runs. Health checks may be exempt (`--health-without-auth`),
  for load balancers and orchestrators that cannot send a token;
- `check_bind`: a server reachable beyond this host must either authenticate or be told
  `--insecure` explicitly.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import grpc.aio

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def load_keys(keys_file: str | None, keys: str | None) -> list[bytes]:
    out: list[str] = []
    if keys_file:
        for line in Path(keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line)
    if keys:
        out.extend(k.strip() for k in keys.split(",") if k.strip())
    for k in out:
        if len(k) < 16:
            raise ValueError("API keys must be at least 16 characters")
    return [k.encode() for k in out]


def token_matches(token: bytes, keys: Sequence[bytes]) -> bool:
    """Whether `token` is one of `keys`, compared in constant time against every key (gRPC and HTTP)."""
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token, key)
    return ok


def _deny(kind: Callable[..., grpc.RpcMethodHandler], streaming_response: bool) -> grpc.RpcMethodHandler:
    async def unary(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

    async def stream(request: object, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        yield  # pragma: no cover  (abort raises)

    return kind(stream if streaming_response else unary)


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, keys: Sequence[bytes], health_exempt: bool = False) -> None:
        assert keys, "BearerAuth without keys"
        self.keys = list(keys)
        self.health_exempt = health_exempt

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if self.health_exempt and details.method.startswith(HEALTH_PREFIX):
            return await continuation(details)
        token = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                raw = value.encode() if isinstance(value, str) else value
                if raw[:7].lower() == b"bearer ":
                    token = raw[7:].strip()
        if token and token_matches(token, self.keys):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.request_streaming:
            kind = grpc.stream_stream_rpc_method_handler if handler.response_streaming else \
                grpc.stream_unary_rpc_method_handler
        else:
            kind = grpc.unary_stream_rpc_method_handler if handler.response_streaming else \
                grpc.unary_unary_rpc_method_handler
        return _deny(kind, handler.response_streaming)


def is_loopback(address: str) -> bool:
    """Whether a gRPC listen address (`host:port`, `[v6]:port`, `unix:...`) is reachable only locally."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: may resolve to anything


def check_bind(address: str, authenticated: bool, insecure: bool) -> None:
    if not is_loopback(address) and not authenticated and not insecure:
        raise ValueError(f"refusing to serve {address} (reachable beyond this host) without authentication: "
                         "give --api-keys-file / --api-keys, or --insecure to do it anyway")
