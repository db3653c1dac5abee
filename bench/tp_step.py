"""`python -m bench tp-step`: decode step time with one worker rank against a tensor-parallel group.

Runs `tandem serve --tensor-parallel-size N` for each N given (one after the other, on the same
machine, in one run), sends the same batch of greedy requests, and reports the mean step time as wall
time over the steps the server counted (GetStats `steps`; the requests' prefill is one of them).
On a CPU machine the ranks share its cores (gloo over loopback): a record of what the split costs
there, not a performance target; the GPU figures (NCCL) are measured on GPUs. It also times the plan
relay alone: rank 0 broadcasting plan-sized messages to a follower over gloo, as group_link.py does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

from tandem.v1 import api_pb2

from bench.records import fmt, write_record
from client import AsyncTandemClient, TandemClient
from client.local_server import ROOT, free_port, health_status

SERVING = 1


def _stats(address: str) -> api_pb2.ServerStats:
    with TandemClient(address) as c:
        return c.server_stats(timeout=30)


async def _batch(address: str, batch: int, prompt_len: int, new_tokens: int) -> None:
    async with AsyncTandemClient(address) as c:
        results = await asyncio.gather(*(
            c.generate(token_ids=[(7 * i + j) % 1000 + 3 for j in range(prompt_len)], max_new_tokens=new_tokens,
                       temperature=0, ignore_eos=True) for i in range(batch)))
    assert all(len(r.token_ids) == new_tokens for r in results)


def measure(model: str, tp: int, batch: int, prompt_len: int, new_tokens: int, extra: list[str]) -> dict:
    address = f"127.0.0.1:{free_port()}"
    log = tempfile.TemporaryFile("w+")
    tandem = os.path.join(os.path.dirname(sys.executable), "tandem")
    proc = subprocess.Popen([tandem, "serve", "--model", model, "--address", address, "--sync",
                             "--tensor-parallel-size", str(tp), "--max-num-rows", str(batch), *extra],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while health_status(address) != SERVING:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"tandem serve (tp {tp}) did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        asyncio.run(_batch(address, batch, prompt_len, 4))  # warm-up, not timed
        before, t0 = _stats(address).steps, time.perf_counter()
        asyncio.run(_batch(address, batch, prompt_len, new_tokens))
        wall, steps = time.perf_counter() - t0, _stats(address).steps - before
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)
    return {"model": model, "tensor_parallel_size": tp, "batch": batch, "context": prompt_len + new_tokens,
            "steps": steps, "wall_s": round(wall, 3), "step_ms": round(1000 * wall / steps, 2)}


RELAY_SIZES = (1 << 10, 16 << 10, 256 << 10)  # plan bytes: a decode step's plan is a few KB


def relay_rank(rank: int, port: int, iters: int) -> None:
    """One rank of the relay measurement: the leader broadcasts plan-sized messages as the worker group
    does (group_link.py: size, then the bytes, over gloo); rank 0 prints the mean per message."""
    import torch
    import torch.distributed as dist

    from worker_svc.parallel.group_link import _encode

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for size in RELAY_SIZES:
        frames = [b"PLAN", bytes(size)]
        t0 = time.perf_counter()
        for _ in range(iters):
            if rank == 0:
                payload = _encode(1, frames)
                dist.broadcast(torch.tensor([payload.numel()], dtype=torch.int64), 0)
                dist.broadcast(payload, 0)
            else:
                n = torch.zeros(1, dtype=torch.int64)
                dist.broadcast(n, 0)
                dist.broadcast(torch.empty(int(n.item()), dtype=torch.uint8), 0)
        if rank == 0:
            print(f"{size} {1e6 * (time.perf_counter() - t0) / iters:.1f}", flush=True)
    dist.destroy_process_group()


def measure_relay(iters: int = 500) -> list[dict]:
    """Mean time rank 0 takes to relay one plan to a follower, by plan size (two processes, loopback)."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.tp_step", "--relay-rank"]
    follower = subprocess.Popen([*cmd, "1", "--relay-port", str(port), "--relay-iters", str(iters)], cwd=ROOT)
    out = subprocess.run([*cmd, "0", "--relay-port", str(port), "--relay-iters", str(iters)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    follower.wait(60)
    return [{"plan_bytes": int(a), "relay_us": float(b)} for a, b in (line.split() for line in out.split("\n") if line)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench tp-step", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:qwen2.5-0.5b")
    p.add_argument("--sizes", default="1,2", help="tensor-parallel sizes, comma-separated")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default="")
    p.add_argument("--relay-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("--relay-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--relay-iters", type=int, default=500, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.relay_rank >= 0:
        relay_rank(args.relay_rank, args.relay_port, args.relay_iters)
        return 0
    extra = ["--device", args.device, "--num-blocks", "512", "--max-context", "1024"]
    runs = [measure(args.model, int(n), args.batch, args.prompt_len, args.new_tokens, extra)
            for n in args.sizes.split(",")]
    base = runs[0]["step_ms"]
    print(f"{'tp':>3} {'batch':>5} {'context':>7} {'steps':>5} {'step ms':>8} {'vs first':>8}")
    for r in runs:
        r["vs_first"] = round(r["step_ms"] / base, 3)
        print(f"{r['tensor_parallel_size']:>3} {r['batch']:>5} {r['context']:>7} {r['steps']:>5} "
              f"{fmt(r['step_ms'], '.1f'):>8} {fmt(r['vs_first'], '.2f'):>8}")
    relay = measure_relay()
    for r in relay:
        print(f"relay of a {r['plan_bytes']}-byte plan to the other rank: {r['relay_us']:.0f} us")
    if args.json:
        write_record(args.json, {
            "command": "python -m bench tp-step " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "device": args.device},
            "runs": runs,
            "plan_relay": relay,
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
