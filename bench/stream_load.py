"""N concurrent GenerateStream RPCs against a real Tandem server (scheduler side + worker) on CUDA.

Reports one JSON line: wall time, output tokens/s, stream messages received (a front end that lags
merges several tokens into one message), the engine's steps over the measured round and the
worker's busy ratio (GetStats: the whole session, warm-up included). Imports only `client`, so the
same file measures any code tree: run it with that tree first on PYTHONPATH, e.g. the base commit's
sources unpacked into BEFORE and this checkout as AFTER:

    for T in BEFORE AFTER; do (cd $T && PYTHONPATH=$T:$T/proto python3 AFTER/bench/stream_load.py \\
        --label $T --rows 1024 --prompt-len 128 --new-tokens 128 --model random:llama-3.2-1b); done
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from client import AsyncTandemClient
from client.local_server import TandemServer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/stream_load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--model", default="random:llama-3.2-1b")
    p.add_argument("--max-num-tokens", type=int, default=8192)
    args = p.parse_args(argv)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49152) for _ in range(args.prompt_len)] for _ in range(args.rows)]
    blocks = args.rows * -(-(args.prompt_len + args.new_tokens + 8) // 16) + 256
    server = TandemServer(model=args.model, scheduler_args=["--max-waiting", str(2 * args.rows)], worker_args=[
        "--device", "cuda", "--dtype", "bfloat16", "--num-blocks", str(blocks), "--max-num-rows", str(args.rows),
        "--max-num-tokens", str(args.max_num_tokens)])
    server.start(600)

    async def round_(n: int) -> tuple[float, int, int]:
        async with AsyncTandemClient(server.address) as c:
            async def one(prompt: list[int]) -> tuple[int, int]:
                msgs = toks = 0
                async for chunk in c.generate_stream(token_ids=prompt, max_new_tokens=n, temperature=0,
                                                     ignore_eos=True):
                    msgs += 1
                    toks += len(chunk.token_ids)
                return msgs, toks

            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(p) for p in prompts))
            return time.perf_counter() - t0, sum(m for m, _ in res), sum(t for _, t in res)

    try:
        asyncio.run(round_(8))  # warm-up: kernels, graphs, allocator
        s0 = server.stats()
        wall, msgs, toks = asyncio.run(round_(args.new_tokens))
        s1 = server.stats()
        assert toks == args.rows * args.new_tokens, toks
        steps = s1.steps - s0.steps
        print(json.dumps({"code": args.label, "rows": args.rows, "prompt_len": args.prompt_len,
                          "new_tokens": args.new_tokens, "model": args.model, "wall_s": wall,
                          "output_tok_s": toks / wall, "messages": msgs, "tokens": toks, "steps": steps,
                          "ms_per_step": 1000 * wall / max(1, steps), "session_busy_ratio": s1.worker_busy_ratio}))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
