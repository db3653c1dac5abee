"""GPU benchmark: Tandem sync vs async (engine-only and end to end) and transformers' continuous
batching on the same workload, same GPU, same run. The seed's experiment, scaled.

Owns the workload (random-weight model of a real shape, N prompts of P random tokens, M new tokens
each, greedy, EOS ignored) and five measurements on it:
- engine-only: the real Scheduler driving an in-process worker Engine (bench.inprocess), depth 1 and
  depth 2, CUDA graphs on; busy = step compute time / (compute + idle gaps), from CUDA events;
- end to end: a real scheduler process + worker process (client.local_server), all requests sent at
  once through gRPC; busy from the server's GetStats (the worker's events, whole session);
- transformers `generate_batch`, `use_async_batching` False and True, on the same prompts.

    python -m bench gpu [--model random:llama-3.1-8b] [--num-requests 32] [--prompt-len 128]
                        [--max-new-tokens 1024] [--no-fuse] [--json docs/bench/async_vs_sync.json]

Each Tandem entry carries the workload's physical floor (`physical_floor_s`): every step streams the
weights once (bench/floor_parts.weight_bytes_per_step) and reads each request's KV so far, over the
device-to-device copy bandwidth measured in the run; `over_floor` is wall time over that floor.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import torch

from bench.inprocess import greedy_requests, run_requests
from client import AsyncTandemClient
from client.local_server import TandemServer


@dataclass
class Result:
    engine: str
    mode: str
    model: str
    num_requests: int
    variant: str = "greedy"
    wall_s: float | None = None
    output_tok_s: float | None = None
    ms_per_step: float | None = None
    gpu_busy_ratio: float | None = None
    steps: int | None = None
    physical_floor_s: float | None = None
    over_floor: float | None = None
    client_procs: int = 1
    host_ms_per_step: dict[str, float] | None = None  # engine-only: bench.inprocess.LoopStats.host_ms per step
    error: str | None = None


MODES = ("sync", "async")

# End-to-end sampling variants (`--variants`), each over the same rows: (requests divisor, params).
# n4 sends a quarter of the requests with n=4, so as many sequences decode as in the others.
VARIANTS: dict[str, tuple[int, dict]] = {
    "greedy": (1, {"temperature": 0}),
    "sampled": (1, {"temperature": 0.8, "top_p": 0.95}),
    "penalties": (1, {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1, "presence_penalty": 0.3,
                      "frequency_penalty": 0.3}),
    "n4": (4, {"temperature": 0.8, "top_p": 0.95, "n": 4}),
}


def _depths(modes: tuple[str, ...], link: bool = False) -> list[tuple[int, str]]:
    """Pipeline depth per mode: sync is depth 1 (no overlap), async depth 2; async3 is depth 3, which
    only a link has (its third plan waits in the worker's socket): end to end, not engine-only."""
    known = ((1, "sync"), (2, "async"), (3, "async3")) if link else ((1, "sync"), (2, "async"))
    return [(d, m) for d, m in known if m in modes]


def prompts_for(n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(length)] for _ in range(n)]


def workload_bytes(model: str, num_requests: int, prompt_len: int, max_new: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) the workload must move at the least, from the model's shape alone
    (built on the meta device: no weights): each of the `max_new` steps streams the weights once and
    reads every request's KV so far (prompt + tokens generated before it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.floor_parts import weight_bytes_per_step
    from worker_svc.kv_cache import config_for_model
    from worker_svc.models import RANDOM_PREFIX
    from worker_svc.presets import preset_config

    assert model.startswith(RANDOM_PREFIX), "the floor is computed for random:<preset> shapes"
    cfg = preset_config(model[len(RANDOM_PREFIX):])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    meta.tie_weights()
    kv_per_token = config_for_model(config, 1, 1, 0.0, torch.bfloat16, "cpu").bytes_per_block  # K and V, all layers
    contexts = max_new * prompt_len + max_new * (max_new - 1) // 2  # sum over steps of tokens before it
    return max_new * weight_bytes_per_step(meta, num_requests), num_requests * kv_per_token * contexts


