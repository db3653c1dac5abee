"""The load-test driver: sends a workload on an arrival schedule through gRPC streams and records
what each request saw.

Owns the asyncio side of `tandem bench`: readiness wait, warm-up requests (sent and awaited before
the clock starts, never counted), the schedule (`arrivals.offsets`) with an optional concurrency
cap, one `GenerateStream` per request (TTFT is only visible on a stream) or, with backend "openai",
one streaming OpenAI-compatible HTTP request (openai_backend.py), and the records
(`metrics.RequestRecord`). A failed request is recorded with its gRPC status code, never raised.
Multi-turn requests (those naming a conversation) go out conversation by conversation: the schedule
gives each conversation's first turn its send time, and each later turn is sent as soon as the
previous turn's answer has arrived, its prompt that turn's prompt + the answer's token ids + its own
new tokens; after a failed turn the rest of its conversation is recorded as NOT_SENT. GetStats is
asked right after the warm-ups and after the last request, for the server's prefix-cache counters
over the measured requests (server-wide: other clients' traffic counts too).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tandem.v1 import api_pb2

from client import AsyncTandemClient, TandemError
from client.bench.arrivals import offsets
from client.bench.metrics import RequestRecord, prefix_cache_delta
from client.bench.openai_backend import OpenAIBackend
from client.bench.workloads import BenchRequest, conversation_prompt


@dataclass(frozen=True)
class LoadSpec:
    """How requests are sent (not what): rate, burstiness, cap, sampling."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ramp: tuple[float, float] | None = None
    seed: int = 0
    ignore_eos: bool = False
    temperature: float | None = None  # None: the model's default
    timeout: float | None = None  # per request, seconds


async def wait_ready(client: AsyncTandemClient | OpenAIBackend, timeout: float) -> None:
    """Polls health until SERVING; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await client.health(timeout=2.0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"server at {client.address} not SERVING after {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def server_stats(client: AsyncTandemClient | OpenAIBackend) -> api_pb2.ServerStats | None:
    """The server's GetStats, or None where it cannot be had (an old server, no permission) or means
    nothing (a client balancing over replicas: each call reaches one of them)."""
    if isinstance(client, AsyncTandemClient) and client.target.balanced:
        return None
    try:
        return await client.server_stats(timeout=10.0)
    except TandemError:
        return None


async def _one(client: AsyncTandemClient | OpenAIBackend, req: BenchRequest, spec: LoadSpec, rec: RequestRecord,
               gate: asyncio.Semaphore | None, on_done: Callable[[RequestRecord], None] | None,
               token_ids: list[int] | None = None) -> None:
    """Sends `req` (or, given, `token_ids` as its prompt) and fills `rec`."""
    prompt = req.prompt if token_ids is None else {"token_ids": token_ids}
    async with gate if gate is not None else _NoGate():
        rec.start = time.perf_counter()
        if isinstance(client, OpenAIBackend):
            await client.stream(prompt, req.max_new_tokens, spec.temperature, spec.seed + req.index, spec.ignore_eos,
                                spec.timeout, rec)
            rec.end = time.perf_counter()
            if on_done is not None:
                on_done(rec)
            return
        try:
            stream = client.generate_stream(**prompt, max_new_tokens=req.max_new_tokens,
                                            ignore_eos=spec.ignore_eos, temperature=spec.temperature,
                                            seed=spec.seed + req.index, timeout=spec.timeout)
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.token_ids:
                    rec.chunk_times.append(now)
                    rec.chunk_tokens.append(len(chunk.token_ids))
                    rec.output_token_ids.extend(chunk.token_ids)
                if chunk.request_id:
                    rec.request_id = chunk.request_id
                if chunk.completion is not None:
                    rec.output_tokens = chunk.completion.usage.completion_tokens
                    rec.prompt_tokens = chunk.completion.usage.prompt_tokens or rec.prompt_tokens
                    rec.cached_tokens = chunk.completion.usage.cached_tokens
                    rec.finish_reason = chunk.completion.finish_reason
        except TandemError as e:
            rec.error_code, rec.error = e.code.name, e.message
        except Exception as e:  # a harness bug or a broken channel: still one failed request, not a crash
            rec.error_code, rec.error = "CLIENT_ERROR", f"{type(e).__name__}: {e}"
        rec.end = time.perf_counter()
    if on_done is not None:
        on_done(rec)


async def _conversation(client: AsyncTandemClient | OpenAIBackend, turns: list[BenchRequest],
                        records: list[RequestRecord], spec: LoadSpec, gate: asyncio.Semaphore | None,
                        on_done: Callable[[RequestRecord], None] | None) -> None:
    """One conversation's turns in order, each sent once the answer before it has arrived."""
    history: list[int] = []
    for k, (req, rec) in enumerate(zip(turns, records, strict=True)):
        prompt = conversation_prompt(history, req)
        rec.prompt_token_ids, rec.prompt_tokens = prompt, len(prompt)
        await _one(client, req, spec, rec, gate, on_done, prompt)
        if not rec.ok:
            for later in records[k + 1:]:
                later.error_code = "NOT_SENT"
                later.error = f"turn {rec.turn} of conversation {rec.conversation} failed ({rec.error_code})"
                later.start = later.end = rec.end
                if on_done is not None:
                    on_done(later)
            return
        history = prompt + rec.output_token_ids  # the answer as the server gave it, token ids


