"""Structured output's cost: throughput with 0 %, 50 % and 100 % of the requests under a JSON schema,
and the host time per constrained token spent advancing matchers and filling bitmasks.

Owns one measurement, in one run, engine-only (the real Scheduler driving the in-process worker
Engine, bench/inprocess.py's loop, with the grammar engine the worker uses): N requests, each
generating exactly `--max-new` tokens, so every configuration computes the same steps and the same
tokens and only the constraint differs. The schema is an array of at least `--max-new` small integers,
so a constrained output cannot end before its budget; unconstrained requests ignore EOS. The
configurations run in turn, after one warm-up pass of each, and the order repeats `--repeats` times
(the median of each is reported), so that drifting load on a shared machine falls on all of them.

    python -m bench.structured_output [--model smollm2-135m-instruct] [--device cpu] \
        [--json docs/bench/structured_output.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from bench.inprocess import scheduler_for
from scheduler_svc.core.request import Constraint, Request, SamplingParams


def _schema(n: int) -> str:
    return json.dumps({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                       "minItems": n, "maxItems": 4 * n}, separators=(",", ":"))


def _requests(n: int, fraction: float, max_new: int, eos: list[int], prompt: list[int]) -> list[Request]:
    constrained = round(n * fraction)
    c = Constraint("json_schema", _schema(max_new))
    return [Request(req_id=f"r{i}", prompt_ids=prompt + [3 + i], max_new_tokens=max_new,
                    sampling=SamplingParams(temperature=0.7, seed=i), eos_token_ids=frozenset(eos),
                    ignore_eos=i >= constrained, constraint=c if i < constrained else None, uid=i + 1)
            for i in range(n)]


def run_once(engine, reqs: list[Request], depth: int) -> dict:
    sched = scheduler_for(engine, depth)
    for r in reqs:
        sched.add(r)
    steps, grammar_ms, compute_ms, idle_ms = 0, 0.0, 0.0, 0.0
    t0 = time.perf_counter()
    while not sched.is_idle:
        while sched.in_flight < depth and (built := sched.build_plan()) is not None:
            engine.launch(built[0])
        result = engine.collect()
        steps += 1
        grammar_ms += result.grammar_ms
        compute_ms += result.compute_ms
        if steps > 1:  # the first step's gap is the time since the previous run
            idle_ms += result.idle_gap_ms
        sched.process_result(result)
    wall = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in reqs)
    constrained = sum(len(r.output_ids) for r in reqs if r.constraint is not None)
    for r in reqs:
        assert len(r.output_ids) == r.max_new_tokens, (r.req_id, len(r.output_ids))
        if r.constraint is not None:
            assert r.finish_reason is not None and r.finish_reason.name == "LENGTH"
    return {"wall_s": wall, "steps": steps, "tokens": tokens, "tok_per_s": tokens / wall,
            "grammar_ms": grammar_ms, "constrained_tokens": constrained,
            "busy_ratio": compute_ms / (compute_ms + idle_ms) if compute_ms + idle_ms else 0.0,
            "mask_us_per_constrained_token": 1000 * grammar_ms / constrained if constrained else 0.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.structured_output", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--depth", type=int, default=0, help="0: 2 on CUDA, 1 on CPU (the server's auto depth)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    from worker_svc.models import load
    from worker_svc.runner import Engine, EngineConfig
    from worker_svc.structured.grammar import GrammarEngine, engine_name

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    loaded = load(args.model, device=args.device, dtype=dtype)
    grammar = GrammarEngine(loaded.tokenizer_json, loaded.vocab_size, loaded.eos_token_ids)
    c = Constraint("json_schema", _schema(args.max_new))
    t0 = time.perf_counter()
    grammar.submit(c.key, c.kind, c.spec)
    assert grammar.get(c.key) is not None
    compile_ms = 1000 * (time.perf_counter() - t0)
    engine = Engine(loaded, EngineConfig(num_blocks=2048, max_num_rows=args.requests, max_num_tokens=2048),
                    args.device, grammar=grammar)
    depth = args.depth or (2 if args.device.startswith("cuda") else 1)
    prompt = [1, 9690, 198, 2683, 314]  # a short fixed prompt (token ids)
    runs: dict[float, list[dict]] = {f: [] for f in args.fractions}
    for rep in range(args.repeats + 1):
        for f in args.fractions:
            row = run_once(engine, _requests(args.requests, f, args.max_new, loaded.eos_token_ids, prompt), depth)
            if rep:  # the first pass warms every configuration up
                runs[f].append(row)
    base = statistics.median(r["tok_per_s"] for r in runs[args.fractions[0]])
    table = []
    for f, rows in runs.items():
        tps = statistics.median(r["tok_per_s"] for r in rows)
        table.append({"constrained_fraction": f, "tok_per_s": tps, "ratio_to_first": tps / base,
                      "mask_us_per_constrained_token": statistics.median(r["mask_us_per_constrained_token"]
                                                                         for r in rows),
                      "busy_ratio": statistics.median(r["busy_ratio"] for r in rows),
                      "steps": rows[0]["steps"], "tokens": rows[0]["tokens"], "runs": rows})
        print(f"{f:4.0%} constrained: {tps:8.1f} tok/s ({tps / base:.3f}x), "
              f"mask {table[-1]['mask_us_per_constrained_token']:.1f} us per constrained token, "
              f"busy {table[-1]['busy_ratio']:.4f}")
    record = {
        "command": " ".join(["python -m bench.structured_output", *(sys.argv[1:] if argv is None else argv)]),
        "model": args.model, "device": args.device, "depth": depth, "requests": args.requests,
        "max_new_tokens": args.max_new, "repeats": args.repeats, "grammar_engine": engine_name(),
        "schema": json.loads(c.spec), "schema_compile_ms": compile_ms, "step_counts": engine.step_counts,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_threads": torch.get_num_threads()},
        "results": table,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=1)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
