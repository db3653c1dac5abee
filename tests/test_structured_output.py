"""Structured output end to end: constraints compiled by the worker's grammar engine (xgrammar),
enforced by its matchers at pipeline depth 1 and 2, through the real scheduler and worker processes.

The models are random-weight (their free output is noise, so only the constraint can make it valid)
and the embedded SmolLM2. Every constrained output that ends on EOS must parse and validate against
its schema (jsonschema), fully match its regex, or be one of its choices; the schemas bound every
number and string, so a constrained output must end within max_new_tokens, and the tests require it.
The in-process test drives the worker's Engine with the real Scheduler (bench/inprocess.py): at depth
2 a constrained step's sampling is issued by the collect of the step before it, and the tokens must
be those of depth 1, where nothing runs ahead; on CUDA its constrained decode steps must replay the
forward-only decode graph and give the tokens of an engine without graphs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re

import grpc
import jsonschema
import pytest
import torch
from tokenizers import Tokenizer

from bench.inprocess import run_requests
from client import AsyncTandemClient, TandemError
from scheduler_svc.core.request import Constraint, Request, SamplingParams
from worker_svc import models
from worker_svc.runner import Engine, EngineConfig
from worker_svc.structured.grammar import GrammarEngine

PERSON = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999},
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["id", "name", "kind", "ok", "tags"],
    "additionalProperties": False,
}
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": -50, "maximum": 50},
                   "y": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["x", "y"],
    "additionalProperties": False,
}
REGEX = r"[a-f]{2,4}-[0-9]{3}"
CHOICES = ["red", "green", "blue", "none of these"]


def _kinds(i: int) -> dict:
    """The i-th request's constraint as client keyword arguments (a quarter of them free)."""
    return [{"json_schema": PERSON}, {"json_schema": POINT}, {"regex": REGEX}, {"choice": CHOICES},
            {"json_object": True}, {}, {}, {}][i % 8]


def check_valid(kw: dict, text: str) -> None:
    if "json_schema" in kw:
        jsonschema.validate(json.loads(text), kw["json_schema"])
    elif "json_object" in kw:
        assert isinstance(json.loads(text), dict), text
    elif "regex" in kw:
        assert re.fullmatch(kw["regex"], text), text
    elif "choice" in kw:
        assert text in kw["choice"], text


async def _run(address: str, prompts: list[list[int]], max_new: int, **common) -> list:
    async with AsyncTandemClient(address) as c:
        return await asyncio.gather(*(c.generate(token_ids=p, max_new_tokens=max_new, **_kinds(i), **common)
                                      for i, p in enumerate(prompts)))


