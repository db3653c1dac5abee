"""The host's parts of a step at many rows, on CPU: the real Scheduler driving an in-process CPU worker
Engine (bench/inprocess.py) over a one-layer tiny Llama, so that the forward is cheap and the host's
own work (build_plan, process_result) is what moves. On CPU `launch` includes the forward itself (the
CPU runs it as it is issued), so only `build` and `process` read as host work here. On a GPU the parts come with
`python -m bench gpu --parts engine` (its entries' `host_ms_per_step`); here they can be compared
between code versions without one. Reports the best of `--rounds` rounds per part (the least
disturbed by this machine's other work).

    python -m bench.host_parts [--rows 1024] [--new-tokens 32] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.inprocess import HOST_PARTS, run_requests
from bench.records import cpu_header, write_record
from scheduler_svc.core.request import Request, SamplingParams

VOCAB = 512


def _requests(rows: int, new_tokens: int) -> list[Request]:
    return [Request(req_id=f"r{i}", prompt_ids=[3 + i % (VOCAB - 3), 7, 9, 11], max_new_tokens=new_tokens,
                    ignore_eos=True, sampling=SamplingParams(temperature=0.0), arrival_time=time.monotonic())
            for i in range(rows)]


def measure(rows: int, new_tokens: int, rounds: int) -> dict:
    from worker_svc.models import load
    from worker_svc.presets import preset_config
    from worker_svc.runner import Engine, EngineConfig

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "model.json"
        spec.write_text(json.dumps({**preset_config("tiny-llama"), "vocab_size": VOCAB, "hidden_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}))
        loaded = load(f"random:{spec}", device="cpu", dtype=torch.float32)
    engine = Engine(loaded, EngineConfig(num_blocks=rows * -(-(4 + new_tokens) // 16) + 64, max_num_rows=rows,
                                         max_num_tokens=max(rows, 4096)), "cpu")
    run_requests(engine, _requests(8, 4), 2)  # warm-up
    per_round = []
    for _ in range(rounds):
        stats = run_requests(engine, _requests(rows, new_tokens), 2)
        assert sum(len(v) for v in stats.outputs.values()) == rows * new_tokens
        per_round.append(stats.host_ms_per_step())
    return {"rows": rows, "new_tokens": new_tokens, "steps": stats.steps, "rounds": per_round,
            "best_ms_per_step": {k: min(r[k] for r in per_round) for k in HOST_PARTS}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_parts", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1024])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {**cpu_header("bench.host_parts", argv), "commit": head, "entries": []}
    for rows in args.rows:
        entry = measure(rows, args.new_tokens, args.rounds)
        record["entries"].append(entry)
        print(f"{rows} rows, {entry['steps']} steps, best of {args.rounds} (ms per step): "
              + ", ".join(f"{k} {v:.3f}" for k, v in entry["best_ms_per_step"].items()))
    if args.json:
        write_record(args.json, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
