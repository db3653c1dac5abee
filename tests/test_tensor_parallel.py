"""Tensor parallelism through the whole stack on CPU (gloo): `tandem serve --tensor-parallel-size 2` gives
transformers' greedy tokens (the near-tie rule) and the single-rank server's seeded tokens, at depth 1
and 2 and under preemption, for a Llama and a Qwen2 shape (biased q/k/v); a size that does not divide
the heads is refused naming them; a rank killed under load takes its group down, `tandem serve`
restarts the group, and the requests it ran resume with the tokens of an uninterrupted run."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from grpc_health.v1 import health_pb2
from tandem.v1 import api_pb2

from client import AsyncTandemClient, TandemClient
from client.local_server import ROOT, free_port, health_status
from tests.conftest import TINY_WORKER_ARGS, _reference
from tests.procs import children as _children
from tests.reference import NEAR_TIE, assert_matches, hf_generate

TANDEM = os.path.join(os.path.dirname(sys.executable), "tandem")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# 24 blocks of 16 tokens for 12 requests of 28 to 100 tokens each: running requests outgrow the pool,
# and the scheduler must preempt (as tests/test_e2e_pipeline.py's small pool).
PRESSURE = ["--num-blocks", "24"]


def _cases(seed: int, n: int = 12) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 49152) for _ in range(rng.randint(20, 60))], rng.randint(8, 40)) for _ in range(n)]


@contextmanager
def _serve(model: str, tp: int, *extra: str) -> Iterator[tuple[subprocess.Popen, str, tempfile.TemporaryFile]]:
    address = f"127.0.0.1:{free_port()}"
    log = tempfile.TemporaryFile("w+")  # not a pipe, which nobody would read while requests run
    proc = subprocess.Popen(
        [TANDEM, "serve", "--model", model, "--address", address, *TINY_WORKER_ARGS,
         "--tensor-parallel-size", str(tp), *extra],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while health_status(address) != SERVING:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise AssertionError(f"tandem serve never became SERVING:\n{log.read()[-4000:]}")
            time.sleep(0.2)
        yield proc, address, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


async def _generate(address: str, cases, **kw) -> list:
    async with AsyncTandemClient(address) as c:
        return await asyncio.gather(*(
            c.generate(token_ids=p, max_new_tokens=m, ignore_eos=True, **({"seed": 100 + i} | kw))
            for i, (p, m) in enumerate(cases)))


def _stats(address: str) -> api_pb2.ServerStats:
    with TandemClient(address) as c:
        return c.server_stats(timeout=10)


def _idle_and_whole(address: str) -> None:
    deadline = time.monotonic() + 10
    while (st := _stats(address)).num_running or st.kv_blocks_free != st.kv_blocks_total:
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_tp2_gives_the_single_rank_tokens(preset: str):
    """A Llama and a Qwen2 shape (biased q/k/v), each at depth 1 and 2. Each TP=2 server
    has the small KV pool, so that requests are preempted and recomputed."""
    model = f"random:{preset}"
    cases = _cases(3)
    sampled = {"temperature": 0.9, "top_p": 0.95}
    with _serve(model, 1) as (_, address, _):
        single = asyncio.run(_generate(address, cases, **sampled))
    reference = _reference(model)
    refs = [hf_generate(reference, p, m) for p, m in cases]
    # Only a sequence whose reference holds a near-tie may stop matching (the all-reduced partial sums
    # round differently from one whole matmul).
    near_ties = sum(min(ref.gaps) < NEAR_TIE for ref in refs)
    for depth in (1, 2):
        with _serve(model, 2, "--pipeline-depth", str(depth), *PRESSURE) as (_, address, _):
            with TandemClient(address) as c:
                assert c.model_info().tensor_parallel_size == 2
            greedy = asyncio.run(_generate(address, cases, temperature=0.0))
            seeded = asyncio.run(_generate(address, cases, **sampled))
            assert _stats(address).num_preemptions > 0, "the small KV pool was meant to preempt"
            _idle_and_whole(address)
        full = sum(assert_matches(r.token_ids, ref, f"{preset} depth {depth} request {i}")
                   for i, (r, ref) in enumerate(zip(greedy, refs, strict=True)))
        assert full >= len(cases) - near_ties
        # Seeded sampling: the same tokens with one rank and with two.
        assert [r.token_ids for r in seeded] == [r.token_ids for r in single], f"depth {depth}"


def test_a_size_that_does_not_divide_the_heads_is_refused():
    out = subprocess.run(
        [TANDEM, "serve", "--model", "random:tiny-llama", "--address", f"127.0.0.1:{free_port()}",
         *TINY_WORKER_ARGS, "--tensor-parallel-size", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "--tensor-parallel-size 3 does not divide the model's heads: 4 attention heads, 2 KV heads" in text


def _rank_pid(serve_pid: int, rank: int) -> int:
    for pid in _children(serve_pid):
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        if env.get(b"RANK") == str(rank).encode() and b"worker_svc" in open(f"/proc/{pid}/cmdline", "rb").read():
            return pid
    raise AssertionError(f"no rank {rank} under {serve_pid}")


def test_a_killed_rank_restarts_its_group_and_the_requests_resume():
    prompts = [[7 + i, 11, 13, 300 + i] * 3 for i in range(4)]
    new_tokens = 120
    # Slowed steps (a fault hook) so that the kill lands while every stream still runs.
    os.environ["TANDEM_FAULTS"] = "step_sleep_ms=20"
    try:
        with _serve("random:tiny-llama", 2) as (proc, address, log):
            async def streams(kill_rank: int | None) -> tuple[list[list[int]], float]:
                async with AsyncTandemClient(address) as c:
                    got: list[list[int]] = [[] for _ in prompts]

                    async def one(i: int) -> list[int]:
                        async for chunk in c.generate_stream(token_ids=prompts[i], max_new_tokens=new_tokens,
                                                             ignore_eos=True, temperature=0):
                            got[i] += chunk.token_ids
                        return got[i]

                    tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
                    noticed = 0.0
                    if kill_rank is not None:
                        while min(len(g) for g in got) < 5:
                            await asyncio.sleep(0.005)
                        os.kill(_rank_pid(proc.pid, kill_rank), signal.SIGKILL)
                        t0 = time.monotonic()
                        while health_status(address) != NOT_SERVING:
                            assert time.monotonic() - t0 < 2.0, "the group's loss was not noticed within 2 s"
                            await asyncio.sleep(0.01)
                        noticed = time.monotonic() - t0
                        assert all(len(g) < new_tokens for g in got) and not any(t.done() for t in tasks)
                    return await asyncio.gather(*tasks), noticed

            reference, _ = asyncio.run(streams(None))
            resumed, noticed = asyncio.run(streams(kill_rank=1))
            assert resumed == reference, "a request resumed on the restarted group differs from its uninterrupted run"
            _idle_and_whole(address)
            log.seek(0)
            text = log.read()
            assert "restarting its group worker (2 processes)" in text, text[-3000:]
            print(f"\ngroup loss noticed {noticed:.2f} s after the kill")
    finally:
        del os.environ["TANDEM_FAULTS"]
