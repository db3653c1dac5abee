"""The engine link's structured-output messages (COMPILE, COMPILED, RELEASE) and plans round-trip, and
garbage is a WireError, not a crash."""

from __future__ import annotations

import numpy as np
import pytest
from tandem import wire


def test_compile_compiled_release_round_trip():
    specs = [("k1", "json_schema", '{"type": "object"}'), ("k2", "choice", '["a", "b"]')]
    kind, header, frames = wire.split(wire.compile_message(specs))
    assert kind == wire.KIND_COMPILE and frames == [] and wire.decode_compile(header) == specs
    kind, header, _ = wire.split(wire.compiled_message("k1", False, "Unsupported type", 12.5))
    assert kind == wire.KIND_COMPILED and wire.decode_compiled(header) == ("k1", False, "Unsupported type", 12.5)
    kind, header, _ = wire.split(wire.release_message(["k1", "k2"]))
    assert kind == wire.KIND_RELEASE and wire.decode_release(header) == ["k1", "k2"]


@pytest.mark.parametrize("decode", [wire.decode_compile, wire.decode_compiled, wire.decode_release])
def test_garbage_is_a_wire_error(decode):
    with pytest.raises(wire.WireError):
        decode(b"\xff\xff\xff")


def test_hello_carries_the_grammar_engine():
    hello = wire.Hello(worker_id="w", pid=1, model_name="m", vocab_size=8, eos_token_ids=[2], max_context=16,
                       dtype="float32", device="cpu", num_blocks=4, block_size=4, max_num_tokens=8, max_num_rows=2,
                       max_blocks_per_row=4, tokenizer_json=b"", grammar_engine="xgrammar 0.2.9")
    assert wire.Hello.from_header(hello.encode()[1]).grammar_engine == "xgrammar 0.2.9"


def _plan(**kw) -> wire.StepPlan:
    base = dict(step_id=3, carry_from_step=2, flush=False, rows=np.array([0, 1], np.int32),
                query_start=np.array([0, 1, 2], np.int32), input_ids=np.array([0, 0], np.int32),
                carry_index=np.array([0, 1], np.int32), sample=np.array([1, 1], np.int32))
    return wire.StepPlan(**{**base, **kw})


def test_a_plan_sends_only_its_nonempty_arrays_and_decodes_whole():
    """Protocol 4: a steady decode plan carries five array frames (its rows'), not every array."""
    plan = _plan(append_slots=np.array([1], np.int32), append_blocks=np.array([9], np.int32))
    kind, header, frames = wire.split(plan.encode())
    assert kind == wire.KIND_PLAN and len(frames) == 7
    back = wire.StepPlan.decode(header, frames)
    for name, dtype in wire.PLAN_ARRAYS.items():
        arr = getattr(back, name)
        assert arr.dtype == np.dtype(dtype) and np.array_equal(arr, getattr(plan, name)), name
    back.validate(max_tokens=8, max_rows=4, vocab_size=16)


@pytest.mark.parametrize("names", [["sample", "rows"], ["rows", "rows"], ["rows", "no_such_array"]])
def test_plan_arrays_out_of_order_repeated_or_unknown_are_refused(names):
    arrays = {n: np.zeros(2, np.int32) for n in names}
    specs, frames = wire.pack_arrays(arrays)
    if len(set(names)) < len(names):  # a dict cannot hold the repeat: spell the header out
        specs, frames = specs * 2, frames * 2
    header = wire.pb.StepPlanHeader(step_id=0, carry_from_step=-1, arrays=specs).SerializeToString()
    with pytest.raises(wire.WireError, match="plan arrays"):
        wire.StepPlan.decode(header, [bytes(f) for f in frames])
