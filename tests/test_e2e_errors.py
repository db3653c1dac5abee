"""Acceptance: bad input gets a precise status, cancels and deadlines free everything, nothing is lost."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest

from client import AsyncTandemClient, TandemError
from client.local_server import TandemServer


async def _expect(coro, code: grpc.StatusCode, field: str | None = None) -> TandemError:
    with pytest.raises(TandemError) as err:
        await coro
    assert err.value.code == code, err.value
    if field is not None:
        fields = [f for f, _ in err.value.field_violations]
        assert field in fields, (field, fields, err.value)
    return err.value


def test_client_cancel_and_deadline_free_kv(tiny):
    """A cancelled stream and a deadline each end a request that is still running (1500 tokens to go,
    seconds of work here), and its KV blocks are back within a second."""
    tiny.wait_idle()

    def back_within(seconds: float) -> float:
        t0 = time.monotonic()
        st = tiny.wait_idle(timeout=seconds)
        assert (st.num_running, st.num_waiting) == (0, 0) and st.kv_blocks_free == st.kv_blocks_total, st
        return time.monotonic() - t0

    async def run():
        async with AsyncTandemClient(tiny.address) as c:
            stream = c.generate_stream(token_ids=[7] * 50, max_new_tokens=1500, ignore_eos=True)
            got = 0
            async for chunk in stream:
                got += len(chunk.token_ids)
                if got >= 3:
                    break
            running = tiny.stats()
            assert running.num_running == 1 and running.kv_blocks_free < running.kv_blocks_total
            await stream.aclose()  # leaving the iterator cancels the RPC
            back_within(1.0)

            deadline = asyncio.ensure_future(
                c.generate(token_ids=[9] * 30, max_new_tokens=1500, ignore_eos=True, timeout=0.5))
            await asyncio.sleep(0.3)
            assert tiny.stats().num_running == 1  # admitted and running when its deadline comes
            await _expect(deadline, grpc.StatusCode.DEADLINE_EXCEEDED)
            back_within(1.0)

    asyncio.run(run())


BAD = [
    ({"prompt": ""}, "text"),
    ({"token_ids": []}, "token_ids.ids"),
    ({"token_ids": [5] * 2048}, "token_ids"),
    ({"token_ids": [1, 2, 49152]}, "token_ids.ids"),
    ({"token_ids": [1, -1]}, "token_ids.ids"),
    ({"token_ids": [1, 2], "max_new_tokens": 2047}, "max_new_tokens"),
    ({"token_ids": [1, 2], "max_new_tokens": 0}, "max_new_tokens"),
    ({"token_ids": [1, 2], "temperature": -0.5}, "temperature"),
    ({"token_ids": [1, 2], "temperature": math.nan}, "temperature"),
    ({"token_ids": [1, 2], "top_p": 0.0}, "top_p"),
    ({"token_ids": [1, 2], "top_p": 1.5}, "top_p"),
    ({"token_ids": [1, 2], "top_k": -1}, "top_k"),
    ({"token_ids": [1, 2], "min_p": 2.0}, "min_p"),
    ({"token_ids": [1, 2], "stop": ["x"] * 17}, "stop"),
    ({"token_ids": [1, 2], "stop": ["y" * 257]}, "stop[0]"),
    ({"token_ids": [1, 2], "stop": [""]}, "stop[0]"),
    ({"token_ids": [1, 2], "stop_token_ids": [60000]}, "stop_token_ids[0]"),
    ({"token_ids": [1, 2], "logprobs": 1000}, "logprobs"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "chat.messages[0].role"),
]


def test_bad_input_is_invalid_argument_and_disturbs_nobody(tiny):
    async def run():
        async with AsyncTandemClient(tiny.address) as c:
            bystander = asyncio.ensure_future(
                c.generate(token_ids=[11] * 20, max_new_tokens=60, temperature=0, ignore_eos=True)
            )
            for kwargs, field in BAD:
                await _expect(c.generate(**kwargs), grpc.StatusCode.INVALID_ARGUMENT, field)
            got = await bystander
            alone = await c.generate(token_ids=[11] * 20, max_new_tokens=60, temperature=0, ignore_eos=True)
            return got, alone

    got, alone = asyncio.run(run())
    assert got.token_ids == alone.token_ids and got.finish_reason == "length"


def test_full_queue_is_resource_exhausted(servers):
    busy = servers.get(worker_args=("--max-num-rows", "1"), scheduler_args=("--max-waiting", "1"))

    async def run():
        async with AsyncTandemClient(busy.address) as c:
            calls = [c.generate(token_ids=[3] * 10, max_new_tokens=40, ignore_eos=True) for _ in range(6)]
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors and all(isinstance(e, TandemError) for e in errors), errors
    assert {e.code for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert all(r.finish_reason == "length" for r in results if not isinstance(r, Exception))
    st = busy.wait_idle()
    assert st.kv_blocks_free == st.kv_blocks_total


def test_no_worker_is_unavailable():
    with TandemServer(start_worker=False) as server:
        async def run():
            async with AsyncTandemClient(server.address) as c:
                await _expect(c.generate(prompt="hello"), grpc.StatusCode.UNAVAILABLE)
                assert not await c.health()

        asyncio.run(run())


def test_a_body_that_is_not_protobuf_is_invalid_argument(tiny):
    """Bytes that do not decode as the method's message: INVALID_ARGUMENT naming the method (grpc's own
    answer would be UNKNOWN), for unary and streaming methods; the server serves on."""
    garbage = b"\xff\xff\xff\xff\x0f not a protobuf"
    with grpc.insecure_channel(tiny.address) as ch:
        for method, call in (("Generate", ch.unary_unary), ("GenerateStream", ch.unary_stream),
                             ("Tokenize", ch.unary_unary)):
            rpc = call(f"/tandem.v1.Tandem/{method}", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as err:
                out = rpc(garbage, timeout=10)
                if method == "GenerateStream":
                    list(out)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.value)
            assert f"/tandem.v1.Tandem/{method} is not a valid protobuf message" in err.value.details()

    async def ok():
        async with AsyncTandemClient(tiny.address) as c:
            return await c.generate(token_ids=[5, 6, 7], max_new_tokens=3, temperature=0)

    assert len(asyncio.run(ok()).token_ids) == 3
