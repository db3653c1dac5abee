"""The asynchronous GPU engine: CUDA graphs, run-ahead and KV reuse change no token. CUDA only."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from client import AsyncTandemClient  # noqa: E402
from client.local_server import TandemServer  # noqa: E402

# An explicit KV pool: by default a worker takes 85% of the free GPU memory, which would starve the
# in-process engines and the other servers of this session.
GPU_WORKER = ["--device", "cuda", "--dtype", "float32", "--max-num-rows", "64", "--max-num-tokens", "512",
              "--num-blocks", "4096"]


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """In-process engines' memory goes back to the driver, where server processes can get it."""
    yield
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def _drive(engine, requests, depth: int = 1) -> dict[str, list[int]]:
    from bench.inprocess import run_requests

    return run_requests(engine, requests, depth).outputs


def _requests(seed: int, n: int, temperature: float):
    from scheduler_svc.core.request import Request, SamplingParams

    rng = random.Random(seed)
    return [
        Request(req_id=f"r{i}", prompt_ids=[rng.randrange(3, 49152) for _ in range(rng.randint(1, 300))],
                max_new_tokens=rng.randint(1, 80),
                # Some rows use top-k / top-p (the graphs' sort variant) and ask for top-n logprobs.
                sampling=SamplingParams(temperature=temperature, seed=i, top_k=20 if i % 3 == 0 else 0,
                                        top_p=0.9 if i % 3 == 1 else 1.0, num_logprobs=3 if i % 5 == 0 else -1),
                stop_token_ids=frozenset(), eos_token_ids=frozenset(), ignore_eos=True,
                arrival_time=time.monotonic())
        for i in range(n)
    ]


def test_graphs_and_eager_give_the_same_tokens():
    from worker_svc.models import load
    from worker_svc.runner import Engine, EngineConfig

    loaded = load("random:tiny-llama", device="cuda", dtype=torch.float32)
    eager = Engine(loaded, EngineConfig(num_blocks=4096, max_num_rows=64, cuda_graphs=False), "cuda")
    # The graphed engine also runs the placeholder debug mode: sentinels in, a device assert after carry-over.
    graphed = Engine(loaded, EngineConfig(num_blocks=4096, max_num_rows=64, cuda_graphs=True,
                                          debug_placeholders=True), "cuda")
    # Per bucket: two I/O slots x (sorted filters or not) x (penalized or not).
    assert graphed.graphs is not None and len(graphed.graphs.captured) == 8 * len(graphed.graphs.buckets)
    assert not graphed.graphs.forward_only  # no grammar engine: no forward-only variants captured
    for temperature in (0.0, 0.8):
        for depth in (1, 2):
            a = _drive(eager, _requests(3, 40, temperature), depth)
            b = _drive(graphed, _requests(3, 40, temperature), depth)
            assert a == b, (temperature, depth)


async def _run_all(address: str, cases, stop_at: dict[int, int]):
    async with AsyncTandemClient(address) as c:
        return await asyncio.gather(*(
            c.generate(token_ids=p, max_new_tokens=m, ignore_eos=True, temperature=t, seed=i,
                       stop_token_ids=[stop_at[i]] if i in stop_at else None)
            for i, (p, m, t) in enumerate(cases)
        ))


def test_sync_and_async_identical_on_gpu(servers):
    """64 concurrent mixed requests, greedy and seeded; a quarter stop mid-batch on a token the model
    really emits (not known in advance, like EOS), so overruns and deferred frees happen."""
    fast = servers.get(worker_args=tuple(GPU_WORKER))
    slow = servers.get(depth=1, worker_args=tuple(GPU_WORKER))
    rng = random.Random(9)
    cases = [([rng.randrange(3, 49152) for _ in range(rng.randint(1, 400))], rng.randint(1, 100),
              0.0 if i % 2 else 0.9) for i in range(64)]
    first = asyncio.run(_run_all(fast.address, cases, {}))
    stop_at = {i: r.token_ids[len(r.token_ids) // 2]
               for i, r in enumerate(first) if i % 4 == 0 and len(r.token_ids) > 4}
    a = asyncio.run(_run_all(fast.address, cases, stop_at))
    b = asyncio.run(_run_all(slow.address, cases, stop_at))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a if r.finish_reason == "length"] == [
        r.token_ids for r, f in zip(first, a, strict=True) if f.finish_reason == "length"]
    assert sum(r.finish_reason == "stop_token" for r in a) >= 8
    for server in (fast, slow):
        st = server.wait_idle()
        assert st.kv_blocks_free == st.kv_blocks_total


