"""The FastAPI application of the OpenAI-compatible API.

Owns the routes (`POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`,
`POST /tokenize`), the gate in front of them (bearer keys, compared in constant time as on gRPC, and
the cap on requests in flight: past `max_concurrent` a request gets 429, as a gRPC call past
--max-concurrent-rpcs gets RESOURCE_EXHAUSTED) and the error handlers that turn everything, pydantic's
type errors and unknown routes included, into OpenAI's error object. A request goes the gRPC path:
convert.py builds the GenerateRequest, `admission.admit_samples` validates and queues it (one handle per
sample of n), its deltas become chunks (responses.py), n samples' interleaved (sample_group.py). A
client that disconnects, streaming or not, aborts its request (every sample), which frees its KV
blocks; so does the end of the response in any other way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from tandem.v1 import api_pb2

from scheduler_svc.frontend import admission, sample_group
from scheduler_svc.frontend.admission import Refusal
from scheduler_svc.frontend.auth import token_matches
from scheduler_svc.frontend.engine_client import EngineClient, Unavailable
from scheduler_svc.frontend.handle import Completion as Done
from scheduler_svc.frontend.handle import Delta, RequestHandle
from scheduler_svc.frontend.http_api import convert, responses
from scheduler_svc.frontend.http_api import schemas as s
from scheduler_svc.frontend.http_api.errors import ApiError, from_refusal, from_status
from scheduler_svc.frontend.validation import RequestLimits

log = logging.getLogger("tandem.http")

_CODE_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
               503: "UNAVAILABLE", 500: "INTERNAL"}
_GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


class Gate:
    """ASGI middleware: authentication first (an unauthenticated caller learns nothing of its body),
    then the cap on requests in flight (a stream counts until its last byte is sent)."""

    def __init__(self, app: ASGIApp, keys: Sequence[bytes], health_exempt: bool, max_concurrent: int) -> None:
        self.app, self.keys, self.health_exempt, self.max_concurrent = app, list(keys), health_exempt, max_concurrent
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.keys and not (self.health_exempt and path == "/health"):
            auth = Headers(scope=scope).get("authorization", "")
            token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
            if not (token and token_matches(token, self.keys)):
                err = ApiError(401, "missing or invalid bearer token", "authentication_error", None, "invalid_api_key")
                await err.response()(scope, receive, send)
                return
        if not self.max_concurrent or path == "/health":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            err = ApiError(429, f"too many requests in flight (at most {self.max_concurrent})", "rate_limit_error",
                           None, "too_many_requests", retry_after_s=1.0)
            await err.response()(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class _Stream(StreamingResponse):
    """A server-sent-event stream that aborts its request (every sample) however it ends, disconnect
    included."""

    def __init__(self, content: AsyncIterator[str], group: list[RequestHandle], engine: EngineClient,
                 headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"cache-control": "no-cache", **headers})
        self._group, self._engine = group, engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for handle in self._group:
                admission.release(self._engine, handle)


async def _indexed(handle: RequestHandle) -> AsyncIterator[tuple[int, Delta]]:
    async for delta in admission.deltas(handle):
        yield 0, delta


def _event(data: str) -> str:
    return f"data: {data}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(engine: EngineClient, limits: RequestLimits, keys: Sequence[bytes] = (),
               health_without_auth: bool = False, max_concurrent: int = 0) -> FastAPI:
    app = FastAPI(title="Tandem (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)
    if keys or max_concurrent:
        app.add_middleware(Gate, keys=keys, health_exempt=health_without_auth, max_concurrent=max_concurrent)
    started = int(time.time())

    def served_model(model: str | None) -> str:
        try:
            name = engine.hello().model_name
        except Unavailable as exc:
            raise from_status(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
        if model and model != name:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{name}`.",
                           "invalid_request_error", "model", "model_not_found")
        return name

    async def generate(request: Request, model_param: str | None, msg: api_pb2.GenerateRequest,
                       spec: convert.Spec) -> Response:
        model = served_model(model_param)
        text = responses.TokenText(engine.tokenizer())
        client_id = admission.bind_request_id(request.headers.get("x-request-id", ""))
        try:
            group = await admission.admit_samples(engine, limits, msg, client_id, streamed=spec.stream)
        except Refusal as refusal:
            err = from_refusal(refusal, spec.prompt_param, spec.max_tokens_param, spec.logprobs_param,
                               spec.constraint_param)
            err.counted = True
            raise err from None
        rid = ("chatcmpl-" if spec.chat else "cmpl-") + client_id
        created = int(time.time())
        headers = {"x-request-id": client_id}
        if spec.stream:
            writer = responses.ChunkWriter(spec, rid, created, model, text)
            return _Stream(_events(group, writer), group, engine, headers)
        try:
            # One wake-up per sample at its end (not one per token), or the client's disconnect.
            ended = asyncio.ensure_future(asyncio.gather(*(h.ended.wait() for h in group)))
            gone = asyncio.ensure_future(_disconnected(request))
            await asyncio.wait((ended, gone), return_when=asyncio.FIRST_COMPLETED)
            ended.cancel()
            gone.cancel()
            if not all(h.ended.is_set() for h in group):
                return Response(status_code=499)  # nobody reads it: the client has gone
            deltas = [h.take() for h in group]
            error = next((d.error for d in deltas if d.error is not None), None)
            if error is not None:
                err = from_refusal(admission.failure(engine, error))
                err.counted = True
                raise err
            body = responses.whole(spec, rid, created, model, deltas, text)
            return Response(body.model_dump_json(), media_type="application/json", headers=headers)
        finally:
            for handle in group:  # a disconnect (or an error) ends every sample and frees its KV
                admission.release(engine, handle)

    async def _events(group: list[RequestHandle], writer: responses.ChunkWriter) -> AsyncIterator[str]:
        deltas = _indexed(group[0]) if len(group) == 1 else sample_group.interleave(group)
        dones: dict[int, Done] = {}
        async for index, delta in deltas:
            if delta.error is not None:
                yield _event(json.dumps(from_refusal(admission.failure(engine, delta.error)).body()))
                break
            chunk = writer.chunk(index, delta)
            if chunk is not None:
                yield _event(chunk)
            if delta.completion is not None:
                dones[index] = delta.completion
                if len(dones) == len(group):
                    last = writer.usage_chunk([dones[i] for i in range(len(group))])
                    if last is not None:
                        yield _event(last)
        yield _event("[DONE]")

    @app.post("/v1/completions")
    async def completions(body: s.CompletionRequest, request: Request) -> Response:
        msg, spec = convert.completion_request(body)
        return await generate(request, body.model, msg, spec)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Response:
        msg, spec = convert.chat_request(body)
        return await generate(request, body.model, msg, spec)

    @app.get("/v1/models")
    async def models() -> Response:
        name = served_model(None)
        hello = engine.hello()
        card = s.ModelCard(id=name, created=started, max_model_len=hello.max_context, vocab_size=hello.vocab_size,
                           structured_output_engine=hello.grammar_engine)
        return Response(s.ModelList(data=[card]).model_dump_json(), media_type="application/json")

    @app.get("/health")
    async def health() -> Response:
        ok = engine.serving and not engine.draining
        return Response(json.dumps({"status": "SERVING" if ok else "NOT_SERVING"}), status_code=200 if ok else 503,
                        media_type="application/json")

    @app.post("/tokenize")
    async def tokenize(body: s.TokenizeRequest) -> Response:
        served_model(body.model)
        msg = convert.tokenize_request(body.prompt, body.messages)
        param = "prompt" if body.prompt is not None else "messages"
        try:
            ids, strs = admission.tokenize(engine, limits, msg)
        except Refusal as refusal:
            raise from_refusal(refusal, param) from None
        out = s.TokenizeResponse(count=len(ids), max_model_len=engine.hello().max_context, tokens=ids,
                                 token_strs=strs if body.return_token_strs else None)
        return Response(out.model_dump_json(), media_type="application/json")

    def _failed(request: Request, err: ApiError) -> Response:
        if request.url.path in _GENERATE_PATHS and not getattr(err, "counted", False):
            refusal = Refusal(grpc.StatusCode[_CODE_NAMES.get(err.status, "INTERNAL")], err.message)
            admission.record_failure(engine, refusal)
        return err.response()

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> Response:
        return _failed(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid_body(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [x for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _failed(request, ApiError(400, f"the body is not valid JSON: {first.get('msg', '')}"))
        param = str(loc[0]) if loc else None
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc[1:])
        message = f"{param}{where}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid body"))
        return _failed(request, ApiError(400, message, param=param, code="invalid_argument"))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return ApiError(exc.status_code, str(exc.detail), kind).response()

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        log.error("internal error", exc_info=exc)
        return _failed(request, ApiError(500, f"internal error: {type(exc).__name__}", "server_error", None,
                                         "internal_error"))

    return app
