"""SIGTERM to the scheduler: NOT_SERVING at once, new RPCs UNAVAILABLE, requests in flight finish
within --drain-timeout, what remains after it ends UNAVAILABLE ("shutting down"), exit code 0."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from client import AsyncTandemClient, TandemError
from client.local_server import TandemServer, health_status
from tests.conftest import TINY_WORKER_ARGS


async def _stream_tokens(c: AsyncTandemClient, n: int, started: asyncio.Event) -> tuple[int, str | None]:
    """Tokens received and the error code, if the stream ended with one."""
    got = 0
    try:
        async for chunk in c.generate_stream(token_ids=[7, 8, 9], max_new_tokens=n, ignore_eos=True, temperature=0):
            got += len(chunk.token_ids)
            started.set()
    except TandemError as e:
        return got, f"{e.code.name}: {e.message}"
    return got, None


def _wait_not_serving(address: str, timeout: float) -> float:
    t0 = time.monotonic()
    while health_status(address) == health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() - t0 < timeout, "still SERVING after SIGTERM"
        time.sleep(0.01)
    return time.monotonic() - t0


@pytest.mark.parametrize("drain_s,max_new,finishes", [(30.0, 150, True), (0.5, 1900, False)])
def test_sigterm_drains_then_exits_zero(drain_s: float, max_new: int, finishes: bool):
    server = TandemServer(worker_args=TINY_WORKER_ARGS, scheduler_args=["--drain-timeout", str(drain_s)]).start()
    try:
        async def run():
            async with AsyncTandemClient(server.address) as c:
                started = asyncio.Event()
                streams = [asyncio.create_task(_stream_tokens(c, max_new, started)) for _ in range(4)]
                await started.wait()
                server.scheduler.send_signal(signal.SIGTERM)
                flipped = await asyncio.to_thread(_wait_not_serving, server.address, 2.0)
                with pytest.raises(TandemError) as refused:
                    await c.generate(token_ids=[1, 2], max_new_tokens=2)
                return flipped, refused.value, await asyncio.gather(*streams)

        flipped, refused, results = asyncio.run(run())
        assert flipped < 1.0
        assert refused.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.message
        if finishes:
            assert all(err is None and got == max_new for got, err in results), results
        else:
            assert all(err == "UNAVAILABLE: shutting down" and got < max_new for got, err in results), results
        assert server.scheduler.wait(timeout=20) == 0
    finally:
        server.stop()
