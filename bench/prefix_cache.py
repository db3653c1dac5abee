"""Prefix caching on CPU, end to end: the same three workloads on a server with the prefix cache (the
default) and on one started with `--no-prefix-caching`, in one run.

The server is the real scheduler + worker pair (`client.local_server.TandemServer`) serving the
embedded SmolLM2-135M-Instruct (`smollm2-135m-instruct`, float32) on this machine's CPU. Only one
server runs at a time: each round starts the caching server, runs the three workloads on it, stops
it, then does the same with the caching-off server (`--repeats` rounds, so the modes alternate
on, off, on, off). Every prompt is token ids drawn from a seeded RNG, identical for both modes;
decoding is greedy with `ignore_eos`, so every request produces exactly `--new-tokens` tokens.

Workloads (default sizes), each sent through `AsyncTandemClient.generate_stream` over gRPC:

- `shared`: 32 requests made of one 1024-token system prompt plus 32 distinct tokens each, all sent
  at once. Before them, and before the clock starts, ONE warm request (the system prompt plus 32
  other tokens, 8 new tokens) is sent and awaited: on the caching server it leaves the system
  prompt's full blocks in the cache, so the measured requests find them; the caching-off server
  gets the same warm request.
- `multi-turn`: 8 conversations of 4 turns, run concurrently; the turns of one conversation are
  sequential, and each turn's prompt is the conversation so far: the previous turn's prompt, the
  answer it got (its token ids) and a new user chunk (first turn ~256 tokens, later chunks ~64,
  lengths within +-12.5%).
- `no-prefix`: 64 prompts of ~256 random tokens (+-12.5%) sharing nothing, all sent at once.

Per workload and mode: wall time (first send to last token), output tok/s (output tokens / wall),
TTFT measured by this client (send to the first streamed chunk carrying a token; the headline) and
by the server (`timings.ttft_s`, from the request's acceptance), mean and p99 (linear interpolation,
numpy's default), for `multi-turn` also the mean TTFT of turn 1 and of turns 2-4, and the prefix-cache
hit ratio from the server's `GetStats` counters taken right before and after the measured requests
(delta `prefix_cache_hits` / delta `prefix_cache_queries`, prompt tokens; the server is idle at both),
and the CPU seconds the worker, the scheduler, this client and the whole machine spent meanwhile
(`/proc`; what none of the three used is other work on the shared cores). The workloads run in the
order above on each server, so `no-prefix` on the caching server runs with the earlier workloads'
blocks still cached (evictable). The caching-off server's
outputs are the reference: the token ids of each request are compared between the two modes of a
round. Targets (from the issue, reported, not tuned for): `shared` >= 5x lower mean TTFT and >= 2x the
throughput with caching; `multi-turn` >= 3x lower mean TTFT on turns 2-4; `no-prefix` throughput
within 2% of caching off. Prints a markdown table and writes a JSON record.

    python -m bench.prefix_cache [--repeats 3] [--json docs/bench/prefix_cache.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.records import fmt, write_record
from client import AsyncTandemClient
from client.bench.metrics import percentile
from client.local_server import TandemServer

MODEL = "smollm2-135m-instruct"
FIRST_ID = 3  # token ids drawn from [FIRST_ID, vocab_size), as `tandem bench` draws them
WORKLOADS = ("shared", "multi-turn", "no-prefix")
MODES = ("on", "off")


@dataclass
class Outcome:
    """One request as this client saw it (times are `time.perf_counter()` seconds)."""

    prompt_len: int
    token_ids: list[int]
    ttft_s: float | None  # client side: send -> first chunk carrying a token
    server_ttft_s: float  # the server's timings.ttft_s (accepted -> first token)
    e2e_s: float
    cached_tokens: int  # usage.cached_tokens
    start: float
    end: float
    conversation: int | None = None
    turn: int | None = None
    prompt_ids: list[int] = field(default_factory=list, repr=False)


async def stream_one(client: AsyncTandemClient, prompt: list[int], new_tokens: int) -> Outcome:
    t0 = time.perf_counter()
    first: float | None = None
    ids: list[int] = []
    completion = None
    async for chunk in client.generate_stream(token_ids=prompt, max_new_tokens=new_tokens, temperature=0,
                                              ignore_eos=True):
        if chunk.token_ids:
            if first is None:
                first = time.perf_counter()
            ids.extend(chunk.token_ids)
        if chunk.completion is not None:
            completion = chunk.completion
    end = time.perf_counter()
    if completion is None:
        raise RuntimeError("stream ended without a completion")
    if len(ids) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} tokens, got {len(ids)} ({completion.finish_reason})")
    return Outcome(len(prompt), ids, None if first is None else first - t0, completion.timings.ttft_s, end - t0,
                   completion.usage.cached_tokens, t0, end, prompt_ids=list(prompt))


# ------------------------------------------------------------------------------------------ workloads


@dataclass
class Workloads:
    """Every prompt of the run, fixed by the seed before any server starts."""

    system: list[int]
    warm: list[int]
    shared: list[list[int]]
    chats: list[list[list[int]]]  # per conversation: the first turn's prompt, then each later turn's user chunk
    no_prefix: list[list[int]]


def _about(rng: random.Random, n: int, spread: float = 0.125) -> int:
    return rng.randint(max(1, round(n * (1 - spread))), max(1, round(n * (1 + spread))))


def build_workloads(args: argparse.Namespace, vocab_size: int) -> Workloads:
    rng = random.Random(args.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_ID, vocab_size) for _ in range(n)]

    system = ids(args.system_len)
    warm = system + ids(args.suffix_len)
    shared = [system + ids(args.suffix_len) for _ in range(args.shared_requests)]
    chats = [[ids(_about(rng, args.first_turn_len))] + [ids(_about(rng, args.user_len)) for _ in range(args.turns - 1)]
             for _ in range(args.conversations)]
    no_prefix = [ids(_about(rng, args.random_len)) for _ in range(args.random_requests)]
    return Workloads(system, warm, shared, chats, no_prefix)


async def run_all_at_once(client: AsyncTandemClient, prompts: list[list[int]], new_tokens: int) -> list[Outcome]:
    return list(await asyncio.gather(*(stream_one(client, p, new_tokens) for p in prompts)))


async def run_conversations(client: AsyncTandemClient, chats: list[list[list[int]]], new_tokens: int) -> list[Outcome]:
    async def converse(c: int, chunks: list[list[int]]) -> list[Outcome]:
        history: list[int] = []
        out = []
        for turn, user in enumerate(chunks):
            prompt = history + user  # the conversation so far, then the new user chunk
            o = await stream_one(client, prompt, new_tokens)
            o.conversation, o.turn = c, turn + 1
            out.append(o)
            history = prompt + o.token_ids  # the answer the server gave, as token ids
        return out

    per_chat = await asyncio.gather(*(converse(c, chunks) for c, chunks in enumerate(chats)))
    return [o for chat in per_chat for o in chat]


# ------------------------------------------------------------------------------------------ measuring


@dataclass
class Run:
    """One workload on one server (one mode, one round). `outcomes` stays out of the JSON."""

    workload: str
    mode: str
    round: int
    num_requests: int = 0
    wall_s: float | None = None
    output_tokens: int = 0
    output_tok_s: float | None = None
    mean_ttft_s: float | None = None  # client side
    p99_ttft_s: float | None = None
    mean_server_ttft_s: float | None = None
    p99_server_ttft_s: float | None = None
    mean_ttft_turn1_s: float | None = None  # multi-turn only, client side
    mean_ttft_turns2plus_s: float | None = None
    mean_server_ttft_turn1_s: float | None = None
    mean_server_ttft_turns2plus_s: float | None = None
    prefix_cache_queries: int | None = None  # GetStats delta over the measured requests (prompt tokens)
    prefix_cache_hits: int | None = None
    hit_ratio: float | None = None
    cached_tokens_usage: int | None = None  # sum of usage.cached_tokens of the measured requests
    prompt_tokens: int = 0
    warm_request: dict[str, Any] | None = None
    identical_to_off: int | None = None  # requests whose token ids equal the caching-off server's, same round
    same_prompts_as_off: int | None = None  # multi-turn: prompts (which carry earlier answers) equal to off's
    load_avg_before: float | None = None
    steps: int | None = None  # GetStats deltas over the measured requests
    preemptions: int | None = None
    # CPU seconds over the measured requests (/proc): the worker, the scheduler, this client, the whole
    # machine (busy, and stolen by the hypervisor); `others_cpu_s` is the machine's busy time none of
    # the three used: other work on the shared cores.
    cpu: dict[str, float] | None = None
    error: str | None = None
    outcomes: list[Outcome] = field(default_factory=list, repr=False)

    def finish(self, outcomes: list[Outcome], before: Any, after: Any) -> None:
        self.outcomes = outcomes
        self.num_requests = len(outcomes)
        self.wall_s = max(o.end for o in outcomes) - min(o.start for o in outcomes)
        self.output_tokens = sum(len(o.token_ids) for o in outcomes)
        self.output_tok_s = self.output_tokens / self.wall_s
        self.prompt_tokens = sum(o.prompt_len for o in outcomes)
        ttft = [o.ttft_s for o in outcomes if o.ttft_s is not None]
        server = [o.server_ttft_s for o in outcomes]
        self.mean_ttft_s, self.p99_ttft_s = statistics.fmean(ttft), percentile(ttft, 99)
        self.mean_server_ttft_s, self.p99_server_ttft_s = statistics.fmean(server), percentile(server, 99)
        if self.workload == "multi-turn":
            first = [o for o in outcomes if o.turn == 1]
            later = [o for o in outcomes if o.turn and o.turn > 1]
            self.mean_ttft_turn1_s = statistics.fmean(o.ttft_s for o in first if o.ttft_s is not None)
            self.mean_ttft_turns2plus_s = statistics.fmean(o.ttft_s for o in later if o.ttft_s is not None)
            self.mean_server_ttft_turn1_s = statistics.fmean(o.server_ttft_s for o in first)
            self.mean_server_ttft_turns2plus_s = statistics.fmean(o.server_ttft_s for o in later)
        self.prefix_cache_queries = after.prefix_cache_queries - before.prefix_cache_queries
        self.prefix_cache_hits = after.prefix_cache_hits - before.prefix_cache_hits
        self.hit_ratio = self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else None
        self.cached_tokens_usage = sum(o.cached_tokens for o in outcomes)
        self.steps = after.steps - before.steps
        self.preemptions = after.num_preemptions - before.num_preemptions

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "outcomes"}
        out["requests"] = [{"conversation": o.conversation, "turn": o.turn, "prompt_len": o.prompt_len,
                            "cached_tokens": o.cached_tokens, "ttft_s": o.ttft_s, "server_ttft_s": o.server_ttft_s,
                            "e2e_s": o.e2e_s} for o in self.outcomes]
        return out


def run_server(mode: str, rnd: int, wl: Workloads, args: argparse.Namespace, worker_args: list[str],
               scheduler_args: list[str]) -> list[Run]:
    runs = [Run(name, mode, rnd) for name in args.workloads]
    sched = [*scheduler_args, *(["--no-prefix-caching"] if mode == "off" else [])]
    server = TandemServer(model=args.model, scheduler_args=sched, worker_args=worker_args)
    try:
        server.start(600)
        with asyncio.Runner() as loop:
            client = loop.run(_connect(server.address))
            try:
                for run in runs:
                    run.load_avg_before = os.getloadavg()[0]
                    print(f"round {rnd} caching {mode}: {run.workload} (load average {run.load_avg_before:.2f}) ...",
                          flush=True)
                    try:
                        _measure(run, loop, client, server, wl, args)
                    except Exception as e:  # one broken workload must not hide the others
                        run.error = f"{type(e).__name__}: {e}"
                        traceback.print_exc()
                        continue
                    print(f"  wall {run.wall_s:.2f} s, {run.output_tok_s:.1f} tok/s, mean TTFT {run.mean_ttft_s:.3f} s"
                          f", hit ratio {fmt(run.hit_ratio, '.3f')}, {run.steps} steps, cpu {run.cpu}", flush=True)
            finally:
                loop.run(client.close())
    except Exception as e:
        for run in runs:
            run.error = run.error or f"server: {type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        server.stop()
    return runs


async def _connect(address: str) -> AsyncTandemClient:
    return AsyncTandemClient(address, timeout=1800)  # inside the loop: the channel binds to the running loop


def _measure(run: Run, loop: asyncio.Runner, client: AsyncTandemClient, server: TandemServer, wl: Workloads,
             args: argparse.Namespace) -> None:
    n = args.new_tokens
    if run.workload == "shared":
        warm = loop.run(stream_one(client, wl.warm, args.warm_new_tokens))
        run.warm_request = {"prompt_len": warm.prompt_len, "new_tokens": args.warm_new_tokens,
                            "cached_tokens": warm.cached_tokens, "ttft_s": warm.ttft_s, "e2e_s": warm.e2e_s,
                            "note": "the system prompt + 32 other tokens, sent and awaited before the clock; it "
                                    "leaves the system prompt's full blocks in the cache (caching on)"}
        measured = lambda: run_all_at_once(client, wl.shared, n)  # noqa: E731
    elif run.workload == "multi-turn":
        measured = lambda: run_conversations(client, wl.chats, n)  # noqa: E731
    else:
        measured = lambda: run_all_at_once(client, wl.no_prefix, n)  # noqa: E731
    before = server.wait_idle(120)  # nothing in flight: the counters cover exactly the measured requests
    cpu0 = cpu_sample(server)
    outcomes = loop.run(measured())
    cpu1 = cpu_sample(server)
    after = server.wait_idle(120)
    run.finish(outcomes, before, after)
    run.cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0}
    run.cpu["others_cpu_s"] = round(run.cpu["machine_busy_s"] - run.cpu["worker_s"] - run.cpu["scheduler_s"]
                                    - run.cpu["client_s"], 2)


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_sample(server: TandemServer) -> dict[str, float]:
    """CPU seconds so far of the worker, the scheduler, this process, and the machine (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = cpu[:8]
    me = os.times()
    return {"worker_s": _proc_cpu_s(server.worker.pid), "scheduler_s": _proc_cpu_s(server.scheduler.pid),
            "client_s": me.user + me.system, "machine_busy_s": (user + nice + system + irq + softirq) / tick,
            "machine_steal_s": steal / tick}


def compare(runs: list[Run]) -> None:
    """Sets `identical_to_off` on every run of a round from the caching-off run of the same workload."""
    for run in runs:
        off = next((r for r in runs if r.workload == run.workload and r.round == run.round and r.mode == "off"
                    and r.outcomes), None)
        if off is None or not run.outcomes:
            continue
        run.identical_to_off = sum(a.token_ids == b.token_ids for a, b in zip(run.outcomes, off.outcomes, strict=True))
        if run.workload == "multi-turn":
            run.same_prompts_as_off = sum(a.prompt_ids == b.prompt_ids
                                          for a, b in zip(run.outcomes, off.outcomes, strict=True))


# ------------------------------------------------------------------------------------------ targets


def _mean(runs: list[Run], attr: str) -> float | None:
    vals = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return statistics.fmean(vals) if vals else None


def _ratio(on: float | None, off: float | None, way: str) -> float | None:
    if on is None or off is None or not on or not off:
        return None
    return off / on if way == "off/on" else on / off


def _met(x: float | None, threshold: float | None) -> bool | None:
    """At least `threshold`; with no threshold, within 2% of 1."""
    if x is None:
        return None
    return x >= threshold if threshold is not None else abs(x - 1) <= 0.02


def targets(runs: list[Run], rounds: int) -> list[dict[str, Any]]:
    """Each target per round (the on and off runs of that round) and on the means over the rounds."""
    specs = [  # (workload, what, attr, on/off or off/on, threshold, how)
        ("shared", "mean TTFT off / on >= 5", "mean_ttft_s", "off/on", 5.0),
        ("shared", "output tok/s on / off >= 2", "output_tok_s", "on/off", 2.0),
        ("multi-turn", "mean TTFT turns 2-4 off / on >= 3", "mean_ttft_turns2plus_s", "off/on", 3.0),
        ("no-prefix", "output tok/s on / off within 2% (0.98..1.02)", "output_tok_s", "on/off", None),
    ]
    out = []
    for workload, what, attr, way, threshold in specs:
        per_round = []
        for rnd in range(1, rounds + 1):
            pick = {r.mode: getattr(r, attr) for r in runs if r.workload == workload and r.round == rnd}
            x = _ratio(pick.get("on"), pick.get("off"), way)
            per_round.append({"round": rnd, "on": pick.get("on"), "off": pick.get("off"), "ratio": x,
                              "met": _met(x, threshold)})
        on = _mean([r for r in runs if r.workload == workload and r.mode == "on"], attr)
        off = _mean([r for r in runs if r.workload == workload and r.mode == "off"], attr)
        x = _ratio(on, off, way)
        if any(r.workload == workload for r in runs):
            out.append({"workload": workload, "target": what, "metric": attr, "per_round": per_round,
                        "mean_on": on, "mean_off": off, "ratio_of_means": x, "met_on_means": _met(x, threshold),
                        "met_every_round": all(p["met"] for p in per_round) if per_round else None})
    return out


# ------------------------------------------------------------------------------------------ report



def markdown_table(runs: list[Run], wl: Workloads) -> str:
    lines = [
        "| workload | caching | round | wall s | output tok/s | mean TTFT s | p99 TTFT s | TTFT turn 1 / turns 2-4 s "
        "| server mean TTFT s | hit ratio | identical to off | other CPU s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {w: i for i, w in enumerate(WORKLOADS)}
    for r in sorted(runs, key=lambda r: (order[r.workload], r.mode != "on", r.round)):
        if r.error and r.wall_s is None:
            lines.append(f"| {r.workload} | {r.mode} | {r.round} | failed: {r.error.splitlines()[0][:100]} "
                         "| | | | | | | | |")
            continue
        turns = "-" if r.mean_ttft_turn1_s is None else \
            f"{r.mean_ttft_turn1_s:.3f} / {r.mean_ttft_turns2plus_s:.3f}"
        same = "-" if r.identical_to_off is None else f"{r.identical_to_off}/{r.num_requests}"
        lines.append(
            f"| {r.workload} | {r.mode} | {r.round} | {fmt(r.wall_s, '.2f')} | {fmt(r.output_tok_s, '.1f')} | "
            f"{fmt(r.mean_ttft_s, '.3f')} | {fmt(r.p99_ttft_s, '.3f')} | {turns} | "
            f"{fmt(r.mean_server_ttft_s, '.3f')} | {fmt(r.hit_ratio, '.3f')} | {same} | "
            f"{fmt(r.cpu and r.cpu['others_cpu_s'], '.1f')} |")
    return "\n".join(lines)


def targets_table(result: list[dict[str, Any]]) -> str:
    lines = ["| workload | target | per round (ratio) | ratio of the means | met |", "| --- | --- | --- | ---: | --- |"]
    for t in result:
        rounds = ", ".join(f"r{p['round']}: {fmt(p['ratio'], '.2f')}" for p in t["per_round"])
        met = {True: "yes", False: "no", None: "-"}
        verdict = met[t["met_on_means"]]
        if t["met_on_means"] is not None and t["met_every_round"] != t["met_on_means"]:
            verdict += " (not in every round)"
        lines.append(f"| {t['workload']} | {t['target']} | {rounds} | {fmt(t['ratio_of_means'], '.2f')} | {verdict} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import torch

    return {"processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_num_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def _vocab_size() -> int:
    from worker_svc.models import embedded_model_dir

    config = json.loads((Path(embedded_model_dir()) / "config.json").read_text())
    return int(config["vocab_size"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="rounds; each runs every workload on, then off")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset (for smoke tests)")
    p.add_argument("--alternate-order", action="store_true",
                   help="even rounds run off before on, so that a position effect (first or second server of a "
                        "round) cancels over an even number of rounds")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per request (every workload)")
    p.add_argument("--system-len", type=int, default=1024, help="shared: the system prompt's tokens")
    p.add_argument("--suffix-len", type=int, default=32, help="shared: distinct tokens after it, per request")
    p.add_argument("--shared-requests", type=int, default=32)
    p.add_argument("--warm-new-tokens", type=int, default=8, help="shared: new tokens of the warm request")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--first-turn-len", type=int, default=256, help="multi-turn: first turn's prompt (+-12.5%%)")
    p.add_argument("--user-len", type=int, default=64, help="multi-turn: new user tokens per later turn (+-12.5%%)")
    p.add_argument("--random-requests", type=int, default=64)
    p.add_argument("--random-len", type=int, default=256, help="no-prefix: prompt tokens (+-12.5%%)")
    p.add_argument("--max-num-tokens", type=int, default=512, help="worker: most tokens per step")
    p.add_argument("--max-num-rows", type=int, default=64, help="worker: most requests per step")
    p.add_argument("--num-blocks", type=int, default=3072, help="worker: KV blocks (16 tokens each)")
    p.add_argument("--worker-args", default="", help="extra worker_svc flags for both servers (one string)")
    p.add_argument("--scheduler-args", default="", help="extra scheduler_svc flags for both servers (one string)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=MODEL,
                   help="served model; a random: shape draws its prompts from the embedded model's vocabulary too")
    p.add_argument("--device", default="cpu", help="worker device (cuda for the GPU runs)")
    p.add_argument("--json", default="docs/bench/prefix_cache.json", help="where to write the JSON record")
    args = p.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not set(args.workloads) <= set(WORKLOADS) or args.repeats < 1:
        p.error(f"--workloads is a subset of {','.join(WORKLOADS)}; --repeats >= 1")

    worker_args = ["--device", args.device, "--max-num-tokens", str(args.max_num_tokens), "--max-num-rows",
                   str(args.max_num_rows), "--num-blocks", str(args.num_blocks), *shlex.split(args.worker_args)]
    scheduler_args = shlex.split(args.scheduler_args)
    wl = build_workloads(args, _vocab_size())
    print(f"shared: {len(wl.shared)} x ({len(wl.system)} + {args.suffix_len}) tokens; multi-turn: "
          f"{len(wl.chats)} x {args.turns} turns; no-prefix: {len(wl.no_prefix)} x "
          f"{min(map(len, wl.no_prefix))}..{max(map(len, wl.no_prefix))} tokens; {args.new_tokens} new tokens each; "
          f"{args.repeats} rounds", flush=True)

    runs: list[Run] = []
    def order(rnd: int) -> tuple[str, ...]:
        return MODES[::-1] if args.alternate_order and rnd % 2 == 0 else MODES

    for rnd in range(1, args.repeats + 1):
        for mode in order(rnd):  # one server at a time, never two: the machine has few cores
            runs += run_server(mode, rnd, wl, args, worker_args, scheduler_args)
    compare(runs)
    checked = targets(runs, args.repeats)

    table, ttable = markdown_table(runs, wl), targets_table(checked)
    print()
    print(table)
    print()
    print(ttable)
    record = {
        "command": " ".join(["python", "-m", "bench.prefix_cache", *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "model": args.model, "greedy": True, "ignore_eos": True, "new_tokens": args.new_tokens, "seed": args.seed,
            "repeats": args.repeats, "order": [f"round {r} caching {m}" for r in range(1, args.repeats + 1)
                                               for m in order(r)],
            "worker_args": worker_args, "scheduler_args_on": scheduler_args,
            "scheduler_args_off": [*scheduler_args, "--no-prefix-caching"],
            "pipeline_depth": "scheduler default (0 = auto: 1 for a CPU worker)", "block_size": "worker default (16)",
            "ttft": "client side: generate_stream send -> first chunk carrying a token (server's timings.ttft_s "
                    "beside it as server_*)",
            "throughput": "output tokens of the measured requests / wall (first send -> last token)",
            "hit_ratio": "GetStats delta prefix_cache_hits / delta prefix_cache_queries over the measured "
                         "requests (server idle before and after)",
            "cpu": "CPU seconds over the measured requests from /proc: worker, scheduler, this client, the machine "
                   "(busy, steal); others_cpu_s = machine busy - the three (other work on the shared cores)",
            "workloads": {
                "shared": {"requests": len(wl.shared), "system_len": len(wl.system), "suffix_len": args.suffix_len,
                           "warm_request": f"1 x ({len(wl.system)} + {args.suffix_len}) tokens, "
                                           f"{args.warm_new_tokens} new tokens, awaited before the clock",
                           "sent": "all at once"},
                "multi-turn": {"conversations": len(wl.chats), "turns": args.turns,
                               "first_turn_lens": [len(c[0]) for c in wl.chats],
                               "user_chunk_lens": [[len(x) for x in c[1:]] for c in wl.chats],
                               "sent": "conversations concurrently, turns sequential; turn k's prompt = turn k-1's "
                                       "prompt + its answer + a new user chunk"},
                "no-prefix": {"requests": len(wl.no_prefix), "prompt_lens": [len(x) for x in wl.no_prefix],
                              "sent": "all at once"},
            },
        },
        "runs": [r.to_json() for r in runs],
        "targets": checked,
        "table_markdown": table,
        "targets_markdown": ttable,
    }
    write_record(args.json, record)
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
