"""The pictures of a load test, as PNG files (matplotlib, headless).

Owns three figures:
- `latency_cdfs`: the cumulative distribution of TTFT, TPOT, ITL and E2EL over a run's requests;
- `timeline`: output tokens per second (1-s bins) and requests in flight over a run;
- `sweep`: for one or more sweeps (e.g. Tandem async and sync), output throughput against p99
  TTFT and p99 TPOT, one line per sweep, the SLO limits drawn when given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from client.bench.metrics import RequestRecord


def available() -> bool:
    """Whether matplotlib is installed (the `bench` extra); without it `tandem bench` writes no plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def latency_cdfs(records: Sequence[RequestRecord], path: Path, title: str) -> Path:
    plt = _pyplot()
    done = [r for r in records if r.ok]
    series = {
        "TTFT": [r.ttft * 1000 for r in done if r.ttft is not None],
        "TPOT": [r.tpot * 1000 for r in done if r.tpot is not None],
        "ITL (per chunk)": [x * 1000 for r in done for x in r.itls],
        "E2EL": [r.e2el * 1000 for r in done],
    }
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, series.items(), strict=True):
        xs = sorted(values)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post")
        ax.set_title(name)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if name != "ITL (per chunk)" else "fraction of chunks")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def timeline(records: Sequence[RequestRecord], path: Path, title: str) -> Path:
    plt = _pyplot()
    origin = min((r.start for r in records), default=0.0)
    end = max((r.end for r in records), default=origin) - origin
    seconds = int(end) + 1
    tokens = [0] * seconds
    in_flight = [0] * seconds
    for r in records:
        for t, n in zip(r.chunk_times, r.chunk_tokens, strict=True):
            tokens[min(seconds - 1, int(t - origin))] += n
        for s in range(int(r.start - origin), min(seconds, int(r.end - origin) + 1)):
            in_flight[s] += 1
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(range(seconds), tokens, label="output tokens / s")
    ax.set_xlabel("s since the first request")
    ax.set_ylabel("output tokens / s")
    ax2 = ax.twinx()
    ax2.plot(range(seconds), in_flight, color="tab:orange", label="requests in flight")
    ax2.set_ylabel("requests in flight")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep(sweeps: Mapping[str, Sequence[Mapping[str, Any]]], path: Path,
          slo_ms: Mapping[str, float] | None = None) -> Path:
    """`sweeps`: label -> the run summaries of one sweep (any order; sorted by request rate here)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, runs in sweeps.items():
        runs = sorted(runs, key=lambda s: s["request_throughput"])
        for ax, metric in zip(axes, ("p99_ttft_ms", "p99_tpot_ms"), strict=True):
            ax.plot([s["output_throughput"] for s in runs], [s[metric] for s in runs], marker="o", label=label)
    for ax, metric, name in zip(axes, ("ttft", "tpot"), ("p99 TTFT (ms)", "p99 TPOT (ms)"), strict=True):
        if slo_ms and metric in slo_ms:
            ax.axhline(slo_ms[metric], color="gray", linestyle="--", label=f"SLO {slo_ms[metric]:g} ms")
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
