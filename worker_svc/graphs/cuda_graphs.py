"""CUDA graphs of decode steps: one per (I/O slot, row bucket, sampling variant, penalties or not),
and with structured output a forward-only one per (I/O slot, row bucket), all in one shared memory
pool.

A decode-only step (every row one token) is padded on the host to the next row bucket, so its device
inputs have the shapes, and live at the addresses, the graph was captured with. The block table is
not an input: the graph reads the engine's persistent device table in place, each row through its
`table_rows` entry, and attention walks each row's own context only, so no per-step table is built
or copied and a longer model context costs a decode step nothing. Padding rows write nowhere (slot
-1 is skipped by the KV store) and attend to nothing (context length 0). The graph holds carry-over
(gather the other slot's sampled ids by carry_index, replace where >= 0), the forward, and sampling
of every row (the fused kernel; the padded plan marks every row as sampling, so the sampling inputs
have the bucket's fixed shape, and the scheduler ignores the rows it did not ask for). Its sampled
ids and logprobs go straight into the slot's output buffer, outside the pool, where carry-over reads
them one step later. The two sampling variants differ only in whether top-k / top-p (a sort per row)
are applied: the plan says on the host which one a step needs. The penalized variant of each adds,
between the forward and the sampler, the penalty transforms of every row (logit bias, min_tokens,
repetition, presence, frequency: penalties.py, reading the per-slot device state in place) and, after
the sampler, the count update of every row's token, so a penalized decode step, carried-over tokens
included, stays one replay (neutral rows' logits are unchanged bit for bit; padding rows read and
count into the state's neutral trash row). The runner picks it when a sampled row is penalized and
every row samples; the plain variant is the same graph as without penalties, so an unpenalized step
costs what it did. Graphs are captured largest bucket
first, so the shared pool is sized by the largest and the others fit inside it. The logits and log-
sum-exp that top-n logprobs read after a replay are copied, inside the graph, into one buffer of
`max_rows` rows outside the pool that every graph shares: an output left in the pool stays allocated
for the graph's lifetime, and one per graph adds up (all graphs of the 8B shape took 2954 MiB at 256
rows with per-graph logits, 1488 MiB shared; 1224 and 946 MiB at 128 rows, measured on an H100). The
copy (rows x vocabulary, bf16) is a few microseconds. They are consumed on the compute stream before
the next replay overwrites them.

With a grammar engine (structured output), each (I/O slot, row bucket) also has a forward-only
variant: carry-over and the forward, ending with every row's logits copied into that same shared
buffer, and no sampling. A decode step with constrained rows replays it (a graph that samples inside
has no room for the host-filled bitmask), then the runner's tail masks, penalizes and samples the
sampled rows from the buffer eagerly, as after a piecewise graph. Servers without a grammar engine
capture none: no capture time, no memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from worker_svc.attention import RowLayout
from worker_svc.row_state import StepBatch

log = logging.getLogger("tandem.worker.graphs")

# nano-vllm's shape: small buckets one by one where padding would double the work, then steps of 16.
SMALL_BUCKETS = (1, 2, 4, 8)


def row_buckets(max_rows: int) -> list[int]:
    buckets = [b for b in SMALL_BUCKETS if b <= max_rows] + list(range(16, max_rows + 1, 16))
    if buckets[-1] != max_rows:
        buckets.append(max_rows)
    return buckets


def pad_decode_batch(plan: StepBatch, rows: int, sample_all: bool = True) -> StepBatch:
    """The batch grown to `rows` rows; padding rows do nothing (KV slot -1, context 0, table row 0).
    `sample_all`: every row samples (a graph that samples has the bucket's fixed shape); otherwise the
    rows keep the plan's flags and padding rows do not sample, so the sampling inputs are those of the
    unpadded plan (a forward-only replay, whose tail samples eagerly)."""
    r = plan.num_rows
    assert plan.is_decode_only and r <= rows

    def grow(a: np.ndarray, fill: float) -> np.ndarray:
        out = np.full(rows, fill, dtype=a.dtype)
        out[:r] = a
        return out

    return StepBatch(
        step_id=plan.step_id, carry_from_step=plan.carry_from_step, rows=grow(plan.rows, 0),
        query_start=np.arange(rows + 1, dtype=np.int32), input_ids=grow(plan.input_ids, 0),
        positions=grow(plan.positions, 0), slot_mapping=grow(plan.slot_mapping, -1), kv_lens=grow(plan.kv_lens, 0),
        carry_index=grow(plan.carry_index, -1),
        sample=np.ones(rows, dtype=plan.sample.dtype) if sample_all else grow(plan.sample, 0),
        temperature=grow(plan.temperature, 0), top_p=grow(plan.top_p, 1), top_k=grow(plan.top_k, 0),
        min_p=grow(plan.min_p, 0), seed=grow(plan.seed, 0), num_logprobs=grow(plan.num_logprobs, -1),
        append_slots=plan.append_slots, append_cols=plan.append_cols, append_blocks=plan.append_blocks,
    )


def decode_layout(rows: int, width: int) -> RowLayout:
    every = np.arange(rows, dtype=np.int32)
    return RowLayout(single_rows=every, single_tokens=every, single_blocks=width, multi=())


@dataclass
class CapturedStep:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [rows, V], a view of the shared output buffer; valid until the next replay
    lse: torch.Tensor  # [rows], likewise


class DecodeGraphs:
    """Captures and replays decode graphs, keyed (slot, rows, sort_filters, penalized), and the
    forward-only variants, keyed (slot, rows)."""

    def __init__(self, max_rows: int, width: int, penalized: bool = True) -> None:
        self.buckets = row_buckets(max_rows)
        self.width = width
        self.penalized = penalized  # whether the penalized variants are captured
        self.pool = torch.cuda.graph_pool_handle()
        self.captured: dict[tuple[int, int, bool, bool], CapturedStep] = {}
        self.forward_only: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # empty without a grammar engine
        self.logits_out: torch.Tensor | None = None  # [max_rows, V], shared by every graph, outside the pool
        self.lse_out: torch.Tensor | None = None  # [max_rows]

    def bucket_for(self, plan: StepBatch) -> int | None:
        if not plan.is_decode_only:
            return None
        return next((b for b in self.buckets if b >= plan.num_rows), None)

    def capture(self, slot_index: int, rows: int, sort_filters: bool, penalized: bool, stream: torch.cuda.Stream,
                body: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Captures `body` (inputs already loaded for `rows` rows on this slot) after one warm-up run.
        The shared logits buffer takes the dtype of the first capture's logits (a plain variant's: the
        model's), so the plain graphs copy what they always did."""
        with torch.cuda.stream(stream):
            logits, lse = body()  # warm-up: Triton compiles, cuBLAS picks its kernels, outside the capture
            if self.logits_out is None:
                self.logits_out = logits.new_empty((self.buckets[-1], logits.shape[1]))
                self.lse_out = lse.new_empty(self.buckets[-1])
        stream.synchronize()
        del logits, lse
        assert self.logits_out is not None and self.lse_out is not None
        logits_out, lse_out = self.logits_out[:rows], self.lse_out[:rows]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            logits, lse = body()
            logits_out.copy_(logits)
            lse_out.copy_(lse)
            del logits, lse  # back to the pool for the next capture
        self.captured[(slot_index, rows, sort_filters, penalized)] = CapturedStep(graph, logits_out, lse_out)

    def replay(self, slot_index: int, rows: int, sort_filters: bool, penalized: bool = False) -> CapturedStep:
        step = self.captured[(slot_index, rows, sort_filters, penalized)]
        step.graph.replay()
        return step

    def capture_forward_only(self, slot_index: int, rows: int, stream: torch.cuda.Stream,
                             body: Callable[[], torch.Tensor]) -> None:
        """Captures `body` (carry-over + forward, returning the logits [rows, V]) after one warm-up
        run, its logits copied into the shared buffer, which a plain variant's capture has sized:
        graph_capture captures these after the plain variants of the largest bucket."""
        assert self.logits_out is not None, "forward-only variants are captured after a plain variant"
        with torch.cuda.stream(stream):
            body()  # warm-up, outside the capture
        stream.synchronize()
        logits_out = self.logits_out[:rows]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=stream):
            logits = body()
            logits_out.copy_(logits)
            del logits  # back to the pool: only the shared buffer outlives the capture
        self.forward_only[(slot_index, rows)] = graph

    def replay_forward_only(self, slot_index: int, rows: int) -> torch.Tensor:
        """Replays the forward-only variant; returns its logits [rows, V], a view of the shared buffer
        valid until the next replay of any decode graph (the compute stream's order keeps it)."""
        assert self.logits_out is not None
        self.forward_only[(slot_index, rows)].replay()
        return self.logits_out[:rows]