@pytest.mark.parametrize("alloc_conf", ["", "expandable_segments:True"])
def test_canary_survives_block_churn(alloc_conf):
    """A long request's tokens must not change while 1-2-token requests churn through a tiny pool."""
    env = {"PYTORCH_CUDA_ALLOC_CONF": alloc_conf} if alloc_conf else {}
    args = [*GPU_WORKER, "--num-blocks", "40"]
    with TandemServer(worker_args=args, scheduler_args=["--max-waiting", "1000"], env=env) as server:
        canary = [random.Random(1).randrange(3, 49152) for _ in range(100)]

        async def run():
            async with AsyncTandemClient(server.address) as c:
                solo = await c.generate(token_ids=canary, max_new_tokens=200, temperature=0, ignore_eos=True)
                rng = random.Random(2)
                churn = [c.generate(token_ids=[rng.randrange(3, 49152) for _ in range(rng.randint(5, 60))],
                                    max_new_tokens=rng.randint(1, 2), ignore_eos=True) for _ in range(300)]
                together = await asyncio.gather(
                    c.generate(token_ids=canary, max_new_tokens=200, temperature=0, ignore_eos=True), *churn)
                return solo, together[0]

        solo, together = asyncio.run(run())
        assert np.array_equal(solo.token_ids, together.token_ids)
        st = server.wait_idle()
        assert st.kv_blocks_free == st.kv_blocks_total


@pytest.mark.parametrize("model", ["random:llama-3.2-1b", "random:qwen2.5-0.5b"])
def test_llama_and_qwen2_shapes_match_transformers(model):
    """The unmodified transformers model code on the Triton paths (prefill chunks longer than the
    token budget, decode graphs, fused sampler) gives transformers' own greedy tokens: Llama 3.2
    (GQA 4, head_dim 64, tied embeddings) and Qwen2.5 (GQA 7, q/k/v biases)."""
    from tests.reference import assert_matches, hf_generate
    from worker_svc.models import load
    from worker_svc.runner import Engine, EngineConfig

    reference_model = load(model, device="cuda", dtype=torch.float32).model
    reference_model.set_attn_implementation("sdpa")
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 30000) for _ in range(rng.randint(1, 300))] for _ in range(6)]
    refs = [hf_generate(reference_model, p, 16) for p in prompts]
    del reference_model
    torch.cuda.empty_cache()
    engine = Engine(load(model, device="cuda", dtype=torch.float32),
                    EngineConfig(num_blocks=1024, max_num_rows=16, max_num_tokens=128), "cuda")
    from scheduler_svc.core.request import Request, SamplingParams

    requests = [Request(req_id=f"r{i}", prompt_ids=p, max_new_tokens=16, sampling=SamplingParams(temperature=0.0),
                        stop_token_ids=frozenset(), eos_token_ids=frozenset(), ignore_eos=True,
                        arrival_time=time.monotonic()) for i, p in enumerate(prompts)]
    out = _drive(engine, requests, depth=2)
    for i, ref in enumerate(refs):
        assert_matches(out[f"r{i}"], ref, f"{model} prompt {i}")


def test_prefix_caching_changes_no_token():
    """On the Triton paths (a chunk that starts after a cached prefix, decode graphs), at depth 2:
    requests over shared prefixes give the tokens they give with the cache off."""
    from bench.inprocess import run_requests
    from scheduler_svc.core.request import Request, SamplingParams
    from worker_svc.models import load
    from worker_svc.runner import Engine, EngineConfig

    loaded = load("random:tiny-llama", device="cuda", dtype=torch.float32)
    engine = Engine(loaded, EngineConfig(num_blocks=1024, max_num_rows=32, max_num_tokens=256), "cuda")
    rng = random.Random(8)
    systems = [[rng.randrange(3, 49152) for _ in range(n)] for n in (300, 170)]
    tails = [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 40))] for _ in range(24)]

    def requests():
        return [Request(req_id=f"r{i}", prompt_ids=systems[i % 2] + tail, max_new_tokens=24,
                        sampling=SamplingParams(temperature=0.8 if i % 3 else 0.0, seed=i), ignore_eos=True,
                        arrival_time=time.monotonic()) for i, tail in enumerate(tails)]

    off = run_requests(engine, requests(), 2)
    on = run_requests(engine, requests(), 2, prefix_caching=True)
    assert on.prefix_hits > 0 and off.prefix_hits == 0
    assert on.outputs == off.outputs