def _prompts(n: int, seed: int, lo: int = 4, hi: int = 24) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 40000) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_200_mixed_requests_valid_and_identical_at_every_depth(tiny, tiny_sync, tiny_depth3) -> None:
    """200 requests, constrained and free in the same batches (temperature 0 and seeded 0.9): every
    constrained one ends on EOS within its budget with a valid output, and depths 2 and 3 give depth
    1's tokens (the sampler's RNG is keyed by (seed, position), so seeded rows must match too; at depth
    3 a constrained row that ends may have two overrun rows in flight, whose masks are all-ones)."""
    prompts = _prompts(200, seed=5)
    # Seeded random rows are a quarter: the CPU sampler's counter-based noise costs more than a forward.
    seeds = [{"temperature": 0.9, "seed": 100 + i} if i % 4 == 1 else {"temperature": 0.0} for i in range(200)]

    async def run(address: str) -> list:
        async with AsyncTandemClient(address) as c:  # free rows need no long budget: they run to it
            return await asyncio.gather(*(c.generate(token_ids=p, max_new_tokens=64 if _kinds(i) else 16,
                                                     **_kinds(i), **seeds[i]) for i, p in enumerate(prompts)))

    deep = asyncio.run(run(tiny.address))
    sync = asyncio.run(run(tiny_sync.address))
    deeper = asyncio.run(run(tiny_depth3.address))
    for i, (a, b, c) in enumerate(zip(deep, sync, deeper, strict=True)):
        assert a.token_ids == b.token_ids, f"request {i} ({_kinds(i)}): depth 2 and depth 1 differ"
        assert c.token_ids == b.token_ids, f"request {i} ({_kinds(i)}): depth 3 and depth 1 differ"
        kw = _kinds(i)
        if kw and (a.finish_reason == "eos" or "json_object" not in kw):
            assert a.finish_reason == "eos", (i, kw, a.text, a.finish_reason)
            check_valid(kw, a.text)
    # json_object bounds nothing (any string, any length): noise may run to its budget there, and such
    # an output is not claimed valid; those that end must be valid JSON objects.
    ended = [r for i, r in enumerate(deep) if "json_object" in _kinds(i) and r.finish_reason == "eos"]
    print(f"json_object: {len(ended)} of 25 ended on EOS")
    assert len(ended) >= 5
    free = [r for i, r in enumerate(deep) if not _kinds(i)]
    assert sum(r.finish_reason == "length" for r in free) >= 0.9 * len(free)  # noise: free rows run on
    tiny.wait_idle(timeout=1.0)  # every KV block back within a second of the last answer
    st = tiny_depth3.wait_idle(timeout=1.0)
    assert st.kv_blocks_free == st.kv_blocks_total


def test_embedded_smollm2_follows_a_schema_and_a_choice(smol) -> None:
    async def run() -> list:
        async with AsyncTandemClient(smol.address) as c:
            return await asyncio.gather(
                c.generate(messages=[{"role": "user", "content": "Describe a pet as JSON."}], max_new_tokens=80,
                           temperature=0.0, json_schema=PERSON),
                c.generate(messages=[{"role": "user", "content": "What colour is the sky?"}], max_new_tokens=10,
                           temperature=0.0, choice=CHOICES),
                c.generate(messages=[{"role": "user", "content": "Give a code."}], max_new_tokens=20,
                           temperature=0.0, regex=REGEX))

    person, colour, code = asyncio.run(run())
    for kw, r in (({"json_schema": PERSON}, person), ({"choice": CHOICES}, colour), ({"regex": REGEX}, code)):
        assert r.finish_reason == "eos", (kw, r.text)
        check_valid(kw, r.text)


def test_preempted_constrained_requests_resume_valid(servers, tiny) -> None:
    """A small KV pool preempts requests mid-output; a resumed constrained slot replays its outputs
    into a fresh matcher. Outputs stay valid, and equal those of the roomy server (greedy float32: the
    same tokens unless a near-tie flips between the two servers' different chunkings, hence 11 of 12)."""
    small = servers.get(worker_args=("--max-num-tokens", "128", "--max-num-rows", "32", "--num-blocks", "24"))
    prompts = _prompts(12, seed=9, lo=30, hi=50)
    before = small.stats().num_preemptions
    got = asyncio.run(_run(small.address, prompts, 64, temperature=0.0))
    assert small.wait_idle().num_preemptions > before
    ref = asyncio.run(_run(tiny.address, prompts, 64, temperature=0.0))
    for i, r in enumerate(got):
        if _kinds(i):
            assert r.finish_reason == "eos", (i, r.text)
            check_valid(_kinds(i), r.text)
    same = sum(a.token_ids == b.token_ids for a, b in zip(got, ref, strict=True))
    assert same >= 11, f"only {same}/12 equal to the unpreempted run"


