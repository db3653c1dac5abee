"""Scheduler core (request, block manager, row table, scheduler) driven by an array-level fake worker.

The fake worker keeps the worker's row-slot state with the worker's own `RowState` (plans are
incremental: it resolves each against the slots) and plays the GPU's role on the resolved arrays: it
resolves carry-over from the previous step's `sampled`, writes input tokens into a slot->token KV dict
through `slot_mapping`, reads every row's context back through its slot's block table, and samples a
token that is a pure function of that context and the row's seed (so outputs cannot depend on
batching, chunking, preemption or depth). Every step, its state digest is checked against the
scheduler's (`check_state`).
"""

from __future__ import annotations

import random
from collections import Counter, deque

import numpy as np
import pytest
from tandem.wire import StepPlan, StepResult

from scheduler_svc.core.request import FinishReason, Request, RequestStatus, SamplingParams
from scheduler_svc.core.scheduler import NeverFits, QueueFull, Scheduler, SchedulerLimits, StateMismatch
from worker_svc.row_state import RowState, StepBatch

V = 40
EOS = 3
STOP = 5


def next_token(history: list[int], seed: int) -> int:
    x = (sum(history) * 31 + len(history) * 7 + seed * 131 + 1) * 2654435761 % (1 << 32)
    return (x >> 9) % V


def oracle(req: Request) -> tuple[list[int], list[int], FinishReason]:
    """(full token sequence ignoring finishes, expected outputs, expected finish) for `req`."""
    seq = list(req.prompt_ids)
    out: list[int] = []
    reason = FinishReason.LENGTH
    while len(out) < req.max_new_tokens:
        t = next_token(seq, req.sampling.seed)
        seq.append(t)
        out.append(t)
        if t in req.eos_token_ids and not req.ignore_eos:
            reason = FinishReason.EOS
            break
        if t in req.stop_token_ids:
            reason = FinishReason.STOP_TOKEN
            break
    while len(seq) < len(req.prompt_ids) + req.max_new_tokens:  # the truth past a finish, for prefix checks
        seq.append(next_token(seq, req.sampling.seed))
    return seq, out, reason


def limits(depth: int, **kw) -> SchedulerLimits:
    base = dict(num_blocks=24, block_size=4, max_num_tokens=16, max_num_rows=8, max_blocks_per_row=32,
                max_context=128, max_waiting=64, pipeline_depth=depth)
    base.update(kw)
    return SchedulerLimits(**base)


def make_request(i: int, prompt_len: int, max_new: int, **kw) -> Request:
    rng = random.Random(i)
    return Request(req_id=f"r{i}", prompt_ids=[rng.randrange(V) for _ in range(prompt_len)],
                   max_new_tokens=max_new, sampling=SamplingParams(seed=1000 + i),
                   eos_token_ids=frozenset({EOS}), **kw)


def worker_rows(lim: SchedulerLimits) -> RowState:
    return RowState(lim.slots, lim.max_blocks_per_row, lim.block_size, lim.num_blocks, lim.max_context)


