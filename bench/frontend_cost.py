"""The front end's CPU per step at many rows: what `EngineClient._on_outputs` (and, for streams, the
handles' takes) costs for one step's tokens, without gRPC, sockets or a core.

Owns one question from docs/benchmarks.md (the host path at scale): how much of each step the front
end's event loop spends on the tokens themselves, which new RPCs wait behind. N handles without stop
strings, as admission builds them, get `--steps` synthetic step outputs (one random token each, a
logprob, no top logprobs) through the real `_on_outputs`; a stream's handle is taken whenever it
woke, as the servicer would. Variants: unary calls (text made UNARY_TEXT_BATCH tokens at a time),
unary calls detokenized token by token (`unary_text_batch=1`: the code before the batching),
streams at interval 1 and 4. The embedded SmolLM2 tokenizer. CPU only; ms a step are this
machine's, the ratios are what to compare.

    python -m bench.frontend_cost [--rows 1024] [--steps 200] [--json docs/bench/frontend_cost.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from tandem.v1 import core_pb2 as cpb

from bench.detok_cost import embedded_tokenizer
from bench.records import cpu_header, write_record
from scheduler_svc.core import core_link as cl
from scheduler_svc.core.request import Request
from scheduler_svc.frontend.detokenizer import OutputText
from scheduler_svc.frontend.engine_client import EngineClient
from scheduler_svc.frontend.handle import UNARY_TEXT_BATCH, RequestHandle
from scheduler_svc.frontend.metrics import Metrics
from scheduler_svc.frontend.tokenizer import TandemTokenizer

VARIANTS = {  # name: (streamed, stream_interval, unary text batch)
    "unary": (False, 1, UNARY_TEXT_BATCH),
    "unary_token_by_token": (False, 1, 1),
    "stream_interval_1": (True, 1, UNARY_TEXT_BATCH),
    "stream_interval_4": (True, 4, UNARY_TEXT_BATCH),
}


def run(tok: TandemTokenizer, rows: int, steps: int, streamed: bool, interval: int, batch: int) -> float:
    """Seconds a step of `_on_outputs` (plus the streams' takes) over `steps` steps."""
    client = EngineClient.__new__(EngineClient)  # no core process: only the outputs path is measured
    client.metrics, client.handles, client.requests_finished = Metrics(), {}, 0
    for uid in range(1, rows + 1):
        req = Request(f"r{uid}", [1] * 128, steps + 1)
        req.uid = uid
        client.handles[uid] = RequestHandle(req, f"c{uid}", OutputText(tok), stream_interval=interval,
                                            streamed=streamed, unary_text_batch=batch)
    rng = np.random.default_rng(0)
    zeros = np.zeros(rows, np.int32)
    outputs = [cl.OutputBatch(s, np.arange(1, rows + 1, dtype=np.int64),
                              rng.integers(3, tok.vocab_size, rows).astype(np.int32), zeros, zeros,
                              np.ones(rows), zeros, np.full(rows, -0.5, np.float32), None, None, cpb.Load(),
                              True, 0.01) for s in range(steps)]
    handles = list(client.handles.values())
    t0 = time.perf_counter()
    for out in outputs:
        client._on_outputs(out)
        if streamed:
            for h in handles:
                if h.changed.is_set():
                    h.take()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.frontend_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default="docs/bench/frontend_cost.json")
    args = p.parse_args(argv)
    tok = embedded_tokenizer()
    entries = []
    for rnd in range(args.rounds):
        for name, (streamed, interval, batch) in VARIANTS.items():
            s = run(tok, args.rows, args.steps, streamed, interval, batch)
            entries.append({"round": rnd, "variant": name, "ms_per_step": round(1e3 * s, 3),
                            "us_per_token": round(1e6 * s / args.rows, 3)})
            print(json.dumps(entries[-1]), flush=True)
    record = {**cpu_header("bench.frontend_cost", argv), "rows": args.rows, "steps": args.steps,
              "unary_text_batch": UNARY_TEXT_BATCH, "entries": entries}
    write_record(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
