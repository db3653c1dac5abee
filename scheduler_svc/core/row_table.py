"""The scheduler's half of the persistent batch: one worker row slot per running request.

Owns which row slot each running request holds and that request's scheduling counters, as numpy
columns indexed by slot, so that the steady-state decode step is planned and its results applied
with a handful of array operations over every row instead of a Python loop per row
(`Scheduler.build_plan` / `process_result`). The worker keeps the matching state per slot (block
table, context length, sampling parameters): a StepPlan carries only the changes, and with
`check_state` both sides compare a digest of it after every step.

A slot, like a KV block, is reused only after every step sent while its request held it has
reported back (`DeferredPool`): until then a late result can still name it. Its release is sent to
the worker with the next plan (`take_frees`), which the worker applies before that plan's new rows.
"""

from __future__ import annotations

import numpy as np
from tandem import wire

from scheduler_svc.core.block_manager import DeferredPool
from scheduler_svc.core.request import Request


class RowTable:
    def __init__(self, num_slots: int, max_context: int) -> None:
        self.num_slots = num_slots
        self.max_context = max_context
        self.pool = DeferredPool(num_slots, "row slot")
        n = num_slots
        self.computed = np.zeros(n, np.int64)  # Request.num_computed
        self.inflight = np.zeros(n, np.int64)  # Request.num_inflight
        self.known = np.zeros(n, np.int64)  # prompt + confirmed outputs
        self.cap = np.zeros(n, np.int64)  # tokens it may reach: min(prompt + max_new_tokens, max_context)
        self.last_step = np.full(n, -1, np.int64)  # step of the newest in-flight sample (when inflight > 0)
        self.last_row = np.full(n, -1, np.int64)  # its row in that step
        self.last_token = np.zeros(n, np.int64)  # the last known token: a decode's input when nothing is in flight
        self.num_blocks = np.zeros(n, np.int64)  # len(block_ids)
        self.seq = np.zeros(n, np.int64)  # admission order: rows are planned oldest first
        self.active = np.zeros(n, bool)
        self.owner = np.full(n, None, object)
        self._next_seq = 0
        self._frees: list[int] = []  # released since the last plan: the next plan tells the worker
        self._order: np.ndarray | None = None

    def order(self) -> np.ndarray:
        """Slots of the running requests in admission order (cached until the set changes)."""
        if self._order is None:
            act = np.flatnonzero(self.active)
            self._order = act[np.argsort(self.seq[act], kind="stable")]
        return self._order

    def admit(self, req: Request) -> int:
        """Gives `req` a free slot and moves its counters into the slot's columns."""
        assert req.rows is None and req.slot < 0 and req.num_inflight == 0
        (s,) = self.pool.allocate(1)
        assert not self.active[s]
        self.computed[s] = req._computed
        self.inflight[s] = 0
        self.known[s] = req.num_known_tokens
        self.cap[s] = min(req.token_cap, self.max_context)
        self.last_step[s] = self.last_row[s] = -1
        self.last_token[s] = req.last_token
        self.num_blocks[s] = len(req.block_ids)
        self.seq[s] = self._next_seq
        self._next_seq += 1
        self.active[s] = True
        self.owner[s] = req
        req.slot, req.rows = s, self
        self._order = None
        return s

    def release(self, req: Request, last_step_sent: int) -> None:
        """`req` leaves its slot (finished or preempted): counters back into the request; the slot
        is reusable once `last_step_sent` has reported."""
        s = req.slot
        assert req.rows is self and self.owner[s] is req
        req._computed, req._inflight, req._last_sample = req.num_computed, req.num_inflight, req.last_sample
        req.slot, req.rows = -1, None
        self.active[s] = False
        self.owner[s] = None
        self.pool.free_after(last_step_sent, [s])
        self._frees.append(s)
        self._order = None

    def take_frees(self) -> np.ndarray:
        frees, self._frees = self._frees, []
        return np.asarray(frees, np.int32)

    def digest(self) -> int:
        """wire.state_digest of what the worker's slots hold once the plans sent so far are applied."""
        slots = np.flatnonzero(self.active)
        blocks = [b for s in slots.tolist() for b in self.owner[s].block_ids]
        return wire.state_digest(slots, self.computed[slots], self.num_blocks[slots], np.asarray(blocks, np.int64))

    def check_integrity(self, block_size: int) -> None:
        self.pool.check_integrity()
        act = np.flatnonzero(self.active)
        assert act.size == self.pool.num_used, "active slots != slots in use"
        for s in act.tolist():
            req = self.owner[s]
            assert req is not None and req.slot == s and req.rows is self
            assert self.known[s] == req.num_known_tokens, f"slot {s}: known tokens out of sync"
            assert self.num_blocks[s] == len(req.block_ids) == -(-int(self.computed[s]) // block_size)
            assert self.last_token[s] == req.last_token, f"slot {s}: last token out of sync"
