"""Probe: how fast N server-streaming RPCs started at once reach a grpc.aio servicer (plain gRPC, no model).

Owns the question "where does a new RPC wait between the client sending it and the handler being
called" (docs/benchmarks.md, "Why the cache-hit run is slower: requests reach the front end in waves").
A server process (grpc.aio by default, or the sync server with a thread pool) serves one generic
unary-stream method with bytes (de)serializers. Its handler records time.monotonic() on entry, sends it
as the first message (8 bytes, a float64), then streams `--messages` small messages at `--interval-ms`,
either each stream on its own timer (`--pace sleep`) or all streams woken together by one ticker like an
engine step (`--pace tick`), burning `--burn-us` of CPU per message sent (the front end's per-token work).
The server's event loop lag (a 1 ms sleep's lateness) is sampled while it runs.

The client (this process, or `--client-procs` processes) opens `--channels` grpc.aio channels (distinct
`grpc.channel_id` so they do not share a subchannel) and starts N streams at once. Reported as one JSON
object: when 50/90/100% of the streams reached the handler (seconds after the client started them), the
first wave (arrivals before the first stream's second message), the arrival rate after it, arrivals per
100 ms, the first-message latency seen by the client, and the server's loop lag. Both sides use
time.monotonic on one host.

    python -m bench.grpc_intake --streams 1024 --interval-ms 10 --messages 128 --pace tick --burn-us 20
    python -m bench.grpc_intake --streams 1024 --server-option grpc.max_concurrent_streams=100000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
import grpc.aio

METHOD = "/probe.Intake/Stream"
SERVICE, NAME = "probe.Intake", "Stream"


def _ident(b: bytes) -> bytes:
    return b


def _parse_options(items: Sequence[str]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for item in items:
        key, _, value = item.partition("=")
        out.append((key, int(value) if value.lstrip("-").isdigit() else value))
    return out


def _burn(us: float) -> None:
    if us <= 0:
        return
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


# ---------------------------------------------------------------- server


class _Ticker:
    """One clock for all streams (`--pace tick`): every interval, every waiting stream is woken at once."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.event = asyncio.Event()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            event, self.event = self.event, asyncio.Event()
            event.set()


def _aio_handler(args: argparse.Namespace, arrivals: list[float], ticker: _Ticker | None,
                 turns: list[int] | None = None, counter: _Turns | None = None):
    interval = args.interval_ms / 1000
    payload = b"x" * args.payload

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        t = time.monotonic()
        arrivals.append(t)
        if counter is not None and turns is not None:
            turns.append(counter.n)
        yield struct.pack("<d", t)
        for _ in range(args.messages):
            if ticker is not None:
                await ticker.event.wait()
            else:
                await asyncio.sleep(interval)
            _burn(args.burn_us)
            yield payload

    return stream


def _sync_handler(args: argparse.Namespace, arrivals: list[float]):
    interval = args.interval_ms / 1000
    payload = b"x" * args.payload

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        t = time.monotonic()
        arrivals.append(t)
        yield struct.pack("<d", t)
        for _ in range(args.messages):
            time.sleep(interval)
            _burn(args.burn_us)
            yield payload

    return stream


def _generic(handler: Any) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {NAME: grpc.unary_stream_rpc_method_handler(handler, request_deserializer=_ident,
                                                             response_serializer=_ident)})


