"""The public gRPC API (tandem.v1.Tandem) on grpc.aio.

Owns the mapping between RPCs and the engine (validation, admission and the stream of deltas are
shared with the HTTP API: `admission.py`), and turns every failure into an explicit status with
google.rpc details (never UNKNOWN). A client cancel or an
expired deadline cancels the handler, whose `finally` aborts the request so its KV blocks return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tandem.v1 import api_pb2, api_pb2_grpc

from scheduler_svc.frontend import admission, sample_group
from scheduler_svc.frontend.admission import Refusal, bind_request_id
from scheduler_svc.frontend.engine_client import EngineClient
from scheduler_svc.frontend.handle import Completion, Delta, RequestHandle
from scheduler_svc.frontend.validation import RequestLimits

log = logging.getLogger("tandem.api")

SERVER_VERSION = "0.1.0"


def _status(code: grpc.StatusCode, message: str, *details) -> grpc.Status:
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))


def invalid_argument(field: str, description: str) -> grpc.Status:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
    )
    return _status(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", bad)


def resource_exhausted(message: str, retry_after_s: float = 1.0) -> grpc.Status:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(nanos=int(retry_after_s * 1e9)))
    return _status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, retry)


def _completion_pb(c: Completion) -> api_pb2.Completion:
    out = api_pb2.Completion(
        finish_reason=int(c.finish_reason),
        usage=api_pb2.Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                            cached_tokens=c.cached_tokens),
        timings=api_pb2.Timings(queue_s=c.queue_s, ttft_s=c.ttft_s, total_s=c.total_s),
    )
    if c.stop_string is not None:
        out.stop_string = c.stop_string
    elif c.stop_token_id is not None:
        out.stop_token_id = c.stop_token_id
    return out


def _logprobs_pb(items) -> list[api_pb2.TokenLogprob]:
    return [
        api_pb2.TokenLogprob(token_id=t, logprob=lp, top=[api_pb2.TopLogprob(token_id=i, logprob=v) for i, v in top])
        for t, lp, top in items
    ]


def _refusal_status(refusal: Refusal) -> grpc.Status:
    if refusal.field is not None:
        return invalid_argument(refusal.field, refusal.description)
    if refusal.retry_after_s is not None:
        return resource_exhausted(refusal.message, refusal.retry_after_s)
    return _status(refusal.code, refusal.message)


@contextlib.asynccontextmanager
async def internal_errors(context: grpc.aio.ServicerContext):
    """A bug surfaces as INTERNAL with a message, never as UNKNOWN."""
    try:
        yield
    except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        log.exception("internal error")
        await context.abort_with_status(_status(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"))


async def _indexed(handle: RequestHandle) -> AsyncIterator[tuple[int, Delta]]:
    async for delta in admission.deltas(handle):
        yield 0, delta


class TandemServicer(api_pb2_grpc.TandemServicer):
    def __init__(self, engine: EngineClient, limits: RequestLimits) -> None:
        self.engine = engine
        self.limits = limits

    async def _admit(self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                     streamed: bool) -> list[RequestHandle]:
        """One handle per sample (n), sample 0 first."""
        client_id = bind_request_id(
            request.request_id or dict(context.invocation_metadata() or ()).get("x-request-id", ""))
        try:
            return await admission.admit_samples(self.engine, self.limits, request, client_id, streamed)
        except Refusal as refusal:
            await context.abort_with_status(_refusal_status(refusal))
            raise  # not reached: abort raises

    async def _end_with_error(self, context: grpc.aio.ServicerContext, error) -> None:
        await context.abort_with_status(_refusal_status(admission.failure(self.engine, error)))

    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        async with internal_errors(context):
            group = await self._admit(request, context, streamed=False)
            try:
                # One wake-up per sample at its end, not one per token: with hundreds of unary calls in
                # flight, per-token wake-ups would cost the event loop more than a GPU step lasts.
                choices = []
                for index, handle in enumerate(group):
                    await handle.ended.wait()
                    delta = handle.take()
                    if delta.error is not None:
                        await self._end_with_error(context, delta.error)
                    assert delta.completion is not None
                    choices.append(api_pb2.GenerateResponse(
                        request_id=handle.client_request_id, text=delta.text, token_ids=delta.token_ids,
                        logprobs=_logprobs_pb(delta.logprobs), completion=_completion_pb(delta.completion),
                        index=index,
                    ))
                if len(choices) == 1:
                    return choices[0]
                # n > 1: every sample whole, by index, in `choices`.
                return api_pb2.GenerateResponse(request_id=group[0].client_request_id, choices=choices)
            finally:
                for handle in group:  # a cancel or deadline ends every sample and frees its KV
                    admission.release(self.engine, handle)

    async def GenerateStream(self, request, context):  # noqa: N802
        async with internal_errors(context):
            group = await self._admit(request, context, streamed=True)
            try:
                # n > 1: the samples' messages interleaved as they progress, each with its index.
                deltas = _indexed(group[0]) if len(group) == 1 else sample_group.interleave(group)
                async for index, delta in deltas:
                    if delta.error is not None:
                        await self._end_with_error(context, delta.error)
                    msg = api_pb2.GenerateResponse(
                        request_id=group[0].client_request_id, text=delta.text, token_ids=delta.token_ids,
                        logprobs=_logprobs_pb(delta.logprobs), index=index,
                    )
                    if delta.completion is not None:
                        msg.completion.CopyFrom(_completion_pb(delta.completion))
                    yield msg
            finally:
                for handle in group:  # a cancel or deadline ends every sample and frees its KV
                    admission.release(self.engine, handle)

    async def Tokenize(self, request, context):  # noqa: N802
        async with internal_errors(context):
            try:
                ids, tokens = admission.tokenize(self.engine, self.limits, request)
            except Refusal as refusal:
                await context.abort_with_status(_refusal_status(refusal))
            return api_pb2.TokenizeResponse(token_ids=ids, tokens=tokens)

    async def GetModelInfo(self, request, context):  # noqa: N802
        async with internal_errors(context):
            info = api_pb2.ModelInfo(
                pipeline_depth=self.engine.depth, server_version=SERVER_VERSION,
                worker_connected=self.engine.serving, max_new_tokens_default=self.limits.default_max_new_tokens,
            )
            if self.engine.serving:
                h = self.engine.hello()
                info.model, info.vocab_size, info.max_context = h.model_name, h.vocab_size, h.max_context
                info.eos_token_ids.extend(h.eos_token_ids)
                info.dtype, info.device = h.dtype, h.device
                info.kv_blocks, info.kv_block_size = h.num_blocks, h.block_size
                info.default_temperature, info.default_top_p = h.default_temperature, h.default_top_p
                info.default_top_k, info.default_min_p = h.default_top_k, h.default_min_p
                info.tensor_parallel_size = max(1, h.tensor_parallel_size)
                info.structured_output_engine = h.grammar_engine
            return info


    async def GetStats(self, request, context):  # noqa: N802
        async with internal_errors(context):
            st = await self.engine.stats()
            return api_pb2.ServerStats(
                num_running=st.running, num_waiting=st.waiting, kv_blocks_total=st.kv_blocks_total,
                kv_blocks_free=st.kv_blocks_free, num_preemptions=st.preemptions, steps=st.steps,
                worker_busy_ratio=st.busy_ratio, worker_connected=self.engine.serving,
                requests_finished=self.engine.requests_finished, prefix_cache_queries=st.prefix_cache_queries,
                prefix_cache_hits=st.prefix_cache_hits, prefix_cached_blocks=st.prefix_cached_blocks,
                prefix_evictable_blocks=st.prefix_evictable_blocks,
            )
