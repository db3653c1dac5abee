"""The step clock's arithmetic (worker_svc/step_clock.py): a unit counts as busy from the later of the
previous unit's end and its own issue end. The CUDA events themselves run on the GPU machine
(bench/busy_check.py compares the figure with a profiler's kernel timeline there)."""

from __future__ import annotations

import pytest

from worker_svc.step_clock import busy_ms


def test_host_ahead_counts_every_unit_whole() -> None:
    # Issued before the GPU got to each unit (the asynchronous loop): the whole span is busy.
    assert busy_ms([2.0, 5.0, 9.0], [0.0, 0.1, 0.2]) == pytest.approx(9.0)


def test_host_behind_counts_only_what_ran_after_each_issue() -> None:
    # The GPU finishes each unit 0.1 ms after the host issued it: 0.1 ms per unit of a 9 ms span.
    assert busy_ms([1.1, 4.1, 9.1], [1.0, 4.0, 9.0]) == pytest.approx(0.3)


def test_mixed_and_a_marker_after_the_end_counts_nothing() -> None:
    # Unit 0: issued at 0.5, ends 3 -> 2.5. Unit 1: issued 2, ends 6 -> from 3: 3. Unit 2: its marker
    # fired after the GPU's end event (timestamp jitter between streams): 0, not negative.
    assert busy_ms([3.0, 6.0, 6.5], [0.5, 2.0, 6.6]) == pytest.approx(5.5)


def test_one_unit_is_the_span_after_the_issue() -> None:
    assert busy_ms([4.0], [0.0]) == pytest.approx(4.0)
    assert busy_ms([4.0], [3.0]) == pytest.approx(1.0)
    assert busy_ms([], []) == 0.0