class FakeWorker:
    def __init__(self, lim: SchedulerLimits, truth: dict[str, list[int]]) -> None:
        self.lim = lim
        self.truth = truth
        self.rows = worker_rows(lim)
        self.kv: dict[int, int] = {}
        self.prev: tuple[int, np.ndarray] | None = None

    def blocks_of(self, slot: int) -> list[int]:
        return self.rows.table[slot, : self.rows.num_blocks[slot]].tolist()

    def run(self, plan: StepPlan, requests) -> tuple[StepResult, StepBatch]:
        bs = self.lim.block_size
        batch = self.rows.prepare(plan, self.lim.max_num_tokens, V)
        ids = batch.input_ids.astype(np.int64)
        qs = batch.query_start
        for r in np.nonzero(batch.carry_index >= 0)[0]:
            assert self.prev is not None and plan.carry_from_step == self.prev[0] == plan.step_id - 1
            assert ids[qs[r]] == 0, "carried row must have placeholder 0"
            ids[qs[r]] += self.prev[1][batch.carry_index[r]]
            assert self.prev[1][batch.carry_index[r]] >= 0, "carried from a row that did not sample"
        for r in range(batch.num_rows):
            s, e = qs[r], qs[r + 1]
            table = self.rows.table[batch.rows[r]]
            assert list(batch.positions[s:e]) == list(range(batch.kv_lens[r] - (e - s), batch.kv_lens[r]))
            for t in range(s, e):
                p = batch.positions[t]
                assert batch.slot_mapping[t] == table[p // bs] * bs + p % bs
                self.kv[int(batch.slot_mapping[t])] = int(ids[t])
        sampled = np.full(batch.num_rows, -1, np.int32)
        for r in range(batch.num_rows):
            n = int(batch.kv_lens[r])
            table = self.rows.table[batch.rows[r]]
            ctx = [self.kv.get(int(table[p // bs]) * bs + p % bs, -1) for p in range(n)]
            assert ctx == self.truth[requests[r].req_id][:n], f"step {plan.step_id}: row {r} reads wrong KV"
            if batch.sample[r]:
                sampled[r] = next_token(ctx, int(batch.seed[r]))
        self.prev = (plan.step_id, sampled)
        digest = self.rows.digest() if plan.check_state else 0
        return StepResult(step_id=plan.step_id, sampled=sampled, state_digest=digest), batch


def run_to_completion(sched: Scheduler, reqs: list[Request], arrive_per_step: int = 3, deferred: bool = False) -> dict:
    """A minimal engine loop with invariant checks; returns per-request outputs and statistics.
    `deferred`: the core's order (engine.py): accept a result, build and send the next plans, and only
    then take the result's events, so that plans are built with rows unsettled."""
    lim = sched.limits
    truth = {r.req_id: oracle(r)[0] for r in reqs}
    worker = FakeWorker(lim, truth)
    queue = deque(reqs)
    inflight: deque[tuple[StepResult, list]] = deque()
    events: dict[str, list] = {r.req_id: [] for r in reqs}
    samples = Counter()  # sampling rows scheduled per request
    last_ref: dict[int, tuple[tuple[str, int], int]] = {}  # block -> ((req, incarnation), step)
    reported = -1
    stats = Counter()
    unsettled = False
    preempt = sched._preempt

    def preempt_counted(req: Request) -> None:
        # A victim whose last token is still unsettled: _preempt must settle it before it leaves its slot.
        pending = sched._unsettled
        stats["preempted_unsettled"] += pending is not None and any(r is req for r in pending[0].requests)
        preempt(req)

    sched._preempt = preempt_counted

    def take(evs: list) -> None:
        for ev in evs:
            assert not events[ev.request.req_id] or events[ev.request.req_id][-1].finish is None
            events[ev.request.req_id].append(ev)
        sched.check_integrity()

    while queue or not sched.is_idle:
        for _ in range(arrive_per_step):
            if queue:
                sched.add(queue.popleft())
        while sched.in_flight < lim.pipeline_depth:
            stats["built_unsettled"] += sched._unsettled is not None
            built = sched.build_plan()
            if built is None:
                break
            plan, info = built
            stats["steps"] += 1
            stats["carried"] += info.num_carried
            result, batch = worker.run(plan, info.requests)
            for r, req in enumerate(info.requests):
                n = int(plan.query_start[r + 1] - plan.query_start[r])
                stats["chunked"] += n > 1 and batch.kv_lens[r] < req.num_prompt_tokens
                owner = (req.req_id, req.num_preemptions)
                # A block this row writes must not be one another request's in-flight step may still
                # read or write (blocks only read, a shared cached prefix, may be held by many).
                lo, hi = int(batch.query_start[r]), int(batch.query_start[r + 1])
                written = {int(x) // lim.block_size for x in batch.slot_mapping[lo:hi]}
                for b in worker.blocks_of(int(batch.rows[r])):
                    prev = last_ref.get(int(b))
                    if int(b) in written and prev is not None and prev[0] != owner:
                        assert prev[1] <= reported, f"block {b} reused while step {prev[1]} is in flight"
                        assert prev[1] < plan.step_id, "block written in one row, used in another"
                    last_ref[int(b)] = (owner, plan.step_id)
                if plan.sample[r]:
                    samples[req.req_id] += 1
                    assert samples[req.req_id] <= req.max_new_tokens, "sample scheduled past max_new_tokens"
                    assert batch.kv_lens[r] < lim.max_context
            inflight.append((result, info.requests))
        if unsettled:
            take(sched.take_events())
            unsettled = False
        if not inflight:
            assert sched.is_idle, "nothing schedulable but work remains (deadlock)"
            continue  # more arrivals, or done
        result, rows = inflight.popleft()
        live_before = [not req.is_finished for req in rows]
        if deferred:
            sched.accept_result(result)
            unsettled = True
        else:
            take(sched.process_result(result))
        reported = result.step_id
        stats["overruns"] += sum(1 for r in range(len(rows)) if result.sampled[r] >= 0 and not live_before[r])
    take(sched.take_events())
    assert sched.blocks.num_free == lim.num_blocks
    stats["preemptions"] = sched.num_preemptions
    return {"events": events, "samples": samples, "stats": stats}


def mixed_requests() -> list[Request]:
    rng = random.Random(7)
    reqs = []
    for i in range(32):
        kw = {}
        if i % 7 == 3:
            kw["ignore_eos"] = True
        if i % 5 == 1:
            kw["stop_token_ids"] = frozenset({STOP})
        reqs.append(make_request(i, rng.randint(1, 40), rng.randint(1, 40), **kw))
    return reqs


@pytest.mark.parametrize(("depth", "deferred"), [(1, False), (2, False), (3, False), (1, True), (2, True), (3, True)])
def test_outputs_match_oracle_with_chunking_and_preemption(depth: int, deferred: bool) -> None:
    reqs = mixed_requests()
    out = run_to_completion(Scheduler(limits(depth, check_state=True)), reqs, deferred=deferred)
    stats = out["stats"]
    assert stats["preemptions"] > 0 and stats["chunked"] > 0
    if depth > 1:
        assert stats["carried"] > 0 and stats["overruns"] > 0
    else:
        assert stats["carried"] == 0 and stats["overruns"] == 0
    if deferred:  # plans were built, and requests preempted, with a result's rows unsettled
        assert stats["built_unsettled"] > 0 and stats["preempted_unsettled"] > 0
    reasons = Counter()
    extras = []
    for req in reqs:
        _, expected, reason = oracle(req)
        evs = out["events"][req.req_id]
        assert [e.token_id for e in evs] == expected == req.output_ids, req.req_id
        assert evs[-1].finish == reason == req.finish_reason and req.is_finished
        assert all(e.finish is None for e in evs[:-1])
        # Length finishes are known in advance: no sample was ever scheduled past the end; an EOS or
        # stop token may have up to depth - 1 more in flight.
        extra = out["samples"][req.req_id] - len(expected)
        assert extra == 0 if (depth == 1 or reason == FinishReason.LENGTH) else 0 <= extra < depth
        extras.append(extra)
        reasons[reason] += 1
    assert reasons[FinishReason.EOS] and reasons[FinishReason.LENGTH] and reasons[FinishReason.STOP_TOKEN]
    assert max(extras) == depth - 1  # some finish had every step the depth allows still in flight


def test_depth_1_and_2_identical_and_timestamps_set() -> None:
    a, b = mixed_requests(), mixed_requests()
    run_to_completion(Scheduler(limits(1, check_state=True)), a)
    run_to_completion(Scheduler(limits(2, max_num_tokens=24, num_blocks=30, check_state=True)), b, arrive_per_step=5)
    for x, y in zip(a, b, strict=True):
        assert x.output_ids == y.output_ids and x.finish_reason == y.finish_reason
        assert x.arrival_time <= x.first_scheduled_time <= x.first_token_time <= x.finish_time


def test_carry_over_arrays_at_depth_2() -> None:
    lim = limits(2, num_blocks=8)
    s, rows = Scheduler(lim), worker_rows(lim)
    req = make_request(0, 6, 5)
    s.add(req)
    p0, _ = s.build_plan()
    assert list(p0.input_ids) == req.prompt_ids and list(p0.sample) == [1] and p0.carry_from_step == -1
    assert list(p0.new_slots) == [req.slot] and list(p0.append_blocks) == [0, 1] and list(p0.append_slots) == [0, 0]
    rows.prepare(p0, lim.max_num_tokens, V)
    p1, info1 = s.build_plan()  # built before step 0's token is known
    assert p1.step_id == 1 and p1.carry_from_step == 0 and list(p1.carry_index) == [0]
    assert list(p1.input_ids) == [0] and p1.new_slots.size == p1.append_slots.size == p1.free_slots.size == 0
    b1 = rows.prepare(p1, lim.max_num_tokens, V)  # only the row and its token crossed: the worker knows the rest
    assert list(b1.positions) == [6] and list(b1.kv_lens) == [7]
    assert rows.table[req.slot, :2].tolist() == req.block_ids == [0, 1]
    assert list(b1.slot_mapping) == [1 * 4 + 2]
    assert req.num_inflight == 2 and info1.num_carried == 1
    with pytest.raises(AssertionError):
        s.build_plan()  # pipeline full
    with pytest.raises(AssertionError):
        s.process_result(StepResult(step_id=1, sampled=np.array([7], np.int32)))  # out of order


def test_plan_arrays_sampling_params_and_logprobs() -> None:
    lim = limits(1, max_num_tokens=64)
    s, rows = Scheduler(lim), worker_rows(lim)
    a = make_request(0, 9, 2)
    a.sampling = SamplingParams(temperature=0.0, top_p=0.5, top_k=3, min_p=0.1, seed=(1 << 64) - 1,
                                num_logprobs=2)
    b = make_request(1, 3, 2)
    s.add(a)
    s.add(b)
    plan, info = s.build_plan()
    assert list(info.requests) == [a, b] and list(plan.query_start) == [0, 9, 12]
    assert list(plan.rows) == list(plan.new_slots) == [a.slot, b.slot] and a.slot != b.slot
    assert list(plan.append_slots) == [a.slot] * 3 + [b.slot] and list(plan.append_blocks) == [0, 1, 2, 3]
    assert plan.new_seed.dtype == np.uint64 and int(plan.new_seed[0]) == (1 << 64) - 1
    assert list(plan.new_num_logprobs) == [2, -1] and list(plan.new_top_k) == [3, 0]
    assert plan.new_temperature[0] == 0.0 and plan.new_top_p[0] == pytest.approx(0.5)
    assert list(plan.sample) == [1, 1] and plan.flush
    batch = rows.prepare(plan, lim.max_num_tokens, V)  # the worker's per-row view of the same parameters
    assert list(batch.top_k) == [3, 0] and int(batch.seed[0]) == (1 << 64) - 1 and list(batch.kv_lens) == [9, 3]
    res = StepResult(step_id=0, sampled=np.array([11, 12], np.int32),
                     logprob=np.array([-0.5, -1.0], np.float32),
                     top_ids=np.array([[11, 9], [12, 8]], np.int32),
                     top_logprobs=np.array([[-0.5, -2.0], [-1.0, -3.0]], np.float32))
    ev_a, ev_b = s.process_result(res)
    assert ev_a.logprob == -0.5 and ev_a.top == [(11, -0.5), (9, -2.0)]
    assert ev_b.logprob is None and ev_b.top is None


def test_blocks_of_aborted_request_freed_only_after_in_flight_step_reports() -> None:
    s = Scheduler(limits(2, num_blocks=8))
    a, b = make_request(0, 8, 10), make_request(1, 4, 10)
    s.add(a)
    p0, _ = s.build_plan()  # a: 8 tokens, 2 blocks, step 0 in flight
    slot_a = a.slot
    assert s.blocks.num_free == 6
    assert s.abort("r0") is a and a.finish_reason == FinishReason.ABORTED
    assert s.blocks.num_free == 6 and s.blocks.num_pending == 2  # step 0 still writes them
    assert s.abort("r0") is None and s.finish("r0", FinishReason.STOP_STRING) is None
    assert a.finish_reason == FinishReason.ABORTED
    s.add(b)
    p1, _ = s.build_plan()
    assert not set(p1.append_blocks) & set(p0.append_blocks)  # not handed out while in flight
    assert list(p1.free_slots) == [slot_a] and b.slot != slot_a  # nor is a's row slot
    assert s.rows.pool.num_pending == 1
    events = s.process_result(StepResult(step_id=0, sampled=np.array([7], np.int32)))
    assert events == [] and a.output_ids == []  # the aborted row's token is discarded
    assert s.blocks.num_free == 6 - 1 + 2 and s.blocks.num_pending == 0  # freed exactly once
    assert s.rows.pool.num_pending == 0
    s.abort("r1")
    s.process_result(StepResult(step_id=1, sampled=np.array([7], np.int32)))
    assert s.is_idle
    s.check_integrity()
    assert s.blocks.num_free == 8


def test_abort_waiting_and_finish_from_outside() -> None:
    s = Scheduler(limits(1, max_num_rows=1))
    a, b = make_request(0, 4, 10), make_request(1, 4, 10)
    s.add(a)
    s.add(b)
    plan, _ = s.build_plan()
    assert plan.num_rows == 1 and s.num_waiting == 1
    assert s.abort("r1") is b and s.num_waiting == 0 and b.block_ids == []
    s.process_result(StepResult(step_id=0, sampled=np.array([9], np.int32)))
    assert s.finish("r0", FinishReason.STOP_STRING) is a
    assert a.finish_reason == FinishReason.STOP_STRING and a.output_ids == [9]
    assert s.abort("r0") is None and s.abort("nope") is None
    assert s.build_plan() is None and s.is_idle
    s.check_integrity()


def test_length_finish_not_scheduled_past_end_at_depth_2() -> None:
    s = Scheduler(limits(2))
    req = make_request(0, 5, 2, ignore_eos=True)
    s.add(req)
    p0, _ = s.build_plan()
    p1, _ = s.build_plan()
    assert list(p0.sample) == [1] and list(p1.sample) == [1]
    s.process_result(StepResult(step_id=0, sampled=np.array([1], np.int32)))
    assert s.build_plan() is None  # two outputs promised: nothing more to schedule
    (ev,) = s.process_result(StepResult(step_id=1, sampled=np.array([2], np.int32)))
    assert ev.finish == FinishReason.LENGTH and req.output_ids == [1, 2] and s.is_idle


def test_queue_full_and_never_fits() -> None:
    s = Scheduler(limits(1, max_waiting=2, max_context=64, num_blocks=10, max_blocks_per_row=12))
    s.add(make_request(0, 4, 4))
    s.add(make_request(1, 4, 4))
    with pytest.raises(QueueFull):
        s.add(make_request(2, 4, 4))
    with pytest.raises(NeverFits, match="context"):
        s.add(make_request(3, 60, 5))
    with pytest.raises(NeverFits, match="blocks"):
        s.add(make_request(4, 30, 20))  # 49 KV tokens: 13 blocks > 10 in the pool
    with pytest.raises(NeverFits, match="blocks"):
        Scheduler(limits(1, max_blocks_per_row=2)).add(make_request(5, 8, 2))  # 9 KV tokens: 3 blocks
    Scheduler(limits(1, max_blocks_per_row=2)).add(make_request(6, 8, 1))  # 8 KV tokens fit 2 blocks
    assert s.num_waiting == 2


def test_drain_returns_unfinished_and_resets() -> None:
    s = Scheduler(limits(2))
    reqs = [make_request(i, 10, 10) for i in range(3)]
    for r in reqs:
        s.add(r)
    s.build_plan()
    s.build_plan()
    lost = s.drain()
    assert set(lost) == set(reqs) and all(r.status is RequestStatus.FINISHED for r in reqs)
    assert s.is_idle and s.in_flight == 0 and s.next_step_id == 0
    s.check_integrity()
    s.add(make_request(9, 4, 1))
    plan, _ = s.build_plan()
    assert plan.step_id == 0


def test_worker_state_that_disagrees_is_caught_on_the_next_result() -> None:
    """The debug check can fail: a block the scheduler never sent appears in one slot's table."""
    lim = limits(2, check_state=True)
    s = Scheduler(lim)
    reqs = [make_request(i, 6, 8, ignore_eos=True) for i in range(3)]
    worker = FakeWorker(lim, {r.req_id: oracle(r)[0] for r in reqs})
    for r in reqs:
        s.add(r)
    plan, info = s.build_plan()
    result, _ = worker.run(plan, info.requests)
    s.process_result(result)  # agrees
    plan, info = s.build_plan()
    slot = reqs[1].slot
    worker.rows.table[slot, worker.rows.num_blocks[slot]] = lim.num_blocks - 1
    worker.rows.num_blocks[slot] += 1
    with pytest.raises(StateMismatch, match="disagree"):
        s.process_result(worker.run(plan, info.requests)[0])


def test_row_slot_reused_only_after_the_steps_that_name_it_report() -> None:
    """One row slot: a request that finishes while a step naming its slot is in flight releases the
    slot only when that step reports; the next request is admitted into it only then, and the plan
    that admits it frees the slot first on the worker."""
    lim = limits(2, max_num_rows=1, check_state=True)
    s = Scheduler(lim)
    a, b = make_request(0, 3, 5, ignore_eos=True), make_request(1, 3, 2, ignore_eos=True)
    worker = FakeWorker(lim, {r.req_id: oracle(r)[0] for r in (a, b)})
    s.add(a)
    s.add(b)
    p0, i0 = s.build_plan()
    p1, i1 = s.build_plan()  # a's decode, carried over; step 0 and 1 both name slot 0
    assert list(p0.rows) == list(p1.rows) == [0] and a.slot == 0
    s.process_result(worker.run(p0, i0.requests)[0])
    assert s.finish("r0", FinishReason.STOP_STRING) is a  # a stop string: a leaves, step 1 still in flight
    assert s.rows.pool.num_free == 0 and s.rows.pool.num_pending == 1
    assert s.build_plan() is None and b.slot < 0  # no slot for b while step 1 may still name slot 0
    s.process_result(worker.run(p1, i1.requests)[0])  # a's overrun token: discarded
    assert s.rows.pool.num_free == 1
    p2, _ = s.build_plan()
    assert list(p2.free_slots) == [0] and list(p2.new_slots) == [0] and b.slot == 0 and len(a.output_ids) == 1
    worker.rows.prepare(p2, lim.max_num_tokens, V)  # the worker applies the free before the new request


def test_preempted_request_is_sent_again_as_new_with_all_its_blocks() -> None:
    """Preemption by recompute: the victim's slot is freed on the worker, and when it is admitted
    again its plan starts it in a slot as a new request with every block of its recomputed prefix."""
    lim = limits(1, num_blocks=6, max_num_tokens=32, check_state=True)
    s = Scheduler(lim)
    reqs = [make_request(0, 8, 12, ignore_eos=True), make_request(1, 8, 12, ignore_eos=True)]
    worker = FakeWorker(lim, {r.req_id: oracle(r)[0] for r in reqs})
    for r in reqs:
        s.add(r)
    victim, frees, readmitted = reqs[1], [], None
    for _ in range(200):
        built = s.build_plan()
        if built is None:
            break
        plan, info = built
        frees += plan.free_slots.tolist()
        if victim.num_preemptions and victim.slot in plan.new_slots.tolist():
            readmitted = plan
            mine = plan.append_slots == victim.slot
            assert plan.append_blocks[mine].tolist() == victim.block_ids
            assert len(victim.block_ids) == -(-victim.num_computed // lim.block_size)
        s.process_result(worker.run(plan, info.requests)[0])
    assert victim.num_preemptions >= 1 and readmitted is not None and frees
    assert [r.output_ids for r in reqs] == [oracle(r)[1] for r in reqs] and s.is_idle


def shared_prefix_requests(salted: bool = False) -> list[Request]:
    """Requests over three shared prefixes (2 to 5 blocks of 4), distinct tails, one an exact
    multiple of the block size, one sharing only part of a block; some repeat a whole prompt."""
    rng = random.Random(3)
    prefixes = [[rng.randrange(V) for _ in range(n)] for n in (8, 13, 20)]
    reqs = []
    for i in range(30):
        base = prefixes[i % 3]
        tail = [] if i % 7 == 0 else [rng.randrange(V) for _ in range(rng.randint(1, 9))]
        req = make_request(i, 1, rng.randint(1, 12), ignore_eos=i % 4 == 0)
        req.prompt_ids = list(base) + tail
        if salted:
            req.cache_salt = f"tenant-{i % 2}"
        reqs.append(req)
    return reqs


@pytest.mark.parametrize(("depth", "deferred"), [(1, False), (2, False), (2, True), (3, True)])
def test_prefix_cache_shares_blocks_and_tokens_match_the_oracle(depth: int, deferred: bool) -> None:
    """The fake worker checks every row's context against the truth, so a wrongly shared or evicted
    block fails here; the pool is small enough to evict and preempt."""
    reqs = shared_prefix_requests()
    sched = Scheduler(limits(depth, num_blocks=20, check_state=True, prefix_caching=True))
    out = run_to_completion(sched, reqs, arrive_per_step=2, deferred=deferred)
    for req in reqs:
        assert req.output_ids == oracle(req)[1], req.req_id
    assert sched.blocks.hits > 0 and sum(r.num_cached_tokens for r in reqs) == sched.blocks.hits
    assert all(r.num_cached_tokens % 4 == 0 and r.num_cached_tokens < r.num_prompt_tokens for r in reqs)
    assert out["stats"]["preemptions"] > 0 and sched.blocks.num_cached > 0
    assert sched.blocks.num_free == sched.limits.num_blocks  # evictable blocks count as free


def test_prefix_cache_never_crosses_cache_salts() -> None:
    reqs = shared_prefix_requests(salted=True)
    sched = Scheduler(limits(1, num_blocks=64, prefix_caching=True, check_state=True))
    run_to_completion(sched, reqs, arrive_per_step=1)
    by_block: dict[int, set[str]] = {}
    for b, key in sched.blocks._key_of.items():
        by_block.setdefault(b, set()).add(key.extra)
    assert all(len(salts) == 1 for salts in by_block.values())
    hits = {r.req_id: r.num_cached_tokens for r in reqs}
    assert any(hits.values())
    # The first request of each (prefix, salt) pair ran cold: nothing of another tenant's was found.
    seen = set()
    for i, r in enumerate(reqs):
        key = (i % 3, r.cache_salt)
        if key not in seen:
            assert hits[r.req_id] == 0, r.req_id
            seen.add(key)


def test_cached_blocks_without_users_are_evicted_least_recently_freed_first() -> None:
    lim = limits(1, num_blocks=8, max_num_tokens=32, prefix_caching=True)
    s = Scheduler(lim)
    worker = FakeWorker(lim, {})
    a = make_request(0, 9, 1, ignore_eos=True)  # 2 full blocks cached after it finishes
    b = make_request(1, 9, 1, ignore_eos=True)
    for r in (a, b):
        worker.truth[r.req_id] = oracle(r)[0]
        s.add(r)
        while not s.is_idle:
            plan, info = s.build_plan()
            s.process_result(worker.run(plan, info.requests)[0])
    assert s.blocks.num_evictable == 4 and s.blocks.num_free == 8
    a_blocks = [blk for blk, key in s.blocks._key_of.items() if key.tokens[0] == a.prompt_ids[0]]
    big = make_request(2, 21, 1, ignore_eos=True)  # 6 blocks: 4 free ones, then a's two (freed first)
    worker.truth[big.req_id] = oracle(big)[0]
    s.add(big)
    plan, info = s.build_plan()
    assert set(a_blocks) <= set(plan.append_blocks.tolist()) and s.blocks.num_evictable == 2
    s.process_result(worker.run(plan, info.requests)[0])
    again = make_request(3, 1, 1, ignore_eos=True)
    again.prompt_ids = list(b.prompt_ids)
    worker.truth[again.req_id] = oracle(again)[0]
    s.add(again)
    s.build_plan()
    assert again.num_cached_tokens == 8  # b's blocks survived: the least recently freed went first
    s.check_integrity()


def test_a_hot_prefix_survives_pressure_from_cold_ones() -> None:
    """Cold prompts fill the pool again and again; the prefix every other request starts with is
    freed last each time, so eviction (least recently freed first) takes the cold blocks, and every
    hot request after the first finds its prefix."""
    lim = limits(1, num_blocks=12, max_num_tokens=64, prefix_caching=True, check_state=True)
    s = Scheduler(lim)
    rng = random.Random(9)
    hot = [rng.randrange(V) for _ in range(12)]  # 3 full blocks
    worker = FakeWorker(lim, {})
    hot_hits, cold = [], []
    for i in range(12):
        req = make_request(100 + i, 1, 2, ignore_eos=True)
        req.prompt_ids = (hot + [rng.randrange(V)]) if i % 2 == 0 else [rng.randrange(V) for _ in range(29)]
        worker.truth[req.req_id] = oracle(req)[0]
        s.add(req)
        while not s.is_idle:
            plan, info = s.build_plan()
            s.process_result(worker.run(plan, info.requests)[0])
        (hot_hits if i % 2 == 0 else cold).append(req)
        assert req.output_ids == oracle(req)[1]
    assert [r.num_cached_tokens for r in hot_hits] == [0] + [12] * 5
    assert all(r.num_cached_tokens == 0 for r in cold)  # never shared, and evicted in turn
    s.check_integrity()


def test_request_matches_blocks_whose_writing_step_is_still_in_flight() -> None:
    """Depth 2: B shares A's prompt and is admitted while the step writing A's first chunk has not
    reported. It takes those blocks (the writer was sent first and steps run in order), and the fake
    worker, which checks every row's context, reads the right tokens for it."""
    lim = limits(2, max_num_tokens=8, prefix_caching=True, check_state=True)
    s = Scheduler(lim)
    a = make_request(0, 12, 3, ignore_eos=True)
    b = make_request(1, 12, 3, ignore_eos=True)
    b.prompt_ids = list(a.prompt_ids)
    worker = FakeWorker(lim, {r.req_id: oracle(r)[0] for r in (a, b)})
    s.add(a)
    p0, i0 = s.build_plan()  # A's first 8 tokens: two full blocks, named as this plan is built
    s.add(b)
    p1, i1 = s.build_plan()  # step 0 still in flight
    assert s.in_flight == 2 and b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert list(p1.new_context[p1.new_slots == b.slot]) == [8]
    inflight = deque([(p0, i0), (p1, i1)])
    while inflight:
        plan, info = inflight.popleft()
        s.process_result(worker.run(plan, info.requests)[0])
        built = s.build_plan()
        if built is not None:
            inflight.append(built)
    assert a.output_ids == oracle(a)[1] and b.output_ids == oracle(b)[1] and s.is_idle
