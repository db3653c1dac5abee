"""Capturing the worker's CUDA graphs once at start-up: decode graphs per (I/O slot, row bucket,
sampling variant, penalties or not; forward-only with a grammar engine) and piecewise graphs per
(I/O slot, token bucket), all in one shared pool, largest first so the pool is sized by the largest
(see cuda_graphs.py and piecewise.py for what they hold and how they are replayed). Owns the
placeholder plans graphs are captured on and what a decode graph's body holds. The penalized
variants need the penalty state's buffers to exist (the graph holds their addresses), so capturing
them allocates those up front. With a grammar engine the forward-only variant of each decode graph
(carry-over + forward, logits into the shared buffer; constrained decode steps replay it and sample
eagerly) is captured too, in the same largest-first order; without one it is not, so a server
without structured output pays nothing for it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

import numpy as np
import torch

from worker_svc.attention import PagedStep, attend, row_layout
from worker_svc.graphs.cuda_graphs import DecodeGraphs, decode_layout
from worker_svc.graphs.piecewise import AttentionIO, PiecewiseGraph, token_buckets
from worker_svc.io_slots import DeviceSync, IOSlot, SlotLimits
from worker_svc.penalties import ALL, PenaltyState
from worker_svc.row_state import StepBatch
from worker_svc.sampler import sample
from worker_svc.step_forward import StepForward


class Engine(Protocol):
    """What capture needs of runner.Engine: its buffers and the step body, which lives below both
    (step_forward.py), so this module never imports the runner nor calls back into it."""

    limits: SlotLimits
    slots: list[IOSlot]
    sync: DeviceSync
    cache: Any
    loaded: Any
    device: str
    graphs: DecodeGraphs | None
    piecewise: dict[tuple[int, int], PiecewiseGraph]
    token_buckets: list[int]
    graph_memory_bytes: int
    penalties: PenaltyState
    penalty_graphs: bool
    fwd: StepForward  # the body captured (and what the runner runs eagerly)
    grammar: object | None  # the runner's StepGrammar: forward-only variants are captured only with one

log = logging.getLogger("tandem.worker.runner")


def capture_graphs(engine: Engine) -> None:
    """Captures every decode graph, then every piecewise graph, into the engine (one shared pool)."""
    width = engine.limits.max_blocks_per_row
    engine.graphs = DecodeGraphs(engine.limits.max_num_rows, width, penalized=engine.penalty_graphs)
    t0, reserved = time.perf_counter(), torch.cuda.memory_reserved()
    if engine.penalty_graphs:
        engine.penalties.allocate()
        torch.cuda.synchronize()  # allocated (and zeroed) on the default stream, before any capture
    with torch.inference_mode():
        _capture_decode(engine, width)
        _capture_piecewise(engine)
    torch.cuda.synchronize()
    engine.graph_memory_bytes = torch.cuda.memory_reserved() - reserved
    log.info("captured %d decode CUDA graphs (row buckets %s%s), %d forward-only decode graphs and %d piecewise "
             "graphs (token buckets %s) in %.1f s, %.0f MiB", len(engine.graphs.captured), engine.graphs.buckets,
             ", with and without penalties" if engine.penalty_graphs else "", len(engine.graphs.forward_only),
             len(engine.piecewise), engine.token_buckets, time.perf_counter() - t0,
             engine.graph_memory_bytes / (1 << 20))


def _capture_piecewise(engine: Engine) -> None:
    """Per (slot, token bucket), largest first, the forward of a step that is not decode-only,
    cut at every attention call (see piecewise.py). Captured on an empty plan padded to the bucket."""
    assert engine.graphs is not None
    engine.token_buckets = token_buckets(engine.limits.max_num_tokens)
    empty = _batch(0, 0)  # no rows, no tokens: padded to each bucket when loaded
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
            step = engine.fwd.paged_step(inputs, layout)
            step.piecewise = graph
            with torch.cuda.stream(stream):
                graph.capturing = False  # warm-up, outside any capture: cuBLAS picks its kernels
                engine.fwd.forward(inputs, step, other, True, inputs.sample_tokens)
                stream.synchronize()
                graph.capturing = True
                graph.begin()
                graph.end(engine.fwd.forward(inputs, step, other, True, inputs.sample_tokens))
            engine.piecewise[(slot.index, tokens)] = graph
            slot.in_use = False


def _capture_decode(engine: Engine, width: int) -> None:
    assert engine.graphs is not None
    variants = (False, True) if engine.graphs.penalized else (False,)
    for rows in reversed(engine.graphs.buckets):
        idle = _batch(rows, rows)  # every row padding
        for penalized in variants:  # plain first: the shared logits buffer takes the model's dtype
            for sort_filters in (False, True):
                for slot in engine.slots:
                    inputs, step, other = _placeholder_step(engine, slot, idle, rows, width)
                    engine.graphs.capture(
                        slot.index, rows, sort_filters, penalized, engine.sync.compute_stream,
                        lambda i=inputs, st=step, sl=slot, o=other, f=sort_filters, p=penalized:
                            _graph_body(engine, i, st, sl, o, f, p))
                    slot.in_use = False
        if engine.grammar is not None:  # after this bucket's plain variants, which size the shared logits
            for slot in engine.slots:
                inputs, step, other = _placeholder_step(engine, slot, idle, rows, width)
                engine.graphs.capture_forward_only(
                    slot.index, rows, engine.sync.compute_stream,
                    lambda i=inputs, st=step, o=other: engine.fwd.forward(i, st, o, True, 0))
                slot.in_use = False


def _placeholder_step(engine: Engine, slot: IOSlot, idle: StepBatch, rows: int,
                      width: int) -> tuple[object, PagedStep, IOSlot]:
    """The padding batch of a `rows` bucket loaded into `slot` (the compute stream waits for its copy):
    the inputs, paged step and other slot a decode graph of that bucket is captured on."""
    layout = decode_layout(rows, width)
    inputs = slot.load(idle, layout)
    step = engine.fwd.paged_step(inputs, layout)
    engine.sync.compute_stream.wait_event(slot.h2d_done)
    return inputs, step, engine.slots[1 - slot.index]


def _graph_body(engine: Engine, inputs, step: PagedStep, slot: IOSlot, other: IOSlot,
                sort_filters: bool, penalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """What a decode graph holds: carry-over, forward, (penalized: every row's transforms from its
    slot's state), sampling of every row into the slot's outputs, (penalized: every row's token
    counted into its slot's state). Padding rows (context 0) use the state's neutral trash row."""
    logits = engine.fwd.forward(inputs, step, other, True, 0)
    if penalized:
        pen = engine.penalties
        pslots = torch.where(inputs.kv_lens > 0, inputs.table_rows, pen.trash).to(torch.int64)
        logits = pen.apply(logits, pslots, inputs.counter, ALL)
    res = sample(logits, inputs.temperature, inputs.top_p, inputs.top_k, inputs.min_p, inputs.seed,
                 inputs.counter, 0, sort_filters=sort_filters)
    if penalized:
        pen.record(pslots, res.token_ids, ALL)
    rows = logits.shape[0]
    slot.out_sampled(rows).copy_(res.token_ids)
    slot.out_logprob(rows).copy_(res.logprob)
    return logits, res.lse


def _batch(rows: int, tokens: int) -> StepBatch:
    """A batch of `rows` padding rows (every one samples, as in every padded graph batch; see
    cuda_graphs) over `tokens` tokens: it reads and writes no KV and changes no block-table cell."""
    zeros, none = np.zeros(rows, np.int32), np.zeros(0, np.int32)
    return StepBatch(
        step_id=0, carry_from_step=-1, rows=zeros, query_start=np.arange(rows + 1, dtype=np.int32),
        input_ids=np.zeros(tokens, np.int32), positions=np.zeros(tokens, np.int32),
        slot_mapping=np.full(tokens, -1, np.int32), kv_lens=zeros, carry_index=np.full(rows, -1, np.int32),
        sample=np.ones(rows, np.int32), temperature=np.zeros(rows, np.float32), top_p=np.ones(rows, np.float32),
        top_k=zeros, min_p=np.zeros(rows, np.float32), seed=np.zeros(rows, np.uint64),
        num_logprobs=np.full(rows, -1, np.int32), append_slots=none, append_cols=none, append_blocks=none,
    )
