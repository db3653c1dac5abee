"""Device memory the CUDA graphs take: an engine built with graphs minus the same engine without,
per decode row count, on one loaded model (GPU only).

    python -m bench graph-memory [--model random:llama-3.1-8b] [--rows 128 256] [--max-num-tokens 512]

Prints one JSON object: MiB reserved by each engine and the difference ("graph_mib") per row count.
This is memory the KV cache cannot have, so it is what a change to graph capture is judged by.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench graph-memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--rows", type=int, nargs="+", default=[128, 256])
    p.add_argument("--max-num-tokens", type=int, default=512)
    p.add_argument("--num-blocks", type=int, default=2048)
    args = p.parse_args(argv)
    from worker_svc.models import load
    from worker_svc.runner import Engine, EngineConfig

    loaded = load(args.model, device="cuda", dtype=torch.bfloat16)
    out: dict[str, object] = {"model": args.model, "gpu": torch.cuda.get_device_name()}
    for rows in args.rows:
        mib = {}
        for graphs in (False, True):
            gc.collect()
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved()
            engine = Engine(loaded, EngineConfig(num_blocks=args.num_blocks, max_num_rows=rows,
                                                 max_num_tokens=args.max_num_tokens, cuda_graphs=graphs), "cuda")
            torch.cuda.synchronize()
            mib[graphs] = (torch.cuda.memory_reserved() - before) / (1 << 20)
            del engine
        out[f"rows{rows}"] = {"engine_mib": mib[False], "engine_with_graphs_mib": mib[True],
                              "graph_mib": mib[True] - mib[False]}
    print(json.dumps(out))
    return 0
