"""The worker's half of the persistent batch: what each row slot holds across steps.

Owns, per row slot, the request's block table (a host mirror of the device-resident table the
kernels read), its context length and its sampling parameters and seed, and turns each incremental
StepPlan (engine.proto) into a `StepBatch`: the step's rows resolved against that state, with the
positions and KV slots of its tokens, ready for an I/O slot. numpy only, no torch.

`prepare` checks the whole plan against the state before changing anything, so a refused plan
(WireError) leaves every slot as it was: an out-of-range index reaching a kernel would be a device
assert on CUDA, which kills the process. Work per step is O(rows + tokens + appended blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tandem import wire
from tandem.wire import StepPlan, WireError

MAX_TOP_LOGPROBS = 20  # most alternatives a row may ask for (the scheduler's limit too)


@dataclass
class StepBatch:
    """One step's host arrays once resolved against the row slots (R rows, T tokens, A appends)."""

    step_id: int
    carry_from_step: int
    rows: np.ndarray  # int32 [R]: row -> slot, i.e. its row of the block table
    query_start: np.ndarray  # int32 [R + 1]
    input_ids: np.ndarray  # int32 [T]
    positions: np.ndarray  # int32 [T]
    slot_mapping: np.ndarray  # int32 [T]: KV slot each token writes; -1 = nowhere (padding)
    kv_lens: np.ndarray  # int32 [R]: context length once this step's tokens are written
    carry_index: np.ndarray  # int32 [R]
    sample: np.ndarray  # int32 [R]
    temperature: np.ndarray  # float32 [R]
    top_p: np.ndarray  # float32 [R]
    top_k: np.ndarray  # int32 [R]
    min_p: np.ndarray  # float32 [R]
    seed: np.ndarray  # uint64 [R]
    num_logprobs: np.ndarray  # int32 [R]
    append_slots: np.ndarray  # int32 [A]: block-table cells this step sets, before its forward
    append_cols: np.ndarray  # int32 [A]
    append_blocks: np.ndarray  # int32 [A]

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == self.num_rows


def _run_ranks(keys: np.ndarray) -> tuple[np.ndarray, int]:
    """For a 1-D array, each element's index within its run of equal neighbours, and the run count."""
    if keys.size == 0:
        return keys.astype(np.int64), 0
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    run_of = np.cumsum(np.r_[True, keys[1:] != keys[:-1]]) - 1
    return np.arange(keys.size) - starts[run_of], int(starts.size)


@dataclass
class _Checked:
    """The slot columns as they stand once a checked plan is applied."""

    active: np.ndarray
    append_cols: np.ndarray  # the block-table column of each appended block
    num_blocks: np.ndarray
    context: np.ndarray  # after the step's rows


