"""Summarises one measured round of `bench/stream_load.py`: its `--timeline` with the server's `--step-trace`.

When did the streams reach the front end (the core's submit events carry the front end's arrival
time), how full were the steps, how busy was the front end's event loop (the `.front` file, where
present), per time bin from the round's first stream start. All times share the host's monotonic
clock. Prints one JSON object:

    python bench/stream_trace.py --timeline T.jsonl --trace S.jsonl [--label L] [--bin 0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from statistics import median


def _lines(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarize(timeline: str, trace: str, label: str = "", bin_s: float = 0.25) -> dict:
    streams = _lines(timeline)
    t0 = min(s["start"] for s in streams)
    events = [e for e in _lines(trace) if e["t"] >= t0]
    arrivals = sorted(e["arrival"] - t0 for e in events if e["ev"] == "submit")
    plans = [e for e in events if e["ev"] == "plan"]
    results = {e["step"]: e for e in events if e["ev"] == "result"}
    front = [x for x in _lines(trace + ".front") if x["t"] >= t0] if os.path.exists(trace + ".front") else []
    end = max(s["end"] for s in streams) - t0
    bins = []
    b = 0.0
    while b < end:
        ps = [p for p in plans if b <= p["t"] - t0 < b + bin_s]
        lags = [x["lag_ms"] for x in front if b <= x["t"] - t0 < b + bin_s]
        row = {"t": round(b, 3), "arrivals": sum(1 for a in arrivals if b <= a < b + bin_s), "steps": len(ps),
               "rows_mean": round(sum(p["rows"] for p in ps) / len(ps), 1) if ps else 0,
               "compute_ms_mean": round(sum(results[p["step"]]["compute_ms"] for p in ps if p["step"] in results)
                                        / max(1, sum(p["step"] in results for p in ps)), 2)}
        if front:
            row["front_lag_ms_p50"] = round(median(lags), 2) if lags else None
            hs = [x["handles"] for x in front if b <= x["t"] - t0 < b + bin_s]
            row["front_requests_mean"] = round(sum(hs) / len(hs)) if hs else None
        bins.append(row)
        b += bin_s
    return {
        "label": label, "streams": len(streams), "wall_s": round(end, 3),
        "arrivals_s": {"first": round(arrivals[0], 3), "median": round(arrivals[len(arrivals) // 2], 3),
                       "last": round(arrivals[-1], 3)},
        "first_message_s": {"median": round(sorted(s["first"] - t0 for s in streams)[len(streams) // 2], 3),
                            "max": round(max(s["first"] for s in streams) - t0, 3)},
        "steps": len(plans), "rows_per_step_mean": round(sum(p["rows"] for p in plans) / max(1, len(plans)), 1),
        "bin_s": bin_s, "bins": bins,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/stream_trace.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--timeline", required=True)
    p.add_argument("--trace", required=True)
    p.add_argument("--label", default="")
    p.add_argument("--bin", type=float, default=0.25)
    args = p.parse_args(argv)
    print(json.dumps(summarize(args.timeline, args.trace, args.label, args.bin)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
