"""The in-process loop's host parts (bench/inprocess.py LoopStats.host_ms): each part is timed, the
parts fit inside the wall time they were taken in, and the step count is the engine's own."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bench.host_parts import tiny_cpu_engine  # noqa: E402
from bench.inprocess import HOST_PARTS, greedy_requests, run_requests  # noqa: E402


def test_host_parts_are_timed_and_fit_in_the_wall():
    engine = tiny_cpu_engine(rows=8, num_blocks=64, max_num_tokens=64, layers=2)
    stats = run_requests(engine, greedy_requests([[3 + i, 7, 9] for i in range(8)], 12), depth=2)
    assert sum(len(v) for v in stats.outputs.values()) == 8 * 12
    # 8 rows of 3-token prompts prefill in one step, then 11 more decode steps: 12 results collected.
    assert stats.steps == 12
    assert set(stats.host_ms) == set(HOST_PARTS)
    assert all(v > 0 for v in stats.host_ms.values()), stats.host_ms
    # The parts are disjoint intervals of the loop, so together they cannot exceed its wall time.
    assert sum(stats.host_ms.values()) <= 1000 * stats.wall_s
    per_step = stats.host_ms_per_step()
    assert per_step["launch"] == pytest.approx(stats.host_ms["launch"] / 12, abs=1e-4)
