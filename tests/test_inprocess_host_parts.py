"""The in-process loop's host parts (bench/inprocess.py LoopStats.host_ms): each part is timed, the
parts fit inside the wall time they were taken in, and the step count is the engine's own."""

from __future__ import annotations

import json
import time

import pytest

torch = pytest.importorskip("torch")

from bench.inprocess import HOST_PARTS, run_requests  # noqa: E402
from scheduler_svc.core.request import Request, SamplingParams  # noqa: E402


def test_host_parts_are_timed_and_fit_in_the_wall(tmp_path):
    from worker_svc.models import load
    from worker_svc.presets import preset_config
    from worker_svc.runner import Engine, EngineConfig

    spec = tmp_path / "model.json"
    spec.write_text(json.dumps({**preset_config("tiny-llama"), "vocab_size": 512, "hidden_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}))
    engine = Engine(load(f"random:{spec}", device="cpu", dtype=torch.float32),
                    EngineConfig(num_blocks=64, max_num_rows=8, max_num_tokens=64), "cpu")
    reqs = [Request(req_id=f"r{i}", prompt_ids=[3 + i, 7, 9], max_new_tokens=12, ignore_eos=True,
                    sampling=SamplingParams(temperature=0.0), arrival_time=time.monotonic()) for i in range(8)]
    stats = run_requests(engine, reqs, depth=2)
    assert sum(len(v) for v in stats.outputs.values()) == 8 * 12
    # 8 rows of 3-token prompts prefill in one step, then 11 more decode steps: 12 results collected.
    assert stats.steps == 12
    assert set(stats.host_ms) == set(HOST_PARTS)
    assert all(v > 0 for v in stats.host_ms.values()), stats.host_ms
    # The parts are disjoint intervals of the loop, so together they cannot exceed its wall time.
    assert sum(stats.host_ms.values()) <= 1000 * stats.wall_s
    per_step = stats.host_ms_per_step()
    assert per_step["launch"] == pytest.approx(stats.host_ms["launch"] / 12, abs=1e-4)
