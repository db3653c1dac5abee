"""Benchmark state surgery on a worker Engine: row slots that hold requests mid-decode.

A benchmark of one decode step at a long context cannot prefill its way there (rows x context
tokens through a forward); it puts the engine's row slots (worker_svc/row_state.py and the device
block table) straight into the state that the plans admitting and prefilling those requests would
have left, and then sends plain decode plans. Used by `bench floor` and `bench plan-cost`.
"""

from __future__ import annotations

import numpy as np
import torch
from tandem.wire import StepPlan


def occupy_rows(engine, slots: list[int], tables: list[list[int]], computed: list[int]) -> None:
    """Slot `slots[i]` holds a greedy request whose KV blocks are `tables[i]` and whose first
    `computed[i]` tokens are written (its seed is its slot)."""
    ws = engine.rows
    for s, blocks, n in zip(slots, tables, computed, strict=True):
        assert not ws.active[s] and n <= len(blocks) * ws.block_size
        ws.active[s], ws.context[s], ws.num_blocks[s] = True, n, len(blocks)
        ws.table[s, : len(blocks)] = blocks
        ws.temperature[s], ws.top_p[s], ws.top_k[s], ws.min_p[s], ws.seed[s] = 0.0, 1.0, 0, 0.0, s
        ws.num_logprobs[s] = -1
        engine.block_table[s, : len(blocks)] = torch.from_numpy(ws.table[s, : len(blocks)]).to(engine.device)


def fixed_context_rows(engine, rows: int, context: int) -> None:
    """Slots 0..rows-1 decode at `context` (the next token sits at position context - 1), their
    blocks laid out one row after another."""
    engine.reset_rows()
    per_row = -(-context // engine.cache.cfg.block_size)
    tables = np.arange(rows * per_row, dtype=np.int32).reshape(rows, per_row)
    occupy_rows(engine, list(range(rows)), tables.tolist(), [context - 1] * rows)


def decode_plan(engine, step_id: int, rows: int, context: int) -> StepPlan:
    """A decode step of slots 0..rows-1 at `context`, every time at the same position: the rows'
    context is set back first (a fixed-context benchmark; the step rewrites the same KV slot)."""
    engine.rows.context[:rows] = context - 1
    vocab = engine.loaded.vocab_size
    return StepPlan(
        step_id=step_id, carry_from_step=-1, flush=False, rows=np.arange(rows, dtype=np.int32),
        query_start=np.arange(rows + 1, dtype=np.int32),
        input_ids=np.random.default_rng(step_id).integers(3, vocab, rows).astype(np.int32),
        carry_index=np.full(rows, -1, np.int32), sample=np.ones(rows, np.int32),
    )
