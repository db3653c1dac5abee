"""A request body that is not the method's protobuf message gets INVALID_ARGUMENT, not UNKNOWN.

grpc's own handling of a deserializer that raises is to end the call UNKNOWN ("Unexpected
DecodeError"), which tells a client in another language nothing it can act on. This interceptor
wraps every method's deserializer so that a body that fails to decode becomes a marker, and the
method's behaviour, seeing the marker, ends the call INVALID_ARGUMENT with the decoder's message.
A server-streaming behaviour may be an async generator (ours) or a coroutine that writes with
`context.write` (grpc's Health.Watch, which client-side health checking opens): each is wrapped as
what it is.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc


class _Undecodable:
    def __init__(self, reason: str) -> None:
        self.reason = reason


class DecodeGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler  # no method here streams requests in; unknown methods stay UNIMPLEMENTED
        decode, method = handler.request_deserializer, details.method

        def safe(data: bytes) -> Any:
            try:
                return decode(data)
            except Exception as exc:  # protobuf's DecodeError, whatever its module
                return _Undecodable(f"the request body of {method} is not a valid protobuf message: {exc}")

        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                return await behaviour(request, context)

            return handler._replace(request_deserializer=safe, unary_unary=unary_unary)
        streaming = handler.unary_stream
        if not inspect.isasyncgenfunction(streaming):
            # A behaviour that writes its messages with context.write (grpc's own aio Health.Watch):
            # a coroutine, wrapped as one.
            async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                await streaming(request, context)

            return handler._replace(request_deserializer=safe, unary_stream=unary_stream_writer)

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            async for message in streaming(request, context):
                yield message

        return handler._replace(request_deserializer=safe, unary_stream=unary_stream)
