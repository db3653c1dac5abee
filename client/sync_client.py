"""Blocking Tandem client: one gRPC channel, typed results, `TandemError` for every failed RPC.

Owns the channel lifetime and the cancel-on-close behaviour of streams; request building and response
parsing live in `client._convert` (shared with the async client).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Unpack

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tandem.v1 import api_pb2, api_pb2_grpc

from . import _convert, targets
from .types import GenerationResult, ModelInfo, StreamChunk, TandemError, TokenizeResult

DEFAULT_ADDRESS = "localhost:50051"


class GenerateStream(Iterator[StreamChunk]):
    """Iterator over the chunks of one GenerateStream RPC; closing it (or breaking out of a `for`
    loop over it, or leaving its `with` block) cancels the RPC so the server stops generating."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._closed = False

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> StreamChunk:
        if self._closed:
            raise StopIteration
        try:
            resp = next(self._call)
        except StopIteration:
            self._closed = True
            raise
        except grpc.RpcError as e:
            if self._closed:  # cancelled by us from another thread while blocked here
                raise StopIteration from None
            self._closed = True
            raise _convert.error_from_rpc(e) from None
        return _convert.chunk_from_response(resp)

    def cancel(self) -> None:
        if not self._closed:
            self._closed = True
            self._call.cancel()

    close = cancel

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # A stream dropped half-read must not keep the server generating for nobody.
        try:
            self.cancel()
        except Exception:
            pass


class TandemClient:
    """Synchronous client. `timeout` (seconds) is the default deadline of every call; `metadata` is sent
    with every call.

    `address`: one `host:port`; several replicas (`"h1:50051,h2:50051"` or a sequence), which grpc
    balances round-robin over those reporting SERVING; or a grpc target such as `dns:///name:port`
    (every address the name resolves to, balanced the same way). `health_check=False` keeps the
    round-robin but drops the client-side health checking (`client.targets` says what each does)."""

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
        self._channel = (grpc.secure_channel(self.target.target, creds, options=opts) if creds is not None
                         else grpc.insecure_channel(self.target.target, options=opts))
        self._stub = api_pb2_grpc.TandemStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[_convert.GenerateParams],
    ) -> GenerationResult:
        req = _convert.build_generate_request(prompt, **params)
        try:
            resp = self._stub.Generate(req, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise _convert.error_from_rpc(e) from None
        return _convert.result_from_response(resp)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **params: Unpack[_convert.GenerateParams],
    ) -> GenerateStream:
        req = _convert.build_generate_request(prompt, **params)
        call = self._stub.GenerateStream(req, timeout=self._timeout(timeout), metadata=self._metadata)
        return GenerateStream(call)

    def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[_convert.Message] | None = None,
        timeout: float | None = None,
    ) -> TokenizeResult:
        req = _convert.build_tokenize_request(prompt, messages=messages)
        try:
            resp = self._stub.Tokenize(req, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise _convert.error_from_rpc(e) from None
        return _convert.tokenize_from_response(resp)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        try:
            resp = self._stub.GetModelInfo(
                api_pb2.GetModelInfoRequest(), timeout=self._timeout(timeout), metadata=self._metadata
            )
        except grpc.RpcError as e:
            raise _convert.error_from_rpc(e) from None
        return _convert.model_info_from_proto(resp)

    def server_stats(self, *, timeout: float | None = None) -> api_pb2.ServerStats:
        """The GetStats counters (running, KV blocks, steps, requests finished...) of the server, or of
        the one replica this call reached, as the proto."""
        try:
            return self._stub.GetStats(api_pb2.GetStatsRequest(), timeout=self._timeout(timeout),
                                       metadata=self._metadata)
        except grpc.RpcError as e:
            raise _convert.error_from_rpc(e) from None

    def health(self, service: str = "", *, timeout: float | None = None) -> bool:
        """True only when the server reports SERVING; False when not serving or unreachable."""
        try:
            return self.health_status(service, timeout=timeout) == "SERVING"
        except TandemError:
            return False

    def health_status(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...); TandemError when unreachable."""
        try:
            resp = self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._timeout(timeout),
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise _convert.error_from_rpc(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
