"""Prometheus metrics of the scheduler, served over HTTP at `/metrics` on `--metrics-port`.

Owns the figures operators scrape (names follow vLLM's with the `tandem_` prefix, and vLLM's
histogram buckets where it has the metric):
  gauges      tandem_num_requests_running, tandem_num_requests_waiting, tandem_kv_cache_usage_ratio,
              tandem_gpu_busy_ratio (the worker's compute share, from its CUDA events),
              tandem_prefix_cache_blocks, tandem_prefix_cache_evictable_blocks
  counters    tandem_prompt_tokens_total, tandem_generation_tokens_total, tandem_num_preemptions_total,
              tandem_prefix_cache_queries_total, tandem_prefix_cache_hits_total (prompt tokens looked up
              in the prefix cache, and found there), tandem_requests_resumed_total (held through a
              worker loss, then resumed),
              tandem_request_success_total{finished_reason}, tandem_request_failure_total{code}
  histograms  tandem_time_to_first_token_seconds, tandem_inter_token_latency_seconds,
              tandem_e2e_request_latency_seconds, tandem_request_queue_time_seconds,
              tandem_step_seconds{kind} (device compute time of a step: kind decode = every row one
              token, mixed = any prefill chunk)
Everything is recorded on the event loop with plain integer and list updates (an ITL per token per
step must cost well under a microsecond: prometheus_client's own Histogram takes a lock per
observation) and turned into metric families only when scraped, from the HTTP thread. A scrape
may see a step half-counted; never a torn value.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator, Sequence

# vLLM's buckets (vllm/v1/metrics/loggers.py) for the metrics it has.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative-bucket histogram updated without locks (single writer: the event loop)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        counts, total = list(self.counts), self.sum
        cumulative, out = 0, []
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), counts, strict=True):
            cumulative += n
            out.append((bound, cumulative))
        return out, total


class Metrics:
    """The scheduler's metrics; see the module docstring."""

    def __init__(self) -> None:
        self.running = self.waiting = 0
        self.kv_usage = self.busy_ratio = 0.0
        self.preemptions = 0  # of the current worker session, plus those of sessions before it
        self.requests_resumed = 0  # held through a worker loss, then scheduled on the next worker
        self._preemptions_before = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = self.prefix_hits = 0
        self.prefix_blocks = self.prefix_evictable = 0
        self.success: Counter[str] = Counter()
        self.failure: Counter[str] = Counter()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(REQUEST_LATENCY_BUCKETS)
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)
        self.step = {"decode": Histogram(STEP_BUCKETS), "mixed": Histogram(STEP_BUCKETS)}

    # ----- recording (event loop) ------------------------------------------------------------------
    def set_load(self, running: int, waiting: int, kv_usage: float, busy_ratio: float, preemptions: int) -> None:
        self.running, self.waiting, self.kv_usage, self.busy_ratio = running, waiting, kv_usage, busy_ratio
        self.preemptions = self._preemptions_before + preemptions

    def resumed(self, n: int) -> None:
        self.requests_resumed += n

    def end_session(self, preemptions: int) -> None:
        """A worker session ended: its scheduler (and preemption count) goes away, the total stays."""
        self._preemptions_before += preemptions
        self.preemptions = self._preemptions_before
        self.running = self.waiting = 0
        self.kv_usage = self.busy_ratio = 0.0

    def set_prefix_cache(self, blocks: int, evictable: int) -> None:
        self.prefix_blocks, self.prefix_evictable = blocks, evictable

    def prefix_lookup(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A request's first admission looked its prompt up in the prefix cache."""
        self.prefix_queries += prompt_tokens
        self.prefix_hits += cached_tokens

    def admitted(self, prompt_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens

    def first_token(self, seconds: float) -> None:
        self.generation_tokens += 1
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.generation_tokens += 1
        self.itl.observe(seconds)

    def finished(self, reason: str, e2e_s: float, queue_s: float) -> None:
        self.success[reason] += 1
        self.e2e.observe(e2e_s)
        self.queue.observe(queue_s)

    def failed(self, code: str) -> None:
        self.failure[code] += 1

    def step_done(self, decode_only: bool, seconds: float) -> None:
        self.step["decode" if decode_only else "mixed"].observe(seconds)

    # ----- exposition (scrape thread) --------------------------------------------------------------
    def collect(self) -> Iterator[object]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for name, doc, value in (
            ("tandem_num_requests_running", "Requests scheduled on the worker.", self.running),
            ("tandem_num_requests_waiting", "Requests waiting to be scheduled.", self.waiting),
            ("tandem_kv_cache_usage_ratio", "Share of KV cache blocks in use (0-1).", self.kv_usage),
            ("tandem_gpu_busy_ratio", "Worker compute time / (compute + idle gaps) over its session.",
             self.busy_ratio),
            ("tandem_prefix_cache_blocks", "KV blocks the prefix cache names (held or not).", self.prefix_blocks),
            ("tandem_prefix_cache_evictable_blocks", "Cached KV blocks no request holds.", self.prefix_evictable),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
            ("tandem_prompt_tokens", "Prompt tokens of admitted requests.", self.prompt_tokens),
            ("tandem_generation_tokens", "Tokens generated.", self.generation_tokens),
            ("tandem_num_preemptions", "Requests preempted (KV blocks reclaimed, recomputed later).",
             self.preemptions),
            ("tandem_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", self.prefix_queries),
            ("tandem_prefix_cache_hits", "Prompt tokens found in the prefix cache.", self.prefix_hits),
            ("tandem_requests_resumed", "Requests held through a worker loss and resumed on the next worker "
             "(recomputed, same tokens).", self.requests_resumed),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        ok = CounterMetricFamily("tandem_request_success", "Requests finished, by finish reason.",
                                 labels=["finished_reason"])
        for reason, n in sorted(self.success.items()):
            ok.add_metric([reason], n)
        yield ok
        bad = CounterMetricFamily("tandem_request_failure", "Requests ended with a gRPC error, by status code.",
                                  labels=["code"])
        for code, n in sorted(self.failure.items()):
            bad.add_metric([code], n)
        yield bad
        for name, doc, hist in (
            ("tandem_time_to_first_token_seconds", "Accepted -> first token.", self.ttft),
            ("tandem_inter_token_latency_seconds", "Between successive tokens of a request.", self.itl),
            ("tandem_e2e_request_latency_seconds", "Accepted -> finished.", self.e2e),
            ("tandem_request_queue_time_seconds", "Accepted -> first scheduled.", self.queue),
        ):
            buckets, total = hist.snapshot()
            yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)
        steps = HistogramMetricFamily("tandem_step_seconds", "Device compute time of a step.", labels=["kind"])
        for kind, hist in self.step.items():
            buckets, total = hist.snapshot()
            steps.add_metric([kind], buckets, total)
        yield steps


def serve(metrics: Metrics, port: int, host: str = "0.0.0.0") -> int:
    """Starts the /metrics HTTP server on a daemon thread; returns the bound port (0 asks for any)."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # type: ignore[arg-type]  # a collector: has collect()
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
