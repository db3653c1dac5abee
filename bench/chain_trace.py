"""The serial chain of the asynchronous loop, link by link, from the core's and the worker's
`--step-trace` files (one host: both on its monotonic clock).

At depth 2, step N's result leaves the worker while step N+1 computes; the core turns it into plan
N+2, and the worker launches N+2 and then waits for N+1. Per step N the links are:
- `result_to_core`: step N's outputs on the worker's host -> the core's loop took its result (the
  result's encode and send, the wire, the core's wake-up);
- `core`: the core took result N -> it sent plan N+2 (accept_result, build_plan, encode);
- `plan_to_worker`: plan N+2 sent -> the worker had it decoded;
- `launch`: the worker's Engine.launch of N+2;
- `wait`: launched N+2 -> step N+1's outputs were on the host (the host's slack: near 0 when the
  host chain, not the device, sets the pace).
Their sum is one period of the loop. (The worker's `result_out`, after its send returns, is in the
trace but not a link: a send may return after the core already has the message.) Medians, p90 and
minima over the steady steps: those whose whole chain is in both traces, the first and last `--trim`
fraction left out (admission, the tail).

    python -m bench.chain_trace --core CORE.jsonl --worker WORKER.jsonl [--trim 0.1] [--json F]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

LINKS = ("result_to_core", "core", "plan_to_worker", "launch", "wait")


def _events(path: str | Path, names: set[str]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {n: {} for n in names}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        ev = json.loads(line)
        if ev.get("ev") in names and "step" in ev:
            out[ev["ev"]].setdefault(int(ev["step"]), float(ev["t"]))  # the first, if a step id repeats
    return out


def chain(core: str | Path, worker: str | Path, trim: float = 0.1) -> dict:
    c = _events(core, {"result", "plan"})
    w = _events(worker, {"plan_in", "launched", "collected"})
    rows: list[list[float]] = []
    for n in sorted(w["collected"]):
        try:
            t = (w["collected"][n], c["result"][n], c["plan"][n + 2], w["plan_in"][n + 2],
                 w["launched"][n + 2], w["collected"][n + 1])
        except KeyError:
            continue
        rows.append([1000 * (b - a) for a, b in zip(t, t[1:], strict=False)])
    if not rows:
        return {"steps": 0, "error": "no step with its whole chain in both traces"}
    a = np.asarray(rows)
    k = int(len(a) * trim)
    a = a[k: len(a) - k] if len(a) > 2 * k else a
    period = a.sum(axis=1)
    return {
        "steps": int(len(a)),
        "median_ms": {name: round(float(np.median(a[:, i])), 4) for i, name in enumerate(LINKS)},
        "p90_ms": {name: round(float(np.percentile(a[:, i], 90)), 4) for i, name in enumerate(LINKS)},
        "min_ms": {name: round(float(a[:, i].min()), 4) for i, name in enumerate(LINKS)},
        "period_median_ms": round(float(np.median(period)), 4),
        "host_chain_median_ms": round(float(np.median(period - a[:, LINKS.index("wait")])), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chain_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--core", required=True, help="the scheduler's --step-trace file")
    p.add_argument("--worker", required=True, help="the worker's --step-trace file")
    p.add_argument("--trim", type=float, default=0.1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = chain(args.core, args.worker, args.trim)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["steps"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
