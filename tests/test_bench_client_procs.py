"""bench gpu's multi-process client (`--client-procs`): the workload split over client processes
reaches a real server and every token comes back, counted by the server as well as the clients."""

from __future__ import annotations

from bench.gpu_async import end_to_end, prompts_for


def test_split_client_sends_every_request_and_the_server_counts_its_steps():
    prompts = prompts_for(6, 8)
    results = list(end_to_end("random:tiny-llama", prompts, 5, "float32", rows=8, modes=("async",), fuse=False,
                              device="cpu", client_procs=(1, 3)))
    assert [r.error for r in results] == [None, None]
    assert [r.client_procs for r in results] == [1, 3]
    for r in results:
        assert r.output_tok_s == 6 * 5 / r.wall_s
        # Every request decodes 5 tokens; rows share steps, so the server's count lies between 5 (all
        # six in every step) and 30 (one a step): outside, the split sent nothing or sent it twice.
        assert 5 <= r.steps <= 30, r.steps


def test_async3_mode_runs_end_to_end_at_depth_3():
    prompts = prompts_for(6, 8)
    (r,) = end_to_end("random:tiny-llama", prompts, 5, "float32", rows=8, modes=("async3",), fuse=False, device="cpu")
    assert r.error is None and r.mode == "async3" and 5 <= r.steps <= 30
