"""Continuous-batching scheduler: which tokens of which requests go into each step, and what came back.

Owns the waiting queue, the running set, the KV block tables and the steps in flight. Pure Python +
numpy (never torch). The engine loop calls `build_plan` while fewer than `pipeline_depth` steps are in
flight and `process_result` for every result, in step order; the plan returned counts as sent.

Running ahead (depth 2) is made safe here, not in the worker:
- a decode whose input token is the in-flight step's sample carries it over (input 0 + carry_index);
  one whose pending sample comes from an older in-flight step waits;
- a sample is never scheduled past max_new_tokens or max_context (in-flight samples count);
- EOS / stop-token / outside `finish` may leave one step in flight: its rows are discarded;
- blocks of a finished, aborted or preempted request are freed tagged with the last step sent, and
  return to the pool only when that step has reported.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import numpy as np
from tandem.wire import StepPlan, StepResult

from scheduler_svc.block_manager import BlockManager, cdiv
from scheduler_svc.request import FinishReason, Request, RequestStatus


class QueueFull(Exception):
    """The waiting queue is at its limit; the client may retry later."""


class NeverFits(ValueError):
    """The request cannot run even alone on an empty worker."""


@dataclass(frozen=True)
class SchedulerLimits:
    num_blocks: int
    block_size: int
    max_num_tokens: int  # token budget of one step
    max_num_rows: int
    max_blocks_per_row: int
    max_context: int
    max_waiting: int
    pipeline_depth: int = 1
    placeholder: int = 0  # input id of a carry-over row; wire.PLACEHOLDER_SENTINEL in debug mode

    def __post_init__(self) -> None:
        assert self.pipeline_depth in (1, 2), "pipeline depth is 1 (sync) or 2 (async)"
        assert min(self.num_blocks, self.block_size, self.max_num_tokens, self.max_num_rows,
                   self.max_blocks_per_row, self.max_context) > 0


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
    requests: list[Request]  # row -> request
    sample: list[bool]  # row -> whether it samples
    num_tokens: int
    num_carried: int


@dataclass
class _Row:
    req: Request
    start: int  # first position scheduled
    n: int  # tokens scheduled
    carry: int  # row of the previous step whose sample is this row's input; -1 = none


class Scheduler:
    def __init__(self, limits: SchedulerLimits) -> None:
        self.limits = limits
        self.num_preemptions = 0
        self._reset()

    def _reset(self) -> None:
        self.blocks = BlockManager(self.limits.num_blocks, self.limits.block_size)
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._waiting: deque[Request] = deque()
        self._running: dict[str, Request] = {}  # admission order: the last one is preempted first
        self._in_flight: deque[StepInfo] = deque()
        self._next_step = 0

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
        """Block accounting invariants; when idle, every block must be back in the pool."""
        self.blocks.check_integrity()
        owned = [b for req in self._running.values() for b in req.block_ids]
        assert len(owned) == len(set(owned)) == self.blocks.num_used, "block owned twice or leaked"
        for req in self._running.values():
            assert len(req.block_ids) == self.blocks.blocks_for(req.num_computed)
        for req in self._waiting:
            assert not req.block_ids and req.num_computed == 0
        assert len(self._requests) == len(self._running) + len(self._waiting)
        if self.is_idle:
            assert self.blocks.num_used == 0 and self.blocks.num_pending == 0
            assert self.blocks.num_free == self.limits.num_blocks

    # ---- requests in and out -------------------------------------------------------------------

    def add(self, req: Request) -> None:
        L = self.limits
        assert req.req_id not in self._requests, f"duplicate request id {req.req_id}"
        assert req.status is RequestStatus.WAITING and not req.output_ids and req.num_computed == 0
        total = req.num_prompt_tokens + req.max_new_tokens
        if total > L.max_context:
            raise NeverFits(f"{req.num_prompt_tokens} prompt + {req.max_new_tokens} new tokens exceed the "
                            f"{L.max_context}-token context")
        # The last sampled token is never written to the KV cache.
        blocks = cdiv(total - 1, L.block_size)
        if blocks > min(L.max_blocks_per_row, L.num_blocks):
            raise NeverFits(f"{req.num_prompt_tokens} prompt + {req.max_new_tokens} new tokens need {blocks} "
                            f"KV blocks of {L.block_size}; the worker allows {L.max_blocks_per_row} per "
                            f"request and has {L.num_blocks}")
        if len(self._waiting) >= L.max_waiting:
            raise QueueFull(f"{len(self._waiting)} requests waiting (limit {L.max_waiting})")
        self._requests[req.req_id] = req
        self._waiting.append(req)

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
        """The worker is gone: removes and returns every unfinished request; fresh state for the next."""
        lost = list(self._requests.values())
        now = time.monotonic()
        for req in lost:
            req.status, req.finish_reason, req.finish_time = RequestStatus.FINISHED, FinishReason.ABORTED, now
            req.block_ids = []
            req.num_inflight, req.last_sample = 0, None
        self._reset()
        return lost

    def _finish(self, req: Request, reason: FinishReason) -> None:
        del self._requests[req.req_id]
        if req.status is RequestStatus.RUNNING:
            del self._running[req.req_id]
        else:
            self._waiting.remove(req)
        self._free_blocks(req)
        req.status, req.finish_reason, req.finish_time = RequestStatus.FINISHED, reason, time.monotonic()

    def _free_blocks(self, req: Request) -> None:
        # Every step sent so far may write or read these blocks: return them after the last one reports.
        self.blocks.free_after(self._next_step - 1, req.block_ids)
        req.block_ids = []

    def _preempt(self, req: Request) -> None:
        """Recompute-preemption: drop its KV; it rejoins the queue's front with prompt + outputs to redo."""
        del self._running[req.req_id]
        self._free_blocks(req)
        req.num_computed = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(req)

    # ---- building a step -----------------------------------------------------------------------

    def build_plan(self) -> tuple[StepPlan, StepInfo] | None:
        L = self.limits
        assert len(self._in_flight) < L.pipeline_depth, "build_plan with the pipeline full"
        step = self._next_step
        rows: list[_Row] = []
        scheduled: set[str] = set()
        budget = L.max_num_tokens
        preemptions_before = self.num_preemptions
        stalled = False  # a running request went without KV blocks: admit nobody new this step

        # Running requests in admission order: decodes (one token) first, then continuing prefills.
        for decode_pass in (True, False):
            for req in list(self._running.values()):
                if len(rows) == L.max_num_rows or budget == 0:
                    break
                if req.req_id in scheduled or req.status is not RequestStatus.RUNNING:
                    continue  # preempted earlier in this build
                if (req.num_to_compute == 1) != decode_pass or not self._may_sample(req):
                    continue
                carry = -1
                if req.num_inflight > 0:
                    assert req.num_to_compute == 1 and req.last_sample is not None
                    if req.last_sample[0] != step - 1:
                        continue  # its input comes from an older in-flight step: not carried over
                    carry = req.last_sample[1]
                if decode_pass:
                    n = 1 if self._reserve(req, req.num_computed + 1, scheduled) else 0
                else:
                    n = self._fit_chunk(req, min(req.num_to_compute, budget), scheduled)
                if n == 0:
                    stalled = True
                    continue
                rows.append(_Row(req, req.num_computed, n, carry))
                scheduled.add(req.req_id)
                budget -= n

        # Admit waiting requests FIFO, chunking the prompt to the budget and the free blocks.
        if not stalled and self.num_preemptions == preemptions_before:
            while self._waiting and len(rows) < L.max_num_rows and budget > 0:
                req = self._waiting[0]
                if req.num_inflight > 0:
                    break  # preempted with a sample in flight: recompute once it has arrived
                n = min(req.num_to_compute, budget, self.blocks.num_free * L.block_size)
                if n == 0:
                    break
                self._waiting.popleft()
                req.status = RequestStatus.RUNNING
                self._running[req.req_id] = req
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                grown = self.blocks.grow(req.block_ids, n)
                assert grown
                rows.append(_Row(req, 0, n, -1))
                scheduled.add(req.req_id)
                budget -= n

        if not rows:
            return None
        return self._emit(step, rows)

    def _may_sample(self, req: Request) -> bool:
        """False when the in-flight samples already reach max_new_tokens or the context: nothing to do."""
        return (req.num_promised_outputs < req.max_new_tokens
                and req.num_tokens < self.limits.max_context)

    def _reserve(self, req: Request, kv_len: int, scheduled: set[str]) -> bool:
        need = self.blocks.blocks_for(kv_len) - len(req.block_ids)
        if need > 0 and not self._make_room(req, need, scheduled):
            return False
        grown = self.blocks.grow(req.block_ids, kv_len)
        assert grown
        return True

    def _fit_chunk(self, req: Request, n: int, scheduled: set[str]) -> int:
        """Shrinks a prefill chunk to the free blocks (preempting only if not one token fits)."""
        bs = self.limits.block_size
        room = (len(req.block_ids) + self.blocks.num_free) * bs - req.num_computed
        if room <= 0:
            if not self._make_room(req, 1, scheduled):
                return 0
            room = (len(req.block_ids) + self.blocks.num_free) * bs - req.num_computed
        n = min(n, room)
        grown = self.blocks.grow(req.block_ids, req.num_computed + n)
        assert grown
        return n

    def _make_room(self, req: Request, need: int, scheduled: set[str]) -> bool:
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
                if r.req_id not in scheduled:
                    victim = r
                    break
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _emit(self, step: int, rows: list[_Row]) -> tuple[StepPlan, StepInfo]:
        """Fills the plan's arrays (engine.proto) and commits the rows to the requests' state."""
        L, bs = self.limits, self.limits.block_size
        R = len(rows)
        qs = np.zeros(R + 1, np.int32)
        qs[1:] = np.cumsum([row.n for row in rows])
        T = int(qs[-1])
        width = max(len(row.req.block_ids) for row in rows)
        assert T <= L.max_num_tokens and R <= L.max_num_rows and width <= L.max_blocks_per_row
        # Built as Python lists and converted once: per-row numpy calls cost more than the rows' work.
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        kv_lens: list[int] = []
        carry: list[int] = []
        sample: list[int] = []
        table_cells: list[int] = []  # every row's block ids, concatenated
        table_lens: list[int] = []
        params: list[tuple[float, float, int, float, int, int]] = []

        for r, row in enumerate(rows):
            req = row.req
            start, end = row.start, row.start + row.n
            assert start == req.num_computed and end <= req.num_tokens
            table = req.block_ids
            assert len(table) == self.blocks.blocks_for(end)
            if row.n == 1:  # decode (or a one-token chunk): no ranges to build
                positions.append(start)
                slot_mapping.append(table[start // bs] * bs + start % bs)
            else:
                span = range(start, end)
                positions.extend(span)
                slot_mapping.extend(table[p // bs] * bs + p % bs for p in span)
            table_cells.extend(table)
            table_lens.append(len(table))
            kv_lens.append(end)
            if row.carry >= 0:
                assert row.n == 1
                carry.append(row.carry)
                input_ids.append(L.placeholder)
            else:
                carry.append(-1)
                input_ids.extend(req.token_ids(start, end))
            sp = req.sampling
            params.append((sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.seed, sp.num_logprobs))
            req.num_computed = end
            if end == req.num_tokens:  # its last scheduled token is the last token it has: sample
                assert self._may_sample(req)
                sample.append(1)
                req.num_inflight += 1
                req.last_sample = (step, r)
            else:
                sample.append(0)

        # Each row's block ids go to the left of its block-table row, -1 after them.
        lens = np.asarray(table_lens, np.int64)
        row_of_cell = np.repeat(np.arange(R), lens)
        col_of_cell = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)
        block_tables = np.full((R, width), -1, np.int32)
        block_tables[row_of_cell, col_of_cell] = table_cells
        temperature, top_p, top_k, min_p, seed, num_logprobs = zip(*params, strict=True)
        carry_index = np.asarray(carry, np.int32)
        num_carried = int(np.count_nonzero(carry_index >= 0))
        plan = StepPlan(
            step_id=step, carry_from_step=step - 1 if num_carried else -1,
            flush=L.pipeline_depth == 1, input_ids=np.asarray(input_ids, np.int32),
            positions=np.asarray(positions, np.int32), slot_mapping=np.asarray(slot_mapping, np.int32),
            query_start=qs, kv_lens=np.asarray(kv_lens, np.int32), block_tables=block_tables,
            carry_index=carry_index, sample=np.asarray(sample, np.int32),
            temperature=np.asarray(temperature, np.float32), top_p=np.asarray(top_p, np.float32),
            top_k=np.asarray(top_k, np.int32), min_p=np.asarray(min_p, np.float32),
            seed=np.asarray(seed, np.uint64), num_logprobs=np.asarray(num_logprobs, np.int32),
            request_ids="\n".join(row.req.client_id for row in rows),
        )
        info = StepInfo(step, [row.req for row in rows], [bool(x) for x in sample], T, num_carried)
        assert num_carried == 0 or (self._in_flight and self._in_flight[-1].step_id == step - 1)
        self._in_flight.append(info)
        self._next_step += 1
        return plan, info

    # ---- results -------------------------------------------------------------------------------

    def process_result(self, result: StepResult) -> list[TokenEvent]:
        assert self._in_flight, f"result for step {result.step_id} with nothing in flight"
        info = self._in_flight.popleft()
        assert result.step_id == info.step_id, f"result for step {result.step_id}, expected {info.step_id}"
        assert result.sampled.shape == (len(info.requests),)
        events: list[TokenEvent] = []
        # The worker's sampler marks a row whose logits were not finite with a NaN logprob.
        broken = np.isnan(result.logprob) if result.logprob is not None else None
        for r, req in enumerate(info.requests):
            if not info.sample[r] or req.is_finished:
                continue  # a prefill chunk, or the overrun of a request already finished: discarded
            req.num_inflight -= 1
            assert req.num_inflight >= 0
            if req.num_inflight == 0:
                req.last_sample = None
            if broken is not None and broken[r]:
                events.append(TokenEvent(req, -1, None, None, FinishReason.ABORTED, error="non-finite logits"))
                self._finish(req, FinishReason.ABORTED)
                continue
            token = int(result.sampled[r])
            assert token >= 0, f"step {info.step_id} row {r} sampled nothing"
            req.output_ids.append(token)
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            events.append(TokenEvent(req, token, *self._logprobs(result, r, req), self._finish_reason(req)))
            if events[-1].finish is not None:
                self._finish(req, events[-1].finish)
        self.blocks.release_through(info.step_id)
        return events

    def _finish_reason(self, req: Request) -> FinishReason | None:
        token = req.output_ids[-1]
        if token in req.eos_token_ids and not req.ignore_eos:
            return FinishReason.EOS
        if token in req.stop_token_ids:
            return FinishReason.STOP_TOKEN
        if req.num_output_tokens >= req.max_new_tokens or req.num_known_tokens >= self.limits.max_context:
            return FinishReason.LENGTH
        return None

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
