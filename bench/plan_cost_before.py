"""The `before` driver of bench/plan_cost.py: one steady-state decode step through the old step
protocol (base commit f31f37b: `StepPlan` with per-token arrays and a full block table per row).

Runs only inside a `plan_cost` child process whose PYTHONPATH puts the before tree first, so every
project import below resolves to that tree; they are made inside the functions, never at module
import, for that reason. The harness (plan_cost.py) owns warm-up, step counts, medians and the
ZeroMQ link; this module owns what one step is for this code version (see `measure_before`).

State surgery (instead of prefilling rows x context tokens through the per-token Python code,
32M tokens at 1024 x 32K): each of the `rows` requests is built with a `context`-token prompt,
marked RUNNING, given the KV blocks of its first `context - 1` tokens straight from the scheduler's
BlockManager, `num_computed = context - 1`, and registered in the scheduler's `_requests` and
`_running` dicts in row order, as `build_plan` would have left it after prefilling all but the
last prompt token. Then `num_to_compute == 1`, so the first plan is the decode of the last prompt
token (position context - 1, kv_len context), and every later plan, after a faked result, decodes
the token just sampled; `check_integrity` holds (blocks == blocks_for(num_computed)). All rows sit
at the same context, so every 16th step each row takes one new block (one step in 16 is slower; the
harness reports medians). Checked once against the real path at 4 rows x 41 tokens (`add`, a
40-token prefill plan, a faked result, the next plan): every plan array and the request ids were
identical to the surgery's first plan.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TOKEN = 1000  # every prompt token and every faked sample: inside the vocabulary, not EOS
_ENGINE: dict[tuple[int, int], Any] = {}  # (max rows, num blocks) -> the one Engine of this process


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def build_engine(grid: Any) -> Any:
    """The worker Engine on CPU for the whole grid (built once per process): the tiny Llama-3.1
    shape of `grid.model_overrides`, bf16, `grid.num_blocks` KV blocks, I/O slots for `grid.max_rows`."""
    key = (grid.max_rows, grid.num_blocks)
    if key in _ENGINE:
        return _ENGINE[key]
    _ENGINE.clear()
    import torch

    from worker_svc.models import load
    from worker_svc.presets import preset_config
    from worker_svc.runner import Engine, EngineConfig

    config = {**preset_config(grid.preset), **grid.model_overrides}
    with tempfile.TemporaryDirectory(prefix="plan_cost_model.") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config))
        loaded = load(f"random:{path}", device="cpu", dtype=getattr(torch, grid.dtype))
    engine = Engine(loaded, EngineConfig(block_size=grid.block_size, num_blocks=grid.num_blocks,
                                         max_num_tokens=grid.max_rows, max_num_rows=grid.max_rows,
                                         cuda_graphs=False), "cpu")
    assert engine.loaded.max_context == grid.model_max_context, engine.loaded.max_context
    assert engine.limits.max_blocks_per_row == cdiv(grid.model_max_context, grid.block_size)
    _ENGINE[key] = engine
    return engine


def decoding_scheduler(engine: Any, rows: int, context: int) -> Any:
    """A Scheduler (pipeline depth 1) with `rows` requests in steady-state decode at `context`
    tokens each, by the state surgery of the module docstring."""
    from scheduler_svc.request import Request, RequestStatus, SamplingParams
    from scheduler_svc.scheduler import Scheduler, SchedulerLimits

    kv = engine.cache.cfg
    max_context = engine.loaded.max_context
    sched = Scheduler(SchedulerLimits(
        num_blocks=kv.num_blocks, block_size=kv.block_size, max_num_tokens=engine.limits.max_num_tokens,
        max_num_rows=rows, max_blocks_per_row=cdiv(max_context, kv.block_size), max_context=max_context,
        max_waiting=rows, pipeline_depth=1,
    ))
    eos = frozenset(engine.loaded.eos_token_ids)
    assert TOKEN not in eos and TOKEN < engine.loaded.vocab_size
    prompt = [TOKEN] * context  # one list shared by every request: the scheduler only reads prompts
    now = time.monotonic()
    for i in range(rows):
        req = Request(req_id=f"req-{i}", prompt_ids=prompt, max_new_tokens=max_context - context,
                      sampling=SamplingParams(temperature=0.0, seed=i), eos_token_ids=eos, ignore_eos=True,
                      client_id=f"{i:032x}")  # as long as the uuid4().hex the servicer generates
        req.status = RequestStatus.RUNNING
        req.num_computed = context - 1
        req.block_ids = sched.blocks.allocate(sched.blocks.blocks_for(context - 1))
        req.first_scheduled_time = now
        sched._requests[req.req_id] = req
        sched._running[req.req_id] = req
    sched.check_integrity()
    assert all(r.num_to_compute == 1 for r in sched._running.values())
    return sched


def measure_before(rows: int, context: int, grid: Any, link: Any) -> Callable[[], dict[str, float]]:
    """Sets up `rows` x `context` decode on the old code and returns the function that runs one step:
    timed build_plan | encode | link send + recv + split + decode | check_plan + pad to the graph row
    bucket + IOSlot.load, then untimed a faked StepResult into process_result."""
    from tandem import wire
    from tandem.wire import StepPlan, StepResult
    from worker_svc.cuda_graphs import decode_layout, pad_decode_plan, row_buckets

    engine = build_engine(grid)
    sched = decoding_scheduler(engine, rows, context)
    width = engine.limits.max_blocks_per_row
    # What DecodeGraphs(max_num_rows, width).bucket_for picks on CUDA (on CPU no graphs are captured).
    bucket = next(b for b in row_buckets(engine.limits.max_num_rows) if b >= rows)
    sampled = np.full(rows, TOKEN, np.int32)
    logprob = np.zeros(rows, np.float32)
    clock = time.perf_counter

    def step() -> dict[str, float]:
        t0 = clock()
        built = sched.build_plan()
        t1 = clock()
        assert built is not None
        plan = built[0]
        frames = plan.encode()
        t2 = clock()
        link.send(frames)
        kind, header, arrays = wire.split(link.recv())
        assert kind == wire.KIND_PLAN
        got = StepPlan.decode(header, arrays)
        t3 = clock()
        engine.check_plan(got)  # what Engine.launch does first
        slot = engine.slots[got.step_id % 2]
        padded = pad_decode_plan(got, bucket, width)
        slot.load(padded, decode_layout(bucket, width))
        t4 = clock()
        slot.in_use = False  # nothing was launched: free the slot for the step after next
        # Untimed: the bulk host->"device" copy inside load, a host memcpy on CPU, an async DMA on CUDA.
        nbytes = slot._in.end("block_tables", padded.block_tables.size)
        c0 = clock()
        slot.dev_in[:nbytes].copy_(slot.host_in[:nbytes])
        copy_ms = 1000 * (clock() - c0)
        assert plan.num_rows == plan.num_tokens == rows and int(plan.kv_lens[0]) > context - 1
        sched.process_result(StepResult(step_id=plan.step_id, sampled=sampled, logprob=logprob))
        return {"plan_ms": 1000 * (t1 - t0), "encode_ms": 1000 * (t2 - t1), "link_ms": 1000 * (t3 - t2),
                "load_ms": 1000 * (t4 - t3), "plan_bytes": float(sum(memoryview(f).nbytes for f in frames)),
                "load_copy_ms": copy_ms, "kv_len": float(plan.kv_lens[0])}

    return step
