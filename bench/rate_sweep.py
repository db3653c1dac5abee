"""Rate sweep, Tandem async against sync, in one run: `tandem bench --sweep` against a real server
started once per mode on the same GPU, then both sweeps on one chart and the highest request rate
each mode serves within the SLOs.

    python -m bench sweep [--model random:llama-3.1-8b] [--num-prompts 80] [--input-len 512]
                          [--output-len 128] [--sweep 4] [--result-dir docs/bench/sweep]

The SLOs are the issue's: p99 TTFT <= 1 s and p99 TPOT <= 50 ms. "Highest rate within the SLOs"
is the highest offered rate among the sweep's Poisson runs (the throughput pass counts at its
measured request throughput) whose p99 TTFT and p99 TPOT meet them, with no run at a lower rate
missing them (`client.bench.metrics.highest_rate_within`). Finite runs above the server's capacity
can still pass while the queue is short, so runs need to be long (hundreds of prompts) to find it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from pathlib import Path

from client.bench import plots
from client.bench.cli import run as run_bench
from client.bench.metrics import SLO, highest_rate_within
from client.cli import build_parser
from client.local_server import TandemServer

SLO_MS = {"ttft": 1000.0, "tpot": 50.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--sweep", type=int, default=4)
    p.add_argument("--rates", type=float, nargs="+", default=None,
                   help="the same Poisson rates for both modes (default: each mode's own evenly spaced sweep)")
    p.add_argument("--max-num-rows", type=int, default=128)
    p.add_argument("--result-dir", default="docs/bench/sweep")
    p.add_argument("--worker-args", default="", help="extra worker_svc flags for both servers (e.g. --no-fuse)")
    args = p.parse_args(argv)
    out_dir = Path(args.result_dir)
    sweeps: dict[str, list[dict]] = {}
    for mode, depth in (("async", 2), ("sync", 1)):
        server = TandemServer(model=args.model,
                              scheduler_args=["--pipeline-depth", str(depth), "--max-waiting", "4096"],
                              worker_args=["--device", args.device, "--dtype", args.dtype, "--max-num-rows",
                                           str(args.max_num_rows), "--max-num-tokens", "4096",
                                           *shlex.split(args.worker_args)])
        try:
            server.start(900)
            bench_args = build_parser().parse_args([
                "bench", "--address", server.address, "--num-prompts", str(args.num_prompts), "--num-warmups", "4",
                "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                "--ignore-eos", "--temperature", "0", "--sweep", str(args.sweep), "--label", mode,
                "--goodput", f"ttft:{SLO_MS['ttft']:g}", f"tpot:{SLO_MS['tpot']:g}", "--result-dir", str(out_dir),
                "--result-filename", mode, "--disable-tqdm",
                *(["--sweep-rates", *map(str, args.rates)] if args.rates else []),
            ])
            sweeps[mode] = asyncio.run(run_bench(bench_args))
        finally:
            server.stop()
    if plots.available():  # matplotlib is the `bench` extra; the summary below needs nothing
        print(f"wrote {plots.sweep(sweeps, out_dir / 'async_vs_sync.png', SLO_MS)}")
    summary = {
        "command": "python -m bench sweep " + " ".join(sys.argv[2:] if argv is None else argv),
        "slo_ms": SLO_MS,
        "worker_args": shlex.split(args.worker_args),
        "best_rate_within_slo": {mode: highest_rate_within(runs, SLO(ttft_ms=SLO_MS["ttft"], tpot_ms=SLO_MS["tpot"]))
                                 for mode, runs in sweeps.items()},
        "runs": {mode: [{k: r[k] for k in ("run", "request_throughput", "output_throughput", "p99_ttft_ms",
                                           "p99_tpot_ms", "mean_ttft_ms", "mean_tpot_ms", "completed", "failed")}
                        | {"request_rate": r["args"]["request_rate"]} for r in runs] for mode, runs in sweeps.items()},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps(summary["best_rate_within_slo"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
