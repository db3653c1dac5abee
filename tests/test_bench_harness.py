"""`tandem bench`: metrics on synthetic timestamps (exact values), arrival schedules, and the
harness against a real server (its counts must match what the server saw), multi-turn
conversations included (each turn extends the last one's prompt and answer; the prefix-cache hit
ratio reported is the server's GetStats delta)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from client.bench import report
from client.bench.arrivals import offsets, ramp_offsets
from client.bench.metrics import (
    SLO,
    RequestRecord,
    highest_rate_within,
    peak_concurrency,
    percentile,
    prefix_cache_delta,
    summarize,
)
from client.bench.runner import LoadSpec, run_load
from client.bench.workloads import conversation_prompt, multi_turn_requests

BLOCK = 16  # the tiny server's KV block size (the worker's default)


def _record(index: int, start: float, chunks: list[tuple[float, int]], prompt: int = 10,
            error: str | None = None) -> RequestRecord:
    r = RequestRecord(index, prompt, sum(n for _, n in chunks))
    r.start = start
    r.chunk_times = [t for t, _ in chunks]
    r.chunk_tokens = [n for _, n in chunks]
    r.output_tokens = sum(r.chunk_tokens)
    r.end = chunks[-1][0] if chunks else start + 0.5
    r.error_code = error
    return r


def test_metrics_on_synthetic_timestamps_are_exact():
    a = _record(0, 0.0, [(0.1, 1), (0.3, 1), (0.5, 2)], prompt=10)  # TTFT 100, TPOT (500-100)/3, ITLs 200, 200
    b = _record(1, 1.0, [(1.4, 1), (1.5, 1)], prompt=20)  # TTFT 400, TPOT 100, ITL 100
    c = _record(2, 1.2, [(1.3, 1)], prompt=30)  # one token: no TPOT, no ITL
    failed = _record(3, 0.2, [], error="UNAVAILABLE")
    s = summarize([a, b, c, failed], duration=2.0, slo=SLO(ttft_ms=150, tpot_ms=200))
    assert (s["completed"], s["failed"], s["failures_by_code"]) == (3, 1, {"UNAVAILABLE": 1})
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 7)
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 3.5 and s["total_token_throughput"] == 33.5
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_ttft_ms"] == pytest.approx(100.0)
    assert s["max_ttft_ms"] == pytest.approx(400.0) and s["min_ttft_ms"] == pytest.approx(100.0)
    assert s["mean_tpot_ms"] == pytest.approx((400 / 3 + 100) / 2)
    assert s["mean_itl_ms"] == pytest.approx((200 + 200 + 100) / 3)
    # Per token: the last chunk of `a` carried 2 tokens, so its 200 ms gap counts as 2 x 100 ms.
    assert s["mean_itl_per_token_ms"] == pytest.approx((200 + 100 + 100 + 100) / 4)
    assert s["mean_e2el_ms"] == pytest.approx((500 + 500 + 100) / 3)
    assert s["p99_e2el_ms"] == pytest.approx(float(np.percentile([500, 500, 100], 99)))
    assert s["std_ttft_ms"] == pytest.approx(float(np.std([100, 400, 100])))
    # Goodput: a meets TTFT 150 / TPOT 200, b misses TTFT, c (one token, TPOT 0) meets both.
    assert s["request_goodput"] == pytest.approx(2 / 2.0)
    # Tokens per 1-s bin from the first send: [0, 1) has a's 4, [1, 2) has b's 2 and c's 1.
    assert s["max_output_tokens_per_s"] == 4
    # In flight: a [0, 0.5], failed [0.2, 0.7], b [1.0, 1.5], c [1.2, 1.3] -> at most 2.
    assert s["max_concurrent_requests"] == 2


def test_percentile_is_numpys_linear_interpolation():
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = list(rng.normal(size=n))
        for p in (0, 50, 90, 95, 99, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))


def test_peak_concurrency_counts_touching_intervals_once():
    rs = [_record(i, float(i), [(i + 1.0, 1)]) for i in range(3)]  # [0,1], [1,2], [2,3]
    assert peak_concurrency(rs) == 1


def test_goodput_flag_parsing():
    assert SLO.parse(["ttft:1000", "tpot:50"]) == SLO(ttft_ms=1000, tpot_ms=50)
    for bad in (["ttft"], ["latency:5"], ["tpot:-1"], ["e2el:x"]):
        with pytest.raises(ValueError):
            SLO.parse(bad)


def test_poisson_and_gamma_arrivals_offer_the_asked_rate():
    for burstiness in (1.0, 0.25, 4.0):
        t = offsets(2000, rate=10.0, burstiness=burstiness, seed=3)
        assert t[0] == 0.0 and t[-1] == pytest.approx(200.0)
        assert all(b >= a for a, b in zip(t, t[1:], strict=False))
        gaps = np.diff(t)
        # Gamma of shape k: squared coefficient of variation 1 / k.
        assert np.var(gaps) / np.mean(gaps) ** 2 == pytest.approx(1 / burstiness, rel=0.2)
    assert offsets(5, rate=10.0, seed=1) == offsets(5, rate=10.0, seed=1)
    assert offsets(4, math.inf) == [0.0] * 4
    with pytest.raises(ValueError):
        offsets(3, rate=0.0)


def test_linear_ramp_sends_at_the_ramping_rate():
    t = ramp_offsets(300, 1.0, 5.0)
    duration = 2 * 300 / 6.0
    assert t[0] == 0.0 and t[-1] < duration
    first_half = sum(x < duration / 2 for x in t)
    # Rate 1 -> 3 in the first half (mean 2), 3 -> 5 in the second (mean 4): a third of the requests first.
    assert first_half == pytest.approx(100, abs=2)
    assert ramp_offsets(10, 2.0, 2.0) == pytest.approx([i / 2.0 for i in range(10)])


def test_harness_against_a_real_server(tiny, tmp_path):
    """Counts in the summary, the JSONL and the CSV match what the server saw; warm-ups are sent but
    not counted; requests the server rejects are counted by status code."""
    before = tiny.stats().requests_finished
    jsonl = tmp_path / "prompts.jsonl"
    lines = [{"prompt": f"Question {i}: what is {i} + {i}?", "output_len": 6} for i in range(5)]
    lines.append({"prompt": "too long an answer", "output_len": 100000})  # INVALID_ARGUMENT: beyond the context
    jsonl.write_text("".join(json.dumps(x) + "\n" for x in lines))
    base = [sys.executable, "-m", "client.cli", "bench", "--address", tiny.address, "--disable-tqdm",
            "--result-dir", str(tmp_path / "out"), "--ignore-eos", "--seed", "1"]
    random_run = subprocess.run(
        [*base, "--num-prompts", "12", "--num-warmups", "2", "--random-input-len", "20", "--random-output-len",
         "8", "--request-rate", "40", "--max-concurrency", "4", "--goodput", "ttft:60000", "--result-filename",
         "random"], capture_output=True, text=True, timeout=300)
    assert random_run.returncode == 0, random_run.stderr
    assert "Successful requests:" in random_run.stdout and "P99 TTFT (ms):" in random_run.stdout
    s = json.loads((tmp_path / "out" / "random.json").read_text())
    assert (s["completed"], s["failed"]) == (12, 0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (12 * 20, 12 * 8)
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    assert 1 <= s["max_concurrent_requests"] <= 4
    assert s["server"]["model"] == "random:tiny-llama" and s["args"]["num_prompts"] == 12
    # The prefix-cache window is the measured requests: the warm-ups' prompt tokens are not in it.
    assert s["prefix_cache_queries"] == 12 * 20 and s["prefix_cache_hits"] == s["total_cached_tokens"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "random.requests.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["output_tokens"] == 8 and r["error_code"] is None for r in rows)
    assert all(r["ttft_ms"] > 0 and len(r["itl_ms"]) == len(r["chunk_tokens"]) - 1 for r in rows)

    file_run = subprocess.run([*base, "--dataset-name", "jsonl", "--dataset-path", str(jsonl), "--num-prompts", "6",
                               "--result-filename", "file"], capture_output=True, text=True, timeout=300)
    assert file_run.returncode == 0, file_run.stderr
    f = json.loads((tmp_path / "out" / "file.json").read_text())
    assert (f["completed"], f["failed"], f["failures_by_code"]) == (5, 1, {"INVALID_ARGUMENT": 1})
    assert f["total_output_tokens"] == 5 * 6 and f["total_input_tokens"] > 5

    for name in ("random.latency.png", "random.timeline.png", "file.latency.png"):
        png = (tmp_path / "out" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name

    csv_lines = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("date,label,model")
    # The server finished the 12 measured + 2 warm-up + 5 file requests (the rejected one never started).
    assert tiny.wait_idle().requests_finished - before == 12 + 2 + 5


def _sweep_run(run: str, rate: float, ttft: float, tpot: float = 20.0, achieved: float | None = None) -> dict:
    achieved = rate if achieved is None else achieved
    return {"run": run, "args": {"request_rate": rate}, "request_throughput": achieved,
            "output_throughput": achieved * 100, "p99_ttft_ms": ttft, "p99_tpot_ms": tpot}


def test_highest_rate_within_slos():
    """The sweep's answer: the highest offered rate kept at p99 with no miss at or below it; the
    one-at-a-time pass never counts, the all-at-once pass counts at its measured throughput."""
    slo = SLO.parse(["ttft:1000", "tpot:50"])
    runs = [_sweep_run("sync", math.inf, 30, achieved=0.9), _sweep_run("rate-24", 24, 150),
            _sweep_run("rate-28", 28, 600), _sweep_run("rate-32", 32, 1013), _sweep_run("rate-36", 36, 900)]
    assert highest_rate_within(runs, slo) == 28  # 36 passed, but 32 below it missed
    runs.append(_sweep_run("rate-28", 28, 400, tpot=51))  # a second pass at 28 misses TPOT
    assert highest_rate_within(runs, slo) == 24
    # The all-at-once pass counts at its throughput when it kept the SLOs; its miss rules out nothing.
    assert highest_rate_within([_sweep_run("throughput", math.inf, 900, achieved=33.8)], slo) == 33.8
    runs.append(_sweep_run("throughput", math.inf, 16000, achieved=23.9))
    assert highest_rate_within(runs, slo) == 24
    assert highest_rate_within([_sweep_run("rate-24", 24, 1500)], slo) is None
    assert highest_rate_within(runs, SLO.parse(["ttft:2000"])) == 36  # only the SLOs given are checked


def test_sweep_plot_compares_labelled_sweeps(tmp_path):
    """`--compare-sweeps` draws saved sweeps (e.g. async and sync) into one valid PNG, sending no load,
    merges several files of one label and reports each label's highest rate within the SLOs."""
    for label, slow in (("async", 1.0), ("sync", 2.0)):
        runs = [_sweep_run(f"rate-{r}", r, 200 * r * slow) for r in (1, 2, 4)]
        (tmp_path / f"{label}.sweep.json").write_text(json.dumps(runs[:2]))
        (tmp_path / f"{label}.more.sweep.json").write_text(json.dumps(runs[2:]))
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "bench", "--compare-sweeps",
         f"async={tmp_path / 'async.sweep.json'},{tmp_path / 'async.more.sweep.json'}",
         f"sync={tmp_path / 'sync.sweep.json'},{tmp_path / 'sync.more.sweep.json'}",
         "--result-dir", str(tmp_path), "--goodput", "ttft:1000"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    png = (tmp_path / "sweeps.compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # async: p99 TTFT 200, 400, 800 ms -> all three rates; sync: 400, 800, 1600 ms -> up to 2.
    assert "async: highest rate within the SLOs 4 req/s" in out.stdout
    assert "sync: highest rate within the SLOs 2 req/s" in out.stdout


def test_multi_turn_workload_layout():
    reqs = multi_turn_requests(3, 4, first_len=20, user_len=5, output_len=7, vocab_size=1000, prefix_len=8, seed=2,
                               num_warmups=2)
    assert [r.index for r in reqs] == list(range(2 + 3 * 4))
    warm, conv = reqs[:2], reqs[2:]
    assert all(r.conversation is None and r.turn is None and r.prompt_tokens == 28 for r in warm)
    assert [(r.conversation, r.turn) for r in conv] == [(c, t) for c in range(3) for t in range(1, 5)]
    prefix = warm[0].prompt["token_ids"][:8]
    for r in reqs:
        ids = r.prompt["token_ids"]
        assert r.max_new_tokens == 7 and all(3 <= x < 1000 for x in ids)
        if r.turn in (None, 1):  # a first turn: the shared prefix, then its own tokens
            assert len(ids) == 28 and ids[:8] == prefix and r.prompt_tokens == 28
        else:  # a later turn holds only its new user tokens; its length is known at run time
            assert len(ids) == 5 and r.prompt_tokens == 0
    assert len({tuple(r.prompt["token_ids"][8:]) for r in reqs if r.turn in (None, 1)}) == 5
    assert multi_turn_requests(3, 4, 20, 5, 7, 1000, prefix_len=8, seed=2, num_warmups=2) == reqs
    assert conversation_prompt([1, 2], conv[1]) == [1, 2, *conv[1].prompt["token_ids"]]
    with pytest.raises(ValueError):
        multi_turn_requests(1, 0, 20, 5, 7, 1000)


def test_prefix_cache_delta_and_its_report():
    def st(q: int, h: int) -> SimpleNamespace:
        return SimpleNamespace(prefix_cache_queries=q, prefix_cache_hits=h)

    assert prefix_cache_delta(st(100, 10), st(400, 160)) == {
        "prefix_cache_queries": 300, "prefix_cache_hits": 150, "prefix_cache_hit_ratio": 0.5}
    assert prefix_cache_delta(st(5, 1), st(5, 1))["prefix_cache_hit_ratio"] is None  # nothing looked up
    empty = dict.fromkeys(("prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_ratio"))
    assert prefix_cache_delta(None, st(1, 1)) == empty  # GetStats failed
    assert prefix_cache_delta(st(900, 50), st(10, 0)) == empty  # a new worker session reset the counters
    a = _record(0, 0.0, [(0.1, 1), (0.2, 1)])
    a.conversation, a.turn, a.cached_tokens = 0, 1, 0
    b = _record(1, 0.3, [(0.35, 1), (0.4, 1)])
    b.conversation, b.turn, b.cached_tokens = 0, 2, 16
    s = summarize([a, b], 1.0, prefix_cache=prefix_cache_delta(st(0, 0), st(40, 16)))
    assert s["prefix_cache_hit_ratio"] == 0.4 and s["total_cached_tokens"] == 16 and s["num_conversations"] == 1
    assert s["mean_ttft_first_turn_ms"] == pytest.approx(100) and s["mean_ttft_later_turns_ms"] == pytest.approx(50)
    out = io.StringIO()
    report.print_table(s, out)
    assert "Prefix cache hit ratio:                  0.4000" in out.getvalue()
    assert "Prefix cache hits / queries (tokens):    16 / 40" in out.getvalue()
    report.print_table(summarize([a], 1.0, prefix_cache=empty), out)  # no figures: printed as n/a
    assert "Prefix cache hit ratio:                  n/a" in out.getvalue()


def test_multi_turn_turns_extend_the_conversation_on_a_real_server(tiny):
    """Each turn sends exactly the previous turn's prompt + the answer it got + its own tokens (the
    server counts that many prompt tokens and finds the previous prompt and answer in its prefix
    cache), and the hit ratio the harness reports is the server's GetStats delta."""
    reqs = multi_turn_requests(3, 3, first_len=40, user_len=12, output_len=9, vocab_size=49152, seed=11)
    before = tiny.wait_idle()
    load = asyncio.run(run_load(tiny.address, reqs, LoadSpec(ignore_eos=True, temperature=0.0, seed=11)))
    after = tiny.wait_idle()
    recs = {(r.conversation, r.turn): r for r in load.records}
    assert len(recs) == 9 and all(r.ok for r in load.records)
    for (c, t), r in recs.items():
        own = reqs[r.index].prompt["token_ids"]
        assert len(r.output_token_ids) == r.output_tokens == 9
        assert r.prompt_tokens == len(r.prompt_token_ids)  # the server's usage.prompt_tokens
        if t == 1:
            assert r.prompt_token_ids == own and r.cached_tokens == 0
            continue
        prev = recs[(c, t - 1)]
        assert r.start >= prev.end  # sent only after the answer before it arrived
        assert r.prompt_token_ids == prev.prompt_token_ids + prev.output_token_ids + own
        # All the full blocks of the previous prompt and of its answer but the last token (never computed).
        assert r.cached_tokens >= (len(prev.prompt_token_ids) + 9 - 1) // BLOCK * BLOCK > 0
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    assert load.prefix_cache == {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
                                 "prefix_cache_hit_ratio": hits / queries}
    assert queries == sum(r.prompt_tokens for r in load.records)
    assert hits == sum(r.cached_tokens for r in load.records)
    assert load.prefix_cache["prefix_cache_hit_ratio"] > 0.4


def test_multi_turn_through_the_command_line(tiny, tmp_path):
    """`--dataset-name multi-turn` end to end: the report and the JSON carry the prefix-cache hit
    ratio of the measured requests (warm-ups excluded), equal to the server's GetStats delta."""
    before = tiny.wait_idle()
    run = subprocess.run(
        [sys.executable, "-m", "client.cli", "bench", "--address", tiny.address, "--disable-tqdm", "--no-plots",
         "--result-dir", str(tmp_path), "--result-filename", "mt", "--dataset-name", "multi-turn",
         "--num-prompts", "8", "--multi-turn-turns", "4", "--random-input-len", "24", "--multi-turn-user-len", "8",
         "--random-output-len", "6", "--num-warmups", "2", "--ignore-eos", "--seed", "5"],
        capture_output=True, text=True, timeout=300)
    after = tiny.wait_idle()
    assert run.returncode == 0, run.stderr
    s = json.loads((tmp_path / "mt.json").read_text())
    assert (s["completed"], s["failed"], s["num_conversations"]) == (8, 0, 2)
    warm_tokens = 2 * 24  # two single first-turn requests: own random tokens, nothing cached for them
    queries = after.prefix_cache_queries - before.prefix_cache_queries - warm_tokens
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    assert (s["prefix_cache_queries"], s["prefix_cache_hits"]) == (queries, hits)
    assert s["prefix_cache_hit_ratio"] == pytest.approx(hits / queries) and s["prefix_cache_hit_ratio"] > 0.3
    assert s["total_cached_tokens"] == hits and s["total_input_tokens"] == queries
    assert f"Prefix cache hit ratio:                  {s['prefix_cache_hit_ratio']:.4f}" in run.stdout
    rows = [json.loads(x) for x in (tmp_path / "mt.requests.jsonl").read_text().splitlines()]
    by = {(r["conversation"], r["turn"]): r for r in rows}
    assert sorted(by) == [(c, t) for c in range(2) for t in range(1, 5)]
    for (c, t), r in by.items():  # each prompt: the last one, its 6-token answer and 8 new tokens
        assert r["prompt_tokens"] == (24 if t == 1 else by[(c, t - 1)]["prompt_tokens"] + 6 + 8)
        assert (r["cached_tokens"] > 0) == (t > 1)
    bad = subprocess.run([sys.executable, "-m", "client.cli", "bench", "--address", tiny.address,
                          "--dataset-name", "multi-turn", "--num-prompts", "6", "--multi-turn-turns", "4"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "multiple of --multi-turn-turns" in bad.stderr


def test_results_without_matplotlib_are_written_and_say_why_there_are_no_plots(tiny, tmp_path):
    """`make run` installs no `bench` extra: `tandem bench --result-dir` still writes its JSON and CSV,
    and says that plots need matplotlib, instead of failing on the import."""
    code = ("import sys; sys.modules['matplotlib'] = None; from client.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    run = subprocess.run(
        [sys.executable, "-c", code, "bench", "--address", tiny.address, "--disable-tqdm", "--result-dir",
         str(tmp_path), "--result-filename", "np", "--num-prompts", "3", "--random-input-len", "8",
         "--random-output-len", "4", "--ignore-eos", "--seed", "2"],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "plots: they need matplotlib" in run.stderr
    assert json.loads((tmp_path / "np.json").read_text())["completed"] == 3
    assert (tmp_path / "results.csv").exists() and not list(tmp_path.glob("*.png"))