class RowState:
    def __init__(self, num_slots: int, max_blocks_per_row: int, block_size: int, num_blocks: int,
                 max_context: int) -> None:
        self.num_slots = num_slots
        self.max_blocks_per_row = max_blocks_per_row
        self.block_size = block_size
        self.num_kv_blocks = num_blocks
        self.max_context = max_context
        n = num_slots
        self.table = np.full((n, max_blocks_per_row), -1, np.int32)  # mirror of the device table
        self.num_blocks = np.zeros(n, np.int64)
        self.context = np.zeros(n, np.int64)
        self.active = np.zeros(n, bool)
        self.temperature = np.zeros(n, np.float32)
        self.top_p = np.ones(n, np.float32)
        self.top_k = np.zeros(n, np.int32)
        self.min_p = np.zeros(n, np.float32)
        self.seed = np.zeros(n, np.uint64)
        self.num_logprobs = np.full(n, -1, np.int32)
        self.request_ids = [""] * n  # for logs

    def reset(self) -> None:
        self.active[:] = False
        self.num_blocks[:] = 0
        self.context[:] = 0

    def prepare(self, plan: StepPlan, max_tokens: int, vocab_size: int) -> StepBatch:
        """Checks `plan` against the slots (WireError, nothing changed), applies it, returns the batch."""
        plan.validate(max_tokens, self.num_slots, vocab_size)
        return self._apply(plan, self._check(plan))

    def _check(self, plan: StepPlan) -> _Checked:
        """Every check on copies of the slot columns; the copies are the state after the plan, which
        `_apply` then takes as it is. A steady decode plan frees and starts nothing: those checks go."""
        free, new, rows = plan.free_slots, plan.new_slots, plan.rows
        active = self.active.copy()
        base_blocks = self.num_blocks.copy()
        context = self.context.copy()
        if free.size:
            if not np.all(self.active[free]):
                raise WireError("free_slots: a slot that holds no request")
            active[free] = False
            base_blocks[free] = context[free] = 0
        if new.size:
            if np.any(active[new]):
                raise WireError("new_slots: a slot still in use")
            active[new] = True
            t, p, k, m = plan.new_temperature, plan.new_top_p, plan.new_top_k, plan.new_min_p
            if not (np.all(t >= 0) and np.all((p > 0) & (p <= 1)) and np.all(k >= 0)
                    and np.all((m >= 0) & (m <= 1))):
                raise WireError("sampling parameter out of range")
            if np.any(plan.new_num_logprobs < -1) or np.any(plan.new_num_logprobs > MAX_TOP_LOGPROBS):
                raise WireError(f"num_logprobs outside [-1, {MAX_TOP_LOGPROBS}]")
            if np.any(plan.new_context < 0):
                raise WireError("new_context: negative")
            base_blocks[new] = 0
            context[new] = plan.new_context
        a_slots, a_blocks = plan.append_slots, plan.append_blocks
        num_blocks = base_blocks
        ranks = np.zeros(0, np.int64)
        if a_slots.size:
            if not np.all(active[a_slots]):
                raise WireError("append_slots: a slot that holds no request")
            ranks, runs = _run_ranks(a_slots)
            counts = np.bincount(a_slots, minlength=self.num_slots)
            if runs != np.count_nonzero(counts):
                raise WireError("append_slots: one slot's appends are not contiguous")
            if a_blocks.min() < 0 or a_blocks.max() >= self.num_kv_blocks:
                raise WireError(f"append_blocks: block id outside [0, {self.num_kv_blocks})")
            num_blocks = base_blocks + counts
            if num_blocks.max() > self.max_blocks_per_row:
                raise WireError(f"a block table longer than {self.max_blocks_per_row} blocks")
        if not np.all(active[rows]):
            raise WireError("rows: a slot that holds no request")
        kv = context[rows] + np.diff(plan.query_start)
        if kv.max() > self.max_context:
            raise WireError(f"a row's context past max_context {self.max_context}")
        if np.any(kv > num_blocks[rows] * self.block_size):
            raise WireError("a row's context is longer than its block table")
        context[rows] = kv
        return _Checked(active, base_blocks[a_slots] + ranks, num_blocks, context)

    def _apply(self, plan: StepPlan, checked: _Checked) -> StepBatch:
        free, new, rows, qs = plan.free_slots, plan.new_slots, plan.rows, plan.query_start
        for s in free.tolist():
            self.request_ids[s] = ""
        self.active, self.num_blocks, self.context = checked.active, checked.num_blocks, checked.context
        if new.size:  # a steady decode plan starts nothing
            self.temperature[new], self.top_p[new] = plan.new_temperature, plan.new_top_p
            self.top_k[new], self.min_p[new] = plan.new_top_k, plan.new_min_p
            self.seed[new], self.num_logprobs[new] = plan.new_seed, plan.new_num_logprobs
            for s, rid in zip(new.tolist(), plan.new_request_ids(), strict=True):
                self.request_ids[s] = rid
        a_slots = plan.append_slots
        a_cols = checked.append_cols.astype(np.int32)
        if a_slots.size:
            self.table[a_slots, a_cols] = plan.append_blocks

        n = np.diff(qs)
        kv = self.context[rows]
        if plan.num_tokens == plan.num_rows:  # decode-only: one token per row, at the row's last position
            positions = kv - 1
            table_rows = rows
        else:
            positions = np.repeat(kv - n, n) + np.arange(plan.num_tokens) - np.repeat(qs[:-1].astype(np.int64), n)
            table_rows = np.repeat(rows, n)
        bs = self.block_size
        slot_mapping = self.table[table_rows, positions // bs].astype(np.int64) * bs + positions % bs
        return StepBatch(
            step_id=plan.step_id, carry_from_step=plan.carry_from_step, rows=rows, query_start=qs,
            input_ids=plan.input_ids, positions=positions.astype(np.int32),
            slot_mapping=slot_mapping.astype(np.int32), kv_lens=kv.astype(np.int32),
            carry_index=plan.carry_index, sample=plan.sample,
            temperature=self.temperature[rows], top_p=self.top_p[rows], top_k=self.top_k[rows],
            min_p=self.min_p[rows], seed=self.seed[rows], num_logprobs=self.num_logprobs[rows],
            append_slots=a_slots, append_cols=a_cols, append_blocks=plan.append_blocks,
        )

    def digest(self) -> int:
        """wire.state_digest of the slots (the debug check against the scheduler's RowTable)."""
        slots = np.flatnonzero(self.active)
        nb = self.num_blocks[slots]
        held = np.arange(self.max_blocks_per_row)[None, :] < nb[:, None]
        return wire.state_digest(slots, self.context[slots], nb, self.table[slots][held])
