"""What the busy figure's units cost an eager step: op, leaf-module and layer units, no profiler.

Owns one question from docs/benchmarks.md ("Leaf-module units"): an eager forward cut at every leaf
module records two CUDA events per leaf (11 per Llama layer instead of 1); under torch.profiler the
eager windows ran 1.25-1.9x longer, but the profiler traces every API call. This runs the same eager
workload (CUDA graphs off) with each unit choice, alternating, several rounds, and reports the wall
time per step and the event busy figure, so the cost is measured without the profiler. Op units
(every aten op through a Python dispatch mode) cost the most host time.

    python -m bench.unit_cost [--model random:smollm2-135m] [--requests 64] [--max-new 48] [--rounds 2]
                              [--units layer,leaf,op]
                              [--json docs/bench/h200/unit_cost.json]
"""

from __future__ import annotations

import json
import sys

import torch

from bench.busy_check import drop_engine, record_header, workload_engine, workload_parser
from bench.gpu_async import _requests, prompts_for
from bench.inprocess import run_requests


def main(argv: list[str] | None = None) -> int:
    from worker_svc.models import load

    p = workload_parser("bench.unit_cost", __doc__)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--depth", type=int, default=2, choices=(1, 2))
    p.add_argument("--units", default="layer,leaf,op", help="comma-separated EngineConfig.busy_units choices")
    p.add_argument("--json", default="docs/bench/h200/unit_cost.json")
    args = p.parse_args(argv)
    prompts = prompts_for(args.requests, args.prompt_len)
    record = {**record_header("bench.unit_cost", argv, args), "depth": args.depth}
    loaded = load(args.model, device="cuda", dtype=torch.bfloat16)
    for rnd in range(args.rounds):
        for units in args.units.split(","):
            engine = workload_engine(loaded, args, cuda_graphs=False, busy_units=units)
            run_requests(engine, _requests(prompts, 4), args.depth)  # warm-up
            torch.cuda.synchronize()
            stats = run_requests(engine, _requests(prompts, args.max_new), args.depth)
            torch.cuda.synchronize()
            entry = {"round": rnd, "units": units, "steps": stats.steps,
                     "wall_s": stats.wall_s, "ms_per_step": 1000 * stats.wall_s / max(1, stats.steps),
                     "event_busy": stats.busy_ratio}
            print(json.dumps(entry), flush=True)
            record["entries"].append(entry)
            drop_engine(engine)  # the next engine hooks the same model
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
