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
from pathlib import Path

import torch

from bench.inprocess import HOST_PARTS, greedy_requests, run_requests
from bench.records import cpu_header, write_record

VOCAB = 512


def tiny_cpu_engine(rows: int, num_blocks: int, max_num_tokens: int, layers: int = 1):
    """A CPU worker Engine over tiny-llama narrowed to hidden 64 and a 512-token vocabulary (random weights)."""
    from worker_svc.models import load
    from worker_svc.presets import preset_config
    from worker_svc.runner import Engine, EngineConfig

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "model.json"
        spec.write_text(json.dumps({**preset_config("tiny-llama"), "vocab_size": VOCAB, "hidden_size": 64,
                                    "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1}))
        loaded = load(f"random:{spec}", device="cpu", dtype=torch.float32)
    return Engine(loaded, EngineConfig(num_blocks=num_blocks, max_num_rows=rows, max_num_tokens=max_num_tokens), "cpu")


def _prompts(rows: int) -> list[list[int]]:
    return [[3 + i % (VOCAB - 3), 7, 9, 11] for i in range(rows)]


def measure(rows: int, new_tokens: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    engine = tiny_cpu_engine(rows, rows * -(-(4 + new_tokens) // 16) + 64, max(rows, 4096))
    run_requests(engine, greedy_requests(_prompts(8), 4), 2)  # warm-up
    per_round = []
    for _ in range(rounds):
        stats = run_requests(engine, greedy_requests(_prompts(rows), new_tokens), 2)
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
