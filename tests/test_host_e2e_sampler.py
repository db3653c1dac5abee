"""bench host-e2e's CPU-time sampler reaches all three processes: a real front end, its core and a
CPU worker serve real GenerateStream RPCs, and each process's sampler writes stacks of its own code."""

from __future__ import annotations

import json
import sys

from bench.host_e2e import main


def test_the_sampler_profiles_front_end_core_and_worker(tmp_path, capsys):
    out = tmp_path / "record.json"
    # ITIMER_PROF fires on the kernel's tick, so a process is sampled only every few ms of its CPU: about
    # a hundred steps give the core (the least busy, ~1 ms a step) tens of samples; 9 steps once gave it 0.
    assert main(["--codes", "after", "--live-after", "--rows", "64", "--max-new-tokens", "96", "--repeats", "1",
                 "--profile", "--profile-rounds", "1", "--no-pin", "--json", str(out)]) == 0
    profile = json.loads(out.read_text())["entries"][0]["profile"]
    assert "error" not in profile, profile.get("error")
    worker = profile["worker_summary"]
    assert worker["samples"] > 0 and worker["steps"] > 0
    # The worker's inclusive frames hold its step loop: the samples were taken in the worker process.
    assert any(row["frame"].startswith("run (") and "worker_svc" in row["frame"] for row in worker["inclusive"])
    assert profile["core_summary"]["samples"] > 0 and profile["summary"]["samples"] > 0
    printed = capsys.readouterr().out
    assert "the worker's own time" in printed and "where the core's" in printed
    assert sys.modules.get("_tandem_bench_sampler") is None  # installed in the children only
