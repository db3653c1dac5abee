"""The worker's plan checks refuse every malformed or unsafe plan with its own reason and leave the row
slots as they were: `StepPlan.validate` (shapes and ranges) and `RowState` (against the slots' state),
through `RowState.prepare`, the call Engine.launch makes before touching any buffer. Each bad plan
is a good decode plan with one thing changed; the good one is accepted."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from tandem import wire
from tandem.wire import StepPlan, WireError

from worker_svc.row_state import RowState

SLOTS, WIDTH, BS, BLOCKS, CONTEXT, VOCAB, MAX_TOKENS = 4, 4, 4, 16, 16, 50, 16


def i32(*xs: int) -> np.ndarray:
    return np.array(xs, np.int32)


def new_slot_arrays(slots: list[int], **over) -> dict:
    n = len(slots)
    base = dict(new_slots=i32(*slots), new_context=np.zeros(n, np.int32), new_temperature=np.zeros(n, np.float32),
                new_top_p=np.ones(n, np.float32), new_top_k=np.zeros(n, np.int32), new_min_p=np.zeros(n, np.float32),
                new_seed=np.zeros(n, np.uint64), new_num_logprobs=np.full(n, -1, np.int32))
    return {**base, **over}


def started() -> RowState:
    """Slots 0 and 1 hold a request each: prompts of 3 and 2 tokens, one block each."""
    rows = RowState(SLOTS, WIDTH, BS, BLOCKS, CONTEXT)
    rows.prepare(StepPlan(step_id=0, carry_from_step=-1, flush=False, rows=i32(0, 1), query_start=i32(0, 3, 5),
                          input_ids=i32(5, 6, 7, 8, 9), carry_index=i32(-1, -1), sample=i32(1, 1),
                          append_slots=i32(0, 1), append_blocks=i32(3, 4), **new_slot_arrays([0, 1])),
                 MAX_TOKENS, VOCAB)
    return rows


def decode(**over) -> StepPlan:
    plan = StepPlan(step_id=1, carry_from_step=0, flush=False, rows=i32(0, 1), query_start=i32(0, 1, 2),
                    input_ids=i32(0, 0), carry_index=i32(0, 1), sample=i32(1, 1))
    return dataclasses.replace(plan, **over)


def snapshot(rows: RowState) -> list[np.ndarray]:
    return [a.copy() for a in (rows.active, rows.num_blocks, rows.context, rows.table, rows.temperature)]


def test_the_good_decode_plan_is_accepted():
    rows = started()
    batch = rows.prepare(decode(), MAX_TOKENS, VOCAB)
    assert batch.kv_lens.tolist() == [4, 3] and batch.positions.tolist() == [3, 2]
    assert batch.slot_mapping.tolist() == [3 * BS + 3, 4 * BS + 2]


BAD: list[tuple[str, dict]] = [
    # StepPlan.validate: shapes and ranges
    ("slot listed twice", dict(rows=i32(0, 0))),
    ("strictly increasing", dict(query_start=i32(0, 2, 2), input_ids=i32(0, 0), carry_index=i32(-1, -1))),
    ("outside the vocabulary", dict(input_ids=i32(0, VOCAB))),
    ("outside the vocabulary", dict(input_ids=i32(0, -3))),
    ("carry_index set but carry_from_step", dict(carry_from_step=-1)),
    ("several tokens", dict(query_start=i32(0, 2, 3), input_ids=i32(0, 1, 0))),
    ("entries without a new slot", dict(bias_ids=i32(3), bias_values=np.ones(1, np.float32))),
    ("slot outside", dict(rows=i32(0, SLOTS))),
    ("append_blocks and append_slots differ", dict(append_slots=i32(0), append_blocks=i32(5, 6))),
    # RowState: against the slots' state
    ("free_slots: a slot that holds no request", dict(free_slots=i32(2))),
    ("new_slots: a slot still in use", new_slot_arrays([0])),
    ("sampling parameter out of range", new_slot_arrays([2], new_temperature=np.full(1, -1, np.float32))),
    ("num_logprobs outside", new_slot_arrays([2], new_num_logprobs=i32(21))),
    ("new_context: negative", new_slot_arrays([2], new_context=i32(-1))),
    ("append_slots: a slot that holds no request", dict(append_slots=i32(3), append_blocks=i32(5))),
    ("not contiguous", dict(append_slots=i32(0, 1, 0), append_blocks=i32(5, 6, 7))),
    ("block id outside", dict(append_slots=i32(0), append_blocks=i32(BLOCKS))),
    ("block table longer", dict(append_slots=i32(0, 0, 0, 0), append_blocks=i32(5, 6, 7, 8))),
    ("rows: a slot that holds no request", dict(rows=i32(0, 3))),
    ("longer than its block table", dict(query_start=i32(0, 1, 4), input_ids=i32(0, 1, 2, 3), carry_index=i32(0, -1))),
    ("past max_context", dict(rows=i32(0), query_start=i32(0, 14), input_ids=np.ones(14, np.int32),
                              carry_index=i32(-1), sample=i32(1), append_slots=i32(0, 0, 0),
                              append_blocks=i32(5, 6, 7))),
]


@pytest.mark.parametrize(("why", "change"), BAD, ids=[f"{i}-{w}" for i, (w, _) in enumerate(BAD)])
def test_a_bad_plan_is_refused_with_its_reason_and_changes_nothing(why: str, change: dict):
    rows = started()
    before = snapshot(rows)
    with pytest.raises(WireError, match=why):
        rows.prepare(decode(**change), MAX_TOKENS, VOCAB)
    for a, b in zip(before, snapshot(rows), strict=True):
        assert np.array_equal(a, b)
    rows.prepare(decode(), MAX_TOKENS, VOCAB)  # and the good plan still goes through afterwards


def test_a_steady_decode_plan_crosses_the_wire_without_its_empty_arrays():
    _kind, header, frames = wire.split(decode().encode())
    assert len(frames) == 5  # rows, query_start, input_ids, carry_index, sample
    rows = started()
    batch = rows.prepare(StepPlan.decode(header, frames), MAX_TOKENS, VOCAB)
    assert batch.kv_lens.tolist() == [4, 3]
