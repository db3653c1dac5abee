"""The serial chain's instruments on CPU: the core's and the worker's --step-trace, written by real
processes serving real GenerateStream RPCs (bench host-e2e), joined by bench.chain_trace; and
bench.launch_parts' per-part timers over the in-process engine."""

from __future__ import annotations

import json

from bench.chain_trace import LINKS, chain
from bench.host_e2e import main as host_e2e
from bench.host_parts import tiny_cpu_engine
from bench.launch_parts import measure


def test_core_and_worker_traces_join_into_the_chain(tmp_path):
    core, worker = tmp_path / "core.jsonl", tmp_path / "worker.jsonl"
    rows, new = 16, 24
    assert host_e2e(["--codes", "after", "--live-after", "--rows", str(rows), "--prompt-len", "16", "16",
                     "--max-new-tokens", str(new), "--repeats", "1", "--pipeline-depth", "2", "--no-pin",
                     "--scheduler-args", f"--step-trace {core}", "--worker-args", f"--step-trace {worker}",
                     "--json", str(tmp_path / "record.json")]) == 0
    events = [json.loads(line) for line in worker.read_text().splitlines()]
    by_step: dict[int, list[str]] = {}
    for ev in events:
        by_step.setdefault(ev["step"], []).append(ev["ev"])
    # Every step the worker ran: received, launched, collected and answered, in that order, once each.
    assert by_step and all(names == ["plan_in", "launched", "collected", "result_out"] for names in by_step.values())
    times = {(ev["step"], ev["ev"]): ev["t"] for ev in events}
    assert all(times[(s, "plan_in")] <= times[(s, "launched")] <= times[(s, "collected")] <= times[(s, "result_out")]
               for s in by_step)
    out = chain(core, worker, trim=0.0)
    # Each round's steps but its last two have their whole chain (plan N+2 exists) in both traces.
    assert out["steps"] >= len(by_step) // 2 and set(out["median_ms"]) == set(LINKS)
    # Causality across the two processes' clocks: the core takes a result after the worker had it, and
    # the worker decodes a plan after the core sent it.
    assert out["min_ms"]["result_to_core"] > 0 and out["min_ms"]["plan_to_worker"] > 0 and out["min_ms"]["core"] > 0


def test_launch_parts_times_every_part_once_a_step():
    engine = tiny_cpu_engine(16, 16 * 4 + 64, 2048)
    entry = measure(engine, rows=16, prompt_len=16, new_tokens=12, vocab=engine.loaded.vocab_size, rounds=1)
    calls = entry["calls_per_step"]
    # 12 against 3 new tokens: the rows decode in lockstep, one step per token, so 9 more steps.
    assert entry["steps"] == entry["steps_long"] - entry["steps_short"] == 9
    for part in ("launch", "launch.check", "launch.check.validate", "launch.slot_load", "accept_result",
                 "plan_encode", "plan_decode", "result_encode", "result_decode"):
        assert calls[part] == 1.0, (part, calls)
    assert "process_result" not in calls  # the loop accepts, then takes the events after the next launch
    assert calls["take_events"] >= 1.0
    p = entry["parts_ms_per_step"]
    assert entry["serial_chain_ms"] >= p["launch"] + p["accept_result"] + p["build_plan"] > 0


def test_launch_parts_measures_a_tree_in_a_child_process(tmp_path):
    from pathlib import Path

    from bench.launch_parts import main as launch_parts

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "record.json"
    assert launch_parts(["--device", "cpu", "--rows", "16", "--prompt-len", "16", "--new-tokens", "12",
                         "--rounds", "1", "--trees", str(root), "--json", str(out)]) == 0
    (entry,) = json.loads(out.read_text())["entries"]
    assert entry["tree"] == str(root) and entry["steps"] == 9
    assert 0 < entry["host_chain_parts_ms"] <= entry["serial_chain_ms"]