def _units(requests: list[BenchRequest]) -> list[list[int]]:
    """Positions in `requests` of what the schedule sends: a request alone, or a whole conversation
    (its turns in turn order), in order of first appearance."""
    units: list[list[int]] = []
    by_conversation: dict[int, list[int]] = {}
    for i, req in enumerate(requests):
        if req.conversation is None:
            units.append([i])
        elif req.conversation in by_conversation:
            by_conversation[req.conversation].append(i)
        else:
            by_conversation[req.conversation] = [i]
            units.append(by_conversation[req.conversation])
    for unit in units:
        unit.sort(key=lambda i: requests[i].turn or 0)
    return units


@dataclass
class LoadResult:
    records: list[RequestRecord]  # in request order
    duration: float  # seconds, first send to the last request's end
    prefix_cache: dict[str, Any]  # metrics.prefix_cache_delta over the measured requests


def open_client(address: str, backend: str, connection: dict | None = None,
                model: str | None = None) -> AsyncTandemClient | OpenAIBackend:
    """The client of one backend: gRPC (`address` host:port) or OpenAI-compatible HTTP (a base URL)."""
    conn = connection or {}
    if backend == "openai":
        return OpenAIBackend(address, conn.get("api_key"), conn.get("tls_ca"), model)
    return AsyncTandemClient(address, **conn)


class _NoGate:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def run_load(address: str, requests: list[BenchRequest], spec: LoadSpec, *,
                   warmup: list[BenchRequest] | None = None, ready_timeout: float = 600.0,
                   progress: bool = False, connection: dict | None = None, backend: str = "grpc",
                   model: str | None = None) -> LoadResult:
    """Sends `warmup` (all at once, awaited, not recorded), then `requests` on `spec`'s schedule (a
    conversation's turns one after another); returns the records, the duration and the server's
    prefix-cache counters over the measured requests.

    The duration runs from the first send to the last request's end, as vLLM measures it. `backend`
    "openai": `address` is an OpenAI-compatible base URL (…/v1) and `model` the model to ask for.
    """
    async with open_client(address, backend, connection, model) as client:
        if isinstance(client, OpenAIBackend):
            await client.model_info()  # the model to ask for, when none was named
        await wait_ready(client, ready_timeout)
        if warmup:
            await asyncio.gather(*(_one(client, r, spec, RequestRecord(r.index, r.prompt_tokens, r.max_new_tokens),
                                        None, None) for r in warmup))
        records = [RequestRecord(r.index, r.prompt_tokens, r.max_new_tokens, conversation=r.conversation, turn=r.turn)
                   for r in requests]
        bar = _Progress(len(requests)) if progress else None
        gate = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
        units = _units(requests)
        times = offsets(len(units), spec.request_rate, spec.burstiness, spec.seed, spec.ramp)
        before = await server_stats(client)
        t0 = time.perf_counter()
        tasks = []
        on_done = bar.update if bar else None
        for unit, at in zip(units, times, strict=True):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if requests[unit[0]].conversation is None:
                job = _one(client, requests[unit[0]], spec, records[unit[0]], gate, on_done)
            else:
                job = _conversation(client, [requests[i] for i in unit], [records[i] for i in unit], spec, gate,
                                    on_done)
            tasks.append(asyncio.create_task(job))
        await asyncio.gather(*tasks)
        after = await server_stats(client)
        if bar:
            bar.close()
        start = min((r.start for r in records), default=t0)
        end = max((r.end for r in records), default=t0)
        return LoadResult(records, end - start, prefix_cache_delta(before, after))


class _Progress:
    """A one-line progress bar on stderr (done / total, failures, elapsed)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, rec: RequestRecord) -> None:
        self.done += 1
        self.failed += not rec.ok
        if self.tty or self.done == self.total:
            width = 30
            filled = width * self.done // max(1, self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                             f"failed {self.failed}  {time.perf_counter() - self.t0:.1f} s")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()
