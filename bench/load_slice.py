"""One client process of a multi-process end-to-end load (`python -m bench gpu --client-procs N`).

Owns a slice of the workload's requests: connects, proves the connection with a two-token call,
says `ready`, waits for `go` on stdin, then sends its slice at once and prints one JSON line with its
start and end on the system-wide monotonic clock (so the parent can take the wall from the first
start to the last end across processes) and the tokens it received.

Why it exists: with one client process, the client's own per-call work (grpc.aio, protobuf) shares
one Python interpreter across 1024 calls, and the end-to-end figure then measures the client as well
as the server. Splitting the client says how much of the end-to-end loss is the server's.

    python -m bench.load_slice WORKLOAD.json START COUNT
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from client import AsyncTandemClient


async def _run(work: dict, start: int, count: int) -> dict:
    prompts = work["prompts"][start:start + count]
    n = work["max_new"]
    async with AsyncTandemClient(work["address"]) as c:
        probe = await c.generate(token_ids=prompts[0], max_new_tokens=2, seed=0, ignore_eos=True, temperature=0)
        assert len(probe.token_ids) == 2
        print("ready", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        assert line.strip() == "go", line
        t0 = time.monotonic()
        rs = await asyncio.gather(*(c.generate(token_ids=p, max_new_tokens=n, seed=start + i, ignore_eos=True,
                                               **work["params"]) for i, p in enumerate(prompts)))
        t1 = time.monotonic()
    tokens = sum(len(r.token_ids) for r in rs)
    assert tokens == n * len(prompts), (tokens, n, len(prompts))
    return {"t0": t0, "t1": t1, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    path, start, count = (sys.argv[1:] if argv is None else argv)
    with open(path) as f:
        work = json.load(f)
    print(json.dumps(asyncio.run(_run(work, int(start), int(count)))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
