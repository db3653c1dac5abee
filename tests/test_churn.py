"""Churn: 500 requests arriving and leaving over time, on the real scheduler driving a real (CPU)
worker engine in process at pipeline depth 2, with preemptions (a small KV pool), client aborts and
row-slot reuse. Every step the worker's row slots (context lengths, block tables) are checked
against the scheduler's (`check_state`: a mismatch raises in process_result). Every request that was
not aborted produces exactly the tokens it produces run alone; an aborted one a prefix of them."""

from __future__ import annotations

import json
import random
import time

import pytest

torch = pytest.importorskip("torch")

from bench.inprocess import run_requests, scheduler_for  # noqa: E402
from scheduler_svc.core.request import FinishReason, Request, SamplingParams  # noqa: E402

NUM_REQUESTS = 500
VOCAB = 1024


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from worker_svc.models import load
    from worker_svc.presets import preset_config
    from worker_svc.runner import Engine, EngineConfig

    # tiny-llama made smaller still (a small vocabulary: the CPU sampler's noise is per vocabulary
    # entry), so that 500 requests and their 500 runs alone take seconds, not minutes.
    spec = tmp_path_factory.mktemp("churn") / "model.json"
    spec.write_text(json.dumps({**preset_config("tiny-llama"), "vocab_size": VOCAB, "hidden_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}))
    loaded = load(f"random:{spec}", device="cpu", dtype=torch.float32)
    # 40 blocks of 16 tokens for up to 16 rows of up to 88 tokens: preemptions are certain.
    return Engine(loaded, EngineConfig(num_blocks=40, max_num_rows=16, max_num_tokens=64), "cpu")


def _requests(seed: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    shared = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (20, 35)]
    for i in range(NUM_REQUESTS):
        # A third sample (seeded), the rest are greedy; seeded tokens are keyed by (seed, position),
        # so they must not depend on batch-mates either.
        temperature = 0.8 if i % 3 == 0 else 0.0
        head = shared[i % 2] if i % 3 == 1 else []
        out.append(Request(req_id=f"r{i}",
                           prompt_ids=head + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 48 - len(head)))],
                           max_new_tokens=rng.randint(1, 40), ignore_eos=True,
                           sampling=SamplingParams(temperature=temperature, seed=rng.randrange(1 << 63)),
                           arrival_time=time.monotonic()))
    return out


def _clone(req: Request) -> Request:
    return Request(req_id=req.req_id, prompt_ids=list(req.prompt_ids), max_new_tokens=req.max_new_tokens,
                   ignore_eos=True, sampling=SamplingParams(temperature=req.sampling.temperature,
                                                            seed=req.sampling.seed))


def test_churn_matches_requests_run_alone(engine):
    rng = random.Random(11)
    reqs = _requests(5)
    # With the prefix cache: a preempted request finds its own blocks again unless they were evicted,
    # and a third of the prompts share a prefix with an earlier one.
    sched = scheduler_for(engine, depth=2, check_state=True, prefix_caching=True)
    pending = list(reqs)
    aborted: set[str] = set()
    steps = slots_started = 0
    while pending or not sched.is_idle:
        for _ in range(rng.choice((0, 0, 1, 2, 3))):  # arrivals in bursts, with quiet steps
            if pending:
                sched.add(pending.pop(0))
        while sched.in_flight < 2 and (built := sched.build_plan()) is not None:
            slots_started += built[0].new_slots.size
            engine.launch(built[0])
        if sched.in_flight == 0:
            continue
        sched.process_result(engine.collect())  # raises StateMismatch if the worker's slots disagree
        steps += 1
        if rng.random() < 0.05 and sched.num_running:  # a client cancels a request (running or waiting)
            victim = rng.choice([r for r in reqs if r.req_id not in aborted and sched.get(r.req_id) is not None])
            sched.abort(victim.req_id)
            aborted.add(victim.req_id)
        sched.check_integrity()
    sched.check_integrity()  # idle: every block and row slot is back in its pool
    assert sched.num_preemptions > 20 and len(aborted) > 10 and sched.blocks.hits > 0
    assert slots_started > 10 * engine.limits.max_num_rows  # each of the 16 slots reused many times
    for req in reqs:
        alone = run_requests(engine, [_clone(req)], depth=1).outputs[req.req_id]
        if req.req_id in aborted:
            assert req.finish_reason is FinishReason.ABORTED and req.output_ids == alone[: len(req.output_ids)]
        else:
            assert req.finish_reason is FinishReason.LENGTH and req.output_ids == alone, req.req_id
