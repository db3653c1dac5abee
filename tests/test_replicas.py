"""Data-parallel replicas behind the client's gRPC load balancing (client/targets.py): two real Tandem
servers (scheduler + worker each, the tiny model), the sync and async clients, the CLI and the bench
given both addresses. What is asserted comes from each server's own counters (GetStats).

What grpc does, and these tests check: the policy is round_robin (every new RPC goes to the next
READY replica); with client-side health checking a replica is READY only while its
grpc.health.v1 Watch says SERVING, so a replica whose worker died (NOT_SERVING), or whose scheduler
is gone (connection refused), gets no new RPCs. An RPC already running on a replica when it dies is
not moved: grpc retries transparently only calls that never reached a server, so such a call ends
with the server's status (UNAVAILABLE here) and the caller retries it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest

from client import AsyncTandemClient, TandemClient, TandemError
from client.cli import main as cli_main
from client.local_server import TandemServer
from client.targets import parse_target, replica_targets
from tests.conftest import TINY_WORKER_ARGS

GEN = {"token_ids": [5, 6, 7, 8], "max_new_tokens": 3, "ignore_eos": True, "temperature": 0.0}


def _start_all(servers: list[TandemServer]) -> None:
    errors: list[BaseException] = []

    def start(s: TandemServer) -> None:
        try:
            s.start()
        except BaseException as e:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for s in servers:
            s.stop()
        raise errors[0]


@pytest.fixture(scope="module")
def replicas():
    # --worker-reconnect-timeout 0: a replica whose worker dies fails its requests at once and says
    # NOT_SERVING until a worker connects again.
    # One pair for the module (starting two takes ~20 s on 2 busy cores); the tests run in file order and
    # each leaves both serving, but the last, which kills one.
    pair = [TandemServer(scheduler_args=["--worker-reconnect-timeout", "0"], worker_args=list(TINY_WORKER_ARGS))
            for _ in range(2)]
    _start_all(pair)
    yield pair
    for s in pair:
        s.stop()


def _finished(servers: list[TandemServer]) -> list[int]:
    return [s.stats().requests_finished for s in servers]


def _wait_status(address: str, want: str, timeout: float = 30.0) -> None:
    with TandemClient(address) as c:
        deadline = time.monotonic() + timeout
        while (status := _status(c)) != want:
            assert time.monotonic() < deadline, f"{address} still {status}, not {want}"
            time.sleep(0.1)


def _status(c: TandemClient) -> str:
    try:
        return c.health_status(timeout=2)
    except TandemError:
        return "UNREACHABLE"


def test_targets_are_grpc_multi_address_or_passed_through():
    one = parse_target("localhost:50051")
    assert (one.target, one.balanced) == ("localhost:50051", False)
    two = parse_target("127.0.0.1:5001, 127.0.0.1:5002")
    assert (two.target, two.balanced, two.replicas) == ("ipv4:127.0.0.1:5001,127.0.0.1:5002", True,
                                                        ("127.0.0.1:5001", "127.0.0.1:5002"))
    assert parse_target(["127.0.0.1:5001", "[::1]:5002"]).target == "ipv6:[::ffff:127.0.0.1]:5001,[::1]:5002"
    # A hostname in a list is resolved once, here; its name is what TLS checks.
    named = parse_target("localhost:5001,localhost:5002")
    assert named.balanced and named.tls_name == "localhost" and "127.0.0.1:5001" in named.target
    dns = parse_target("dns:///localhost:5001")
    assert (dns.target, dns.balanced) == ("dns:///localhost:5001", True)
    assert any(r.target == "127.0.0.1:5001" and r.tls_name == "localhost" for r in replica_targets(dns))
    for bad in ("localhost,127.0.0.1:1", "127.0.0.1:5001,dns:///x:1", "::1:5001,127.0.0.1:1", ""):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_health_watch_streams_the_status(replicas):
    """Client-side health checking is grpc.health.v1.Health/Watch, a stream the channel keeps open."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(replicas[0].address) as ch:
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_round_robin_spreads_requests_over_both_replicas(replicas):
    before = _finished(replicas)
    with TandemClient([s.address for s in replicas], timeout=60) as c:
        assert c.target.balanced
        for _ in range(20):
            assert c.generate(**GEN).usage.completion_tokens == 3
    got = [a - b for a, b in zip(_finished(replicas), before, strict=True)]
    assert sum(got) == 20 and min(got) > 0, got
    # Sequential RPCs alternate once both are READY: the split is even but for the first few.
    assert min(got) >= 7, got

    async def concurrent() -> None:
        async with AsyncTandemClient(",".join(s.address for s in replicas), timeout=60) as ac:
            # A fresh channel's first burst all goes to whichever replica's health Watch said SERVING
            # first (round_robin picks among READY ones): a few calls in turn let both become READY.
            for _ in range(4):
                await ac.generate(**GEN)
            results = await asyncio.gather(*(ac.generate(**GEN) for _ in range(10)))
            assert all(r.usage.completion_tokens == 3 for r in results)

    mid = _finished(replicas)
    asyncio.run(concurrent())
    got = [a - b for a, b in zip(_finished(replicas), mid, strict=True)]
    assert sum(got) == 14 and min(got) > 1, got


