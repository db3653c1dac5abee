"""`tandem bench`: the load-testing command. Flags follow `vllm bench serve` where it has one.

Owns the command line and the run plan: one run, or a sweep (a synchronous pass with one request
at a time over `--sweep-sync-prompts` requests, a throughput pass with everything at once, then
`--sweep N` Poisson rates evenly spaced between the two passes' request throughputs), each followed
by its table and files.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client import AsyncTandemClient
from client.bench import report
from client.bench.metrics import SLO, highest_rate_within, summarize
from client.bench.runner import LoadSpec, open_client, run_load, wait_ready
from client.bench.workloads import (
    BenchRequest,
    chat_like_requests,
    jsonl_requests,
    multi_turn_requests,
    random_requests,
)
from client.connection_args import address_arg, connection_args, connection_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    address_arg(p, "localhost:50051", help="--backend grpc: the server host:port; several replicas comma-separated or "
                "by repeating the flag (round-robin over those SERVING; GetStats counters are then one replica's), "
                "or a grpc target such as dns:///name:port")
    p.add_argument("--backend", choices=["grpc", "openai"], default="grpc",
                   help="grpc: GenerateStream; openai: streaming /v1/completions (token-id and text prompts) and "
                   "/v1/chat/completions (messages) of an OpenAI-compatible server at --base-url")
    p.add_argument("--base-url", default="http://localhost:8000/v1",
                   help="the OpenAI-compatible API (--backend openai)")
    p.add_argument("--model", default=None, help="--backend openai: the model to ask for (default: the first listed)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="--backend openai: token ids of random prompts are drawn below it (default: what /v1/models "
                   "says, as Tandem's does)")
    connection_args(p)
    p.add_argument("--num-prompts", type=int, default=100, help="requests measured (warm-ups excluded)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second; inf (default) sends everything at once")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the inter-arrival gaps: 1 = Poisson, < 1 burstier, > 1 more regular")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--ramp-up-strategy", choices=["linear"], default=None)
    p.add_argument("--ramp-up-start-rps", type=float, default=None)
    p.add_argument("--ramp-up-end-rps", type=float, default=None)
    p.add_argument("--dataset-name", choices=["random", "chat", "jsonl", "multi-turn"], default="random",
                   help="multi-turn: conversations whose every turn's prompt is the conversation so far")
    p.add_argument("--dataset-path", default=None, help="the JSONL file for --dataset-name jsonl")
    p.add_argument("--random-input-len", type=int, default=1024, help="multi-turn: the first turn's own tokens")
    p.add_argument("--random-output-len", type=int, default=128, help="multi-turn: every turn's answer")
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0,
                   help="random tokens shared by every prompt (multi-turn: by every conversation's first turn)")
    p.add_argument("--multi-turn-turns", type=int, default=4,
                   help="multi-turn: turns per conversation; --num-prompts counts requests, so it makes "
                   "--num-prompts / turns conversations (--request-rate schedules their first turns; a later turn "
                   "is sent when the answer before it has arrived); --num-warmups are single first-turn requests")
    p.add_argument("--multi-turn-user-len", type=int, default=64,
                   help="multi-turn: new user tokens each turn after the first appends after the previous answer")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly the asked output lengths")
    p.add_argument("--temperature", type=float, default=None, help="default: the model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-warmups", type=int, default=0, help="requests sent and awaited first, not measured")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:1000 tpot:50 e2el:20000")
    p.add_argument("--sweep", type=int, default=0, metavar="N",
                   help="a synchronous pass, a throughput pass, then N rates evenly spaced between them")
    p.add_argument("--sweep-rates", type=float, nargs="+", default=None, metavar="R",
                   help="with --sweep: these Poisson rates instead of evenly spaced ones (to compare servers at "
                   "the same rates)")
    p.add_argument("--sweep-sync-prompts", type=int, default=16,
                   help="requests of the sweep's synchronous pass (one at a time, so it is the slow one)")
    p.add_argument("--result-dir", default=None, help="write <name>.json, <name>.requests.jsonl and results.csv")
    p.add_argument("--result-filename", default=None, help="base name of the result files")
    p.add_argument("--label", default="tandem", help="recorded with the results (e.g. async / sync)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for SERVING")
    p.add_argument("--request-timeout", type=float, default=None, help="per request, seconds")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="write no PNG files")
    p.add_argument("--compare-sweeps", nargs="+", default=None, metavar="LABEL=PATH[,PATH...]",
                   help="only plot: throughput against p99 TTFT/TPOT of saved sweeps (*.sweep.json) side by side, "
                   "into --result-dir (or .), several files of one label merged; with --goodput also the highest "
                   "rate within the SLOs per label; no load is sent")


def _conn(args: argparse.Namespace) -> dict[str, Any]:
    return connection_kwargs(args)


def build_workload(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    total = args.num_prompts + args.num_warmups
    if args.dataset_name == "random":
        reqs = random_requests(total, args.random_input_len, args.random_output_len, vocab_size,
                               args.random_range_ratio, args.random_prefix_len, args.seed)
    elif args.dataset_name == "chat":
        reqs = chat_like_requests(total, vocab_size, args.seed)
    elif args.dataset_name == "multi-turn":
        turns = args.multi_turn_turns
        if turns < 1 or args.num_prompts % turns:
            raise ValueError(f"--dataset-name multi-turn: --num-prompts ({args.num_prompts}) must be a multiple of "
                             f"--multi-turn-turns ({turns}): it counts requests, conversations x turns")
        reqs = multi_turn_requests(args.num_prompts // turns, turns, args.random_input_len, args.multi_turn_user_len,
                                   args.random_output_len, vocab_size, args.random_range_ratio,
                                   args.random_prefix_len, args.seed, num_warmups=args.num_warmups)
    else:
        if not args.dataset_path:
            raise ValueError("--dataset-name jsonl needs --dataset-path")
        reqs = jsonl_requests(args.dataset_path, total, args.random_output_len, args.seed)
    return reqs


def load_spec(args: argparse.Namespace) -> LoadSpec:
    ramp = None
    if args.ramp_up_strategy == "linear":
        if args.ramp_up_start_rps is None or args.ramp_up_end_rps is None:
            raise ValueError("--ramp-up-strategy linear needs --ramp-up-start-rps and --ramp-up-end-rps")
        ramp = (args.ramp_up_start_rps, args.ramp_up_end_rps)
    return LoadSpec(request_rate=args.request_rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                    ramp=ramp, seed=args.seed, ignore_eos=args.ignore_eos, temperature=args.temperature,
                    timeout=args.request_timeout)


def _target(args: argparse.Namespace) -> str:
    return args.base_url if args.backend == "openai" else args.address


async def _server_info(args: argparse.Namespace) -> dict[str, Any]:
    async with open_client(_target(args), args.backend, _conn(args), args.model) as c:
        await wait_ready(c, args.ready_timeout)
        if isinstance(c, AsyncTandemClient):
            return asdict(await c.model_info())
        info = await c.model_info()
        info["vocab_size"] = args.vocab_size or info["vocab_size"]
        if not info["vocab_size"]:
            raise ValueError(f"{args.base_url}/models does not say the vocabulary size: give --vocab-size")
        return info


async def run_one(args: argparse.Namespace, spec: LoadSpec, workload: list[BenchRequest], server: dict[str, Any],
                  name: str) -> dict[str, Any]:
    warm, measured = workload[: args.num_warmups], workload[args.num_warmups :]
    load = await run_load(_target(args), measured, spec, warmup=warm, ready_timeout=args.ready_timeout,
                          progress=not args.disable_tqdm, connection=_conn(args), backend=args.backend,
                          model=args.model)
    records, duration = load.records, load.duration
    slo = SLO.parse(args.goodput) if args.goodput else None
    run_args = {**{k: v for k, v in vars(args).items() if k not in ("func", "subparser", "api_key")},
                "request_rate": spec.request_rate, "max_concurrency": spec.max_concurrency}
    summary = {**report.metadata(run_args, server, args.label), "run": name,
               "max_concurrency": spec.max_concurrency, **summarize(records, duration, slo, load.prefix_cache)}
    report.print_table(summary, sys.stdout, f"{args.label}: {name}")
    if args.result_dir:
        base = args.result_filename or f"tandem-bench-{args.label}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        base = f"{base}-{name}" if args.sweep else base
        result_dir = Path(args.result_dir)
        paths = report.write_outputs(result_dir, base, summary, records, result_dir / "results.csv")
        from client.bench import plots

        if not args.no_plots and not plots.available():
            print("no plots: they need matplotlib (pip install 'tandem[bench]'); the JSON and CSV are written",
                  file=sys.stderr)
        elif not args.no_plots:
            title = f"{args.label} {name}: {summary['server'].get('model', '')}"
            paths["latency_plot"] = plots.latency_cdfs(records, result_dir / f"{base}.latency.png", title)
            paths["timeline_plot"] = plots.timeline(records, result_dir / f"{base}.timeline.png", title)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return summary


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    server = await _server_info(args)
    workload = build_workload(args, int(server["vocab_size"]))
    spec = load_spec(args)
    if not args.sweep:
        rate = "inf" if math.isinf(spec.request_rate) else f"{spec.request_rate:g}"
        return [await run_one(args, spec, workload, server, f"rate-{rate}")]
    sync_workload = workload[: args.num_warmups + min(args.num_prompts, args.sweep_sync_prompts)]
    sync = await run_one(args, replace(spec, request_rate=math.inf, max_concurrency=1, ramp=None), sync_workload,
                         server, "sync")
    full = await run_one(args, replace(spec, request_rate=math.inf, max_concurrency=None, ramp=None), workload,
                         server, "throughput")
    lo, hi = sync["request_throughput"], full["request_throughput"]
    out = [sync, full]
    rates = args.sweep_rates or [lo + (hi - lo) * (i + 1) / (args.sweep + 1) for i in range(args.sweep)]
    for rate in rates:
        out.append(await run_one(args, replace(spec, request_rate=rate, max_concurrency=None, ramp=None), workload,
                                 server, f"rate-{rate:.3g}"))
    if args.result_dir:
        base = args.result_filename or f"tandem-bench-{args.label}-sweep"
        path = Path(args.result_dir) / f"{base}.sweep.json"
        path.write_text(json.dumps(out, indent=1, default=str) + "\n")
        print(f"wrote {path}")
        if not args.no_plots:
            from client.bench import plots

            slo = SLO.parse(args.goodput).as_dict() if args.goodput else None
            print(f"wrote {plots.sweep({args.label: out}, Path(args.result_dir) / f'{base}.sweep.png', slo)}")
    return out


def compare_sweeps(args: argparse.Namespace) -> int:
    from client.bench import plots

    sweeps: dict[str, list[dict[str, Any]]] = {}
    for item in args.compare_sweeps:
        label, sep, paths = item.partition("=")
        if not sep or not paths:
            raise ValueError(f"--compare-sweeps takes LABEL=PATH[,PATH...], not {item!r}")
        # Several files under one label: passes of the same server at different rates, merged.
        sweeps.setdefault(label, []).extend(r for path in paths.split(",") for r in json.loads(Path(path).read_text()))
    out = Path(args.result_dir or ".") / f"{args.result_filename or 'sweeps'}.compare.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    slo = SLO.parse(args.goodput) if args.goodput else None
    print(f"wrote {plots.sweep(sweeps, out, slo.as_dict() if slo else None)}")
    if slo:
        for label, runs in sweeps.items():
            best = highest_rate_within(runs, slo)
            print(f"{label}: highest rate within the SLOs "
                  + ("none (the lowest rate misses)" if best is None else f"{best:g} req/s"))
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        if args.compare_sweeps:
            return compare_sweeps(args)
        summaries = asyncio.run(run(args))
    except (ValueError, OSError, TimeoutError) as e:
        print(f"tandem bench: {e}", file=sys.stderr)
        return 2
    return 0 if all(s["completed"] for s in summaries) else 1
