"""Capturing the worker's CUDA graphs once at start-up: decode graphs per (I/O slot, row bucket,
sampling variant) and piecewise graphs per (I/O slot, token bucket), all in one shared pool,
largest first so the pool is sized by the largest (see cuda_graphs.py and piecewise.py for what
they hold and how they are replayed). Owns the placeholder plans graphs are captured on.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from tandem.wire import StepPlan

from worker_svc.attention import PagedStep, attend, row_layout
from worker_svc.cuda_graphs import DecodeGraphs, decode_layout
from worker_svc.io_slots import IOSlot
from worker_svc.piecewise import AttentionIO, PiecewiseGraph, token_buckets
from worker_svc.sampler import sample

if TYPE_CHECKING:
    from worker_svc.runner import Engine

log = logging.getLogger("tandem.worker.runner")


def capture_graphs(engine: Engine) -> None:
    """Captures every decode graph, then every piecewise graph, into the engine (one shared pool)."""
    width = engine.limits.max_blocks_per_row
    engine.graphs = DecodeGraphs(engine.limits.max_num_rows, width)
    t0, reserved = time.perf_counter(), torch.cuda.memory_reserved()
    with torch.inference_mode():
        _capture_decode(engine, width)
        _capture_piecewise(engine)
    torch.cuda.synchronize()
    engine.graph_memory_bytes = torch.cuda.memory_reserved() - reserved
    log.info("captured %d decode CUDA graphs (row buckets %s) and %d piecewise graphs (token buckets %s) "
             "in %.1f s, %.0f MiB", len(engine.graphs.captured), engine.graphs.buckets, len(engine.piecewise),
             engine.token_buckets, time.perf_counter() - t0, engine.graph_memory_bytes / (1 << 20))


def _capture_piecewise(engine: Engine) -> None:
    """Per (slot, token bucket), largest first, the forward of a step that is not decode-only,
    cut at every attention call (see piecewise.py). Captured on an empty plan padded to the bucket."""
    assert engine.graphs is not None
    engine.token_buckets = token_buckets(engine.limits.max_num_tokens)
    empty = _empty_plan()
    layout = row_layout(empty.query_start, empty.kv_lens, engine.cache.cfg.block_size)
    stream = engine.sync.compute_stream
    kv = engine.cache.cfg
    io = AttentionIO.allocate(engine.token_buckets[-1], engine.loaded.config.num_attention_heads, kv.kv_heads,
                              kv.head_dim, kv.dtype, engine.device)
    for tokens in reversed(engine.token_buckets):
        for slot in engine.slots:
            other = engine.slots[1 - slot.index]
            inputs = slot.load(empty, layout, pad_to=(tokens, min(tokens, engine.limits.max_num_rows)))
            stream.wait_event(slot.h2d_done)
            graph = PiecewiseGraph(engine.graphs.pool, io, attend)
            step = engine.paged_step(inputs, layout)
            step.piecewise = graph
            with torch.cuda.stream(stream):
                graph.capturing = False  # warm-up, outside any capture: cuBLAS picks its kernels
                engine.forward(inputs, step, other, True, inputs.sample_tokens)
                stream.synchronize()
                graph.capturing = True
                graph.begin()
                graph.end(engine.forward(inputs, step, other, True, inputs.sample_tokens))
            engine.piecewise[(slot.index, tokens)] = graph
            slot.in_use = False


def _capture_decode(engine: Engine, width: int) -> None:
    assert engine.graphs is not None
    for rows in reversed(engine.graphs.buckets):
        idle = _idle_decode_plan(rows, width)
        for sort_filters in (False, True):
            for slot in engine.slots:
                other = engine.slots[1 - slot.index]
                inputs = slot.load(idle, decode_layout(rows, width))
                step = engine.paged_step(inputs, decode_layout(rows, width))
                engine.sync.compute_stream.wait_event(slot.h2d_done)
                engine.graphs.capture(
                    slot.index, rows, sort_filters, engine.sync.compute_stream,
                    lambda i=inputs, st=step, sl=slot, o=other, f=sort_filters: _graph_body(engine, i, st, sl, o, f))
                slot.in_use = False


def _graph_body(engine: Engine, inputs, step: PagedStep, slot: IOSlot, other: IOSlot,
                sort_filters: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What a decode graph holds: carry-over, forward, sampling of every row into the slot's outputs."""
    logits = engine.forward(inputs, step, other, True, 0)
    res = sample(logits, inputs.temperature, inputs.top_p, inputs.top_k, inputs.min_p, inputs.seed,
                 inputs.counter, 0, sort_filters=sort_filters)
    rows = logits.shape[0]
    slot.out_sampled(rows).copy_(res.token_ids)
    slot.out_logprob(rows).copy_(res.logprob)
    return logits, res.lse


def _empty_plan() -> StepPlan:
    """A plan of no rows and no tokens: what piecewise graphs are captured on, padded to their bucket."""
    none = np.zeros(0, dtype=np.int32)
    return StepPlan(
        step_id=0, carry_from_step=-1, flush=False, input_ids=none, positions=none, slot_mapping=none,
        query_start=np.zeros(1, np.int32), kv_lens=none, block_tables=np.zeros((0, 1), np.int32),
        carry_index=none, sample=none, temperature=np.zeros(0, np.float32), top_p=np.zeros(0, np.float32),
        top_k=none, min_p=np.zeros(0, np.float32), seed=np.zeros(0, np.uint64), num_logprobs=none,
    )


def _idle_decode_plan(rows: int, width: int) -> StepPlan:
    """A decode plan whose rows are all padding: what graphs are captured on (it reads and writes no KV).
    Every row samples, as in every padded graph plan (see cuda_graphs)."""
    zeros = np.zeros(rows, dtype=np.int32)
    return StepPlan(
        step_id=0, carry_from_step=-1, flush=False, input_ids=zeros, positions=zeros,
        slot_mapping=np.full(rows, -1, np.int32), query_start=np.arange(rows + 1, dtype=np.int32),
        kv_lens=zeros, block_tables=np.full((rows, width), -1, np.int32), carry_index=np.full(rows, -1, np.int32),
        sample=np.ones(rows, np.int32), temperature=np.zeros(rows, np.float32), top_p=np.ones(rows, np.float32),
        top_k=zeros,
        min_p=np.zeros(rows, np.float32), seed=np.zeros(rows, np.uint64), num_logprobs=np.full(rows, -1, np.int32),
    )
