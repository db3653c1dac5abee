"""Fault handling: a worker that hangs (connected, silent) is treated as dead by the watchdog."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from client import AsyncTandemClient, TandemError
from client.local_server import TandemServer, health_status
from tests.conftest import TINY_WORKER_ARGS


def test_hung_worker_is_treated_as_dead():
    with TandemServer(worker_args=TINY_WORKER_ARGS, scheduler_args=["--step-timeout", "1.5"],
                      env={"TANDEM_FAULTS": "hang_at_step=3"}) as server:
        async def run():
            async with AsyncTandemClient(server.address) as c:
                t0 = time.monotonic()
                with pytest.raises(TandemError) as err:
                    await c.generate(token_ids=[5, 6, 7], max_new_tokens=50, ignore_eos=True)
                return err.value, time.monotonic() - t0

        err, elapsed = asyncio.run(run())
        assert err.code == grpc.StatusCode.UNAVAILABLE and "unresponsive" in err.message
        assert elapsed < 1.5 + 3.0
        assert health_status(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.scheduler.poll() is None, "the scheduler itself keeps running"
