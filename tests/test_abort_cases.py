"""Aborts at the awkward moments, on the real scheduler driving a real (CPU) worker engine in process:
on the final step, during chunked prefill, while preempted. Each request ends exactly once (a second
abort is a no-op, no token arrives after it) and its KV blocks come back exactly once (the pool
ends full and the block manager's integrity check holds)."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from bench.inprocess import scheduler_for  # noqa: E402
from scheduler_svc.core.request import FinishReason, Request, RequestStatus, SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    from worker_svc.models import load

    return load("random:tiny-llama", device="cpu", dtype=torch.float32)


def _engine(loaded, num_blocks: int):
    from worker_svc.runner import Engine, EngineConfig

    return Engine(loaded, EngineConfig(num_blocks=num_blocks, max_num_rows=8, max_num_tokens=64), "cpu")


def _req(i: int, prompt_len: int, max_new: int) -> Request:
    return Request(req_id=f"r{i}", prompt_ids=[(7 * i + j) % 40000 + 3 for j in range(prompt_len)],
                   max_new_tokens=max_new, sampling=SamplingParams(temperature=0.0, seed=i),
                   ignore_eos=True, arrival_time=time.monotonic())


class Driver:
    """Steps the scheduler and engine at depth 2 by hand; counts every token event per request."""

    def __init__(self, engine, sched) -> None:
        self.engine, self.sched = engine, sched
        self.tokens: dict[str, int] = {}
        self.finishes: dict[str, int] = {}

    def launch(self) -> bool:
        built = self.sched.build_plan()
        if built is None:
            return False
        self.engine.launch(built[0])
        return True

    def collect(self) -> None:
        for ev in self.sched.process_result(self.engine.collect()):
            rid = ev.request.req_id
            self.tokens[rid] = self.tokens.get(rid, 0) + 1
            if ev.finish is not None:
                self.finishes[rid] = self.finishes.get(rid, 0) + 1

    def step(self) -> None:
        """Keeps two steps in flight where it can, collects one."""
        while self.sched.in_flight < 2 and self.launch():
            pass
        if self.sched.in_flight:
            self.collect()

    def run_to_idle(self, limit: int = 500) -> None:
        for _ in range(limit):
            if self.sched.is_idle:
                break
            self.step()
        assert self.sched.is_idle
        self.sched.check_integrity()
        blocks = self.sched.blocks
        assert blocks.num_free == blocks.num_blocks, "a block was lost or freed twice"


def test_abort_during_chunked_prefill(loaded):
    d = Driver(e := _engine(loaded, 64), scheduler_for(e, depth=2, check_state=True))
    victim, other = _req(0, 300, 8), _req(1, 20, 8)  # 300 tokens at 64 per step: five chunks
    d.sched.add(victim)
    d.sched.add(other)
    d.step()
    d.step()
    assert 0 < victim.num_computed < 300, "not in the middle of its prefill"
    assert d.sched.abort(victim.req_id) is victim
    assert d.sched.abort(victim.req_id) is None  # exactly once
    d.run_to_idle()
    assert victim.finish_reason == FinishReason.ABORTED and d.tokens.get(victim.req_id, 0) == 0
    assert d.tokens[other.req_id] == 8 and d.finishes[other.req_id] == 1


def test_abort_on_the_final_step(loaded):
    d = Driver(e := _engine(loaded, 64), scheduler_for(e, depth=2, check_state=True))
    req = _req(0, 10, 6)
    d.sched.add(req)
    for _ in range(100):  # until the step that samples its last token is in flight, not yet reported
        while d.sched.in_flight < 2 and d.launch():
            pass
        if req.num_output_tokens + req.num_inflight >= req.max_new_tokens and req.num_inflight:
            break
        d.collect()
    else:
        pytest.fail("never had its final sample in flight")
    before = d.tokens.get(req.req_id, 0)
    assert d.sched.abort(req.req_id) is req
    d.run_to_idle()
    assert d.tokens.get(req.req_id, 0) == before, "a token arrived after the abort"
    assert req.finish_reason == FinishReason.ABORTED and req.req_id not in d.finishes


def test_abort_while_preempted(loaded):
    # 6 blocks of 16 tokens: two 40-token prompts growing by 40 tokens cannot both stay.
    d = Driver(e := _engine(loaded, 6), scheduler_for(e, depth=2, check_state=True))
    a, b = _req(0, 40, 40), _req(1, 40, 40)
    d.sched.add(a)
    d.sched.add(b)
    preempted = None
    for _ in range(300):
        d.step()
        preempted = next((r for r in (a, b) if r.num_preemptions and r.status is RequestStatus.WAITING), None)
        if preempted is not None:
            break
    assert preempted is not None, "no preemption happened"
    assert d.sched.abort(preempted.req_id) is preempted
    assert d.sched.abort(preempted.req_id) is None
    survivor = b if preempted is a else a
    d.run_to_idle()
    assert d.finishes[survivor.req_id] == 1 and d.tokens[survivor.req_id] == 40
    assert preempted.req_id not in d.finishes
