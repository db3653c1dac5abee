"""Acceptance: run-ahead (depth 2, and the opt-in depth 3) changes nothing a client can see; neither does
batching or KV pressure."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from client import AsyncTandemClient, TandemError
from tests.reference import NEAR_TIE, assert_matches, hf_generate


def _mixed_cases(seed: int, n: int = 16) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 49152) for _ in range(rng.randint(1, 200))], rng.randint(1, 48)) for _ in range(n)]


async def _generate_all(address: str, cases, **kw):
    async with AsyncTandemClient(address) as c:
        return await asyncio.gather(*(
            c.generate(token_ids=p, max_new_tokens=m, ignore_eos=True, **({"seed": 1000 + i} | kw))
            for i, (p, m) in enumerate(cases)
        ))


def _assert_same_or_tie(model, cases, a, b, what: str) -> None:
    """Equal tokens; a greedy divergence only where transformers' own top-2 logits tie, and in no more
    sequences than those whose reference holds a near-tie (measured for _mixed_cases(7): none, the
    smallest top-2 gap is 3.2e-3, so the two depths must agree exactly)."""
    diverged = 0
    for i, ((prompt, _), ra, rb) in enumerate(zip(cases, a, b, strict=True)):
        if ra.token_ids == rb.token_ids:
            continue
        diverged += 1
        k = next(j for j, (x, y) in enumerate(zip(ra.token_ids, rb.token_ids, strict=False)) if x != y)
        ref = hf_generate(model, prompt + ra.token_ids[:k], 1)
        assert ref.gaps[0] < NEAR_TIE, f"{what}: request {i} diverges at token {k} without a near-tie"
    if diverged:
        near_ties = sum(min(hf_generate(model, p, m).gaps) < NEAR_TIE for p, m in cases)
        assert diverged <= near_ties, f"{what}: {diverged} sequences diverge, {near_ties} references hold a near-tie"


def _assert_same_tokens_as_sync(deep, sync, model, what: str) -> None:
    """`deep`'s greedy and seeded tokens equal the synchronous server's on _mixed_cases(7); both give
    every KV block back."""
    cases = _mixed_cases(7)
    for kw in ({"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95}):
        deep_results = asyncio.run(_generate_all(deep.address, cases, **kw))
        sync_results = asyncio.run(_generate_all(sync.address, cases, **kw))
        if kw["temperature"] == 0:
            _assert_same_or_tie(model, cases, deep_results, sync_results, f"greedy, {what}")
        else:
            assert [r.token_ids for r in deep_results] == [r.token_ids for r in sync_results]
    for server in (deep, sync):
        st = server.wait_idle()
        assert st.kv_blocks_free == st.kv_blocks_total


def test_depth1_and_depth2_identical_greedy_and_seeded(tiny, tiny_sync, tiny_model):
    _assert_same_tokens_as_sync(tiny, tiny_sync, tiny_model, "depth 2")


def test_depth3_identical_to_depth1_greedy_and_seeded(tiny_depth3, tiny_sync, tiny_model):
    """Three plans in flight (the third queued at the worker): the same tokens as the synchronous loop."""
    _assert_same_tokens_as_sync(tiny_depth3, tiny_sync, tiny_model, "depth 3")

    async def depth() -> int:
        async with AsyncTandemClient(tiny_depth3.address) as c:
            return (await c.model_info()).pipeline_depth

    assert asyncio.run(depth()) == 3  # the server ran at the depth it was asked for


CHATS = [
    "Say hi.", "What is 2 + 2?", "Name a fruit.", "Write a haiku about snow.", "Answer yes or no: is ice cold?",
    "Tell me a long story about a dragon.", "Spell cat.", "What colour is the sky?",
    "Explain photosynthesis in detail.", "Count from one to ten in words.",
]


@pytest.mark.slow
def test_depth1_and_depth2_identical_with_eos_mid_batch(smol, smol_sync):
    """Real model, real EOS: short answers finish while long ones run on (overrun tokens discarded)."""

    async def run(address, **kw):
        async with AsyncTandemClient(address) as c:
            return await asyncio.gather(*(
                c.generate(messages=[{"role": "user", "content": q}], max_new_tokens=48, **kw) for q in CHATS
            ))

    for kw in ({"temperature": 0.0}, {"temperature": 0.7, "seed": 5}):
        a = asyncio.run(run(smol.address, **kw))
        b = asyncio.run(run(smol_sync.address, **kw))
        assert [r.token_ids for r in a] == [r.token_ids for r in b], kw
        assert [r.text for r in a] == [r.text for r in b]
        reasons = {r.finish_reason for r in a}
        assert "eos" in reasons and "length" in reasons, reasons
        for r in a:
            if r.finish_reason == "eos":
                assert r.token_ids[-1] == 2 and 2 not in r.token_ids[:-1]
    for server in (smol, smol_sync):
        st = server.wait_idle()
        assert st.kv_blocks_free == st.kv_blocks_total


def test_seeded_request_same_alone_and_in_batch(tiny):
    rng = random.Random(11)
    probe = [rng.randrange(3, 49152) for _ in range(40)]
    others = _mixed_cases(12, 15)

    async def run():
        async with AsyncTandemClient(tiny.address) as c:
            alone = await c.generate(token_ids=probe, max_new_tokens=32, temperature=1.0, seed=42, ignore_eos=True)
            batch = await asyncio.gather(
                *(c.generate(token_ids=p, max_new_tokens=m, temperature=0.8, seed=i, ignore_eos=True)
                  for i, (p, m) in enumerate(others[:8])),
                c.generate(token_ids=probe, max_new_tokens=32, temperature=1.0, seed=42, ignore_eos=True),
                *(c.generate(token_ids=p, max_new_tokens=m, temperature=0.8, seed=i, ignore_eos=True)
                  for i, (p, m) in enumerate(others[8:])),
            )
            return alone, batch[8]

    alone, in_batch = asyncio.run(run())
    assert alone.token_ids == in_batch.token_ids
    assert len(set(alone.token_ids)) > 1  # really sampled, not a constant


def test_small_kv_pool_preempts_and_still_matches(servers, tiny_model):
    """Preempted requests are recomputed (their tokens so far prefilled again, in other batches):
    they still give transformers' tokens, up to a near-tie. Two servers are not compared with each
    other token for token: on CPU a row's float result depends on the batch shape around it."""
    small = servers.get(worker_args=("--max-num-tokens", "128", "--max-num-rows", "32", "--num-blocks", "24"))
    rng = random.Random(5)
    cases = [([rng.randrange(3, 49152) for _ in range(rng.randint(20, 60))], rng.randint(8, 40)) for _ in range(32)]
    pressured = asyncio.run(_generate_all(small.address, cases, temperature=0.0))
    refs = [hf_generate(tiny_model, p, m) for p, m in cases]
    full = sum(assert_matches(r.token_ids, ref, f"request {i}")
               for i, (r, ref) in enumerate(zip(pressured, refs, strict=True)))
    # Only a sequence whose reference holds a near-tie may stop matching. Measured: one of these 32 does
    # (request 26, an exact tie; every other reference's smallest top-2 gap is >= 2e-3).
    near_ties = sum(min(ref.gaps) < NEAR_TIE for ref in refs)
    assert full >= len(cases) - near_ties, f"only {full}/{len(cases)} sequences matched all the way"
    st = small.wait_idle()
    assert st.num_preemptions > 0
    assert st.kv_blocks_free == st.kv_blocks_total

    async def never_fits():
        async with AsyncTandemClient(small.address) as c:
            await c.generate(token_ids=[5] * 380, max_new_tokens=20)

    with pytest.raises(TandemError) as err:
        asyncio.run(never_fits())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
