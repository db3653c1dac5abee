"""Continuous-batching scheduler: which tokens of which requests go into each step, and what came back.

Owns the waiting queue, the running set, the KV block tables and the steps in flight. Pure Python +
numpy (never torch). The engine loop calls `build_plan` while fewer than `pipeline_depth` steps are in
flight and `process_result` for every result, in step order; the plan returned counts as sent. The core
splits the latter: `accept_result` (the row counters, and the rows that end), then the next plans, then
`take_events` (the other rows' tokens appended and their events), so that a result's per-row Python is
not on the path from the worker's result to its next plan.

Plans are incremental (engine.proto): each running request holds a worker row slot (`RowTable`), and
a plan carries the slots freed and started, the KV blocks appended, and the rows this step runs. The
steady-state decode rows are selected, given their blocks and committed with numpy over the row
table; only prefill chunks, admissions, preemptions and the token events of results are per-row
Python, so the cost of a decode step is O(rows) with a small constant and never O(rows x context).

With prefix caching (block_manager.py), admission takes the cached blocks of the longest known
prefix of a request and schedules only the rest; full blocks are named once the step writing them
is sent, so only later steps can read them.

Running ahead (depth 2 or 3) is made safe here, not in the worker:
- a decode whose input token is the in-flight step's sample carries it over (input 0 + carry_index);
  one whose pending sample comes from an older in-flight step waits;
- a sample is never scheduled past max_new_tokens or max_context (in-flight samples count);
- EOS / stop-token / outside `finish` may leave depth - 1 steps in flight: their rows are discarded;
- blocks and the row slot of a finished, aborted or preempted request are freed tagged with the last
  step sent, and return to their pools only when that step has reported.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
from tandem.wire import StepPlan, StepResult

from scheduler_svc.core.block_manager import BlockManager, prefix_keys
from scheduler_svc.core.limits import NeverFits, QueueFull, SchedulerLimits, check_fits
from scheduler_svc.core.plan_params import new_slot_arrays
from scheduler_svc.core.request import FinishReason, Request, RequestStatus
from scheduler_svc.core.row_table import RowTable

__all__ = ["NeverFits", "QueueFull", "Scheduler", "SchedulerLimits", "StateMismatch", "StepInfo", "TokenEvent",
           "check_fits"]  # the limits and admission errors live in limits.py; callers import them from here too


class StateMismatch(AssertionError):
    """The worker's row slots disagree with the scheduler's (the debug check of check_state)."""


@dataclass
class TokenEvent:
    """One accepted token of a live request; `finish` set on its last."""

    request: Request
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None
    finish: FinishReason | None
    error: str | None = None  # the row's logits were broken: the request ends with this error, no token


@dataclass
class StepInfo:
    """What the scheduler must remember about a sent step to interpret its result."""

    step_id: int
    requests: np.ndarray  # object [R]: row -> request
    sample: np.ndarray  # bool [R]: row -> whether it samples
    slots: np.ndarray  # int64 [R]: row -> slot
    num_tokens: int
    num_carried: int
    digest: int = 0  # the row-slot state the worker must report (check_state), else 0


@dataclass
class _Chunk:
    """A row that is not a plain decode: a prefill chunk (continued or new), built in Python."""

    req: Request
    start: int  # first position scheduled
    n: int  # tokens scheduled
    new_blocks: list[int]


class Scheduler:
    def __init__(self, limits: SchedulerLimits) -> None:
        self.limits = limits
        self.num_preemptions = 0
        self._events: list[TokenEvent] = []  # not reset with a session: `drain` leaves them to be taken
        self._reset()

    def _reset(self) -> None:
        self.blocks = BlockManager(self.limits.num_blocks, self.limits.block_size, self.limits.prefix_caching)
        self.rows = RowTable(self.limits.slots, self.limits.max_context)
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}  # admission order: the last one is preempted first
        self._in_flight: deque[StepInfo] = deque()
        self._next_step = 0
        # The EOS and stop tokens of every request added this session: a sampled token outside them
        # cannot end its request, so its row's Python waits until the next plan is out (accept_result).
        self._stop_set: set[int] = set()
        self._stop_ids = np.zeros(0, np.int64)
        self._unsettled: tuple[StepInfo, StepResult, np.ndarray, np.ndarray, float] | None = None

    # ---- introspection -------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Steps sent whose results have not arrived."""
        return len(self._in_flight)

    @property
    def next_step_id(self) -> int:
        return self._next_step

    @property
    def is_idle(self) -> bool:
        return not self._requests and not self._in_flight

    @property
    def kv_usage(self) -> float:
        return self.blocks.usage

    @property
    def oldest_in_flight(self) -> StepInfo | None:
        """The sent step whose result comes next."""
        return self._in_flight[0] if self._in_flight else None

    def get(self, req_id: str) -> Request | None:
        return self._requests.get(req_id)

    def check_integrity(self) -> None:
        """Block and slot accounting invariants; when idle, every block and slot is back in its pool."""
        self._settle()
        owned = Counter(b for req in self._running.values() for b in req.block_ids)
        self.blocks.check_integrity(owned)  # a block's references are the requests holding it
        self.rows.check_integrity(self.limits.block_size)
        assert len(owned) == self.blocks.num_used, "block leaked"
        for req in self._running.values():
            assert len(set(req.block_ids)) == len(req.block_ids), "a block twice in one table"
        for req in self._running.values():
            assert len(req.block_ids) == self.blocks.blocks_for(req.num_computed)
            assert req.status is RequestStatus.RUNNING and req.slot >= 0
        for req in self._waiting:
            assert not req.block_ids and req.num_computed == 0 and req.slot < 0
        assert len(self._requests) == len(self._running) + len(self._waiting)
        if self.is_idle:
            assert self.blocks.num_used == 0 and self.blocks.num_pending == 0
            assert self.blocks.num_free == self.limits.num_blocks
            assert self.rows.pool.num_free == self.limits.slots

    # ---- requests in and out -------------------------------------------------------------------

    def add(self, req: Request) -> None:
        assert req.status is RequestStatus.WAITING and not req.output_ids and req.num_computed == 0
        assert req.req_id not in self._requests, f"duplicate request id {req.req_id}"
        check_fits(self.limits, req)
        if len(self._waiting) >= self.limits.max_waiting:
            raise QueueFull(f"{len(self._waiting)} requests waiting (limit {self.limits.max_waiting})")
        self._requests[req.req_id] = req
        self._waiting.append(req)
        self._note_stops(req)

    def _note_stops(self, req: Request) -> None:
        ids = set(req.stop_token_ids) if req.ignore_eos else set(req.stop_token_ids) | set(req.eos_token_ids)
        if not ids <= self._stop_set:
            self._stop_set |= ids
            self._stop_ids = np.fromiter(sorted(self._stop_set), np.int64, len(self._stop_set))

    def resume(self, req: Request) -> None:
        """Queues a request held through a worker loss (`drain` gave it back): it recomputes its prompt
        and the outputs it already has, then goes on. Raises NeverFits if this worker's limits are
        smaller than the last one's; past the queue bound, since it was admitted long ago."""
        assert not req.block_ids and req.slot < 0 and req.num_computed == 0 and req.num_inflight == 0
        assert req.req_id not in self._requests, f"duplicate request id {req.req_id}"
        check_fits(self.limits, req)
        req.status, req.finish_reason, req.finish_time = RequestStatus.WAITING, None, None
        self._requests[req.req_id] = req
        self._waiting.append(req)
        self._note_stops(req)

    def abort(self, req_id: str, reason: FinishReason = FinishReason.ABORTED) -> Request | None:
        """Stops a request; returns it, or None if it is unknown or already finished (idempotent)."""
        req = self._requests.get(req_id)
        if req is not None:
            self._finish(req, reason)
        return req

    def finish(self, req_id: str, reason: FinishReason) -> Request | None:
        """A finish decided outside (stop string): same effect as `abort` with that reason."""
        return self.abort(req_id, reason)

    def drain(self) -> list[Request]:
        """The worker is gone: removes and returns every unfinished request; fresh state for the next.
        Events not taken yet stay for `take_events` (the tokens they carry are in the requests too)."""
        self._settle()
        lost = list(self._requests.values())
        now = time.monotonic()
        for req in lost:
            req.status, req.finish_reason, req.finish_time = RequestStatus.FINISHED, FinishReason.ABORTED, now
            req.block_ids = []
            req.slot, req.rows = -1, None
            req._computed, req._inflight, req._last_sample = 0, 0, None
            req.prompt_sent_step = -1  # step ids start from 0 again with the next worker
        self._reset()
        return lost

    def _finish(self, req: Request, reason: FinishReason) -> None:
        self._settle()
        del self._requests[req.req_id]
        if req.status is RequestStatus.RUNNING:
            del self._running[req.req_id]
            self._free_blocks(req)
            self.rows.release(req, self._next_step - 1)
        else:
            self._waiting.remove(req)
        req.status, req.finish_reason, req.finish_time = RequestStatus.FINISHED, reason, time.monotonic()

    def _free_blocks(self, req: Request) -> None:
        # Its full blocks written by steps already sent stay findable (a next turn, a recompute).
        self._register(req, 0, min(req.num_computed, req.num_known_tokens), self._next_step - 1)
        # Every step sent so far may write or read these blocks: return them after the last one reports.
        self.blocks.free_after(self._next_step - 1, req.block_ids)
        req.block_ids = []

    def _register(self, req: Request, start: int, end: int, written_in: int) -> None:
        """Names, in the prefix cache, the full blocks of `req` among tokens [start, end), which must be
        known and written by step `written_in` at the latest (sent, or the plan being built)."""
        if not self.blocks.caching:
            return
        self._settle()
        bs = self.limits.block_size
        first, last = start // bs, end // bs
        if last <= first:
            return
        prefix_keys(req.token_ids, bs, req.cache_salt, req.prefix_keys, last)
        for i in range(first, last):
            self.blocks.register(req.block_ids[i], req.prefix_keys[i], written_in)

    def _cached_prefix(self, req: Request) -> list[int]:
        """The cached blocks of the longest prefix of `req`'s known tokens, short of its last token
        (which is always computed, for its logits); not taken yet."""
        if not self.blocks.caching:
            return []
        self._settle()
        bs = self.limits.block_size
        upto = (req.num_known_tokens - 1) // bs
        if upto <= 0:
            return []
        prefix_keys(req.token_ids, bs, req.cache_salt, req.prefix_keys, upto)
        return self.blocks.lookup(req.prefix_keys[:upto])

    def _leader_ready(self, req: Request, step: int) -> bool:
        """Whether sample i > 0 of n may be admitted in `step`: once sample 0's last prompt token was
        computed by an earlier step (its full prompt blocks are then named, and matchable here), or
        once sample 0 is not running (finished, aborted, preempted: nothing to wait for)."""
        leader = req.leader
        if leader is None or not self.blocks.caching:
            return True
        if leader.status is RequestStatus.RUNNING and not 0 <= leader.prompt_sent_step < step:
            return False
        req.leader = None
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute-preemption: drop its KV; it rejoins the queue's front with prompt + outputs to redo."""
        self._settle()
        del self._running[req.req_id]
        self._free_blocks(req)
        self.rows.release(req, self._next_step - 1)
        req.num_computed = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(req)

    # ---- building a step -----------------------------------------------------------------------

    def build_plan(self) -> tuple[StepPlan, StepInfo] | None:
        L, rt = self.limits, self.rows
        assert len(self._in_flight) < L.pipeline_depth, "build_plan with the pipeline full"
        step = self._next_step
        preemptions_before = self.num_preemptions
        in_step = np.zeros(rt.num_slots, bool)  # slots scheduled in this step: never preemption victims

        # Running requests in admission order: decodes (one token) first, then continuing prefills. A
        # row whose pending sample comes from an older in-flight step than the last waits (it cannot
        # be carried over); one whose in-flight samples reach its cap has nothing to do.
        order = rt.order()
        inflight, computed = rt.inflight[order], rt.computed[order]
        tokens = rt.known[order] + inflight
        todo = tokens - computed
        ready = (tokens < rt.cap[order]) & ((inflight == 0) | (rt.last_step[order] == step - 1))
        row_cap = min(L.max_num_rows, L.max_num_tokens)
        decode, appended, stalled = self._schedule_decodes(order[ready & (todo == 1)], row_cap, in_step)
        budget = L.max_num_tokens - decode.size
        chunks: list[_Chunk] = []
        # Continuing prefills and waiting requests have no unsettled token: a request's sample makes its
        # next row a decode, and preemption settles (_preempt).
        for s in order[ready & (todo > 1)].tolist():
            if decode.size + len(chunks) == L.max_num_rows or budget == 0:
                break
            req = rt.owner[s]
            if req is None:
                continue  # preempted earlier in this build
            start = req.num_computed
            new = self._fit_chunk(req, min(req.num_to_compute, budget), in_step)
            if new is None:
                stalled = True
                continue
            n = req.num_computed - start
            chunks.append(_Chunk(req, start, n, new))
            in_step[s] = True
            budget -= n

        # Admit waiting requests FIFO, chunking the prompt to the budget and the free blocks; not when
        # a running request went without blocks or was preempted in this build.
        admitted = 0
        if not stalled and self.num_preemptions == preemptions_before:
            while self._waiting and decode.size + len(chunks) < L.max_num_rows and budget > 0:
                req = self._waiting[0]
                if req.num_inflight > 0:
                    break  # preempted with a sample in flight: recompute once it has arrived
                if not self._leader_ready(req, step):
                    break  # sample i > 0 of n: its prompt's blocks come from sample 0's prefill
                cached = self._cached_prefix(req)
                start = len(cached) * L.block_size
                free = self.blocks.free_if_taken(cached)
                n = min(req.num_known_tokens - start, budget, free * L.block_size)
                if n <= 0 or rt.pool.num_free == 0:
                    break
                self._waiting.popleft()
                req.status = RequestStatus.RUNNING
                self._running[req.req_id] = req
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                    req.num_cached_tokens = min(start, req.num_prompt_tokens)
                    self.blocks.queries += req.num_prompt_tokens
                    self.blocks.hits += req.num_cached_tokens
                self.blocks.take(cached, self._next_step)
                req.block_ids = list(cached)
                s = rt.admit(req)
                new = self.blocks.grow(req.block_ids, start + n)
                assert new is not None
                rt.num_blocks[s] = len(req.block_ids)
                rt.computed[s] = start + n
                chunks.append(_Chunk(req, start, n, cached + new))
                in_step[s] = True
                budget -= n
                admitted += 1

        if decode.size == 0 and not chunks:
            return None
        return self._emit(step, decode, appended, chunks, admitted)

    def _schedule_decodes(self, candidates: np.ndarray, row_cap: int,
                          in_step: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """The decode rows of this step, each given the block its next token needs; returns (slots,
        those that got a new block, stalled). With enough free blocks this is a few array operations;
        otherwise the rows go one by one, preempting newer requests (`_make_room`)."""
        rt, bs = self.rows, self.limits.block_size
        chosen = candidates[:row_cap]
        needs = chosen[rt.computed[chosen] >= rt.num_blocks[chosen] * bs]
        if needs.size <= self.blocks.num_free:
            for s, b in zip(needs.tolist(), self.blocks.allocate(needs.size), strict=True):
                rt.owner[s].block_ids.append(b)
            rt.num_blocks[needs] += 1
            in_step[chosen] = True
            return chosen, needs, False
        rows: list[int] = []
        grown: list[int] = []
        stalled = False
        for s in candidates.tolist():
            if len(rows) == row_cap:
                break
            req = rt.owner[s]
            if req is None:
                continue  # preempted by an older row of this loop
            if rt.computed[s] >= rt.num_blocks[s] * bs:
                if not self._make_room(req, 1, in_step):
                    stalled = True
                    continue
                req.block_ids.extend(self.blocks.allocate(1))
                rt.num_blocks[s] += 1
                grown.append(s)
            rows.append(s)
            in_step[s] = True
        return np.asarray(rows, np.int64), np.asarray(grown, np.int64), stalled

    def _fit_chunk(self, req: Request, n: int, in_step: np.ndarray) -> list[int] | None:
        """Schedules up to `n` tokens of a continuing prefill, shrunk to the free blocks (preempting
        only if not one token fits); returns the blocks it took, None if it must wait. Advances
        num_computed past the chunk."""
        bs = self.limits.block_size
        room = (len(req.block_ids) + self.blocks.num_free) * bs - req.num_computed
        if room <= 0:
            if not self._make_room(req, 1, in_step):
                return None
            room = (len(req.block_ids) + self.blocks.num_free) * bs - req.num_computed
        n = min(n, room)
        new = self.blocks.grow(req.block_ids, req.num_computed + n)
        assert new is not None
        self.rows.num_blocks[req.slot] = len(req.block_ids)
        req.num_computed += n
        return new

    def _make_room(self, req: Request, need: int, in_step: np.ndarray) -> bool:
        """Preempts the newest running requests for `need` free blocks; False if `req` must wait.

        Only requests admitted after `req` and not already in this step are victims, so an older request
        is never evicted for a newer one; the oldest running request can always make room.
        """
        while self.blocks.num_free < need:
            if self.blocks.num_free + self.blocks.num_pending >= need:
                return False  # blocks return when the in-flight step reports: wait instead of evicting
            victim = None
            for r in reversed(self._running.values()):
                if r is req:
                    break
                if not in_step[r.slot]:
                    victim = r
                    break
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _emit(self, step: int, decode: np.ndarray, appended: np.ndarray, chunks: list[_Chunk],
              admitted: int) -> tuple[StepPlan, StepInfo]:
        """Fills the plan's arrays (engine.proto) and commits the rows to the requests' state.

        Rows are the decode rows (arrays over slots), then the chunks; the last `admitted` chunks are
        requests new to the worker."""
        L, rt = self.limits, self.rows
        nd, nc = decode.size, len(chunks)
        R = nd + nc
        assert R <= L.max_num_rows
        # Decode rows: the input is the in-flight sample (carried over from the previous step's row)
        # or, with nothing in flight, the last known token.
        carried = rt.inflight[decode] > 0
        d_ids = np.where(carried, L.placeholder, rt.last_token[decode])
        d_carry = np.where(carried, rt.last_row[decode], -1)
        rt.computed[decode] += 1
        rt.inflight[decode] += 1
        rt.last_step[decode] = step
        rt.last_row[decode] = np.arange(nd)

        c_slots = np.fromiter((c.req.slot for c in chunks), np.int64, nc)
        c_lens = np.fromiter((c.n for c in chunks), np.int64, nc)
        c_ids = [np.asarray(c.req.token_ids(c.start, c.start + c.n), np.int64) for c in chunks]
        c_sample = np.zeros(nc, bool)
        for i, c in enumerate(chunks):
            assert c.req.num_computed == c.start + c.n <= c.req.num_tokens
            if c.start + c.n == c.req.num_tokens:  # its last scheduled token is the last it has: sample
                c_sample[i] = True
            if c.req.prompt_sent_step < 0 and c.start + c.n >= c.req.num_prompt_tokens:
                c.req.prompt_sent_step = step
            # Blocks this chunk fills with known tokens are written by this plan, sent before any plan
            # that could read them on the one compute stream: matchable from now on.
            self._register(c.req, c.start, min(c.start + c.n, c.req.num_known_tokens), step)
        sampling = c_slots[c_sample]
        rt.inflight[sampling] += 1
        rt.last_step[sampling] = step
        rt.last_row[sampling] = nd + np.flatnonzero(c_sample)

        slots = np.concatenate([decode, c_slots])
        lens = np.concatenate([np.ones(nd, np.int64), c_lens])
        qs = np.zeros(R + 1, np.int32)
        np.cumsum(lens, out=qs[1:])
        T = int(qs[-1])
        assert T <= L.max_num_tokens
        assert np.all(rt.num_blocks[slots] <= L.max_blocks_per_row)

        # Blocks appended this step, each slot's contiguous and in column order.
        a_slots = [appended] + [np.full(len(c.new_blocks), c.req.slot, np.int64) for c in chunks]
        a_blocks = [np.asarray([rt.owner[s].block_ids[-1] for s in appended.tolist()], np.int64)]
        a_blocks += [np.asarray(c.new_blocks, np.int64) for c in chunks]
        new = chunks[nc - admitted:] if admitted else []
        new_slots = np.fromiter((c.req.slot for c in new), np.int32, len(new))
        new_context = np.fromiter((c.start for c in new), np.int32, len(new))  # cached tokens it starts with
        sample = np.concatenate([np.ones(nd, np.int32), c_sample.astype(np.int32)])
        carry_index = np.concatenate([d_carry, np.full(nc, -1, np.int64)]).astype(np.int32)
        num_carried = int(np.count_nonzero(carried))
        plan = StepPlan(
            step_id=step, carry_from_step=step - 1 if num_carried else -1, flush=L.pipeline_depth == 1,
            rows=slots.astype(np.int32), query_start=qs,
            input_ids=np.concatenate([d_ids, *c_ids]).astype(np.int32),
            carry_index=carry_index, sample=sample,
            free_slots=rt.take_frees(), new_slots=new_slots, new_context=new_context,
            **new_slot_arrays([c.req for c in new]),
            append_slots=np.concatenate(a_slots).astype(np.int32),
            append_blocks=np.concatenate(a_blocks).astype(np.int32),
            request_ids="\n".join(c.req.client_id for c in new),
            check_state=L.check_state,
        )
        info = StepInfo(step, rt.owner[slots], sample.astype(bool), slots, T, num_carried,
                        rt.digest() if L.check_state else 0)
        assert num_carried == 0 or (self._in_flight and self._in_flight[-1].step_id == step - 1)
        self._in_flight.append(info)
        self._next_step += 1
        return plan, info

    # ---- results -------------------------------------------------------------------------------

    def process_result(self, result: StepResult) -> list[TokenEvent]:
        """`accept_result` then `take_events`: the result's token events, every row settled."""
        self.accept_result(result)
        return self.take_events()

    def accept_result(self, result: StepResult) -> None:
        """Applies `result` to the row counters and finishes the rows that end with it; the other rows'
        per-request Python (output_ids, token events) waits for `take_events`, so that the caller can
        build and send the next plan first: the steady decode path of `build_plan` reads only the row
        table's arrays. Any path that reads a request's tokens settles them first (`_settle`)."""
        assert self._in_flight, f"result for step {result.step_id} with nothing in flight"
        self._settle()  # at most one result's rows wait at a time
        info = self._in_flight.popleft()
        assert result.step_id == info.step_id, f"result for step {result.step_id}, expected {info.step_id}"
        assert result.sampled.shape == (len(info.requests),)
        if info.digest and result.state_digest != info.digest:
            raise StateMismatch(f"step {info.step_id}: the worker's row slots disagree with the scheduler's "
                                f"(digest {result.state_digest:#x}, expected {info.digest:#x})")
        rt = self.rows
        rows = np.flatnonzero(info.sample)
        slots = info.slots[rows]
        # A slot still active belongs to the request it had when the step was sent: slots are reused
        # only after this step has reported. Those rows' counters move with array operations.
        live = rt.active[slots]
        tokens = result.sampled[rows]
        ls = slots[live]
        rt.inflight[ls] -= 1
        rt.known[ls] += 1
        rt.last_token[ls] = tokens[live]
        at_cap = np.zeros(rows.size, bool)
        at_cap[live] = rt.known[ls] >= rt.cap[ls]
        # The worker's sampler marks a row whose logits were not finite with a NaN logprob.
        broken = np.isnan(result.logprob[rows]) if result.logprob is not None else np.zeros(rows.size, bool)
        # Rows that may end here go now, one by one: not live, broken, at their cap, or a token that is
        # some running request's EOS or stop token (a superset: the exact test is per request).
        ends = ~live | broken | at_cap | (tokens < 0)
        if self._stop_ids.size:
            ends |= np.isin(tokens, self._stop_ids)
        now = time.monotonic()
        for i in np.flatnonzero(ends).tolist():
            self._end_row(info, result, int(rows[i]), int(tokens[i]), bool(live[i]), bool(at_cap[i]),
                          bool(broken[i]), now)
        keep = ~ends
        if keep.any():
            self._unsettled = (info, result, rows[keep], tokens[keep], now)
        self.blocks.release_through(info.step_id)
        rt.pool.release_through(info.step_id)

    def take_events(self) -> list[TokenEvent]:
        """The token events since the last call, every accepted row settled."""
        self._settle()
        events, self._events = self._events, []
        return events

    def _settle(self) -> None:
        """The deferred rows of the last accepted result: their tokens appended, their events made."""
        if self._unsettled is None:
            return
        info, result, rows, tokens, now = self._unsettled
        self._unsettled = None
        events = self._events
        reqs = info.requests[rows]
        want_logprobs = result.logprob is not None
        for r, req, token in zip(rows.tolist(), reqs.tolist(), tokens.tolist(), strict=True):
            assert req.rows is not None, "a request left its slot with a token unsettled"
            req.output_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = now
            if want_logprobs and req.sampling.num_logprobs >= 0:
                logprob, top = self._logprobs(result, r, req)
            else:
                logprob, top = None, None
            events.append(TokenEvent(req, token, logprob, top, None))

    def _end_row(self, info: StepInfo, result: StepResult, r: int, token: int, is_live: bool, cap_hit: bool,
                 bad: bool, now: float) -> None:
        """One sampled row that may end its request (or was preempted, or belongs to one that ended)."""
        req = info.requests[r]
        if not is_live:
            if req.is_finished:
                return  # the overrun of a request already finished: discarded
            # Preempted with this sample in flight: it waits, its counters in its own fields.
            req._inflight -= 1
            assert req._inflight >= 0
            if req._inflight == 0:
                req._last_sample = None
            cap_hit = req.num_known_tokens + 1 >= min(req.token_cap, self.limits.max_context)
        if bad:
            self._events.append(TokenEvent(req, -1, None, None, FinishReason.ABORTED, error="non-finite logits"))
            self._finish(req, FinishReason.ABORTED)
            return
        assert token >= 0, f"step {info.step_id} row {r} sampled nothing"
        req.output_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        if token in req.eos_token_ids and not req.ignore_eos:
            finish = FinishReason.EOS
        elif token in req.stop_token_ids:
            finish = FinishReason.STOP_TOKEN
        elif cap_hit:
            finish = FinishReason.LENGTH
        else:
            finish = None
        if result.logprob is not None and req.sampling.num_logprobs >= 0:
            logprob, top = self._logprobs(result, r, req)
        else:
            logprob, top = None, None
        self._events.append(TokenEvent(req, token, logprob, top, finish))
        if finish is not None:
            self._finish(req, finish)

    @staticmethod
    def _logprobs(
        result: StepResult, r: int, req: Request
    ) -> tuple[float | None, list[tuple[int, float]] | None]:
        n = req.sampling.num_logprobs
        if n < 0 or result.logprob is None:
            return None, None
        top = None
        if n > 0 and result.top_ids is not None and result.top_logprobs is not None:
            k = min(n, result.top_ids.shape[1])
            top = list(zip(result.top_ids[r, :k].tolist(), result.top_logprobs[r, :k].tolist(), strict=True))
        return float(result.logprob[r]), top
