"""The GPU-busy figure against a kernel timeline: does the event-based metric hold when the host
issues kernels slower than the GPU runs them?

The worker's busy figure (runner.py, StepResult.compute_ms / idle_gap_ms) is built from two CUDA
events per step on the compute stream: `start` (after the step's inputs landed) and `done`. busy =
sum(done - start) / (sum(done - start) + sum(start - previous done)). A replayed decode graph is one
launch, so the GPU cannot starve inside it; an eager or piecewise step is many launches, and when the
host issues them slower than the GPU runs them, the GPU idles *inside* [start, done], which the events
count as busy. This bench runs one window per mode under `torch.profiler` and compares the event
figure with the union of the device's kernel intervals on the compute stream over the same window
(first step start to last step done, from the trace).

    python -m bench.busy_check [--model random:smollm2-135m] [--requests 64] [--max-new 48]
                               [--units op,leaf] [--json docs/bench/h200/busy_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime

import torch

from bench.gpu_async import _requests, prompts_for
from bench.inprocess import run_requests


def _intervals(trace: dict, stream: int | None) -> list[tuple[float, float]]:
    """(start, end) in microseconds of every kernel (and memset) the trace saw on `stream` (None: any)."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memset"):
            continue
        if stream is not None and e.get("args", {}).get("stream") != stream:
            continue
        out.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))))
    return sorted(out)


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of sorted intervals."""
    total, end = 0.0, float("-inf")
    for s, e in intervals:
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def gap_breakdown(intervals: list[tuple[float, float]], small_us: float) -> tuple[float, float]:
    """(total of idle gaps up to `small_us`, total of longer ones) between the union's intervals, in
    microseconds: launch latency inside a graph is the first kind, a starved GPU the second."""
    small = large = 0.0
    end = None
    for s, e in intervals:
        if end is not None and s > end:
            gap = s - end
            if gap <= small_us:
                small += gap
            else:
                large += gap
        end = e if end is None else max(end, e)
    return small, large


def _compute_stream_id(trace: dict) -> int | None:
    """The stream that ran the most kernel time: the compute stream (copies run on their own)."""
    per: dict[int, float] = {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "X" and e.get("cat") == "kernel":
            s = e.get("args", {}).get("stream")
            per[s] = per.get(s, 0.0) + float(e.get("dur", 0.0))
    return max(per, key=per.get) if per else None


def measure(engine, prompts, max_new: int, depth: int, host_ops: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    run_requests(engine, _requests(prompts, 4), depth)  # warm-up outside the window
    torch.cuda.synchronize()
    # CUDA activity only: recording every host op as well slowed the host several-fold (first run).
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host_ops else [])
    with profile(activities=activities) as prof:
        stats = run_requests(engine, _requests(prompts, max_new), depth)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    stream = _compute_stream_id(trace)
    compute = _intervals(trace, stream)
    every = _intervals(trace, None)
    window = (compute[-1][1] - compute[0][0]) if compute else 0.0
    kernels_busy = union_us(compute) / window if window else 0.0
    counts = dict(engine.step_counts)
    small, large = gap_breakdown(compute, 5.0)
    return {
        "depth": depth, "steps": stats.steps, "wall_s": stats.wall_s,
        "event_busy": stats.busy_ratio, "event_window_ms": stats.compute_ms + stats.idle_gap_ms,
        "profiler_busy_compute_stream": kernels_busy, "profiler_window_ms": window / 1000,
        "profiler_busy_any_stream": union_us(every) / window if window else 0.0,
        "difference_pp": 100 * (stats.busy_ratio - kernels_busy), "kernels": len(compute),
        "idle_gaps_le_5us_pp": 100 * small / window if window else 0.0,
        "idle_gaps_gt_5us_pp": 100 * large / window if window else 0.0,
        "host_ops_recorded": host_ops,
        "step_counts": counts,
    }


def workload_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The in-process GPU workload both this and bench/unit_cost.py run: model, rows, prompt, new tokens."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0])
    p.add_argument("--model", default="random:smollm2-135m")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new", type=int, default=48)
    return p


def record_header(prog: str, argv: list[str] | None, args: argparse.Namespace) -> dict:
    """The record's command, machine and workload; `entries` to fill."""
    return {"command": f"python -m {prog} " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date_utc": datetime.now(UTC).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "model": args.model, "requests": args.requests,
            "prompt_len": args.prompt_len, "max_new": args.max_new, "entries": []}


def workload_engine(loaded, args: argparse.Namespace, **config):
    """An engine sized for the workload (KV blocks for every request at once), `config` on top."""
    from worker_svc.runner import Engine, EngineConfig

    blocks = args.requests * -(-(args.prompt_len + args.max_new) // 16) + 64
    return Engine(loaded, EngineConfig(num_blocks=blocks, max_num_rows=max(64, args.requests),
                                       max_num_tokens=2048, **config), "cuda")


def drop_engine(engine) -> None:
    """Frees an engine whose model lives on: its busy-unit hooks come off the model first, so the next
    engine's eager steps do not also call them."""
    if engine.clock is not None:
        engine.clock.unhook()
    del engine
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    from worker_svc.models import load

    p = workload_parser("bench.busy_check", __doc__)
    p.add_argument("--modes", default="graphs,eager", help="graphs (decode graphs), eager (no CUDA graphs)")
    p.add_argument("--units", default="leaf", help="eager forwards' busy units, comma-separated: op, leaf, layer "
                   "(EngineConfig.busy_units; each eager window runs once per choice, graph windows once)")
    p.add_argument("--json", default="docs/bench/h200/busy_check.json")
    args = p.parse_args(argv)
    prompts = prompts_for(args.requests, args.prompt_len)
    record = record_header("bench.busy_check", argv, args)
    loaded = load(args.model, device="cuda", dtype=torch.bfloat16)
    runs = [(mode, units) for mode in args.modes.split(",")
            for units in (args.units.split(",") if mode == "eager" else ["leaf"])]
    for mode, units in runs:
        t0 = time.perf_counter()
        engine = workload_engine(loaded, args, cuda_graphs=mode == "graphs", busy_units=units)
        for depth in (1, 2):
            entry = {"mode": mode, "units": units, **measure(engine, prompts, args.max_new, depth)}
            print(json.dumps(entry), flush=True)
            record["entries"].append(entry)
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)
        drop_engine(engine)
        print(f"{mode} ({units} units): {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
