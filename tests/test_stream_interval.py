"""`--stream-interval N`: a stream sends once N tokens accumulated, its first token and its end at once.

Against a real scheduler and worker (the tiny random model on CPU). Greedy and seeded outputs are
pure functions of the prompt, so the interval server's tokens must equal the plain server's exactly;
what changes is only how they are cut into messages.
"""

from __future__ import annotations

import asyncio

import pytest

from client import AsyncTandemClient
from tests.conftest import TINY_WORKER_ARGS

INTERVAL = 4
PROMPT = [5, 17, 29, 41, 53, 65, 77, 89]


@pytest.fixture(scope="module")
def spaced(servers):
    return servers.get(worker_args=tuple(TINY_WORKER_ARGS), scheduler_args=("--stream-interval", str(INTERVAL)))


async def _stream(address: str, **params) -> list:
    async with AsyncTandemClient(address) as c:
        return [chunk async for chunk in c.generate_stream(token_ids=PROMPT, **params)]


def test_messages_carry_interval_tokens_and_the_same_output(spaced, tiny) -> None:
    params = dict(max_new_tokens=21, temperature=0, ignore_eos=True)
    chunks = asyncio.run(_stream(spaced.address, **params))
    plain = asyncio.run(_stream(tiny.address, **params))
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == [t for c in plain for t in c.token_ids] and len(tokens) == 21
    assert "".join(c.text for c in chunks) == "".join(c.text for c in plain)
    # The first token at once (TTFT is not delayed), then at least INTERVAL tokens a message; the
    # last message, with the completion, carries whatever the interval had not filled. "At once": the
    # first token wakes the stream, but the next step's tokens may reach the front end before the
    # stream's handler task runs (the event loop's order: on CPU a step takes a few ms), and then ride
    # along; a first message that waited for the interval would carry INTERVAL tokens.
    assert len(chunks[0].token_ids) < INTERVAL
    assert all(len(c.token_ids) >= INTERVAL for c in chunks[1:-1])
    assert chunks[-1].completion is not None and chunks[-1].completion.usage.completion_tokens == 21
    assert len(chunks) <= 2 + -(-20 // INTERVAL)
    st = spaced.wait_idle()
    assert st.kv_blocks_free == st.kv_blocks_total


def test_n_samples_and_unary_calls_are_whole(spaced, tiny) -> None:
    params = dict(max_new_tokens=9, temperature=0.9, seed=7, n=2, ignore_eos=True)
    chunks = asyncio.run(_stream(spaced.address, **params))
    plain = asyncio.run(_stream(tiny.address, **params))
    for index in (0, 1):
        got = [t for c in chunks if c.index == index for t in c.token_ids]
        want = [t for c in plain if c.index == index for t in c.token_ids]
        assert got == want and len(got) == 9
    assert sum(c.completion is not None for c in chunks) == 2

    async def unary(address: str):
        async with AsyncTandemClient(address) as c:
            return await c.generate(token_ids=PROMPT, max_new_tokens=9, temperature=0, ignore_eos=True)

    assert asyncio.run(unary(spaced.address)).token_ids == asyncio.run(unary(tiny.address)).token_ids


def test_the_interval_must_be_positive() -> None:
    from scheduler_svc.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--stream-interval", "0"])
    assert parse_args(["--stream-interval", "3"]).stream_interval == 3
