"""asyncio Tandem client (grpc.aio): the same methods and results as `TandemClient`, awaitable.

Owns the aio channel lifetime and the cancel-on-close behaviour of async streams; request building
and response parsing live in `client._convert`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, Unpack

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tandem.v1 import api_pb2, api_pb2_grpc

from . import _convert, targets
from .sync_client import DEFAULT_ADDRESS
from .types import GenerationResult, ModelInfo, StreamChunk, TandemError, TokenizeResult


class AsyncGenerateStream(AsyncIterator[StreamChunk]):
    """Async iterator over one GenerateStream RPC; `aclose()`/`cancel()`, leaving its `async with`
    block, or the consuming task being cancelled cancels the RPC."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._closed = False

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self._closed:
            raise StopAsyncIteration
        try:
            resp = await self._call.read()
        except asyncio.CancelledError:
            self.cancel()
            raise
        except grpc.RpcError as e:
            if self._closed:
                raise StopAsyncIteration from None
            self._closed = True
            raise _convert.error_from_rpc(e) from None
        if resp is grpc.aio.EOF:
            self._closed = True
            raise StopAsyncIteration
        return _convert.chunk_from_response(resp)

    def cancel(self) -> None:
        if not self._closed:
            self._closed = True
            self._call.cancel()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # `break` out of `async for` does not close an async iterator: dropping it must still cancel.
        try:
            self.cancel()
        except Exception:
            pass


class AsyncTandemClient:
    """asyncio client; create it inside a running event loop. `address` and `health_check` as for
    `TandemClient` (one server, several replicas balanced round-robin, or `dns:///name:port`)."""

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        timeout: float | None = None,
        metadata: _convert.Metadata = None,
        options: Sequence[tuple[str, Any]] | None = None,
        api_key: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        health_check: bool = True,
    ) -> None:
        self.address = targets.display(address)
        self.timeout = timeout
        self._metadata, creds = _convert.connection(self.address, metadata, api_key, tls_ca, tls_cert, tls_key)
        self.target, opts = targets.channel_args(address, options, tls=creds is not None, health_check=health_check)
        self._channel = (grpc.aio.secure_channel(self.target.target, creds, options=opts) if creds is not None
                         else grpc.aio.insecure_channel(self.target.target, options=opts))
        self._stub = api_pb2_grpc.TandemStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def _unary(self, method: Any, req: Any, timeout: float | None) -> Any:
        call = method(req, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            return await call
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.RpcError as e:
            raise _convert.error_from_rpc(e) from None

    async def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[_convert.GenerateParams],
    ) -> GenerationResult:
        req = _convert.build_generate_request(prompt, **params)
        return _convert.result_from_response(await self._unary(self._stub.Generate, req, timeout))

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[_convert.GenerateParams],
    ) -> AsyncGenerateStream:
        """Not a coroutine: `async for chunk in client.generate_stream(...)`."""
        req = _convert.build_generate_request(prompt, **params)
        call = self._stub.GenerateStream(req, timeout=self._timeout(timeout), metadata=self._metadata)
        return AsyncGenerateStream(call)

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[_convert.Message] | None = None,
        timeout: float | None = None,
    ) -> TokenizeResult:
        req = _convert.build_tokenize_request(prompt, messages=messages)
        return _convert.tokenize_from_response(await self._unary(self._stub.Tokenize, req, timeout))

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        resp = await self._unary(self._stub.GetModelInfo, api_pb2.GetModelInfoRequest(), timeout)
        return _convert.model_info_from_proto(resp)

    async def server_stats(self, *, timeout: float | None = None) -> api_pb2.ServerStats:
        """The server's GetStats counters (running, KV blocks, steps, prefix-cache hits...), as the proto."""
        return await self._unary(self._stub.GetStats, api_pb2.GetStatsRequest(), timeout)

    async def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        """True only when the server reports SERVING; False when not serving or unreachable."""
        try:
            return await self.health_status(service, timeout=timeout) == "SERVING"
        except TandemError:
            return False

    async def health_status(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...); TandemError when unreachable."""
        resp = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
