"""The core's ledger of constraints (scheduler_svc/core/grammar_book.py): who waits on a compile, who uses
a compiled key, which idle keys are released, and which refusals are remembered."""

from __future__ import annotations

from scheduler_svc.core.grammar_book import FAILED, READY, WAIT, GrammarBook
from scheduler_svc.core.request import Constraint, Request


def _req(uid: int, pattern: str) -> Request:
    return Request(req_id=f"r{uid}", prompt_ids=[1, 2], max_new_tokens=4, uid=uid,
                   constraint=Constraint("regex", pattern))


def test_one_compile_per_key_and_users_counted_until_idle() -> None:
    book = GrammarBook(max_idle=2)
    a, b = _req(1, "a+"), _req(2, "a+")
    assert book.admit(a) == (WAIT, "") and book.admit(b) == (WAIT, "")
    assert [k for k, _, _ in book.take_compiles()] == [a.constraint.key]  # once, for both
    assert [w.req for w in book.compiled(a.constraint.key, True, "")] == [a, b]
    assert book.admit(_req(3, "a+")) == (READY, "")
    book.check({1, 2, 3})
    for uid in (1, 2, 3):
        book.done(_req(uid, "a+"))
        book.done(_req(uid, "a+"))  # idempotent
    assert a.constraint.key in book.idle and not book.take_releases()
    book.check(set())


def test_idle_keys_past_the_limit_are_released_oldest_first_and_release_precedes_a_recompile() -> None:
    book = GrammarBook(max_idle=2)
    keys = []
    for i, pattern in enumerate(["a", "b", "c"]):
        r = _req(i + 1, pattern)
        book.admit(r)
        book.compiled(r.constraint.key, True, "")
        book.done(r)
        keys.append(r.constraint.key)
    assert len(book.take_compiles()) == 3
    assert book.take_releases() == [keys[0]] and list(book.idle) == keys[1:]
    again = _req(9, "a")  # the released key is asked for again: it compiles again
    assert book.admit(again) == (WAIT, "")
    assert [k for k, _, _ in book.take_compiles()] == [keys[0]]


def test_a_refusal_is_remembered_and_an_abort_while_compiling_is_forgotten() -> None:
    book = GrammarBook(max_failed=1)
    bad, gone = _req(1, "(("), _req(2, "((")
    book.admit(bad)
    book.admit(gone)
    assert book.forget(2).req is gone
    assert [w.req for w in book.compiled(bad.constraint.key, False, "parenthesis is not closed")] == [bad]
    assert book.admit(_req(3, "((")) == (FAILED, "parenthesis is not closed")
    other = _req(4, "[")
    book.admit(other)
    book.compiled(other.constraint.key, False, "bracket")
    assert book.admit(_req(5, "((")) == (WAIT, "")  # only the most recent refusal is kept (max_failed=1)
