"""The reliability suite, sized for CI: nothing accepted is lost, nothing crashes.

- Soak: Poisson arrivals for a bounded time against a real server, with client cancels, short
  deadlines, invalid requests, and one worker kill and restart in the middle. The ledger: every
  request sent ends exactly once, completed or with an explicit status; no INTERNAL or UNKNOWN;
  none lost to the kill (held and resumed); the server's count of completions equals the ledger's;
  once idle every KV block is back in the pool. The figures go to stdout (docs/reliability.md).
- Fuzzing (hypothesis): random GenerateRequests, most of them invalid in some field, sent raw
  through the gRPC stub: never INTERNAL or UNKNOWN, and the server serves normally afterwards.
- Two concurrent requests with the same client request id never mix their outputs.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tandem.v1 import api_pb2, api_pb2_grpc

from client import AsyncTandemClient, TandemError
from client.local_server import TandemServer, free_port
from tests.conftest import TINY_WORKER_ARGS, metric_value

BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


async def _soak(server: TandemServer, seconds: float, rate: float, seed: int) -> Counter:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    killed = restarted = False

    async def one(c: AsyncTandemClient, kind: str) -> None:
        prompt = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 200))]
        try:
            if kind == "invalid":
                await c.generate(token_ids=prompt, max_new_tokens=rng.choice([0, 10**7]))
            elif kind == "deadline":
                await c.generate(token_ids=prompt, max_new_tokens=300, ignore_eos=True, timeout=0.05)
            elif kind == "cancel":
                task = asyncio.ensure_future(c.generate(token_ids=prompt, max_new_tokens=200, ignore_eos=True))
                await asyncio.sleep(rng.uniform(0.0, 0.3))
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    outcomes[f"{kind}: cancelled by client"] += 1
                    return
            else:
                n = rng.randint(1, 40)
                r = await c.generate(token_ids=prompt, max_new_tokens=n, ignore_eos=True,
                                     temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(1 << 30))
                assert len(r.token_ids) == n
            outcomes[f"{kind}: completed"] += 1
        except TandemError as e:
            assert e.code not in BAD_CODES, f"{kind}: {e.code.name} {e.message}"
            outcomes[f"{kind}: {e.code.name}"] += 1

    async with AsyncTandemClient(server.address) as c:
        tasks = []
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            if not killed and elapsed > seconds * 0.4:
                server.worker.kill()  # SIGKILL, mid-load
                killed = True
            if killed and not restarted and elapsed > seconds * 0.55:
                server.start_worker_process()
                restarted = True
            u = rng.random()
            kind = "cancel" if u < 0.10 else "deadline" if u < 0.15 else "invalid" if u < 0.17 else "ok"
            outcomes[f"sent {kind}"] += 1
            tasks.append(asyncio.ensure_future(one(c, kind)))
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    return outcomes


def test_soak_with_cancels_deadlines_invalid_requests_and_a_worker_kill():
    metrics_port = free_port()
    # Prefill budget 512 (not the tiny 128): every request is served now, those held through the kill
    # included, and the backlog they leave must clear well within the wait on a 2-core machine.
    worker_args = [*TINY_WORKER_ARGS, "--max-num-tokens", "512"]
    with TandemServer(worker_args=worker_args,
                      scheduler_args=["--max-waiting", "1000", "--metrics-port", str(metrics_port)]) as server:
        out = asyncio.run(_soak(server, seconds=20.0, rate=25.0, seed=7))
        server.wait_serving(120)  # the restarted worker was taken back
        st_ = server.wait_idle(60)
        assert st_.kv_blocks_free == st_.kv_blocks_total
        resumed = metric_value(metrics_port, "tandem_requests_resumed_total")
    print("\nsoak ledger:", dict(sorted(out.items())), "resumed after the worker loss:", resumed)
    for kind in ("ok", "cancel", "deadline", "invalid"):
        ended = sum(v for k, v in out.items() if k.startswith(f"{kind}: "))
        assert ended == out[f"sent {kind}"], f"{kind}: a request neither completed nor ended with a status"
    # Nothing is lost to the worker kill: what it held waits (the default --worker-reconnect-timeout,
    # 60 s, outlasts the restart) and resumes on the new worker, as do requests sent meanwhile.
    assert out["ok: completed"] == out["sent ok"], "a request was lost to the worker kill"
    assert not [k for k in out if k.endswith(": UNAVAILABLE")], "a request failed with the worker"
    assert resumed > 0, "the kill came while requests were running: some must have been resumed"
    # The server's own count of completed requests agrees with the client's ledger, but for cancels that
    # crossed the completion (finished on the server, cancelled by the client before the answer came).
    completed = sum(v for k, v in out.items() if k.endswith(": completed"))
    assert completed <= st_.requests_finished <= completed + out["cancel: cancelled by client"]
    # Invalid requests are refused as such (the last worker's limits validate them while none is
    # connected); never accepted.
    assert out["invalid: INVALID_ARGUMENT"] > 0
    assert {k for k in out if k.startswith("invalid: ")} == {"invalid: INVALID_ARGUMENT"}
    assert out["deadline: DEADLINE_EXCEEDED"] > 0 and out["cancel: cancelled by client"] > 0


_int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def generate_requests(draw) -> api_pb2.GenerateRequest:
    req = api_pb2.GenerateRequest()
    form = draw(st.sampled_from(["text", "ids", "chat", "none"]))
    if form == "text":
        req.text = draw(st.text(max_size=200))
    elif form == "ids":
        req.token_ids.ids.extend(draw(st.lists(st.one_of(st.integers(0, 60000), _int32), max_size=300)))
    elif form == "chat":
        for role, content in draw(st.lists(st.tuples(st.sampled_from(["user", "system", "assistant", "", "x"]),
                                                     st.text(max_size=50)), max_size=4)):
            req.chat.messages.add(role=role, content=content)
    if draw(st.booleans()):
        req.max_new_tokens = draw(st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)))
    else:
        req.max_new_tokens = 1  # an unset one would default to 256 new tokens: too slow for thousands
    for name in ("temperature", "top_p", "min_p"):
        if draw(st.booleans()):
            setattr(req, name, draw(_floats))
    if draw(st.booleans()):
        req.top_k = draw(_int32)
    if draw(st.booleans()):
        req.seed = draw(st.integers(0, 2**64 - 1))
    req.stop.extend(draw(st.lists(st.text(max_size=30), max_size=20)))
    req.stop_token_ids.extend(draw(st.lists(_int32, max_size=5)))
    req.ignore_eos = draw(st.booleans())
    if draw(st.booleans()):
        req.logprobs = draw(st.integers(0, 2**32 - 1))
    req.request_id = draw(st.text(max_size=40))
    return req


@pytest.fixture(scope="module")
def fuzz_server():
    with TandemServer(worker_args=TINY_WORKER_ARGS) as server:
        yield server


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=generate_requests(), stream=st.booleans())
def test_fuzzed_requests_never_crash_or_return_internal(fuzz_server, req, stream):
    with grpc.insecure_channel(fuzz_server.address) as ch:
        stub = api_pb2_grpc.TandemStub(ch)
        try:
            if stream:
                for _ in stub.GenerateStream(req, timeout=30):
                    pass
            else:
                stub.Generate(req, timeout=30)
        except grpc.RpcError as e:
            assert e.code() not in BAD_CODES, f"{e.code().name}: {e.details()} for {req}"


def test_server_still_serves_after_fuzzing(fuzz_server):
    async def run():
        async with AsyncTandemClient(fuzz_server.address) as c:
            return await c.generate(token_ids=[5, 6, 7], max_new_tokens=4, ignore_eos=True)

    assert len(asyncio.run(run()).token_ids) == 4
    st_ = fuzz_server.wait_idle()
    assert st_.kv_blocks_free == st_.kv_blocks_total


def test_same_client_request_id_never_mixes_outputs(tiny):
    prompts = [[11, 12, 13, 14], [900, 901, 902]]

    async def run():
        async with AsyncTandemClient(tiny.address) as c:
            solo = [await c.generate(token_ids=p, max_new_tokens=24, ignore_eos=True, temperature=0) for p in prompts]
            together = await asyncio.gather(*(
                c.generate(token_ids=p, max_new_tokens=24, ignore_eos=True, temperature=0, request_id="same-id")
                for p in prompts))
            return solo, together

    solo, together = asyncio.run(run())
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    assert solo[0].token_ids != solo[1].token_ids
    assert all(r.request_id == "same-id" for r in together)