def test_cli_and_bench_take_several_addresses(replicas, capsys):
    a, b = replicas
    assert cli_main(["health", "--address", a.address, "--address", b.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == sorted([f"{a.address} SERVING", f"{b.address} SERVING"])
    before = _finished(replicas)
    for _ in range(4):
        assert cli_main(["generate", "--token-ids", "5,6,7", "--max-new-tokens", "2", "--ignore-eos", "--json",
                         "--address", f"{a.address},{b.address}"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 4 and all(r["usage"]["completion_tokens"] == 2 for r in out)
    got = [x - y for x, y in zip(_finished(replicas), before, strict=True)]
    assert sum(got) == 4

    before = _finished(replicas)
    run = subprocess.run([sys.executable, "-m", "client.cli", "bench", "--address", a.address, "--address", b.address,
                          "--disable-tqdm", "--num-prompts", "12", "--num-warmups", "0", "--random-input-len", "8",
                          "--random-output-len", "4", "--ignore-eos", "--max-concurrency", "4"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = [x - y for x, y in zip(_finished(replicas), before, strict=True)]
    assert sum(got) == 12 and min(got) > 0, got



def test_a_dead_replica_is_skipped_and_the_other_serves(replicas, capsys):
    a, b = replicas
    addresses = [a.address, b.address]
    with TandemClient(addresses, timeout=60) as c, TandemClient(addresses, timeout=60, health_check=False) as blind:
        for _ in range(4):  # both replicas READY in both channels
            c.generate(**GEN)
            blind.generate(**GEN)
        # Two long streams: round robin puts one on each replica.
        streams = [c.generate_stream(token_ids=[5, 6, 7], max_new_tokens=150, ignore_eos=True, temperature=0.0)
                   for _ in range(2)]
        for s in streams:
            next(s)
        assert [s.stats().num_running for s in replicas] == [1, 1]

        a.worker.kill()  # replica a: scheduler up, worker gone -> NOT_SERVING
        a.worker.wait()
        _wait_status(a.address, "NOT_SERVING")
        assert cli_main(["health", "--address", f"{a.address},{b.address}"]) == 1
        assert sorted(capsys.readouterr().out.splitlines()) == sorted([f"{a.address} NOT_SERVING",
                                                                      f"{b.address} SERVING"])
        assert cli_main(["health", "--any", "--address", f"{a.address},{b.address}"]) == 0
        capsys.readouterr()
        # The stream on a is not moved to b: it ends UNAVAILABLE; the one on b runs to its end.
        outcomes = []
        for s in streams:
            try:
                n = sum(len(chunk.token_ids) for chunk in s)
                outcomes.append(n + 1)
            except TandemError as e:
                outcomes.append(e.code.name)
        assert sorted(outcomes, key=str) == sorted([150, "UNAVAILABLE"], key=str), outcomes

        before = _finished(replicas)
        time.sleep(0.5)  # the channel's Watch stream on a has reported NOT_SERVING by now
        for _ in range(20):
            c.generate(**GEN)  # none fails
        got = [x - y for x, y in zip(_finished(replicas), before, strict=True)]
        assert got == [0, 20], got
        # Without health checking grpc keeps sending to the reachable replica: those fail.
        failed = 0
        for _ in range(10):
            try:
                blind.generate(**GEN)
            except TandemError as e:
                assert e.code.name == "UNAVAILABLE"
                failed += 1
        assert 0 < failed < 10, failed

        # a's worker back: a serves again and gets requests again.
        a.start_worker_process()
        a.wait_serving(120)
        time.sleep(0.5)
        before = _finished(replicas)
        for _ in range(10):
            c.generate(**GEN)
        got = [x - y for x, y in zip(_finished(replicas), before, strict=True)]
        assert sum(got) == 10 and min(got) > 0, got

        # a's scheduler killed outright: connection refused, a is skipped, every request succeeds on b.
        a.scheduler.kill()
        a.scheduler.wait()
        time.sleep(0.5)
        before_b = b.stats().requests_finished
        for _ in range(20):
            c.generate(**GEN)
        assert b.stats().requests_finished - before_b == 20
