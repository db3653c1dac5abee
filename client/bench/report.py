"""What a load test leaves behind: the stdout table, the summary JSON, per-request JSONL, a CSV row.

Owns the output formats of `tandem bench`. The summary JSON holds the run's metadata (date, the
harness's git revision, the server's model info, the arguments) and the metrics of
`metrics.summarize` under vLLM's key names; the JSONL has one object per measured request; the CSV
gets one appended row per run (header written when the file is new), for comparing runs.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from client.bench.metrics import LATENCIES, PERCENTILES, RequestRecord

CSV_COLUMNS = (
    "date", "label", "model", "request_rate", "burstiness", "max_concurrency", "num_prompts", "completed",
    "failed", "duration", "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms", "mean_e2el_ms",
    "p99_e2el_ms", "max_output_tokens_per_s", "max_concurrent_requests",
)


def git_revision() -> str:
    """The harness's own commit (where it runs from a checkout), else ""."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def metadata(args: Mapping[str, Any], server: Mapping[str, Any], label: str) -> dict[str, Any]:
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "label": label,
            "git_revision": git_revision(), "server": dict(server), "args": dict(args)}


def print_table(summary: Mapping[str, Any], out: TextIO, title: str = "Serving Benchmark Result") -> None:
    """vLLM's summary layout: totals, throughputs, then each latency's mean/median/percentiles."""
    def line(name: str, value: Any, fmt: str = "{:<10}") -> None:
        out.write("{:<40} ".format(name + ":") + fmt.format(value) + "\n")

    out.write(f"{' ' + title + ' ':=^60}\n")
    line("Successful requests", summary["completed"])
    line("Failed requests", summary["failed"])
    for code, n in summary.get("failures_by_code", {}).items():
        line(f"  {code}", n)
    if summary.get("max_concurrency"):
        line("Maximum request concurrency", summary["max_concurrency"])
    line("Benchmark duration (s)", summary["duration"], "{:<10.2f}")
    line("Total input tokens", summary["total_input_tokens"])
    line("Total generated tokens", summary["total_output_tokens"])
    line("Request throughput (req/s)", summary["request_throughput"], "{:<10.2f}")
    if "request_goodput" in summary:
        line("Request goodput (req/s)", summary["request_goodput"], "{:<10.2f}")
    line("Output token throughput (tok/s)", summary["output_throughput"], "{:<10.2f}")
    line("Peak output token throughput (tok/s)", summary["max_output_tokens_per_s"], "{:<10.2f}")
    line("Peak concurrent requests", summary["max_concurrent_requests"])
    line("Total token throughput (tok/s)", summary["total_token_throughput"], "{:<10.2f}")
    if "prefix_cache_hit_ratio" in summary:
        ratio = summary["prefix_cache_hit_ratio"]
        line("Prefix cache hit ratio", "n/a" if ratio is None else f"{ratio:.4f}")
        if summary.get("prefix_cache_queries") is not None:
            line("Prefix cache hits / queries (tokens)",
                 f"{summary['prefix_cache_hits']} / {summary['prefix_cache_queries']}")
    if "total_cached_tokens" in summary:
        line("Cached prompt tokens (usage)", summary["total_cached_tokens"])
    if "num_conversations" in summary:
        line("Conversations", summary["num_conversations"])
        line("Mean TTFT, first turns (ms)", summary["mean_ttft_first_turn_ms"], "{:<10.2f}")
        line("Mean TTFT, later turns (ms)", summary["mean_ttft_later_turns_ms"], "{:<10.2f}")
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency (per chunk)", "itl_per_token": "Inter-token Latency (per token)",
              "e2el": "End-to-end Latency"}
    for name in LATENCIES:
        out.write(f"{titles[name]:-^60}\n")
        line(f"Mean {name.upper()} (ms)", summary[f"mean_{name}_ms"], "{:<10.2f}")
        line(f"Median {name.upper()} (ms)", summary[f"median_{name}_ms"], "{:<10.2f}")
        for p in PERCENTILES:
            line(f"P{p} {name.upper()} (ms)", summary[f"p{p}_{name}_ms"], "{:<10.2f}")
    out.write("=" * 60 + "\n")


def request_rows(records: Sequence[RequestRecord], origin: float) -> list[dict[str, Any]]:
    def ms(x: float | None) -> float | None:
        return None if x is None else x * 1000

    return [{
        "index": r.index, "request_id": r.request_id, "conversation": r.conversation, "turn": r.turn,
        "start_s": r.start - origin, "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
        "output_tokens": r.output_tokens, "expected_output_tokens": r.expected_output_tokens,
        "ttft_ms": ms(r.ttft), "tpot_ms": ms(r.tpot), "e2el_ms": ms(r.e2el), "itl_ms": [x * 1000 for x in r.itls],
        "chunk_tokens": r.chunk_tokens, "finish_reason": r.finish_reason, "error_code": r.error_code, "error": r.error,
    } for r in records]


def write_outputs(result_dir: Path, base: str, summary: Mapping[str, Any], records: Sequence[RequestRecord],
                  csv_path: Path | None = None) -> dict[str, Path]:
    """Writes `<base>.json` and `<base>.requests.jsonl` (and appends to the CSV); returns the paths."""
    result_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": result_dir / f"{base}.json", "requests": result_dir / f"{base}.requests.jsonl"}
    paths["summary"].write_text(json.dumps(summary, indent=1, default=str) + "\n")
    origin = min((r.start for r in records), default=0.0)
    with open(paths["requests"], "w") as f:
        for row in request_rows(records, origin):
            f.write(json.dumps(row) + "\n")
    if csv_path is not None:
        new = not csv_path.exists()
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: _flat(summary, k) for k in CSV_COLUMNS})
        paths["csv"] = csv_path
    return paths


def _flat(summary: Mapping[str, Any], key: str) -> Any:
    if key in summary:
        return summary[key]
    server, args = summary.get("server", {}), summary.get("args", {})
    return {"model": server.get("model"), "request_rate": args.get("request_rate"),
            "burstiness": args.get("burstiness"), "max_concurrency": args.get("max_concurrency"),
            "num_prompts": args.get("num_prompts")}.get(key, "")
