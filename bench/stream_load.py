"""N concurrent GenerateStream RPCs against a real Tandem server (scheduler side + worker) on CUDA.

Reports one JSON line: wall time, output tokens/s, stream messages received (a front end that lags
merges several tokens into one message), the engine's steps over the measured round, the worker's
busy ratio (GetStats: the whole session, warm-up included) and when the streams got their first
message. Imports only `client`, so the same file measures any code tree: run it with that tree
first on PYTHONPATH, e.g. the base commit's sources unpacked into BEFORE and this checkout as AFTER:

    for T in BEFORE AFTER; do (cd $T && PYTHONPATH=$T:$T/proto python3 AFTER/bench/stream_load.py \\
        --label $T --rows 1024 --prompt-len 128 --new-tokens 128 --model random:llama-3.2-1b); done

`--client-procs N` spreads the streams over N client processes (one channel each), so that the
load generator's own event loop is not what limits how fast the streams start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time

from client import AsyncTandemClient
from client.local_server import TandemServer


def _prompts(args: argparse.Namespace, which: str) -> list[list[int]]:
    """The measured round's prompts, or the warm-up's: the same unless --fresh-warmup."""
    rng = random.Random(0)

    def make() -> list[list[int]]:
        return [[rng.randrange(3, 49152) for _ in range(args.prompt_len)] for _ in range(args.rows)]

    measured = make()
    return make() if which == "warmup" and args.fresh_warmup else measured


Stream = tuple[float, float, float, int, int]  # start, first message, end (monotonic), messages, tokens


async def _round(address: str, prompts: list[list[int]], n: int) -> list[Stream]:
    """Streams every prompt at once."""
    async with AsyncTandemClient(address) as c:
        async def one(prompt: list[int]) -> Stream:
            msgs = toks = 0
            start, first = time.monotonic(), 0.0
            async for chunk in c.generate_stream(token_ids=prompt, max_new_tokens=n, temperature=0, ignore_eos=True):
                msgs += 1
                toks += len(chunk.token_ids)
                first = first or time.monotonic()
            return start, first, time.monotonic(), msgs, toks

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def _client_part(args: argparse.Namespace) -> int:
    """A client process of --client-procs: its share of one round, as JSON lines on stdout."""
    part, parts = map(int, args.part.split("/"))
    prompts = _prompts(args, args.which)[part::parts]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()  # go: every client process starts its streams at once
    for row in asyncio.run(_round(args.connect, prompts, args.round_tokens)):
        sys.stdout.write(json.dumps(row) + "\n")
    return 0


def _run_round(args: argparse.Namespace, address: str, which: str, n: int) -> list[Stream]:
    if args.client_procs <= 1:
        return asyncio.run(_round(address, _prompts(args, which), n))
    base = [sys.executable, __file__, "--connect", address, "--which", which, "--round-tokens", str(n),
            "--rows", str(args.rows), "--prompt-len", str(args.prompt_len)] + (["--fresh-warmup"] * args.fresh_warmup)
    procs = [subprocess.Popen([*base, "--part", f"{i}/{args.client_procs}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for i in range(args.client_procs)]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    rows = []
    for p in procs:
        out, _ = p.communicate()
        assert p.returncode == 0, f"client process exited {p.returncode}"
        rows += [tuple(json.loads(line)) for line in out.splitlines()]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/stream_load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--model", default="random:llama-3.2-1b")
    p.add_argument("--max-num-tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda", help="The worker's device (cpu: float32, for a dry run).")
    p.add_argument("--fresh-warmup", action="store_true",
                   help="Warm up with other prompts than the measured round's (default: the same prompts, so "
                        "with prefix caching the measured round finds its prompts cached).")
    p.add_argument("--client-procs", type=int, default=1, help="Client processes the streams are spread over.")
    p.add_argument("--stream-interval", type=int, default=1, help="The scheduler's --stream-interval.")
    p.add_argument("--timeline", default="",
                   help="Write each measured stream's start, first-message and end times (monotonic clock, as the "
                        "server's --step-trace) to this file, one JSON line per stream.")
    # a client process of --client-procs (internal)
    p.add_argument("--connect", default="", help=argparse.SUPPRESS)
    p.add_argument("--part", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--which", default="measured", help=argparse.SUPPRESS)
    p.add_argument("--round-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.connect:
        return _client_part(args)

    blocks = args.rows * -(-(args.prompt_len + args.new_tokens + 8) // 16) + 256
    sched = ["--max-waiting", str(2 * args.rows), "--stream-interval", str(args.stream_interval)]
    server = TandemServer(model=args.model, scheduler_args=sched, worker_args=[
        "--device", args.device, "--dtype", "bfloat16" if args.device.startswith("cuda") else "float32",
        "--num-blocks", str(blocks), "--max-num-rows", str(args.rows), "--max-num-tokens", str(args.max_num_tokens)])
    server.start(600)
    try:
        _run_round(args, server.address, "warmup", 8)  # kernels, graphs, allocator
        s0 = server.stats()
        rows = _run_round(args, server.address, "measured", args.new_tokens)
        s1 = server.stats()
    finally:
        server.stop()
    start, first, end = (min(r[0] for r in rows), sorted(r[1] for r in rows), max(r[2] for r in rows))
    wall, msgs, toks = end - start, sum(r[3] for r in rows), sum(r[4] for r in rows)
    assert toks == args.rows * args.new_tokens, toks
    steps = s1.steps - s0.steps
    if args.timeline:
        with open(args.timeline, "w") as f:
            f.writelines(json.dumps({"start": r[0], "first": r[1], "end": r[2]}) + "\n" for r in rows)
    print(json.dumps({
        "code": args.label, "rows": args.rows, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "model": args.model, "fresh_warmup": args.fresh_warmup, "client_procs": args.client_procs,
        "stream_interval": args.stream_interval, "wall_s": wall,
        "output_tok_s": toks / wall, "messages": msgs, "tokens": toks, "steps": steps,
        "ms_per_step": 1000 * wall / max(1, steps), "session_busy_ratio": s1.worker_busy_ratio,
        "first_message_s": {"p50": first[len(first) // 2] - start, "max": first[-1] - start}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