def test_constraints_with_n_penalties_stops_min_tokens_and_abort(tiny) -> None:
    async def run() -> None:
        async with AsyncTandemClient(tiny.address) as c:
            # n samples: each one valid (and different: sampled at temperature 1 from one seed).
            res = await c.generate(token_ids=[11, 12, 13], max_new_tokens=80, n=3, temperature=1.0, seed=3,
                                   json_schema=PERSON)
            assert len(res.choices) == 3
            for ch in res.choices:
                assert ch.finish_reason == "eos", ch.text
                check_valid({"json_schema": PERSON}, ch.text)
            assert len({ch.text for ch in res.choices}) > 1
            # Penalties and logit bias act on the logits before the mask: a bias on a token the grammar
            # forbids cannot let it through.
            res = await c.generate(token_ids=[21, 22], max_new_tokens=80, temperature=0.0, json_schema=POINT,
                                   repetition_penalty=1.8, frequency_penalty=0.5, logit_bias={300: 50.0})
            assert res.finish_reason == "eos" and 300 not in res.token_ids, res.text
            check_valid({"json_schema": POINT}, res.text)
            # A stop string ends the output inside the grammar: the text before it, finish "stop".
            res = await c.generate(token_ids=[31, 32], max_new_tokens=40, temperature=0.0, regex=REGEX, stop=["-"])
            assert res.finish_reason == "stop_string" and re.fullmatch(r"[a-f]{2,4}", res.text), res.text
            # min_tokens keeps EOS out while the grammar allows more: with EOS biased up, the output ends
            # at the first token the grammar lets it (a control without min_tokens), or right after 12.
            eos = {2: 100.0}  # the borrowed SmolLM2 tokenizer's <|im_end|>
            res = await c.generate(token_ids=[41, 42], max_new_tokens=40, temperature=0.0, regex=r"a{1,200}",
                                   logit_bias=eos)
            assert res.finish_reason == "eos" and len(res.token_ids) == 2, (res.token_ids, res.text)
            res = await c.generate(token_ids=[41, 42], max_new_tokens=40, temperature=0.0, regex=r"a{1,200}",
                                   logit_bias=eos, min_tokens=12)
            assert res.finish_reason == "eos" and len(res.token_ids) == 13, (res.token_ids, res.text)
            assert re.fullmatch(r"a{1,200}", res.text), res.text
            # A budget too small for the schema ends LENGTH, never claimed complete.
            res = await c.generate(token_ids=[51], max_new_tokens=3, temperature=0.0, json_schema=PERSON)
            assert res.finish_reason == "length" and len(res.token_ids) == 3
            # Abort mid-stream: the request ends, its blocks come back.
            stream = c.generate_stream(token_ids=[61, 62], max_new_tokens=2000, temperature=0.0,
                                       regex=r"[ab]{1,3000}")
            async for _chunk in stream:
                break
            stream.cancel()
        stats = tiny.wait_idle(timeout=1.0)
        assert stats.num_running == 0

    asyncio.run(run())


def test_ebnf_and_lark_grammars(tiny) -> None:
    """The same language written in EBNF (xgrammar) and in Lark (llguidance): both outputs in it."""
    ebnf = 'root ::= "(" [a-c]{1,5} ")" ("+" "(" [a-c]{1,5} ")"){0,3}'
    lark = 'start: group ("+" group)~0..3\ngroup: "(" /[a-c]{1,5}/ ")"'
    language = r"\([a-c]{1,5}\)(\+\([a-c]{1,5}\)){0,3}"

    async def run() -> list:
        async with AsyncTandemClient(tiny.address) as c:
            return await asyncio.gather(*(c.generate(token_ids=[7 + i, 8], max_new_tokens=60, temperature=0.0,
                                                     grammar=g, grammar_syntax=syntax)
                                          for i in range(4) for g, syntax in ((ebnf, "ebnf"), (lark, "lark"))))

    for r in asyncio.run(run()):
        assert r.finish_reason == "eos" and re.fullmatch(language, r.text), (r.text, r.finish_reason)


