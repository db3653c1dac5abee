"""The paged decode kernel's launch parameters at the decode step's shapes, timed on a GPU.

Owns an experiment (like bench/gemm_probe.py): which `DECODE_LAUNCH` (worker_svc/kernels/triton_attention.py)
and split count read the KV cache fastest for the 8B shape (32 query heads, 8 KV heads, head dim
128, 16-token blocks, bf16) at the rows and contexts of `bench floor`. Each timing is one CUDA
graph of `--layers` decode launches over as many separate random caches (so the replays do not
reuse the L2), divided by the layer count; the KV store and the separate merge kernel are timed
alone too. Stage 1 sweeps tile, warps and pipeline stages at the default split count; stage 2 the
split count (x0.5 to x4 of `decode_splits`) and the inline merge on stage 1's best launch. Each
variant's output is checked against the default launch's (bf16: max |diff| < 2e-2).

    python -m bench.attn_probe [--json F] [--quick] [--stage2-only]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench.floor_parts import graph_ms
from worker_svc.kernels import triton_attention as ta

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16
GRID = [(32, 1024), (32, 4096), (32, 8192), (128, 1024), (256, 1024)]


class Case:
    """`layers` random caches holding `rows` rows of `context` tokens each, rows laid out one after
    another (as bench floor's engine has them), and one decode step's query."""

    def __init__(self, rows: int, context: int, layers: int) -> None:
        per_row = -(-context // BLOCK)
        blocks = rows * per_row
        self.rows, self.context = rows, context
        self.k = [torch.randn(blocks, BLOCK, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
        self.v = [torch.randn_like(k) for k in self.k]
        self.tables = torch.arange(blocks, dtype=torch.int32, device="cuda").view(rows, per_row)
        self.every = torch.arange(rows, dtype=torch.int32, device="cuda")
        self.kv_lens = torch.full((rows,), context, dtype=torch.int32, device="cuda")
        self.q = torch.randn(rows, HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        self.out = torch.empty_like(self.q)
        self.kv = torch.randn(rows, KV_HEADS, DIM, device="cuda", dtype=torch.bfloat16)
        self.slots = (self.every * per_row * BLOCK + context - 1).to(torch.int32)
        self.kv_bytes = 2 * rows * context * KV_HEADS * DIM * 2
        torch.cuda.synchronize()  # made on the default stream, read on the timing stream

    def decode(self, layer: int, splits: int | None, launch: dict | None) -> None:
        ta.paged_decode(self.q, self.k[layer], self.v[layer], self.out, self.tables, self.every, self.kv_lens,
                        self.every, self.every, DIM**-0.5, num_splits=splits, launch=launch)

    def time(self, splits: int | None, launch: dict | None, stream: torch.cuda.Stream) -> tuple[float, torch.Tensor]:
        """(ms per layer, the output of the last layer)."""
        layers = len(self.k)
        ms = graph_ms(lambda: [self.decode(i, splits, launch) for i in range(layers)], stream)
        return ms / layers, self.out.clone()

    def store_ms(self, stream: torch.cuda.Stream) -> float:
        layers = len(self.k)

        def run() -> None:
            for i in range(layers):
                ta.store_kv(self.kv, self.kv, self.k[i], self.v[i], self.slots)

        return graph_ms(run, stream) / layers

    def merge_ms(self, splits: int, stream: torch.cuda.Stream) -> float:
        part_o = torch.randn(self.rows, HEADS, splits, DIM, device="cuda")
        part_lse = torch.randn(self.rows, HEADS, splits, device="cuda")
        layers = len(self.k)

        def run() -> None:
            for _ in range(layers):
                ta._merge_kernel[(self.rows, HEADS)](part_o, part_lse, self.out, self.every, self.out.stride(0),
                                                     self.out.stride(1), HEAD_DIM=DIM, SPLITS=splits)

        return graph_ms(run, stream) / layers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attn_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="fewer stage-1 variants")
    p.add_argument("--stage2-only", action="store_true", help="stage 2 on DECODE_LAUNCH as it is")
    args = p.parse_args(argv)
    stream = torch.cuda.Stream()
    sms = ta._num_sms(0)
    base = dict(ta.DECODE_LAUNCH)
    tiles, warps, stages = ((64, 128), (4, 8), (2, 3)) if args.quick else ((32, 64, 128), (4, 8), (2, 3, 4))
    record: dict = {"gpu": torch.cuda.get_device_name(), "default_launch": base, "grid": [], "stage1": [],
                    "stage2": []}
    cases = []
    for rows, context in GRID:
        case = Case(rows, context, args.layers)
        default_splits = ta.decode_splits(rows, KV_HEADS, sms)
        store = case.store_ms(stream)  # first: it writes the caches, which the reference output reads
        ms, ref = case.time(None, None, stream)
        entry = {"rows": rows, "context": context, "default_splits": default_splits, "default_ms": ms,
                 "default_gb_s": case.kv_bytes / ms / 1e6, "store_kv_ms": store,
                 "merge_ms": case.merge_ms(default_splits, stream) if default_splits > 1 else 0.0}
        record["grid"].append(entry)
        print(json.dumps(entry), flush=True)
        cases.append((case, default_splits, ref))
        del case

    def sweep(stage: str, variants: list[tuple[dict, float]]) -> list[dict]:
        out = []
        for launch, mult in variants:
            row = {"launch": launch, "split_mult": mult, "ms": [], "gb_s": [], "max_diff": []}
            try:
                for case, default_splits, ref in cases:
                    splits = max(1, min(ta.MAX_SPLITS, int(default_splits * mult)))
                    ms, got = case.time(splits, launch, stream)
                    row["ms"].append(ms)
                    row["gb_s"].append(case.kv_bytes / ms / 1e6)
                    row["max_diff"].append(float((got.float() - ref.float()).abs().max()))
            except Exception as e:  # a launch that does not compile (shared memory) is a result too
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["batch32_ms"] = sum(row["ms"][:3]) if len(row["ms"]) >= 3 else None
            out.append(row)
            record[stage].append(row)
            print(json.dumps({k: ([round(x, 4) for x in v] if isinstance(v, list) else v) for k, v in row.items()}),
                  flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(record, f, indent=1)
        return out

    best = base
    if not args.stage2_only:
        stage1 = sweep("stage1", [({**base, "tile": t, "num_warps": w, "num_stages": s}, 1.0)
                                  for t, w, s in itertools.product(tiles, warps, stages)])
        ok = [r for r in stage1 if r["batch32_ms"] is not None and max(r["max_diff"]) < 2e-2]
        best = min(ok, key=lambda r: r["batch32_ms"])["launch"] if ok else base
    record["stage1_best"] = best
    mults = (1.0, 2.0, 4.0) if args.quick else (0.5, 1.0, 2.0, 4.0)
    sweep("stage2", [({**best, "merge_inline": m}, mult) for m in (False, True) for mult in mults])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    print("default ms/layer:", [round(e["default_ms"], 4) for e in record["grid"]])
    for r in record["stage2"]:
        print(r["launch"], r["split_mult"], [round(x, 4) for x in r["ms"]], r.get("error", ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
