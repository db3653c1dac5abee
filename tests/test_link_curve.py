"""The engine link over tcp:// with CURVE: encrypted, and only workers whose public key the scheduler
holds may connect (a worker with another key, or none, never gets in)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from grpc_health.v1 import health_pb2
from tandem import linkkeys

from client import AsyncTandemClient
from client.local_server import TandemServer, free_port, health_status
from tests.conftest import TINY_WORKER_ARGS


def test_curve_link_serves_known_workers_only(tmp_path: Path):
    keys = linkkeys.create(tmp_path / "keys")
    intruder = linkkeys.create(tmp_path / "intruder")
    clients = tmp_path / "clients"
    clients.mkdir()
    shutil.copy(keys["worker.key"], clients)
    assert oct(keys["worker.key_secret"].stat().st_mode & 0o777) == "0o600"

    server = TandemServer(
        scheduler_args=["--link-curve-secret", str(keys["scheduler.key_secret"]), "--link-curve-clients", str(clients)],
        worker_args=[*TINY_WORKER_ARGS, "--link-curve-secret", str(keys["worker.key_secret"]),
                     "--link-curve-server", str(keys["scheduler.key"])],
    )
    server.engine_address = f"tcp://127.0.0.1:{free_port()}"
    server.start()
    try:
        async def run():
            async with AsyncTandemClient(server.address) as c:
                return await c.generate(token_ids=[5, 6, 7], max_new_tokens=4, ignore_eos=True)

        assert len(asyncio.run(run()).token_ids) == 4
        server.worker.kill()
        server.worker.wait()
        deadline = time.monotonic() + 5  # the scheduler notices the dead worker first
        while health_status(server.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for worker_args in ([*TINY_WORKER_ARGS, "--link-curve-secret", str(intruder["worker.key_secret"]),
                             "--link-curve-server", str(keys["scheduler.key"])],
                            list(TINY_WORKER_ARGS)):  # another key; no CURVE at all
            server.worker_args = worker_args
            server.start_worker_process()
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                assert health_status(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
                time.sleep(0.25)
            server.worker.kill()
            server.worker.wait()
    finally:
        server.stop()