def test_a_bad_constraint_is_refused_with_the_compilers_message(tiny) -> None:
    async def run() -> None:
        async with AsyncTandemClient(tiny.address) as c:
            for _ in range(2):  # the second time from the core's ledger of failures, the same answer
                with pytest.raises(TandemError) as err:
                    await c.generate(token_ids=[1, 2], max_new_tokens=4, json_schema={"type": "strin"})
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
                assert 'Unsupported type "strin"' in str(err.value)
            with pytest.raises(TandemError) as err:
                await c.generate(token_ids=[1, 2], max_new_tokens=4, regex="([a-z")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(TandemError) as err:  # Lark, through llguidance: its message too
                await c.generate(token_ids=[1, 2], max_new_tokens=4, grammar="start: foo", grammar_syntax="lark")
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "foo" in str(err.value), err.value
            # The server goes on serving constrained requests after refusals.
            res = await c.generate(token_ids=[1, 2], max_new_tokens=10, choice=["x", "y"])
            assert res.text in ("x", "y") and res.finish_reason == "eos"

    asyncio.run(run())


# ----- in process: the deferred tail at depth 2 ------------------------------------------------------
def _requests(engine_eos: list[int], n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    kinds = [Constraint("json_schema", json.dumps(PERSON, separators=(",", ":"))), Constraint("regex", REGEX),
             Constraint("choice", json.dumps(CHOICES)), None]
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, 40000) for _ in range(rng.randint(4, 30))]
        out.append(Request(req_id=f"r{i}", prompt_ids=prompt, max_new_tokens=60,
                           sampling=SamplingParams(temperature=0.0, seed=i),
                           eos_token_ids=frozenset(engine_eos), constraint=kinds[i % 4], uid=i + 1))
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _record_constrained_decode_paths(engine: Engine) -> list[set[str]]:
    """Wraps engine.launch: for each decode-only step with constrained rows, the step_counts keys its
    launch moved (how its forward ran; "deferred" left out)."""
    paths: list[set[str]] = []
    launch = engine.launch

    def recording(plan) -> None:
        before = dict(engine.step_counts)
        launch(plan)
        last = engine._last
        if last is not None and last.constrained is not None and plan.num_tokens == plan.num_rows:
            paths.append({k for k, v in engine.step_counts.items() if v != before[k]} - {"deferred"})

    engine.launch = recording  # type: ignore[method-assign]
    return paths


@pytest.mark.parametrize("device", DEVICES)
def test_in_process_depth_two_defers_the_mask_and_matches_depth_one(device: str) -> None:
    """On CUDA the deferred tail overlaps the next forward, and every constrained decode step replays
    the forward-only decode graph (its tail samples from the graph's logits) and gives the eager
    engine's tokens; on CPU the same code runs synchronously. float32 on both: bf16 near-ties could
    flip between the depths' different batch compositions."""
    loaded = models.load("random:tiny-llama", device, torch.float32, seed=0)
    grammar = GrammarEngine(loaded.tokenizer_json, loaded.vocab_size, loaded.eos_token_ids)
    for c in {r.constraint for r in _requests(loaded.eos_token_ids, 4, 0)} - {None}:
        grammar.compile_now(c.kind, c.spec)
        grammar.submit(c.key, c.kind, c.spec)
        assert grammar.get(c.key) is not None
    tok = Tokenizer.from_str(loaded.tokenizer_json.decode())
    cfg = EngineConfig(block_size=16, num_blocks=256, max_num_tokens=128, max_num_rows=16)
    engine = Engine(loaded, cfg, device, grammar=grammar)
    if device == "cuda":  # captured because the engine has a grammar engine: per I/O slot and row bucket
        assert engine.graphs is not None and len(engine.graphs.forward_only) == 2 * len(engine.graphs.buckets)
    paths = _record_constrained_decode_paths(engine)
    outs = {}
    for depth in (1, 2):
        paths.clear()
        reqs = _requests(loaded.eos_token_ids, 16, seed=2)
        stats = run_requests(engine, reqs, depth)
        outs[depth] = stats.outputs
        for r, kw in zip(reqs, [{"json_schema": PERSON}, {"regex": REGEX}, {"choice": CHOICES}, {}] * 4, strict=True):
            if r.constraint is not None:
                assert r.output_ids[-1] in loaded.eos_token_ids, (r.req_id, r.output_ids)
                check_valid(kw, tok.decode(r.output_ids[:-1], skip_special_tokens=False))
        if depth == 2:  # depth 2 ran ahead: constrained tails waited for the previous step's collect
            assert engine.step_counts["deferred"] > 0
        else:
            assert engine.step_counts["deferred"] == 0
        engine.step_counts["deferred"] = 0
        # Every constrained decode step replayed the forward-only graph (CUDA), or ran eagerly (CPU: no graphs).
        expected = {"constrained_decode" if device == "cuda" else "eager"}
        assert paths and all(p == expected for p in paths), (depth, paths)
    assert outs[1] == outs[2]
    if device == "cuda":  # the forward-only replay's logits sample what the eager forward's do
        eager = Engine(loaded, dataclasses.replace(cfg, cuda_graphs=False), device, grammar=grammar)
        assert eager.graphs is None
        assert run_requests(eager, _requests(loaded.eos_token_ids, 16, seed=2), 1).outputs == outs[1]


