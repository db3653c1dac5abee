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


def failed_generate(address: str) -> tuple[TandemError, float]:
    """One generate that must fail: its error and how long the failure took to arrive."""
    async def run():
        async with AsyncTandemClient(address) as c:
            t0 = time.monotonic()
            with pytest.raises(TandemError) as err:
                await c.generate(token_ids=[5, 6, 7], max_new_tokens=50, ignore_eos=True)
            return err.value, time.monotonic() - t0

    return asyncio.run(run())


def test_hung_worker_is_treated_as_dead():
    with TandemServer(worker_args=TINY_WORKER_ARGS,
                      scheduler_args=["--step-timeout", "1.5", "--worker-reconnect-timeout", "0"],
                      env={"TANDEM_FAULTS": "hang_at_step=3"}) as server:
        err, elapsed = failed_generate(server.address)
        assert err.code == grpc.StatusCode.UNAVAILABLE and "unresponsive" in err.message
        assert elapsed < 1.5 + 3.0
        assert health_status(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.scheduler.poll() is None, "the scheduler itself keeps running"


def test_hung_worker_exits_so_a_supervisor_can_restart_it():
    """The worker's own watchdog: a step that keeps it busy past its --hang-timeout ends the process
    with status 3 (it would otherwise hold the device forever); the scheduler, whose own watchdog is
    far slower here, sees the worker go and fails the request UNAVAILABLE at once."""
    with TandemServer(worker_args=[*TINY_WORKER_ARGS, "--hang-timeout", "1"],
                      scheduler_args=["--step-timeout", "60", "--worker-reconnect-timeout", "0"],
                      env={"TANDEM_FAULTS": "hang_at_step=3"}) as server:
        err, elapsed = failed_generate(server.address)
        assert err.code == grpc.StatusCode.UNAVAILABLE, err
        assert elapsed < 1 + 5.0, "the scheduler's 60-s watchdog must not be what ended it"
        assert server.worker.wait(timeout=10) == 3
        assert "exiting with status 3" in server.log_text("worker")
        assert server.scheduler.poll() is None


def test_non_finite_logits_fail_only_that_request():
    """Row 0 of step 6 reports non-finite logits: that request ends INTERNAL, its batch-mates finish
    with exactly the tokens they get without the fault, and every KV block comes back."""
    prompts = [[5 + i, 6, 7, 8] for i in range(4)]

    async def run(address: str):
        async with AsyncTandemClient(address) as c:
            return await asyncio.gather(*(c.generate(token_ids=p, max_new_tokens=20, ignore_eos=True, temperature=0)
                                          for p in prompts), return_exceptions=True)

    with TandemServer(worker_args=TINY_WORKER_ARGS) as clean:
        expected = asyncio.run(run(clean.address))
    with TandemServer(worker_args=TINY_WORKER_ARGS, env={"TANDEM_FAULTS": "nan_logits_at_step=6,nan_row=0"}) as server:
        got = asyncio.run(run(server.address))
        st = server.wait_idle()
        assert st.kv_blocks_free == st.kv_blocks_total
    failed = [r for r in got if isinstance(r, TandemError)]
    assert len(failed) == 1 and failed[0].code == grpc.StatusCode.INTERNAL and "non-finite logits" in failed[0].message
    for r, e in zip(got, expected, strict=True):
        if not isinstance(r, Exception):
            assert r.token_ids == e.token_ids


def test_garbage_on_the_engine_link_never_takes_the_scheduler_down():
    """Random bytes, unknown kinds, truncated and undecodable headers, a RESULT for no step, a
    HELLO of another protocol and an oversized message arrive on the scheduler's engine socket:
    each is dropped (the oversized one costs its sender the connection), and a real worker is
    served afterwards."""
    import zmq

    from scheduler_svc.core.link import MAX_MESSAGE_BYTES

    server = TandemServer(worker_args=TINY_WORKER_ARGS, start_worker=False).start()
    try:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.engine_address)
        for frames in ([b"\x00\xff" * 10], [b"NOPE", b"header"], [b"RESULT"], [b"RESULT", b"\x0a\xff\xff"],
                       [b"HELLO", b"\x08\x63"], [b"RESULT", b"", b"x" * 7], [b"PLAN", b"\x01"]):
            sock.send_multipart(frames)
        sock.send(b"\x00" * (MAX_MESSAGE_BYTES + 1))
        time.sleep(1.0)
        sock.close()
        ctx.term()
        assert server.scheduler.poll() is None
        assert health_status(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        server.start_worker_process()
        server.wait_serving(120)

        async def run():
            async with AsyncTandemClient(server.address) as c:
                return await c.generate(token_ids=[5, 6, 7], max_new_tokens=3, ignore_eos=True)

        assert len(asyncio.run(run()).token_ids) == 3
    finally:
        server.stop()
