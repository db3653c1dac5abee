"""Should prefill and mixed steps be CUDA-graphed? Measures, per step kind, the host time to issue
the step eagerly against the device time to run it.

Owns one measurement: with 32 requests decoding, one more request of L prompt tokens arrives, so the
next step mixes 32 decode rows with an L-token prefill chunk. `Engine.launch` returns once every
kernel is queued, so its wall time is the host's cost of issuing the step; the CUDA events of the
step give its device time. Where device time exceeds issue time, the host runs ahead of the GPU at
pipeline depth 2 and a graph would save nothing; where it does not, the step is launch-bound.

    python -m bench.step_probe [--model random:llama-3.1-8b] [--json docs/bench/step_probe.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.gpu_async import _requests, prompts_for
from bench.inprocess import scheduler_for


def probe(engine, chunk: int, decoding: int = 32) -> dict[str, float]:
    sched = scheduler_for(engine, depth=1)
    for r in _requests(prompts_for(decoding, 128), 64):
        sched.add(r)
    for _ in range(4):  # prefill, then a few decode steps
        engine.launch(sched.build_plan()[0])
        sched.process_result(engine.collect())
    late = _requests(prompts_for(1, chunk, seed=chunk), 4)[0]
    late.req_id = "late"
    sched.add(late)
    plan, _ = sched.build_plan()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.launch(plan)
    issue_ms = 1000 * (time.perf_counter() - t0)
    result = engine.collect()
    return {"decode_rows": decoding, "chunk_tokens": plan.num_tokens - decoding, "rows": plan.num_rows,
            "issue_ms": issue_ms, "device_ms": result.compute_ms}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--json", default="docs/bench/step_probe.json")
    args = p.parse_args(argv)
    from worker_svc.models import load
    from worker_svc.runner import Engine, EngineConfig

    loaded = load(args.model, device="cuda", dtype=torch.bfloat16)
    rows = []
    for graphs in (False, True):
        engine = Engine(loaded, EngineConfig(num_blocks=4096, max_num_rows=64, max_num_tokens=4096,
                                             cuda_graphs=graphs), "cuda")
        for chunk in (0, 16, 64, 256, 1024, 2048):
            probe(engine, max(chunk, 1))  # warm-up of this shape
            row = {"cuda_graphs": graphs, **probe(engine, max(chunk, 1))}
            if chunk == 0:
                row["chunk_tokens"] = 0  # a 1-token prompt: the step is decode-only
            rows.append(row)
            print(row, flush=True)
        del engine
        torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"command": "python -m bench.step_probe " + " ".join(argv or []), "gpu": torch.cuda.get_device_name(),
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
