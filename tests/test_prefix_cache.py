"""Prefix caching through the whole stack: a server with the cache (the default) against the same
model with `--no-prefix-caching`, tiny random Llama in float32 on CPU, greedy and seeded. Tokens
must be identical; the cache must actually be used (`usage.cached_tokens`), and the server's own
counters must agree with what the requests report."""

from __future__ import annotations

import asyncio
import random

import pytest

from client import AsyncTandemClient
from tests.conftest import TINY_WORKER_ARGS

BLOCK = 16  # the worker's default block size
SYSTEM = [random.Random(1).randrange(3, 49152) for _ in range(700)]


@pytest.fixture(scope="module")
def uncached(servers):
    return servers.get(worker_args=tuple(TINY_WORKER_ARGS), scheduler_args=("--no-prefix-caching",))


def _params(i: int) -> dict:
    return {"temperature": 0.8, "seed": i} if i % 2 else {"temperature": 0.0}


async def _run(address: str, prompts: list[list[int]], max_new: int = 8, salts: list[str] | None = None,
               first_alone: bool = True):
    async with AsyncTandemClient(address) as c:
        async def one(i: int):
            salt = salts[i] if salts else None
            return await c.generate(token_ids=prompts[i], max_new_tokens=max_new, ignore_eos=True,
                                    cache_salt=salt, **_params(i))

        head = [await one(0)] if first_alone else []
        rest = await asyncio.gather(*(one(i) for i in range(len(head), len(prompts))))
        return head + list(rest)


def test_shared_system_prompt_is_computed_once_and_tokens_do_not_change(tiny, uncached):
    rng = random.Random(2)
    prompts = [SYSTEM + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 40))] for _ in range(32)]
    before = tiny.stats()
    got = asyncio.run(_run(tiny.address, prompts))
    after = tiny.stats()
    want = asyncio.run(_run(uncached.address, prompts))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    # Every request after the first found the whole system prompt but its last partial block.
    assert got[0].usage.cached_tokens in (0, len(SYSTEM) // BLOCK * BLOCK)
    assert all(r.usage.cached_tokens == len(SYSTEM) // BLOCK * BLOCK for r in got[1:])
    assert all(r.usage.cached_tokens == 0 for r in want)
    # The server's own counters agree with the requests' ledger.
    assert after.prefix_cache_hits - before.prefix_cache_hits == sum(r.usage.cached_tokens for r in got)
    assert after.prefix_cache_queries - before.prefix_cache_queries == sum(len(p) for p in prompts)
    assert after.prefix_cached_blocks > 0


def test_multi_turn_conversation_reuses_the_turns_before(tiny, uncached):
    rng = random.Random(3)

    async def converse(address: str):
        history: list[int] = []
        out = []
        async with AsyncTandemClient(address) as c:
            for turn in range(4):
                history = history + [rng.randrange(3, 49152) for _ in range(rng.randint(10, 30))]
                r = await c.generate(token_ids=history, max_new_tokens=12, ignore_eos=True, **_params(turn))
                out.append(r)
                history = history + r.token_ids
        return out

    rng_state = rng.getstate()
    got = asyncio.run(converse(tiny.address))
    rng.setstate(rng_state)
    want = asyncio.run(converse(uncached.address))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for turn in range(1, 4):  # each turn finds at least the full blocks of the previous turn's prompt
        assert got[turn].usage.cached_tokens >= got[turn - 1].usage.prompt_tokens // BLOCK * BLOCK > 0


def test_block_multiple_and_partial_block_prefixes(tiny, uncached):
    rng = random.Random(4)
    exact = [rng.randrange(3, 49152) for _ in range(4 * BLOCK)]
    part = exact[: BLOCK + 5] + [rng.randrange(3, 49152) for _ in range(9)]
    prompts = [exact, exact, part]
    got = asyncio.run(_run(tiny.address, prompts, first_alone=True))
    want = asyncio.run(_run(uncached.address, prompts, first_alone=True))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    # The same prompt again: every full block but the one holding its last token, which is always
    # computed (its logits give the first token). A prefix ending inside a block shares the full ones.
    assert got[1].usage.cached_tokens == 3 * BLOCK
    assert got[2].usage.cached_tokens == BLOCK


def test_cache_salt_isolates_tenants(tiny):
    rng = random.Random(5)
    prompt = [rng.randrange(3, 49152) for _ in range(5 * BLOCK)]

    async def go():
        async with AsyncTandemClient(tiny.address) as c:
            out = []
            for salt in ("tenant-a", "tenant-b", "tenant-a", None):
                out.append(await c.generate(token_ids=prompt, max_new_tokens=4, temperature=0, cache_salt=salt))
            return out

    a, b, a_again, unsalted = asyncio.run(go())
    assert a.usage.cached_tokens == 0 and b.usage.cached_tokens == 0 and unsalted.usage.cached_tokens == 0
    assert a_again.usage.cached_tokens == 4 * BLOCK
    assert a.token_ids == b.token_ids == a_again.token_ids == unsalted.token_ids


def test_request_arriving_while_its_prefix_is_being_computed(tiny, uncached):
    """Depth 2 (the tiny server runs ahead): the second request arrives while the first one's prompt
    chunks (128 tokens a step) are still being sent and computed; it may find the blocks of chunks
    already sent, and its tokens must be the uncached ones."""
    rng = random.Random(6)
    prompts = [SYSTEM[:600] + [rng.randrange(3, 49152) for _ in range(8)] for _ in range(4)]
    got = asyncio.run(_run(tiny.address, prompts, first_alone=False))
    want = asyncio.run(_run(uncached.address, prompts, first_alone=False))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
