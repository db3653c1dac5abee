"""Load-test metrics with vLLM's definitions and JSON key names (`vllm bench serve`).

Owns the per-request record the harness fills while a stream runs, and their aggregation:
- TTFT: send -> first streamed token; E2EL: send -> last message;
- TPOT: (E2EL - TTFT) / (output tokens - 1), per request with more than one output token;
- ITL: the gaps between successive streamed chunks that carry tokens (vLLM's ITL, per chunk), and
  `itl_per_token`: each gap split evenly over the tokens its chunk carries;
- throughputs over the benchmark's duration: requests, output tokens, input + output tokens;
- goodput: completed requests meeting every given SLO (ms), per second;
- peaks: the most output tokens finished within one wall-clock second, the most requests in flight;
- the server's prefix cache over the measured requests: GetStats `prefix_cache_hits` and
  `prefix_cache_queries` (prompt tokens found cached / looked up) taken before and after, the hit
  ratio their deltas' quotient (`prefix_cache_delta`), beside the requests' own `usage.cached_tokens`;
- multi-turn runs: the mean TTFT of first turns and of later turns apart.
Failures are counted by gRPC status code name. Percentiles interpolate linearly between the
closest ranks (numpy's default), so the figures match vLLM's on the same timestamps.

Names for readers of AIPerf: its "inter_token_latency" is our TPOT, "time_to_first_token" TTFT,
"request_latency" E2EL, "output_token_throughput" `output_throughput`.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

LATENCIES = ("ttft", "tpot", "itl", "itl_per_token", "e2el")
PERCENTILES = (90, 95, 99)


@dataclass
class RequestRecord:
    """What the harness observed of one request; times are `time.perf_counter()` seconds."""

    index: int
    prompt_tokens: int
    expected_output_tokens: int
    start: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried tokens
    chunk_tokens: list[int] = field(default_factory=list)
    end: float = 0.0
    output_tokens: int = 0
    error_code: str | None = None  # gRPC status name; None = completed
    error: str = ""
    finish_reason: str = ""
    request_id: str = ""
    cached_tokens: int = 0  # usage.cached_tokens: prompt tokens the server's prefix cache served
    conversation: int | None = None  # multi-turn: which conversation, and its turn (1-based)
    turn: int | None = None
    output_token_ids: list[int] = field(default_factory=list, repr=False)
    prompt_token_ids: list[int] | None = field(default=None, repr=False)  # multi-turn: what was sent

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2el(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2el - ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def itls_per_token(self) -> list[float]:
        out = []
        for gap, n in zip(self.itls, self.chunk_tokens[1:], strict=True):
            out.extend([gap / n] * n)
        return out


@dataclass(frozen=True)
class SLO:
    """Goodput thresholds in milliseconds (None = not checked)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, items: Sequence[str]) -> SLO:
        """From `ttft:MS tpot:MS e2el:MS` (any subset), as `--goodput` takes them."""
        values: dict[str, float] = {}
        for item in items:
            name, sep, value = item.partition(":")
            if not sep or name not in ("ttft", "tpot", "e2el"):
                raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, not {item!r}")
            ms = float(value)
            if not ms > 0:
                raise ValueError(f"--goodput {name} must be a positive number of milliseconds")
            values[f"{name}_ms"] = ms
        return cls(**values)

    def met_by(self, r: RequestRecord) -> bool:
        checks = ((self.ttft_ms, r.ttft), (self.tpot_ms, r.tpot if r.tpot is not None else 0.0),
                  (self.e2el_ms, r.e2el))
        return all(limit is None or (value is not None and value * 1000 <= limit) for limit, value in checks)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2el", self.e2el_ms)) if v}


def _all_at_once(run: Mapping[str, Any]) -> bool:
    return math.isinf(float(run["args"]["request_rate"]))


def offered_rate(run: Mapping[str, Any]) -> float:
    """A sweep run's offered request rate; the all-at-once pass counts at its measured throughput."""
    return float(run["request_throughput"] if _all_at_once(run) else run["args"]["request_rate"])


def highest_rate_within(runs: Sequence[Mapping[str, Any]], slo: SLO) -> float | None:
    """The highest offered rate at which the sweep's runs keep the SLOs at p99, counting a rate only
    when no rate-limited run at that rate or below missed them: one lucky run above a miss does not
    raise it. The one-at-a-time pass never counts (its rate is not offered load); the all-at-once
    pass counts at its measured throughput when it kept them, and its miss is no evidence against a
    lower steady rate (all of its requests queue at once). None when nothing qualifies."""
    limits = slo.as_dict()

    def kept(r: Mapping[str, Any]) -> bool:
        return all(float(r[f"p99_{name}_ms"]) <= ms for name, ms in limits.items())

    loaded = [r for r in runs if r.get("run") != "sync"]
    missed = [offered_rate(r) for r in loaded if not kept(r) and not _all_at_once(r)]
    return max((offered_rate(r) for r in loaded if kept(r) and offered_rate(r) < min(missed, default=math.inf)),
               default=None)


