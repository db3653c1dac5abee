"""A worker proves which instance it belongs to, and a replacement is deliberate.

The scheduler serves only a worker whose HELLO carries its instance token (`tandem serve` hands one to
both through TANDEM_INSTANCE_TOKEN): another instance's worker is refused for good (exit 2, which
`tandem serve` does not retry) even when no worker is connected. A worker started with --replace takes
the place of the live one, which is told to exit (5, left stopped by `tandem serve`); the requests it
was running resume on the newcomer with the tokens an uninterrupted run gives.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

from grpc_health.v1 import health_pb2

from client import AsyncTandemClient, TandemClient
from client.local_server import ROOT, TandemServer, free_port, health_status
from tests.conftest import TINY_WORKER_ARGS
from tests.procs import children as _children
from tests.procs import cmdline as _cmdline
from tests.procs import gone as _gone

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TOKEN = "a1" * 16
NEW_TOKENS = 1000
# The served worker is slowed (a fault hook) so that its streams outlast the newcomer's start (40 s of
# steps: a CUDA newcomer captures its graphs first); the newcomer, not slowed, then finishes them quickly.
SLOW_STEPS = "step_sleep_ms=40"


def _worker(engine_address: str, token: str | None, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_INSTANCE_TOKEN"}
    if token is not None:
        env["TANDEM_INSTANCE_TOKEN"] = token
    return subprocess.Popen(
        [sys.executable, "-m", "worker_svc", "--model", "random:tiny-llama", "--engine-address", engine_address,
         *TINY_WORKER_ARGS, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_health(address: str, want: int, within: float) -> None:
    deadline = time.monotonic() + within
    while health_status(address) != want:
        assert time.monotonic() < deadline, f"health did not become {want} within {within} s"
        time.sleep(0.05)


def test_a_worker_of_another_instance_is_refused_for_good():
    with TandemServer(worker_args=TINY_WORKER_ARGS, env={"TANDEM_INSTANCE_TOKEN": TOKEN}) as server:
        server.worker.kill()  # no live worker: what refuses the intruders is the token, not the live session
        server.worker.wait()
        _wait_health(server.address, NOT_SERVING, within=5)
        for token in ("b2" * 16, None):  # another instance's token; none at all
            intruder = _worker(server.engine_address, token)
            try:
                assert intruder.wait(120) == 2
            finally:
                if intruder.poll() is None:
                    intruder.kill()
            out = intruder.stdout.read()
            assert "the scheduler refused this worker" in out and "instance token" in out, out[-2000:]
            assert health_status(server.address) == NOT_SERVING
        assert server.log_text("scheduler").count("instance token is not this scheduler's") == 2
        server.start_worker_process()  # its own token (TandemServer's env): served
        server.wait_serving(120)
        with TandemClient(server.address) as c:
            assert len(c.generate(token_ids=[5, 6, 7], max_new_tokens=3, temperature=0).token_ids) == 3


def test_a_deliberate_replacement_takes_over_under_tandem_serve():
    """Under `tandem serve`: a worker started with --replace (and the instance's token) takes over; the
    old worker exits 5 and is left stopped; streams running on it finish on the newcomer unchanged."""
    address = f"127.0.0.1:{free_port()}"
    link = f"ipc://{tempfile.mkdtemp(prefix='tandem-serve-')}/engine.sock"
    env = {**os.environ, "TANDEM_INSTANCE_TOKEN": TOKEN, "TANDEM_FAULTS": SLOW_STEPS}
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads one while the streams run, and it would fill
    serve = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "tandem"), "serve", "--model", "random:tiny-llama",
         "--address", address, "--engine-address", link, *TINY_WORKER_ARGS],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    newcomer = None
    prompts = [[5 + i, 17, 29, 3 + 2 * i] * 4 for i in range(4)]

    async def streams(replace: bool) -> tuple[list[list[int]], list[int]]:
        nonlocal newcomer
        async with AsyncTandemClient(address) as c:
            got: list[list[int]] = [[] for _ in prompts]

            async def one(i: int) -> list[int]:
                async for chunk in c.generate_stream(token_ids=prompts[i], max_new_tokens=NEW_TOKENS,
                                                     ignore_eos=True, temperature=0):
                    got[i] += chunk.token_ids
                return got[i]

            tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
            at_exit: list[int] = []
            if replace:
                while min(len(g) for g in got) < 2:
                    await asyncio.sleep(0.005)
                old = next(k for k in _children(serve.pid) if "worker_svc" in _cmdline(k))
                newcomer = _worker(link, TOKEN, "--replace")  # not slowed: TANDEM_FAULTS is not in its env
                while not _gone(old):  # told to exit once the newcomer's HELLO arrives
                    assert newcomer.poll() is None, newcomer.stdout.read()
                    await asyncio.sleep(0.01)
                at_exit = [len(g) for g in got]
            return await asyncio.gather(*tasks), at_exit

    try:
        _wait_health(address, SERVING, within=120)
        replaced, at_exit = asyncio.run(streams(replace=True))
        assert all(n < NEW_TOKENS for n in at_exit), f"streams finished before the replacement: {at_exit}"
        reference, _ = asyncio.run(streams(replace=False))  # uninterrupted, on the newcomer
        assert replaced == reference, "a stream moved to the replacement differs from its uninterrupted run"
        assert newcomer is not None and newcomer.poll() is None
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0
        log.seek(0)
        out = log.read()
        # The old worker was told why and exited 5; serve left it stopped instead of restarting it.
        assert "replaced by another worker" in out and "exited with code 5: left stopped" in out, out[-3000:]
        assert " replaces worker " in out  # the scheduler says which worker took over from which
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        if newcomer is not None and newcomer.poll() is None:
            newcomer.kill()
