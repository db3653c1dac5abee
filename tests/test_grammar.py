"""The worker's grammar engine (worker_svc/structured/grammar.py) with the embedded model's tokenizer: compiles and
their errors, the compile thread, matchers walking valid outputs, EOS only at the end, the overrun
guard, replay after a preemption, and min_tokens holding stop tokens back."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

pytest.importorskip("xgrammar")

from worker_svc.structured.grammar import ALL_ALLOWED, GrammarEngine, GrammarRows  # noqa: E402

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
                     "required": ["name", "age"]})
VOCAB = 49152
EOS = 2


def _allowed(bitmask_row: torch.Tensor) -> set[int]:
    bits = (bitmask_row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return set(torch.nonzero(bits.flatten()[:VOCAB]).flatten().tolist())


@pytest.fixture(scope="module")
def engine(smol_tokenizer) -> GrammarEngine:
    return GrammarEngine(smol_tokenizer.backend_tokenizer.to_str().encode(), VOCAB, [EOS])


def test_compile_errors_carry_the_compilers_message(engine):
    with pytest.raises(ValueError, match='Unsupported type "strin"'):
        engine.compile_now("json_schema", '{"type": "strin"}')
    with pytest.raises(ValueError, match="parenthesis is not closed"):
        engine.compile_now("regex", "(ab")
    with pytest.raises(ValueError, match='Rule "nope" is not defined'):
        engine.compile_now("ebnf", "root ::= nope")


def test_compile_thread_polls_results_and_reset_drops_old_ones(engine):
    engine.submit("k-schema", "json_schema", SCHEMA)
    engine.submit("k-bad", "regex", "(")
    deadline = time.monotonic() + 10
    results = {}
    while len(results) < 2 and time.monotonic() < deadline:
        results.update({r.key: r for r in engine.poll()})
        time.sleep(0.005)
    assert results["k-schema"].ok and results["k-schema"].compile_ms > 0
    assert not results["k-bad"].ok and "parenthesis" in results["k-bad"].message
    assert engine.pending == 0 and engine.get("k-schema") is not None and engine.get("k-bad") is None
    engine.submit("k-regex", "regex", "[a-z]+")
    engine.reset()  # a new session: the compile in flight answers nobody
    engine._pool.submit(lambda: None).result()  # one compile thread, FIFO: the regex's result is queued now
    assert engine.poll() == [] and engine.get("k-schema") is None
    engine.release(["k-schema"])


def _walk(rows: GrammarRows, slot: int, ids: list[int]) -> list[set[int]]:
    """Fills, checks and accepts each token of `ids` in turn; returns the allowed sets seen."""
    seen = []
    mask = torch.zeros((1, rows.words), dtype=torch.int32)
    for tok in ids:
        m = rows.matchers[slot]
        rows.fill([slot], [m], mask)
        allowed = _allowed(mask[0])
        assert tok in allowed
        seen.append(allowed)
        assert rows.accept([slot], [m], np.array([tok])) == []
    return seen


def test_a_valid_output_walks_and_eos_comes_only_at_the_end(engine, smol_tokenizer):
    engine.submit("walk", "json_schema", SCHEMA)
    assert engine.get("walk") is not None
    rows = GrammarRows(engine, 4)
    ids = smol_tokenizer.encode('{"name":"Ann","age":41}', add_special_tokens=False)
    assert rows.start(1, "walk", [EOS], 0, np.zeros(0, np.int32))
    seen = _walk(rows, 1, ids)
    assert all(EOS not in s for s in seen)
    mask = torch.zeros((1, rows.words), dtype=torch.int32)
    m = rows.matchers[1]
    rows.fill([1], [m], mask)
    assert _allowed(mask[0]) == {EOS}  # the object is complete: only EOS
    assert rows.accept([1], [m], np.array([EOS])) == []
    # The overrun row at depth 2: a terminated matcher is neither filled nor advanced.
    rows.fill([1], [m], mask)
    assert torch.all(mask == ALL_ALLOWED)
    assert rows.accept([1], [m], np.array([123])) == []
    # A token the grammar does not allow is refused, not accepted.
    assert rows.start(2, "walk", [EOS], 0, np.zeros(0, np.int32))
    assert rows.accept([2], [rows.matchers[2]], np.array([EOS])) == [0]


def test_replay_reaches_the_same_masks_as_a_straight_walk(engine, smol_tokenizer):
    engine.submit("replay", "json_schema", SCHEMA)
    ids = smol_tokenizer.encode('{"name":"Bo","age":7}', add_special_tokens=False)
    rows = GrammarRows(engine, 4)
    assert rows.start(0, "replay", [EOS], 0, np.zeros(0, np.int32))
    straight = _walk(rows, 0, ids)
    for k in (1, 3, len(ids) - 1):
        assert rows.start(3, "replay", [EOS], 0, np.asarray(ids[:k], np.int32))
        assert rows.accepted[3] == k
        assert _walk(rows, 3, ids[k:]) == straight[k:]
    assert not rows.start(3, "replay", [EOS], 0, np.asarray([EOS], np.int32))  # not a valid prefix
    assert not rows.start(3, "unknown-key", [EOS], 0, np.zeros(0, np.int32))


def test_min_tokens_holds_stop_tokens_back_unless_nothing_else_is_allowed(engine, smol_tokenizer):
    engine.submit("digits", "regex", "[0-9]{1,6}")
    rows = GrammarRows(engine, 2)
    assert rows.start(0, "digits", [EOS], 3, np.zeros(0, np.int32))
    mask = torch.zeros((1, rows.words), dtype=torch.int32)
    m = rows.matchers[0]
    one = smol_tokenizer.convert_tokens_to_ids("1")
    rows.accept([0], [m], np.array([one]))
    rows.fill([0], [m], mask)
    assert EOS not in _allowed(mask[0])  # 1 of min_tokens 3: the output could end, but may not yet
    rows.accept([0], [m], np.array([one]))
    rows.accept([0], [m], np.array([one]))
    rows.fill([0], [m], mask)
    assert EOS in _allowed(mask[0])
    # A choice that is complete allows only EOS: min_tokens cannot hold it back (the grammar wins).
    engine.submit("yes", "choice", json.dumps(["yes"]))
    assert rows.start(1, "yes", [EOS], 50, np.zeros(0, np.int32))
    m = rows.matchers[1]
    for tok in smol_tokenizer.encode("yes", add_special_tokens=False):
        assert rows.accept([1], [m], np.array([tok])) == []
    rows.fill([1], [m], mask)
    assert _allowed(mask[0]) == {EOS}


def test_length_bounded_strings_refuse_raw_control_characters(engine):
    """xgrammar 0.2.9 lets U+0000-U+001F into a string with maxLength (invalid JSON); ours refuses them,
    keeps the bound, and still takes plain characters. Without the fix the first check fails."""
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "string", "maxLength": 6}}, "required": ["n"]})
    m = engine.matcher(engine.compile_now("json_schema", schema), [2])
    assert m.accept_string('{"n":"a')
    assert not m.accept_string("\x17") and not m.accept_string("\t")
    assert m.accept_string('bc"}') and m.is_completed()
    assert not engine.matcher(engine.compile_now("json_schema", schema), [2]).accept_string('{"n":"abcdefg')
