"""The scheduler's Prometheus endpoint: a scrape during a load and one after agree with the requests
that were sent (counts, tokens, failures by code, histogram counts), and the gauges return to idle."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import AsyncTandemClient, TandemError
from client.local_server import TandemServer, free_port
from scheduler_svc.frontend.metrics import Histogram
from tests.conftest import TINY_WORKER_ARGS


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_histogram_buckets_are_cumulative_with_le_semantics():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    buckets, total = h.snapshot()
    assert buckets == [("0.1", 2), ("1.0", 3), ("+Inf", 4)] and total == pytest.approx(2.65)


def test_metrics_match_the_requests_sent():
    NEW = 48  # noqa: N806 (tokens per request: long enough that the scrape lands mid-load)
    port = free_port()
    with TandemServer(worker_args=TINY_WORKER_ARGS, scheduler_args=["--metrics-port", str(port)]) as server:
        prompts = [[5 + i] * (10 + i) for i in range(8)]

        async def run():
            async with AsyncTandemClient(server.address) as c:
                load = asyncio.gather(*(c.generate(token_ids=p, max_new_tokens=NEW, ignore_eos=True,
                                                   temperature=0) for p in prompts))
                # Scrape while the requests run, once a step's outputs (which carry the load gauges) have
                # reached the front end: the core sends them before it answers GetStats.
                while (st := await c.server_stats()).num_running == 0 or st.steps == 0:
                    await asyncio.sleep(0.005)
                during = await asyncio.to_thread(_scrape, port)
                results = await load
                with pytest.raises(TandemError):
                    await c.generate(token_ids=[5], max_new_tokens=0)  # INVALID_ARGUMENT
                return results, during

        results, during = asyncio.run(run())
        server.wait_idle()
        m = _scrape(port)
    n = len(prompts)
    # Mid-run, the counters are somewhere on the way to their final values, never past them.
    for key in (("tandem_prompt_tokens_total", ()), ("tandem_generation_tokens_total", ()),
                ("tandem_time_to_first_token_seconds_count", ())):
        assert 0 <= during[key] <= m[key]
    assert 1 <= during[("tandem_num_requests_running", ())] + during[("tandem_num_requests_waiting", ())] <= n
    assert during[("tandem_generation_tokens_total", ())] < n * NEW, "the scrape came after the load"
    assert m[("tandem_request_success_total", (("finished_reason", "length"),))] == n
    assert m[("tandem_request_failure_total", (("code", "INVALID_ARGUMENT"),))] == 1
    assert m[("tandem_prompt_tokens_total", ())] == sum(len(p) for p in prompts)
    assert m[("tandem_generation_tokens_total", ())] == sum(len(r.token_ids) for r in results) == n * NEW
    assert m[("tandem_time_to_first_token_seconds_count", ())] == n
    assert m[("tandem_inter_token_latency_seconds_count", ())] == n * (NEW - 1)
    assert m[("tandem_e2e_request_latency_seconds_count", ())] == n
    assert m[("tandem_request_queue_time_seconds_count", ())] == n
    steps = sum(v for (name, _), v in m.items() if name == "tandem_step_seconds_count")
    assert steps >= NEW and m[("tandem_step_seconds_count", (("kind", "decode"),))] >= 1
    assert m[("tandem_num_requests_running", ())] == 0 and m[("tandem_num_requests_waiting", ())] == 0
    assert m[("tandem_kv_cache_usage_ratio", ())] == 0.0
    assert 0 < m[("tandem_gpu_busy_ratio", ())] <= 1
    assert m[("tandem_num_preemptions_total", ())] == 0
