"""Acceptance: the process model. `tandem serve` supervises both processes; with --worker-reconnect-timeout 0
a dead worker fails what it held with UNAVAILABLE (by default it is held: tests/test_recovery.py), and
serving resumes when a worker connects again, without restarting the scheduler.
The scheduler starts its core process (scheduler, engine link) and lives and dies with it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2

from client import AsyncTandemClient, TandemClient, TandemError
from client.local_server import ROOT, TandemServer, free_port, health_status
from tests.procs import children as _children
from tests.procs import cmdline as _cmdline
from tests.procs import gone as _gone

TANDEM = os.path.join(os.path.dirname(sys.executable), "tandem")
SERVING = health_pb2.HealthCheckResponse.SERVING


class _Output:
    """Collects a child's output lines on a thread, so a test can wait for one without blocking."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(stream), daemon=True)
        self._thread.start()

    def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.lines)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@contextlib.contextmanager
def _serve() -> Iterator[tuple[subprocess.Popen, str]]:
    """A SERVING `tandem serve` (tiny model); its whole process group is killed afterwards if left."""
    proc, address = _start_serve()
    try:
        yield proc, address
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _child(kids: list[int], module: str) -> int:
    return next(k for k in kids if module in _cmdline(k))


def _start_serve(own_link: bool = True) -> tuple[subprocess.Popen, str]:
    """`own_link`: a link address of the test's; else the one `tandem serve` picks itself."""
    address = f"127.0.0.1:{free_port()}"
    link = ["--engine-address", f"ipc://{tempfile.mkdtemp(prefix='tandem-serve-')}/engine.sock"] if own_link else []
    proc = subprocess.Popen(
        [TANDEM, "serve", "--model", "random:tiny-llama", "--address", address, *link],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while health_status(address) != SERVING:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "tandem serve never became SERVING"
        time.sleep(0.2)
    return proc, address


def test_tandem_serve_runs_and_stops_cleanly():
    with _serve() as (proc, address):
        output = _Output(proc.stdout)
        # It tells the user how to call it, once it is serving (its own health poll, a moment later).
        assert output.wait_for("tandem generate", 15), "".join(output.lines)
        kids = _children(proc.pid)
        assert len(kids) == 2 and {"scheduler_svc" in _cmdline(k) for k in kids} == {True, False}
        core = _child(_children(_child(kids, "scheduler_svc")), "scheduler_svc.core")
        with TandemClient(address) as c:
            r = c.generate(token_ids=[5, 6, 7], max_new_tokens=4, temperature=0)
        assert len(r.token_ids) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert all(_gone(k) for k in [*kids, core])
        # The scheduler stops first and tells its worker (BYE): an orderly exit, not an error.
        assert output.wait_for("the scheduler is shutting down", 5), "".join(output.lines)
        assert not [line for line in output.lines if "scheduler lost" in line]


def test_tandem_serve_exits_nonzero_when_the_scheduler_dies():
    with _serve() as (proc, _):
        kids = _children(proc.pid)
        os.kill(_child(kids, "scheduler_svc"), signal.SIGKILL)
        assert proc.wait(30) != 0
        assert all(_gone(k) for k in kids)


def test_tandem_serve_restarts_a_dead_worker_and_keeps_its_scheduler():
    with _serve() as (proc, address):
        kids = _children(proc.pid)
        scheduler, worker = _child(kids, "scheduler_svc"), _child(kids, "worker_svc")
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while health_status(address) == SERVING:  # the scheduler notices, first
            assert time.monotonic() < deadline
            time.sleep(0.05)
        deadline = time.monotonic() + 120
        while health_status(address) != SERVING:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        kids_after = _children(proc.pid)
        assert scheduler in kids_after and worker not in kids_after and len(kids_after) == 2
        with TandemClient(address) as c:
            assert len(c.generate(token_ids=[5, 6, 7], max_new_tokens=4, temperature=0).token_ids) == 4
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def _wait_health(address: str, serving: bool, within: float) -> None:
    deadline = time.monotonic() + within
    while (health_status(address) == SERVING) != serving:
        assert time.monotonic() < deadline, f"{address}: health never became {'SERVING' if serving else 'NOT_SERVING'}"
        time.sleep(0.05)


def test_two_tandem_serve_on_one_host_never_cross_wire():
    """Each `tandem serve` links its processes over a private address of its own: when either one's
    worker is killed and restarted, it reconnects to its own scheduler, and both serve again."""
    a, b = _start_serve(own_link=False), _start_serve(own_link=False)
    try:
        links = {_cmdline(_child(_children(p.pid), "worker_svc")).split("--engine-address ")[1].split()[0]
                 for p, _ in (a, b)}
        assert len(links) == 2, f"both instances on one link address: {links}"
        for proc, address in (a, b):
            os.kill(_child(_children(proc.pid), "worker_svc"), signal.SIGKILL)
            _wait_health(address, False, within=5)
            for _, addr in (a, b):  # the restarted worker serves its own scheduler; the other is untouched
                _wait_health(addr, True, within=120)
                with TandemClient(addr) as c:
                    assert len(c.generate(token_ids=[5, 6, 7], max_new_tokens=3, temperature=0).token_ids) == 3
        for proc, _ in (a, b):
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        assert not any(os.path.exists(link[len("ipc://"):]) for link in links), "a private link left behind"
    finally:
        for proc, _ in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def test_a_second_scheduler_on_a_live_link_address_is_refused():
    with TandemServer(worker_args=["--max-num-tokens", "128"]) as server:
        second = subprocess.run(
            [sys.executable, "-m", "scheduler_svc", "--address", f"127.0.0.1:{free_port()}",
             "--engine-address", server.engine_address],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )
        assert second.returncode == 2 and "in use by another live scheduler" in second.stderr, second.stderr
        assert health_status(server.address) == SERVING
        with TandemClient(server.address) as c:
            assert len(c.generate(token_ids=[5, 6, 7], max_new_tokens=3, temperature=0).token_ids) == 3


def test_a_second_worker_on_a_live_scheduler_is_refused():
    """Two workers pointed at one scheduler: the newcomer is told why and exits 4; the scheduler keeps
    its live worker's session (it used to drop it for the newcomer), and serves on."""
    with TandemServer(worker_args=["--max-num-tokens", "128"]) as server:
        first = server.worker
        second = subprocess.Popen(
            [sys.executable, "-m", "worker_svc", "--model", server.model, "--engine-address", server.engine_address,
             "--max-num-tokens", "128"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert second.wait(120) == 4
        finally:
            if second.poll() is None:
                second.kill()
        out = second.stdout.read()
        assert "the scheduler refused this worker" in out and "already serves worker" in out, out[-2000:]
        assert "refusing worker" in server.log_text("scheduler")
        assert first.poll() is None and health_status(server.address) == SERVING
        with TandemClient(server.address) as c:
            assert len(c.generate(token_ids=[5, 6, 7], max_new_tokens=3, temperature=0).token_ids) == 3


def test_dead_worker_fails_inflight_then_serving_resumes():
    # --worker-reconnect-timeout 0: requests fail with their worker (tests/test_recovery.py: they wait).
    # --debug-check-state: the new worker starts with empty row slots, and every plan the scheduler's
    # new session sends is checked against what the worker then holds.
    with TandemServer(worker_args=["--max-num-tokens", "128"],
                      scheduler_args=["--debug-check-state", "--worker-reconnect-timeout", "0"]) as server:
        with TandemClient(server.address) as c:
            first = c.generate(token_ids=[1, 2, 3], max_new_tokens=5, temperature=0).token_ids

        async def run():
            async with AsyncTandemClient(server.address) as c:
                stream = c.generate_stream(token_ids=[8] * 20, max_new_tokens=1500, ignore_eos=True)
                waiting = asyncio.ensure_future(c.generate(token_ids=[9] * 20, max_new_tokens=1500, ignore_eos=True))
                async for _chunk in stream:
                    break
                server.worker.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                with pytest.raises(TandemError) as err:
                    async for _chunk in stream:
                        pass
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
                with pytest.raises(TandemError) as err2:
                    await waiting
                assert err2.value.code == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - killed < 2.0
                assert not await c.health()
                with pytest.raises(TandemError) as err3:
                    await c.generate(token_ids=[1, 2], max_new_tokens=2)
                assert err3.value.code == grpc.StatusCode.UNAVAILABLE

        asyncio.run(run())
        server.worker.wait(10)
        server.start_worker_process()  # same scheduler process, a new worker
        server.wait_serving(120)
        with TandemClient(server.address) as c:
            r = c.generate(token_ids=[1, 2, 3], max_new_tokens=5, temperature=0)
        assert r.token_ids == first and len(first) == 5  # the same weights (seeded), the same tokens
        st = server.wait_idle()
        assert st.kv_blocks_free == st.kv_blocks_total


def test_dead_core_fails_what_it_held_and_ends_the_scheduler():
    with TandemServer(worker_args=["--max-num-tokens", "128"]) as server:
        core = _child(_children(server.scheduler.pid), "scheduler_svc.core")

        async def run():
            async with AsyncTandemClient(server.address) as c:
                stream = c.generate_stream(token_ids=[8] * 20, max_new_tokens=1500, ignore_eos=True)
                async for _chunk in stream:
                    break  # tokens are flowing through the core
                os.kill(core, signal.SIGKILL)
                killed = time.monotonic()
                with pytest.raises(TandemError) as err:
                    async for _chunk in stream:
                        pass
                assert err.value.code == grpc.StatusCode.UNAVAILABLE and "core" in err.value.message
                assert time.monotonic() - killed < 2.0

        asyncio.run(run())
        assert server.scheduler.wait(15) == 1  # a supervisor (tandem serve, compose) restarts it
        assert server.worker.wait(15) != 0  # the engine link it served went with the core


def test_dead_scheduler_takes_its_core_along():
    with TandemServer() as server:
        core = _child(_children(server.scheduler.pid), "scheduler_svc.core")
        server.scheduler.send_signal(signal.SIGKILL)
        server.scheduler.wait(5)
        deadline = time.monotonic() + 3  # the core checks on its parent twice a second
        while not _gone(core):
            assert time.monotonic() < deadline, "the core outlived its scheduler"
            time.sleep(0.05)
