"""Sampling controls through the whole stack (real scheduler and worker processes, tiny random Llama
in float32 on CPU): repetition/presence/frequency penalties and logit bias against transformers'
`generate` with the matching logits processors, at pipeline depth 1 and 2; n samples; min_tokens;
bad values; penalties across a preemption."""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
import pytest
from tandem.samples import derive_seed
from transformers import LogitsProcessorList

from client import AsyncTandemClient, TandemError
from tests.reference import OpenAIPenalties, assert_matches, hf_generate

BLOCK = 16
VOCAB = 49152


def _f32(x: float) -> float:
    """The float32 value the proto carries: the reference gets the very same number."""
    return float(np.float32(x))


def _cases(seed: int, n: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    # A few repeated ids in the prompt: the repetition penalty acts on prompt tokens too.
    return [[rng.randrange(3, 200) for _ in range(rng.randint(8, 40))] for _ in range(n)]


async def _generate_all(address: str, prompts, max_new: int, **kw):
    async with AsyncTandemClient(address) as c:
        return await asyncio.gather(*(c.generate(token_ids=p, max_new_tokens=max_new, ignore_eos=True,
                                                 temperature=0.0, **kw) for p in prompts))


# A bias on three ids makes the random model's greedy choice repeat them (it never repeats a token
# otherwise), so every penalty below has tokens to act on; the bias goes first in both (transformers
# applies sequence_bias before its other processors, penalties.py likewise).
BIAS = {300: 16.0, 301: 16.0, 302: 16.0}
HF_BIAS = {(t,): b for t, b in BIAS.items()}


def _openai(presence: float, frequency: float):
    return lambda p: {"sequence_bias": HF_BIAS, "logits_processor": LogitsProcessorList(
        [OpenAIPenalties(len(p), _f32(presence), _f32(frequency))])}


PENALTIES = [
    ({"logit_bias": BIAS | {7: 9.5, 11: -3.0}},
     lambda p: {"sequence_bias": HF_BIAS | {(7,): 9.5, (11,): -3.0}}),
    ({"logit_bias": BIAS, "repetition_penalty": 1.8},
     lambda p: {"sequence_bias": HF_BIAS, "repetition_penalty": _f32(1.8)}),
    ({"logit_bias": BIAS, "repetition_penalty": 0.7},
     lambda p: {"sequence_bias": HF_BIAS, "repetition_penalty": _f32(0.7)}),
    ({"logit_bias": BIAS, "presence_penalty": 1.5, "frequency_penalty": 0.5}, _openai(1.5, 0.5)),
    ({"logit_bias": BIAS, "frequency_penalty": -0.4}, _openai(0.0, -0.4)),
]
_refs: dict[tuple[int, int], tuple[list[int], object]] = {}


def _reference(model, case: int, prompt: list[int], max_new: int):
    """(reference without the case's penalty, reference with everything), cached across depths."""
    key = (case, hash(tuple(prompt)))
    if key not in _refs:
        base = {} if case == 0 else {"sequence_bias": HF_BIAS}
        _refs[key] = (hf_generate(model, prompt, max_new, **base).tokens,
                      hf_generate(model, prompt, max_new, **PENALTIES[case][1](prompt)))
    return _refs[key]


@pytest.mark.parametrize("depth", [1, 2])
def test_penalties_and_bias_equal_transformers(tiny, tiny_sync, tiny_model, depth):
    """Greedy tokens equal transformers' generate with the matching processors, up to a near-tie of
    the processed scores (a CPU row's float sums depend on its batch shape: tests/reference.py). Every
    case's reference differs from the one without its control, so ignoring it would fail."""
    server = tiny if depth == 2 else tiny_sync
    prompts = _cases(3, 2)
    max_new = 12
    full = total = 0
    for case, (ours, _) in enumerate(PENALTIES):
        got = asyncio.run(_generate_all(server.address, prompts, max_new, **ours))
        changed = False
        for i, (p, r) in enumerate(zip(prompts, got, strict=True)):
            without, ref = _reference(tiny_model, case, p, max_new)
            changed |= ref.tokens != without
            full += assert_matches(r.token_ids, ref, f"{ours} request {i}")
            total += 1
        assert changed, f"{ours}: the reference is the same without it; the case tests nothing"
    assert full >= total - 1, f"only {full}/{total} sequences matched all the way"


def test_min_tokens_masks_eos_and_stop_tokens(tiny):
    async def run():
        async with AsyncTandemClient(tiny.address) as c:
            eos = (await c.model_info()).eos_token_ids[0]
            p = [5, 6, 7, 8]
            early = await c.generate(token_ids=p, max_new_tokens=20, temperature=0.0, logit_bias={eos: 100})
            held = await c.generate(token_ids=p, max_new_tokens=20, temperature=0.0, logit_bias={eos: 100},
                                    min_tokens=5)
            stop_early = await c.generate(token_ids=p, max_new_tokens=20, temperature=0.0, logit_bias={42: 100},
                                          stop_token_ids=[42])
            stop_held = await c.generate(token_ids=p, max_new_tokens=20, temperature=0.0, logit_bias={42: 100},
                                         stop_token_ids=[42], min_tokens=3)
            return eos, early, held, stop_early, stop_held

    eos, early, held, stop_early, stop_held = asyncio.run(run())
    assert early.token_ids == [eos] and early.finish_reason == "eos"
    assert len(held.token_ids) == 6 and held.token_ids[-1] == eos and eos not in held.token_ids[:5]
    assert held.finish_reason == "eos"
    assert stop_early.token_ids == [42] and stop_early.finish_reason == "stop_token"
    assert len(stop_held.token_ids) == 4 and stop_held.token_ids[-1] == 42 and 42 not in stop_held.token_ids[:3]
    assert stop_held.finish_reason == "stop_token"


def test_min_tokens_holds_off_stop_strings(tiny):
    """Through the whole stack: a stop string completed before min_tokens tokens is ordinary text,
    and the first one completed at or after the min_tokens-th token ends the request (vLLM's rule).
    A bias makes every token the same, so every token completes the stop string."""
    async def run():
        async with AsyncTandemClient(tiny.address) as c:
            p, bias = [5, 6, 7, 8], {1000: 100.0}
            probe = await c.generate(token_ids=p, max_new_tokens=3, temperature=0.0, logit_bias=bias,
                                     ignore_eos=True)
            word = probe.text[:len(probe.text) // 3]
            early = await c.generate(token_ids=p, max_new_tokens=20, temperature=0.0, logit_bias=bias,
                                     stop=[word])
            held = await c.generate(token_ids=p, max_new_tokens=20, temperature=0.0, logit_bias=bias,
                                    stop=[word], min_tokens=4)
            streamed = [m async for m in c.generate_stream(token_ids=p, max_new_tokens=20, temperature=0.0,
                                                            logit_bias=bias, stop=[word], min_tokens=4)]
            return probe, word, early, held, streamed

    probe, word, early, held, streamed = asyncio.run(run())
    assert probe.token_ids == [1000] * 3 and word and probe.text == word * 3
    assert early.finish_reason == "stop_string" and early.token_ids == [1000] and early.text == ""
    assert held.finish_reason == "stop_string" and held.token_ids == [1000] * 4
    assert held.text == word * 3  # the three stops before the 4th token are text
    assert "".join(m.text for m in streamed) == word * 3
    assert streamed[-1].completion is not None and streamed[-1].completion.finish_reason == "stop_string"
    st = tiny.wait_idle()
    assert st.kv_blocks_free == st.kv_blocks_total


def test_n_samples_share_one_prefill_and_each_equals_its_derived_seed(tiny):
    prompt = [random.Random(9).randrange(3, VOCAB) for _ in range(40)]
    kw = dict(token_ids=prompt, max_new_tokens=8, ignore_eos=True, temperature=0.9, seed=1234)
    tiny.wait_idle()

    async def run():
        async with AsyncTandemClient(tiny.address) as c:
            before = await c.server_stats()
            group = await c.generate(n=4, cache_salt="n-test", **kw)
            after = await c.server_stats()
            singles = [await c.generate(cache_salt=f"single-{i}", **(kw | {"seed": derive_seed(1234, i)}))
                       for i in range(4)]
            chunks = [ch async for ch in c.generate_stream(n=3, cache_salt="n-stream", **kw)]
            return before, group, after, singles, chunks

    before, group, after, singles, chunks = asyncio.run(run())
    assert [ch.index for ch in group.choices] == [0, 1, 2, 3]
    tokens = [ch.token_ids for ch in group.choices]
    assert len({tuple(t) for t in tokens}) == 4, tokens
    assert tokens == [s.token_ids for s in singles]
    # One prefill: sample 0 computes all 40 prompt tokens; each other sample finds the full blocks
    # short of the last token (2 blocks of 16) and computes the 8 after them.
    cached = (len(prompt) - 1) // BLOCK * BLOCK
    assert [ch.usage.cached_tokens for ch in group.choices] == [0, cached, cached, cached]
    assert after.prefix_cache_queries - before.prefix_cache_queries == 4 * len(prompt)
    assert after.prefix_cache_hits - before.prefix_cache_hits == 3 * cached
    # The stream interleaves the samples, each message with its index; per index, the same tokens.
    by_index: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for ch in chunks:
        by_index[ch.index] += ch.token_ids
    assert [by_index[i] for i in range(3)] == tokens[:3]
    assert sum(ch.completion is not None for ch in chunks) == 3


BAD = [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"), ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -2.01}, "frequency_penalty"), ({"logit_bias": {VOCAB: 1.0}}, f"logit_bias[{VOCAB}]"),
    ({"logit_bias": {3: 100.5}}, "logit_bias[3]"), ({"logit_bias": {i: 1.0 for i in range(301)}}, "logit_bias"),
    ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens"),
]


def test_bad_values_are_invalid_argument_naming_the_field(tiny):
    async def run():
        async with AsyncTandemClient(tiny.address) as c:
            for kw, field in BAD:
                with pytest.raises(TandemError) as err:
                    await c.generate(token_ids=[5, 6], **({"max_new_tokens": 4} | kw))
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (kw, err.value)
                assert field in [f for f, _ in err.value.field_violations], (kw, err.value)

    asyncio.run(run())


def test_penalties_survive_preemption(servers, tiny_model):
    """A small KV pool preempts requests (recomputed from their prompt + outputs): with penalties their
    counts are rebuilt from that history, so the tokens are still transformers' (up to a near-tie)."""
    small = servers.get(worker_args=("--max-num-tokens", "128", "--max-num-rows", "32", "--num-blocks", "24"))
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randint(30, 50))] for _ in range(12)]
    max_new = 24
    before = small.stats().num_preemptions
    got = asyncio.run(_generate_all(small.address, prompts, max_new, repetition_penalty=1.6,
                                    presence_penalty=0.8, frequency_penalty=0.3, logit_bias=BIAS))
    assert small.wait_idle().num_preemptions > before
    full = 0
    for i, (p, r) in enumerate(zip(prompts, got, strict=True)):
        procs = LogitsProcessorList([OpenAIPenalties(len(p), _f32(0.8), _f32(0.3))])
        ref = hf_generate(tiny_model, p, max_new, sequence_bias=HF_BIAS, repetition_penalty=_f32(1.6),
                          logits_processor=procs)
        full += assert_matches(r.token_ids, ref, f"request {i}")
    assert full >= 11, f"only {full}/12 sequences matched all the way"