class _Turns:
    """Counts event-loop iterations: one callback that re-schedules itself runs once per iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.n = 0
        self.loop = loop
        loop.call_soon(self._tick)

    def _tick(self) -> None:
        self.n += 1
        self.loop.call_soon(self._tick)


async def _lag_probe(samples: list[float]) -> None:
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.001)
        samples.append(time.monotonic() - t - 0.001)


async def _serve_aio(args: argparse.Namespace) -> None:
    arrivals: list[float] = []
    lag: list[float] = []
    turns: list[int] = []
    counter = _Turns(asyncio.get_running_loop()) if args.count_turns else None
    if args.switch_interval_ms:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    ticker = _Ticker(args.interval_ms / 1000) if args.pace == "tick" else None
    options = _parse_options(args.server_option)
    servers = []
    ports = []
    for _ in range(args.servers):
        kwargs: dict[str, Any] = {"options": options}
        if args.max_concurrent_rpcs:
            kwargs["maximum_concurrent_rpcs"] = args.max_concurrent_rpcs
        if args.migration_threads:
            kwargs["migration_thread_pool"] = futures.ThreadPoolExecutor(args.migration_threads)
        server = grpc.aio.server(**kwargs)
        server.add_generic_rpc_handlers((_generic(_aio_handler(args, arrivals, ticker, turns, counter)),))
        # --same-port: every server listens on the first one's port (SO_REUSEPORT, on by default in gRPC);
        # the kernel spreads connections, not RPCs, over them
        port = server.add_insecure_port(f"127.0.0.1:{ports[0] if (args.same_port and ports) else 0}")
        ports.append(port)
        await server.start()
        servers.append(server)
    tasks = [asyncio.ensure_future(_lag_probe(lag))]
    if ticker is not None:
        tasks.append(asyncio.ensure_future(ticker.run()))
    print("READY " + ",".join(map(str, ports)), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the client says when to stop
    _write_server_stats(args, arrivals, lag, turns, counter.n if counter else 0)
    for s in servers:
        await s.stop(0)


def _serve_sync(args: argparse.Namespace) -> None:
    arrivals: list[float] = []
    options = _parse_options(args.server_option)
    servers = []
    ports = []
    for _ in range(args.servers):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=args.sync_workers), options=options,
                             maximum_concurrent_rpcs=args.max_concurrent_rpcs or None)
        server.add_generic_rpc_handlers((_generic(_sync_handler(args, arrivals)),))
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    print("READY " + ",".join(map(str, ports)), flush=True)
    sys.stdin.readline()
    _write_server_stats(args, arrivals, [])
    for s in servers:
        s.stop(0)


def _write_server_stats(args: argparse.Namespace, arrivals: list[float], lag: list[float],
                        turns: Sequence[int] = (), total_turns: int = 0) -> None:
    lag_ms = sorted(x * 1000 for x in lag)
    # loop iterations between consecutive handler entries: 1-2 if accepting one call costs a round trip
    # through the loop (grpc.aio keeps one request_call outstanding per server)
    gaps = sorted(b - a for a, b in zip(turns, turns[1:], strict=False))
    stats = {"arrivals": len(arrivals),
             "loop_lag_ms": ({"p50": round(lag_ms[len(lag_ms) // 2], 2), "p90": round(lag_ms[int(len(lag_ms) * .9)], 2),
                              "max": round(lag_ms[-1], 2), "samples": len(lag_ms)} if lag_ms else None),
             "cpu_s": round(time.process_time(), 2),
             "loop_turns": total_turns,
             "turns_between_arrivals": ({"p50": gaps[len(gaps) // 2], "p90": gaps[int(len(gaps) * .9)],
                                         "max": gaps[-1]} if gaps else None)}
    with open(args.stats_file, "w") as f:
        json.dump(stats, f)


# ---------------------------------------------------------------- client


Record = tuple[float, float, float, float, int]  # start, server arrival, first message, second message, messages


async def _client(ports: Sequence[int], n: int, channels: int, options: list[tuple[str, Any]],
                  start_at: float) -> list[Record]:
    own = [("grpc.use_local_subchannel_pool", 1)]  # with a distinct channel_id: a connection per channel
    chans = [grpc.aio.insecure_channel(f"127.0.0.1:{ports[i % len(ports)]}",
                                       options=[*options, ("grpc.channel_id", i), *own])
             for i in range(channels)]
    for c in chans:
        await c.channel_ready()
    calls = [c.unary_stream(METHOD, request_serializer=_ident, response_deserializer=_ident) for c in chans]

    async def one(i: int) -> Record:
        start = time.monotonic()
        arrival = first = second = 0.0
        msgs = 0
        async for msg in calls[i % len(calls)](b""):
            msgs += 1
            if msgs == 1:
                first = time.monotonic()
                (arrival,) = struct.unpack("<d", msg)
            elif msgs == 2:
                second = time.monotonic()
        return start, arrival, first, second, msgs

    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    out = list(await asyncio.gather(*(one(i) for i in range(n))))
    for c in chans:
        await c.close()
    return out


def _client_part(argv: list[str]) -> int:
    """One of --client-procs: ports, its stream count, channels, the start time; records as JSON on stdout."""
    spec = json.loads(argv[0])
    recs = asyncio.run(_client(spec["ports"], spec["n"], spec["channels"], [tuple(o) for o in spec["options"]],
                               spec["start_at"]))
    json.dump(recs, sys.stdout)
    return 0


def _percentile_time(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, max(0, int(round(q * len(xs))) - 1))]


def _summarise(args: argparse.Namespace, recs: list[Record], server: dict[str, Any], wall: float) -> dict[str, Any]:
    t0 = min(r[0] for r in recs)
    arrivals = sorted(r[1] - t0 for r in recs)
    first_msgs = sorted(r[2] - t0 for r in recs)
    seconds = [r[3] - t0 for r in recs if r[3]]
    # the first wave: streams that reached the handler before any stream got its second message
    wave_end = min(seconds) if seconds else arrivals[-1]
    wave = sum(1 for a in arrivals if a <= wave_end)
    rest = arrivals[wave:]
    rate = (len(rest) / (rest[-1] - wave_end)) if len(rest) > 1 and rest[-1] > wave_end else None
    bins: dict[int, int] = {}
    for a in arrivals:
        bins[int(a * 10)] = bins.get(int(a * 10), 0) + 1
    latency = sorted(r[1] - r[0] for r in recs)
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("stats_file",)},
        "streams": len(recs),
        "incomplete_streams": sum(1 for r in recs if r[4] != args.messages + 1),
        "start_spread_s": round(max(r[0] for r in recs) - t0, 4),
        "handler_reached_s": {"first": round(arrivals[0], 4), "p50": round(_percentile_time(arrivals, .5), 4),
                              "p90": round(_percentile_time(arrivals, .9), 4), "p100": round(arrivals[-1], 4)},
        "handler_spread_s": round(arrivals[-1] - arrivals[0], 4),
        "first_wave": {"streams": wave, "ends_s": round(wave_end, 4)},
        "arrivals_per_s_after_first_wave": round(rate, 1) if rate else None,
        "client_first_message_s": {"p50": round(_percentile_time(first_msgs, .5), 4),
                                   "p100": round(first_msgs[-1], 4)},
        "send_to_handler_s": {"p50": round(statistics.median(latency), 4), "max": round(latency[-1], 4)},
        "arrivals_per_100ms": [bins.get(i, 0) for i in range(max(bins) + 1)],
        "server": server,
        "wall_s": round(wall, 3),
    }


def _run(args: argparse.Namespace) -> dict[str, Any]:
    stats_file = f"/tmp/grpc_intake_{os.getpid()}.json"
    cmd = [sys.executable, "-m", "bench.grpc_intake", "--serve", "--stats-file", stats_file,
           *[a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]]
    server = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        line = server.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"server did not start: {line!r}")
        ports = [int(p) for p in line.split()[1].split(",")]
        options = _parse_options(args.client_option)
        t = time.monotonic()
        if args.client_procs <= 1:
            recs = asyncio.run(_client(ports, args.streams, args.channels, options, time.monotonic()))
        else:
            start_at = time.monotonic() + 1.5  # every process has imported grpc and connected by then
            share = [args.streams // args.client_procs + (i < args.streams % args.client_procs)
                     for i in range(args.client_procs)]
            procs = [subprocess.Popen(
                [sys.executable, "-m", "bench.grpc_intake", "--client-part",
                 json.dumps({"ports": ports, "n": k, "channels": max(1, args.channels // args.client_procs),
                             "options": options, "start_at": start_at})], stdout=subprocess.PIPE, text=True)
                for k in share]
            recs = []
            for p in procs:
                out, _ = p.communicate()
                recs.extend(tuple(r) for r in json.loads(out))
            t = start_at
        wall = time.monotonic() - t
        server.stdin.write("stop\n")
        server.stdin.flush()
        server.wait(timeout=30)
        with open(stats_file) as f:
            server_stats = json.load(f)
        os.unlink(stats_file)
    finally:
        if server.poll() is None:
            server.kill()
    return _summarise(args, recs, server_stats, wall)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=1024)
    p.add_argument("--messages", type=int, default=128, help="messages per stream after the first")
    p.add_argument("--interval-ms", type=float, default=10.0)
    p.add_argument("--pace", choices=("sleep", "tick"), default="tick",
                   help="tick: one clock wakes every stream at once (like an engine step); sleep: a timer each")
    p.add_argument("--burn-us", type=float, default=0.0, help="CPU burnt in the handler per message sent")
    p.add_argument("--payload", type=int, default=16, help="bytes per message")
    p.add_argument("--server-kind", choices=("aio", "sync"), default="aio")
    p.add_argument("--servers", type=int, default=1, help="grpc servers in the server process, one port each")
    p.add_argument("--count-turns", action="store_true",
                   help="count loop iterations between arrivals (keeps the loop spinning: perturbs the run)")
    p.add_argument("--switch-interval-ms", type=float, default=0.0,
                   help="server: sys.setswitchinterval (the GIL hand-off the completion-queue poller thread waits for)")
    p.add_argument("--same-port", action="store_true", help="--servers share one port (SO_REUSEPORT)")
    p.add_argument("--sync-workers", type=int, default=2048)
    p.add_argument("--max-concurrent-rpcs", type=int, default=0)
    p.add_argument("--migration-threads", type=int, default=0, help="aio: migration_thread_pool workers")
    p.add_argument("--server-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--client-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--channels", type=int, default=1, help="client channels (streams round-robin over them)")
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--label", default="")
    p.add_argument("--json", default="", help="append the result to this file (a JSON list)")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stats-file", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--client-part":
        return _client_part(argv[1:])
    args = parse_args(argv)
    if args.serve:
        if args.server_kind == "sync":
            _serve_sync(args)
        else:
            asyncio.run(_serve_aio(args))
        return 0
    result = _run(args)
    summary = {k: result[k] for k in ("streams", "handler_reached_s", "first_wave", "arrivals_per_s_after_first_wave",
                                      "server", "wall_s")}
    print(json.dumps({"label": args.label, **summary}), file=sys.stderr)
    print(json.dumps(result))
    if args.json:
        try:
            with open(args.json) as f:
                records = json.load(f)
        except FileNotFoundError:
            records = []
        records.append(result)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "grpc_intake"
    sys.exit(main())