def test_constrained_requests_survive_a_worker_death_with_the_same_tokens() -> None:
    """A worker killed mid-stream: the held constrained requests compile again on the next worker
    before they resume (their matchers replay the outputs they have), one that arrives while no worker
    is connected too; every token equals the fault-free run's."""
    from client.local_server import TandemServer
    from tests.conftest import TINY_WORKER_ARGS

    long_regex = "[ab]{1000,2000}"  # cannot end within 150 tokens: still streaming at the kill
    streams = [({"regex": long_regex}, {"temperature": 0.0}), ({"regex": long_regex}, {"temperature": 0.8, "seed": 4}),
               ({"json_schema": PERSON}, {"temperature": 0.0}), ({}, {"temperature": 0.0, "ignore_eos": True})]
    late = {"choice": CHOICES, "temperature": 0.0}

    async def one(c, i: int, got: list[int] | None = None) -> list[int]:
        kw, sampling = streams[i]
        max_new = 40 if "json_schema" in kw else 150
        out: list[int] = [] if got is None else got
        async for chunk in c.generate_stream(token_ids=[9 + i, 10, 11], max_new_tokens=max_new, **kw, **sampling):
            out += chunk.token_ids
        return out

    with TandemServer(worker_args=TINY_WORKER_ARGS, scheduler_args=["--debug-check-state"]) as server:
        async def reference() -> list[list[int]]:
            async with AsyncTandemClient(server.address) as c:
                runs = [one(c, i) for i in range(len(streams))]
                return await asyncio.gather(*runs, c.generate(token_ids=[3, 4], max_new_tokens=10, **late))

        async def faulty() -> list[list[int]]:
            async with AsyncTandemClient(server.address) as c:
                got: list[list[int]] = [[] for _ in streams]
                tasks = [asyncio.ensure_future(one(c, i, got[i])) for i in range(len(streams))]
                while min(len(g) for g in got[:2]) < 4:
                    await asyncio.sleep(0.005)
                server.worker.kill()  # SIGKILL
                await asyncio.sleep(0.5)
                assert not any(t.done() for t in tasks[:2])
                waiting = asyncio.ensure_future(c.generate(token_ids=[3, 4], max_new_tokens=10, **late))
                server.worker.wait(10)
                server.start_worker_process()
                return [*(await asyncio.gather(*tasks)), await waiting]

        ref = asyncio.run(reference())
        ref = [*ref[:-1], ref[-1].token_ids]
        got = asyncio.run(faulty())
        got = [*got[:-1], got[-1].token_ids]
        assert got == ref, "a resumed constrained request's tokens differ from its fault-free run"
        st = server.wait_idle(5)
        assert st.kv_blocks_free == st.kv_blocks_total
