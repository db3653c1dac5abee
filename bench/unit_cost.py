"""What the busy figure's units cost an eager step: leaf-module units against layer units, no profiler.

Owns one question from docs/benchmarks.md ("Leaf-module units"): an eager forward cut at every leaf
module records two CUDA events per leaf (11 per Llama layer instead of 1); under torch.profiler the
eager windows ran 1.25-1.9x longer, but the profiler traces every API call. This runs the same eager
workload (CUDA graphs off) with each unit choice, alternating, several rounds, and reports the wall
time per step and the event busy figure, so the cost is measured without the profiler.

    python -m bench.unit_cost [--model random:smollm2-135m] [--requests 64] [--max-new 48] [--rounds 2]
                              [--json docs/bench/h200/unit_cost.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

import torch

from bench.gpu_async import _requests, prompts_for
from bench.inprocess import run_requests


def main(argv: list[str] | None = None) -> int:
    from worker_svc.models import load
    from worker_svc.runner import Engine, EngineConfig

    p = argparse.ArgumentParser(prog="python -m bench.unit_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:smollm2-135m")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--depth", type=int, default=2, choices=(1, 2))
    p.add_argument("--json", default="docs/bench/h200/unit_cost.json")
    args = p.parse_args(argv)
    prompts = prompts_for(args.requests, args.prompt_len)
    record = {"command": "python -m bench.unit_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date_utc": datetime.now(UTC).isoformat(timespec="seconds"), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "model": args.model, "requests": args.requests,
              "prompt_len": args.prompt_len, "max_new": args.max_new, "depth": args.depth, "entries": []}
    loaded = load(args.model, device="cuda", dtype=torch.bfloat16)
    blocks = args.requests * -(-(args.prompt_len + args.max_new) // 16) + 64
    for rnd in range(args.rounds):
        for leaf in (False, True):
            engine = Engine(loaded, EngineConfig(num_blocks=blocks, max_num_rows=max(64, args.requests),
                                                 max_num_tokens=2048, cuda_graphs=False, leaf_busy_units=leaf),
                            "cuda")
            run_requests(engine, _requests(prompts, 4), args.depth)  # warm-up
            torch.cuda.synchronize()
            stats = run_requests(engine, _requests(prompts, args.max_new), args.depth)
            torch.cuda.synchronize()
            entry = {"round": rnd, "units": "leaf" if leaf else "layer", "steps": stats.steps,
                     "wall_s": stats.wall_s, "ms_per_step": 1000 * stats.wall_s / max(1, stats.steps),
                     "event_busy": stats.busy_ratio}
            print(json.dumps(entry), flush=True)
            record["entries"].append(entry)
            assert engine.clock is not None
            engine.clock.unhook()  # the next engine hooks the same model
            del engine
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
