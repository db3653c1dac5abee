"""The load-test driver: sends a workload on an arrival schedule through gRPC streams and records
what each request saw.

Owns the asyncio side of `tandem bench`: readiness wait, warm-up requests (sent and awaited before
the clock starts, never counted), the schedule (`arrivals.offsets`) with an optional concurrency
cap, one `GenerateStream` per request (TTFT is only visible on a stream), and the records
(`metrics.RequestRecord`). A failed request is recorded with its gRPC status code, never raised.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from client import AsyncTandemClient, TandemError
from client.bench.arrivals import offsets
from client.bench.metrics import RequestRecord
from client.bench.workloads import BenchRequest


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


async def wait_ready(client: AsyncTandemClient, timeout: float) -> None:
    """Polls health until SERVING; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await client.health(timeout=2.0):
        if time.monotonic() > deadline:
            raise TimeoutError(f"server at {client.address} not SERVING after {timeout:.0f} s")
        await asyncio.sleep(0.5)


async def _one(client: AsyncTandemClient, req: BenchRequest, spec: LoadSpec, rec: RequestRecord,
               gate: asyncio.Semaphore | None, on_done: Callable[[RequestRecord], None] | None) -> None:
    async with gate if gate is not None else _NoGate():
        rec.start = time.perf_counter()
        try:
            stream = client.generate_stream(**req.prompt, max_new_tokens=req.max_new_tokens,
                                            ignore_eos=spec.ignore_eos, temperature=spec.temperature,
                                            seed=spec.seed + req.index, timeout=spec.timeout)
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.token_ids:
                    rec.chunk_times.append(now)
                    rec.chunk_tokens.append(len(chunk.token_ids))
                if chunk.request_id:
                    rec.request_id = chunk.request_id
                if chunk.completion is not None:
                    rec.output_tokens = chunk.completion.usage.completion_tokens
                    rec.prompt_tokens = chunk.completion.usage.prompt_tokens or rec.prompt_tokens
                    rec.finish_reason = chunk.completion.finish_reason
        except TandemError as e:
            rec.error_code, rec.error = e.code.name, e.message
        except Exception as e:  # a harness bug or a broken channel: still one failed request, not a crash
            rec.error_code, rec.error = "CLIENT_ERROR", f"{type(e).__name__}: {e}"
        rec.end = time.perf_counter()
    if on_done is not None:
        on_done(rec)


class _NoGate:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def run_load(address: str, requests: list[BenchRequest], spec: LoadSpec, *,
                   warmup: list[BenchRequest] | None = None, ready_timeout: float = 600.0,
                   progress: bool = False, connection: dict | None = None) -> tuple[list[RequestRecord], float]:
    """Sends `warmup` (all at once, awaited, not recorded), then `requests` on `spec`'s schedule;
    returns (records in request order, duration seconds).

    The duration runs from the first send to the last request's end, as vLLM measures it.
    """
    async with AsyncTandemClient(address, **(connection or {})) as client:
        await wait_ready(client, ready_timeout)
        if warmup:
            await asyncio.gather(*(_one(client, r, spec, RequestRecord(r.index, r.prompt_tokens, r.max_new_tokens),
                                        None, None) for r in warmup))
        records = [RequestRecord(r.index, r.prompt_tokens, r.max_new_tokens) for r in requests]
        bar = _Progress(len(requests)) if progress else None
        gate = asyncio.Semaphore(spec.max_concurrency) if spec.max_concurrency else None
        times = offsets(len(requests), spec.request_rate, spec.burstiness, spec.seed, spec.ramp)
        t0 = time.perf_counter()
        tasks = []
        for req, rec, at in zip(requests, records, times, strict=True):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, req, spec, rec, gate, bar.update if bar else None)))
        await asyncio.gather(*tasks)
        if bar:
            bar.close()
        start = min((r.start for r in records), default=t0)
        end = max((r.end for r in records), default=t0)
        return records, end - start


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
