"""What the two public front ends (gRPC servicer, OpenAI HTTP API) share about one request.

Owns the path of a GenerateRequest from the wire to the engine and back, independent of the
protocol: a process-wide request id, full validation (`validation.build_request`), admission into
the core, the stream of deltas from a `RequestHandle`, and the abort of a request its caller gave up
on. Every refusal becomes a `Refusal` carrying the gRPC status code it means (each front end renders
it: google.rpc details on gRPC, an OpenAI error object on HTTP), is counted in the failure metric and
logged once. Neither front end imports the other; the core never imports this.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from tandem.v1 import api_pb2

from scheduler_svc.core.scheduler import NeverFits, QueueFull
from scheduler_svc.frontend import sample_group
from scheduler_svc.frontend.detokenizer import OutputText
from scheduler_svc.frontend.engine_client import EngineClient, GrammarInvalid, Unavailable
from scheduler_svc.frontend.handle import Delta, RequestHandle
from scheduler_svc.frontend.validation import InvalidArgument, RequestLimits, build_request, prompt_ids

rlog = structlog.get_logger("tandem.requests")

RETRY_AFTER_S = 1.0  # the retry hint of a full queue
_ids = itertools.count()  # one sequence for both front ends: request ids stay unique in the process
_prefix = f"{os.getpid():x}"


@dataclass
class Refusal(Exception):
    """A request ended without a result: the status code it means and why."""

    code: grpc.StatusCode
    message: str
    field: str | None = None  # INVALID_ARGUMENT: the GenerateRequest field at fault
    description: str = ""  # INVALID_ARGUMENT: what is wrong with it
    retry_after_s: float | None = None  # RESOURCE_EXHAUSTED: when to try again

    def __str__(self) -> str:
        return self.message


def invalid(field: str, description: str) -> Refusal:
    return Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {description}", field, description)


def record_failure(engine: EngineClient, refusal: Refusal) -> None:
    engine.metrics.failed(refusal.code.name)
    rlog.info("request failed", code=refusal.code.name, message=refusal.message)


def bind_request_id(client_id: str) -> str:
    """The caller's request id (or a new one), bound to this task's log lines."""
    client_id = client_id or uuid.uuid4().hex
    structlog.contextvars.bind_contextvars(request_id=client_id)
    return client_id


async def admit(engine: EngineClient, limits: RequestLimits, msg: api_pb2.GenerateRequest,
                client_id: str, streamed: bool = True) -> RequestHandle:
    """Validates `msg`, queues it in the core and returns its handle; raises Refusal (counted, logged).
    A request of n > 1 samples needs `admit_samples`."""
    group = await admit_samples(engine, limits, msg, client_id, streamed)
    assert len(group) == 1, "a request of n > 1 samples goes through admit_samples"
    return group[0]


async def admit_samples(engine: EngineClient, limits: RequestLimits, msg: api_pb2.GenerateRequest,
                        client_id: str, streamed: bool = True) -> list[RequestHandle]:
    """`admit` for a request of n samples (sample_group.py): one handle per sample, sample 0 first,
    all admitted or none; raises Refusal (counted, logged). `streamed`: the caller reads the handles
    as they change (a stream), else once at their end (a unary call: text is made in batches)."""
    try:
        tokenizer = engine.tokenizer()
        hello = engine.hello()
        req, stops = build_request(msg, f"{_prefix}-{next(_ids)}", tokenizer, hello, limits)
        req.client_id = client_id
        if req.num_samples == 1:
            group = [RequestHandle(req, client_id, OutputText(tokenizer, stops),
                                   stream_interval=limits.stream_interval, streamed=streamed)]
        else:
            group = sample_group.handles(sample_group.expand(req), client_id, tokenizer, stops,
                                         limits.stream_interval, streamed)
        for i, handle in enumerate(group):
            try:
                await engine.submit(handle)
            except BaseException:
                for h in group[:i]:
                    engine.abort(h)
                raise
        return group
    except InvalidArgument as exc:
        refusal = invalid(exc.field, exc.description)
    except NeverFits as exc:
        refusal = invalid("max_new_tokens", str(exc))
    except GrammarInvalid as exc:
        # The compiler's message, under the constraint's field (json_schema, regex, choice, grammar, ...).
        refusal = invalid(msg.WhichOneof("constraint") or "constraint", f"does not compile: {exc}")
    except QueueFull as exc:
        refusal = Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue full: {exc}", retry_after_s=RETRY_AFTER_S)
    except Unavailable as exc:
        refusal = Refusal(grpc.StatusCode.UNAVAILABLE, str(exc))
    record_failure(engine, refusal)
    raise refusal


def failure(engine: EngineClient, error: tuple[grpc.StatusCode, str]) -> Refusal:
    """A request that failed after admission (its handle's error), counted and logged."""
    refusal = Refusal(*error)
    record_failure(engine, refusal)
    return refusal


async def deltas(handle: RequestHandle) -> AsyncIterator[Delta]:
    """What accumulated since the last delta, each time something did; the last carries the end."""
    while True:
        await handle.changed.wait()
        delta = handle.take()
        yield delta
        if delta.completion is not None or delta.error is not None:
            return


def release(engine: EngineClient, handle: RequestHandle) -> None:
    """The caller is gone (cancel, deadline, disconnect) or done: abort what still runs (idempotent)."""
    if not handle.done:
        engine.abort(handle)


def tokenize(engine: EngineClient, limits: RequestLimits,
             msg: api_pb2.TokenizeRequest) -> tuple[list[int], list[str]]:
    """Token ids and vocabulary strings of a prompt, exactly as Generate would see it; raises Refusal."""
    try:
        tokenizer = engine.tokenizer()
        _, ids = prompt_ids(msg.WhichOneof("prompt"), msg, tokenizer, engine.hello().vocab_size, limits)
    except InvalidArgument as exc:
        raise invalid(exc.field, exc.description) from exc
    except Unavailable as exc:
        raise Refusal(grpc.StatusCode.UNAVAILABLE, str(exc)) from exc
    assert tokenizer is not None, "prompt_ids refuses text and chat without a tokenizer"
    return ids, tokenizer.token_strings(ids)