def engine_sizes(num_requests: int, prompt_len: int, max_new: int) -> tuple[int, int]:
    """(KV blocks, tokens a step) of a benchmark's worker: every request's prompt and outputs at once
    in 16-token blocks (plus 64 spare), and a step budget of every prompt, within [2048, 8192]."""
    return num_requests * -(-(prompt_len + max_new) // 16) + 64, max(2048, min(8192, num_requests * prompt_len))


def _floor(result: Result, floor_s: float | None) -> Result:
    if floor_s and result.wall_s:
        result.physical_floor_s, result.over_floor = floor_s, result.wall_s / floor_s
    return result


def engine_only(model: str, prompts, max_new: int, dtype: torch.dtype, rows: int,
                modes: tuple[str, ...] = MODES, fuse: bool = True) -> Iterator[Result]:
    from worker_svc.models import load
    from worker_svc.runner import Engine, EngineConfig

    loaded = load(model, device="cuda", dtype=dtype)
    if fuse:
        from worker_svc import fusion

        fusion.apply(loaded.model)
    blocks, max_num_tokens = engine_sizes(len(prompts), len(prompts[0]), max_new)
    engine = Engine(loaded, EngineConfig(num_blocks=blocks, max_num_rows=rows, max_num_tokens=max_num_tokens), "cuda")
    run_requests(engine, greedy_requests(prompts, 8), 2)  # warm-up: allocator, kernels
    for depth, mode in _depths(modes):
        torch.cuda.synchronize()
        stats = run_requests(engine, greedy_requests(prompts, max_new), depth)
        tokens = sum(len(v) for v in stats.outputs.values())
        assert tokens == len(prompts) * max_new, tokens
        yield Result("tandem-engine", mode, model, len(prompts), wall_s=stats.wall_s,
                     output_tok_s=tokens / stats.wall_s, ms_per_step=1000 * stats.wall_s / stats.steps,
                     gpu_busy_ratio=stats.busy_ratio, steps=stats.steps,
                     host_ms_per_step=stats.host_ms_per_step())
    del engine, loaded
    gc.collect()
    torch.cuda.empty_cache()


def _run_split(address: str, prompts, max_new: int, params: dict, procs: int) -> float:
    """The requests sent at once by `procs` client processes (bench/load_slice.py), each its own
    interpreter and channel; wall from the first process's start to the last one's end."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"address": address, "prompts": prompts, "max_new": max_new, "params": params}, f)
    cut = [len(prompts) * i // procs for i in range(procs + 1)]
    kids = [subprocess.Popen([sys.executable, "-m", "bench.load_slice", f.name, str(a), str(b - a)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for a, b in zip(cut, cut[1:], strict=False)]
    try:
        for k in kids:
            assert k.stdout.readline().strip() == "ready", "a client process did not connect"
        for k in kids:
            k.stdin.write("go\n")
            k.stdin.flush()
        out = [json.loads(k.stdout.readline()) for k in kids]
        assert all(k.wait(60) == 0 for k in kids)
    finally:
        for k in kids:
            k.kill()
        os.unlink(f.name)
    assert sum(o["tokens"] for o in out) == len(prompts) * max_new
    return max(o["t1"] for o in out) - min(o["t0"] for o in out)


def end_to_end(model: str, prompts, max_new: int, dtype: str, rows: int,
               modes: tuple[str, ...] = MODES, fuse: bool = True,
               variants: tuple[str, ...] = ("greedy",), device: str = "cuda",
               client_procs: tuple[int, ...] = (1,)) -> Iterator[Result]:
    blocks, max_num_tokens = engine_sizes(len(prompts), len(prompts[0]), max_new)
    for depth, mode in _depths(modes, link=True):
        # Every request is sent at once: the waiting queue must hold them (its default, 256, refused
        # part of 1024 on the H200).
        sched = ["--pipeline-depth", str(depth), "--max-waiting", str(max(256, 2 * len(prompts)))]
        server = TandemServer(model=model, scheduler_args=sched, worker_args=[
            "--device", device, "--dtype", dtype, "--num-blocks", str(blocks), "--max-num-rows", str(rows),
            "--max-num-tokens", str(max_num_tokens),
            "--fuse" if fuse else "--no-fuse",
        ])
        try:
            server.start(600)

            async def run(n: int, variant: str, address: str = server.address) -> float:
                share, params = VARIANTS[variant]
                sent = prompts[: len(prompts) // share]
                async with AsyncTandemClient(address) as c:
                    t0 = time.perf_counter()
                    rs = await asyncio.gather(*(c.generate(token_ids=p, max_new_tokens=n, seed=i, ignore_eos=True,
                                                           **params) for i, p in enumerate(sent)))
                    wall = time.perf_counter() - t0
                    for r in rs:
                        assert all(len(x.token_ids) == n for x in (r.choices or [r])), variant
                    return wall

            asyncio.run(run(8, "greedy"))
            results = []
            for variant in variants:
                for procs in client_procs:
                    assert procs == 1 or variant == "greedy", "several client processes: greedy only"
                    before = server.stats()
                    wall = (asyncio.run(run(max_new, variant)) if procs == 1
                            else _run_split(server.address, prompts, max_new, VARIANTS[variant][1], procs))
                    after = server.stats()
                    steps = after.steps - before.steps
                    results.append(Result("tandem-e2e", mode, model, len(prompts), variant, wall_s=wall,
                                          output_tok_s=len(prompts) * max_new / wall,
                                          ms_per_step=1000 * wall / max(1, steps),
                                          gpu_busy_ratio=after.worker_busy_ratio, steps=steps,
                                          client_procs=procs))
        except Exception as e:  # a failed entry is reported, the run goes on
            traceback.print_exc()
            results = [Result("tandem-e2e", mode, model, len(prompts), error=f"{type(e).__name__}: {e}")]
        finally:
            server.stop()
        yield from results


def transformers_cb(model: str, prompts, max_new: int, dtype: torch.dtype,
                    modes: tuple[bool, ...] = (False, True)) -> list[Result]:
    from transformers import GenerationConfig

    from worker_svc.models import load

    loaded = load(model, device="cuda", dtype=dtype)
    hf = loaded.model
    hf.set_attn_implementation("sdpa")
    out = []
    for flag in modes:
        mode = "async" if flag else "sync"
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            gen = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1)
            cb = ContinuousBatchingConfig(use_async_batching=flag)
            hf.generate_batch(inputs=prompts, generation_config=GenerationConfig(max_new_tokens=8, do_sample=False,
                              eos_token_id=-1), continuous_batching_config=cb, progress_bar=False)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = hf.generate_batch(inputs=prompts, generation_config=gen, continuous_batching_config=cb,
                                    progress_bar=False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            tokens = sum(len(r.generated_tokens) for r in res.values())
            out.append(Result("transformers-generate_batch", mode, model, len(prompts), wall_s=wall,
                              output_tok_s=tokens / wall))
        except Exception as e:
            traceback.print_exc()
            out.append(Result("transformers-generate_batch", mode, model, len(prompts),
                              error=f"{type(e).__name__}: {e}"))
    del hf, loaded
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random:llama-3.1-8b")
    p.add_argument("--num-requests", type=int, nargs="+", default=[32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--parts", default="engine,e2e,transformers",
                   help="comma-separated subset of engine, e2e, transformers (or transformers-sync / -async)")
    p.add_argument("--modes", default="sync,async",
                   help="Tandem modes to run, comma-separated: sync, async; async3 (depth 3) end to end only")
    p.add_argument("--variants", default="greedy",
                   help=f"end-to-end sampling variants, comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="Tandem with the fused decoder forwards (the worker's default on CUDA); --no-fuse: "
                        "the model as transformers wrote it")
    p.add_argument("--client-procs", type=int, nargs="+", default=[1],
                   help="end to end: the requests split over this many client processes (each value one "
                        "entry; greedy only above 1), to tell the client's share of the loss from the server's")
    p.add_argument("--json", default="docs/bench/async_vs_sync.json", help="appended to if it exists")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    parts = set(args.parts.split(","))
    modes = tuple(args.modes.split(","))
    results: list[Result] = []
    record = {
        "command": "python -m bench gpu " + shlex.join(sys.argv[2:] if argv is None else argv),
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "workload": {"model": args.model, "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
                     "dtype": args.dtype, "greedy": True, "ignore_eos": True, "fuse": args.fuse},
        "entries": [],
    }
    if args.model.startswith("random:") and torch.cuda.is_available():
        from bench.floor import hbm_bandwidth_gb_s

        record["hbm_gb_s"] = hbm_bandwidth_gb_s()
        torch.cuda.empty_cache()
    try:
        existing = json.load(open(args.json))
        runs = existing if isinstance(existing, list) else [existing]
    except (OSError, ValueError):
        runs = []

    def save(new: Iterable[Result]) -> None:
        """Written after every measurement: a run cut short still leaves what it measured."""
        for r in new:
            print(r, flush=True)
            results.append(r)
            record["entries"] = [asdict(x) for x in results]
            with open(args.json, "w") as f:
                json.dump([*runs, record], f, indent=1)

    hf_modes = tuple(flag for flag, name in ((False, "transformers-sync"), (True, "transformers-async"))
                     if name in parts or "transformers" in parts)
    for n in args.num_requests:
        prompts = prompts_for(n, args.prompt_len)
        rows = max(64, n)
        floor_s = None
        if "hbm_gb_s" in record:
            wb, kvb = workload_bytes(args.model, n, args.prompt_len, args.max_new_tokens)
            floor_s = (wb + kvb) / (record["hbm_gb_s"] * 1e9)
            record.setdefault("floors", []).append({"num_requests": n, "weight_bytes": wb, "kv_bytes": kvb,
                                                    "physical_floor_s": floor_s})
        if "engine" in parts:
            save(_floor(r, floor_s) for r in engine_only(args.model, prompts, args.max_new_tokens, dtype, rows,
                                                          modes, args.fuse))
        if "e2e" in parts:
            save(_floor(r, floor_s) for r in end_to_end(args.model, prompts, args.max_new_tokens, args.dtype, rows,
                                                         modes, args.fuse, tuple(args.variants.split(",")),
                                                         client_procs=tuple(args.client_procs)))
        if hf_modes:
            save(transformers_cb(args.model, prompts, args.max_new_tokens, dtype, hf_modes))
    for r in results:
        print(f"| {r.engine} | {r.mode} | {r.variant} | {r.client_procs} | {r.model} | {r.num_requests} "
              f"| {_f(r.wall_s)} "
              f"| {_f(r.output_tok_s, 0)} "
              f"| {_f(r.ms_per_step)} | {_f(r.gpu_busy_ratio, 3)} | {_f(r.over_floor, 3)} | {r.error or ''} |")
    for r in results:
        if r.host_ms_per_step:
            print(f"host ms per step, {r.engine} {r.mode} {r.num_requests} rows: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in r.host_ms_per_step.items()))
    return 0


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
