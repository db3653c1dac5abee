"""The same load through gRPC and through the OpenAI-compatible HTTP API of one server, in one run (CPU).

What it measures: one real scheduler + worker pair serving the embedded SmolLM2-135M-Instruct (as
`make run` does, plus `--http-port`), and `tandem bench`'s own runner (client/bench/runner.py, the
code behind `tandem bench --backend grpc|openai`) sending N streaming requests at once (default 64:
random token-id prompts of `--input-len`, `--output-len` new tokens each, ignore_eos, greedy) through
one backend, then the other. Per round: output and request throughput over the round's duration,
TTFT (send -> first chunk with a token, client side) mean / median / p99, TPOT, and the CPU seconds
the scheduler front end (the process serving both APIs), its core, the worker and this client spent
in the round (/proc/<pid>/stat: HTTP's extra cost shows there).

Fairness: rounds alternate in pairs, gRPC-HTTP then HTTP-gRPC (`--pairs`), so drift of a shared
machine hits both alike; every round has its own seeded prompts, so no round finds another's prompts
in the prefix cache; one warm-up round of 8 requests per backend goes first. Reported: the median
round of each backend and HTTP / gRPC ratios of those medians; the ratio within each pair (its two
rounds ran back to back) and their median; each backend's best round (contention from other work on
the machine only ever slows a round) and their ratio; and the quiet rounds alone: the machine's busy
CPU time (/proc/stat) less this run's processes (front end, core, worker, client) is what other work
took during a round, and a round where that stayed within `--quiet-share` of the machine's CPUs
(default 10%) is quiet; HTTP / gRPC of the quiet rounds' medians is the headline.

    python -m bench http-vs-grpc [--num-requests 64] [--input-len 64] [--output-len 64] [--pairs 2]
        [--json docs/bench/http_vs_grpc.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.records import fmt, write_record
from client.bench.metrics import summarize
from client.bench.runner import LoadSpec, run_load
from client.bench.workloads import random_requests
from client.local_server import TandemServer

MODEL = "smollm2-135m-instruct"
VOCAB = 49152
TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """utime + stime of one process (its threads, not its children), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _machine_busy_s() -> float:
    """CPU seconds the whole machine (every process, this kernel) has been busy since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _round(server: TandemServer, backend: str, n: int, input_len: int, output_len: int, seed: int) -> dict[str, Any]:
    requests = random_requests(n, input_len, output_len, VOCAB, seed=seed)
    spec = LoadSpec(ignore_eos=True, temperature=0.0, seed=seed)
    target = server.base_url if backend == "openai" else server.address
    pids = {"scheduler_front_end": server.scheduler.pid, "worker": server.worker.pid}
    for i, child in enumerate(_children(server.scheduler.pid)):  # the core (the front end's one child)
        pids["scheduler_core" + (f"_{i}" if i else "")] = child
    before = {k: _cpu_s(p) for k, p in pids.items()}
    client_before = time.process_time()
    machine_before = _machine_busy_s()
    load_avg = os.getloadavg()[0]
    result = asyncio.run(run_load(target, requests, spec, backend=backend))
    machine = _machine_busy_s() - machine_before
    cpu = {k: _cpu_s(p) - before[k] for k, p in pids.items()}
    cpu["client"] = time.process_time() - client_before
    # What other work on the machine took meanwhile (other users' processes): the contention figure.
    cpu["others"] = max(0.0, machine - sum(cpu.values()))
    s = summarize(result.records, result.duration)
    tokens_ok = all(r.ok and r.output_tokens == output_len for r in result.records)
    return {"backend": backend, "seed": seed, "duration_s": result.duration, "completed": s["completed"],
            "failed": s["failed"], "tokens_ok": tokens_ok, "output_throughput": s["output_throughput"],
            "request_throughput": s["request_throughput"], "mean_ttft_ms": s["mean_ttft_ms"],
            "median_ttft_ms": s["median_ttft_ms"], "p99_ttft_ms": s["p99_ttft_ms"], "mean_tpot_ms": s["mean_tpot_ms"],
            "cpu_s": cpu, "others_cpu_share": cpu["others"] / (result.duration * (os.cpu_count() or 1)),
            "load_avg_before": load_avg}


def _median(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench http-vs-grpc", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--pairs", type=int, default=2, help="rounds per backend; pairs alternate gRPC-HTTP, HTTP-gRPC")
    p.add_argument("--quiet-share", type=float, default=0.10,
                   help="a round is quiet when other processes on the machine used at most this share of its CPUs")
    p.add_argument("--json", default=None, help="write the record here")
    args = p.parse_args(argv)
    server = TandemServer(MODEL, http=True)
    started = time.monotonic()
    server.start()
    print(f"server up in {time.monotonic() - started:.1f} s: gRPC {server.address}, HTTP {server.base_url}")
    rounds: list[dict[str, Any]] = []
    try:
        for backend in ("grpc", "openai"):  # warm-up, not recorded
            _round(server, backend, 8, args.input_len, 8, seed=10_000)
        seed = 0
        for pair in range(args.pairs):
            for backend in (("grpc", "openai") if pair % 2 == 0 else ("openai", "grpc")):
                seed += 1
                r = _round(server, backend, args.num_requests, args.input_len, args.output_len, seed)
                rounds.append(r)
                print(f"{backend:7} round (seed {seed}): {r['output_throughput']:.1f} tok/s, TTFT mean "
                      f"{r['mean_ttft_ms']:.0f} ms, {r['duration_s']:.1f} s, front end CPU "
                      f"{r['cpu_s']['scheduler_front_end']:.2f} s, client CPU {r['cpu_s']['client']:.2f} s", flush=True)
    finally:
        server.stop()
    by = {b: [r for r in rounds if r["backend"] == b] for b in ("grpc", "openai")}
    keys = ("output_throughput", "request_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
            "mean_tpot_ms")
    medians = {b: {k: _median(rs, k) for k in keys} for b, rs in by.items()}
    for b, rs in by.items():
        for part in ("scheduler_front_end", "scheduler_core", "worker", "client", "others"):
            medians[b][f"cpu_s_{part}"] = statistics.median(r["cpu_s"][part] for r in rs)
    ratios = {k: medians["openai"][k] / medians["grpc"][k] for k in medians["grpc"]}
    # Rounds of one pair ran back to back: their ratio cancels drift slower than a pair; contention only
    # ever slows a round down, so each backend's best round is the other noise-robust view.
    pairs = [{b: r for r in rounds[i:i + 2] for b in (r["backend"],)} for i in range(0, len(rounds), 2)]
    pair_ratios = [{k: p["openai"][k] / p["grpc"][k] for k in ("output_throughput", "mean_ttft_ms")} for p in pairs]
    median_pair_ratio = {k: statistics.median(pr[k] for pr in pair_ratios) for k in ("output_throughput",
                                                                                     "mean_ttft_ms")}
    quiet = [r for r in rounds if r["others_cpu_share"] <= args.quiet_share]
    quiet_by = {b: [r for r in quiet if r["backend"] == b] for b in ("grpc", "openai")}
    quiet_medians = {b: {k: _median(rs, k) for k in ("output_throughput", "mean_ttft_ms", "median_ttft_ms")}
                     for b, rs in quiet_by.items() if rs}
    quiet_ratio = ({k: quiet_medians["openai"][k] / quiet_medians["grpc"][k] for k in quiet_medians["grpc"]}
                   if len(quiet_medians) == 2 else None)
    best = {b: {"output_throughput": max(r["output_throughput"] for r in rs),
                "mean_ttft_ms": min(r["mean_ttft_ms"] for r in rs)} for b, rs in by.items()}
    best_ratio = {k: best["openai"][k] / best["grpc"][k] for k in ("output_throughput", "mean_ttft_ms")}
    print("\n| backend | output tok/s | req/s | TTFT mean ms | TTFT median ms | TTFT p99 ms | TPOT ms | "
          "front end CPU s | client CPU s |\n|---|---|---|---|---|---|---|---|---|")
    for b, name in (("grpc", "gRPC"), ("openai", "HTTP (OpenAI)")):
        m = medians[b]
        print(f"| {name} | {fmt(m['output_throughput'], '.1f')} | {fmt(m['request_throughput'], '.2f')} | "
              f"{fmt(m['mean_ttft_ms'], '.0f')} | {fmt(m['median_ttft_ms'], '.0f')} | {fmt(m['p99_ttft_ms'], '.0f')} | "
              f"{fmt(m['mean_tpot_ms'], '.1f')} | {fmt(m['cpu_s_scheduler_front_end'], '.2f')} | "
              f"{fmt(m['cpu_s_client'], '.2f')} |")
    print(f"| HTTP / gRPC | {ratios['output_throughput']:.3f} | {ratios['request_throughput']:.3f} | "
          f"{ratios['mean_ttft_ms']:.3f} | {ratios['median_ttft_ms']:.3f} | {ratios['p99_ttft_ms']:.3f} | "
          f"{ratios['mean_tpot_ms']:.3f} | {ratios['cpu_s_scheduler_front_end']:.3f} | "
          f"{ratios['cpu_s_client']:.3f} |")
    print("per pair, HTTP / gRPC output tok/s: " + ", ".join(f"{pr['output_throughput']:.3f}" for pr in pair_ratios)
          + f" (median {median_pair_ratio['output_throughput']:.3f}); mean TTFT: "
          + ", ".join(f"{pr['mean_ttft_ms']:.3f}" for pr in pair_ratios)
          + f" (median {median_pair_ratio['mean_ttft_ms']:.3f})")
    print(f"best rounds, HTTP / gRPC: output tok/s {best_ratio['output_throughput']:.3f}, mean TTFT "
          f"{best_ratio['mean_ttft_ms']:.3f}")
    print(f"quiet rounds (others' CPU <= {args.quiet_share:.0%} of the machine): "
          + ", ".join(f"{b} {len(rs)}" for b, rs in quiet_by.items())
          + (f"; HTTP / gRPC of their medians: output tok/s {quiet_ratio['output_throughput']:.3f}, mean TTFT "
             f"{quiet_ratio['mean_ttft_ms']:.3f}, median TTFT {quiet_ratio['median_ttft_ms']:.3f}"
             if quiet_ratio else ""))
    ok = all(r["tokens_ok"] and not r["failed"] for r in rounds)
    if args.json:
        write_record(args.json, {
            "command": "python -m bench http-vs-grpc " + shlex.join(argv if argv is not None else sys.argv[1:]),
            "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"processor": platform.machine(), "cpu_count": os.cpu_count(),
                        "python": platform.python_version(), "platform": platform.platform()},
            "workload": {"model": MODEL, "num_requests": args.num_requests, "input_len": args.input_len,
                         "output_len": args.output_len, "prompts": "random token ids, fresh per round",
                         "sampling": "greedy, ignore_eos", "arrival": "all at once, streaming",
                         "server": "TandemServer(http=True): scheduler and worker defaults (depth auto = 1 on CPU)"},
            "rounds": rounds, "medians": medians, "http_over_grpc": ratios, "pair_ratios": pair_ratios,
            "median_pair_ratio": median_pair_ratio, "best": best, "best_ratio": best_ratio,
            "quiet_share": args.quiet_share, "quiet_medians": quiet_medians, "quiet_ratio": quiet_ratio,
            "all_tokens_ok": ok,
        })
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