def percentile(values: Sequence[float], p: float) -> float:
    """numpy.percentile's default (linear interpolation between closest ranks)."""
    xs = sorted(values)
    if not xs:
        return 0.0
    pos = (len(xs) - 1) * p / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(name: str, seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    out = {
        f"mean_{name}_ms": statistics.fmean(ms) if ms else 0.0,
        f"median_{name}_ms": percentile(ms, 50),
        f"std_{name}_ms": statistics.pstdev(ms) if ms else 0.0,  # numpy.std: population
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = percentile(ms, p)
    out[f"min_{name}_ms"] = min(ms, default=0.0)
    out[f"max_{name}_ms"] = max(ms, default=0.0)
    return out


def peak_output_tokens_per_s(records: Iterable[RequestRecord], origin: float) -> float:
    """The most output tokens received within one wall-clock second (1-s bins from `origin`)."""
    bins: Counter[int] = Counter()
    for r in records:
        for t, n in zip(r.chunk_times, r.chunk_tokens, strict=True):
            bins[int((t - origin) // 1.0)] += n
    return float(max(bins.values(), default=0))


def peak_concurrency(records: Iterable[RequestRecord]) -> int:
    """The most requests in flight at once (a request counts from its send to its last message)."""
    events = sorted(e for r in records for e in ((r.start, 1), (r.end, -1)))  # ends sort before starts at ties
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


PREFIX_CACHE_KEYS = ("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_ratio")


def prefix_cache_delta(before: Any, after: Any) -> dict[str, Any]:
    """The server's prefix-cache counters over a run from two GetStats answers (or None where one
    failed): queries and hits deltas (prompt tokens) and hits / queries (None without queries). The
    counters belong to the worker's session: a drop means a new session, and nothing is reported."""
    out: dict[str, Any] = dict.fromkeys(PREFIX_CACHE_KEYS)
    if before is None or after is None:
        return out
    queries = int(after.prefix_cache_queries) - int(before.prefix_cache_queries)
    hits = int(after.prefix_cache_hits) - int(before.prefix_cache_hits)
    if queries < 0 or hits < 0:
        return out
    out.update(prefix_cache_queries=queries, prefix_cache_hits=hits,
               prefix_cache_hit_ratio=hits / queries if queries else None)
    return out


def summarize(records: Sequence[RequestRecord], duration: float, slo: SLO | None = None,
              prefix_cache: Mapping[str, Any] | None = None) -> dict[str, object]:
    """The summary JSON's metrics (vLLM's keys, plus min/max, per-token ITL, failures by code, the
    prefix cache's figures when given, first / later turns' TTFT for multi-turn)."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    out: dict[str, object] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(failed),
        "failures_by_code": dict(sorted(Counter(r.error_code for r in failed if r.error_code).items())),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "total_cached_tokens": sum(r.cached_tokens for r in done),
    }
    if prefix_cache is not None:
        out.update(prefix_cache)
    if any(r.turn is not None for r in records):
        first = [r.ttft for r in done if r.turn == 1 and r.ttft is not None]
        later = [r.ttft for r in done if r.turn is not None and r.turn > 1 and r.ttft is not None]
        out["num_conversations"] = len({r.conversation for r in records if r.conversation is not None})
        out["mean_ttft_first_turn_ms"] = statistics.fmean(first) * 1000 if first else 0.0
        out["mean_ttft_later_turns_ms"] = statistics.fmean(later) * 1000 if later else 0.0
    if slo is not None and slo.as_dict():
        good = sum(slo.met_by(r) for r in done)
        out["request_goodput"] = good / duration if duration > 0 else 0.0
        out["goodput_slos_ms"] = slo.as_dict()
    origin = min((r.start for r in records), default=0.0)
    out["max_output_tokens_per_s"] = peak_output_tokens_per_s(done, origin)
    out["max_concurrent_requests"] = peak_concurrency(records)
    series = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [x for r in done for x in r.itls],
        "itl_per_token": [x for r in done for x in r.itls_per_token],
        "e2el": [r.e2el for r in done],
    }
    for name in LATENCIES:
        out.update(_stats(name, series[name]))
    return out
