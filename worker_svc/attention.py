"""Paged attention behind transformers' attention interface: the model code runs unmodified.

The runner calls the model with batch 1 and every token of the step packed (`input_ids [1, T]`,
`position_ids [1, T]`) and passes a `PagedStep` as the forward kwarg `tandem_step`; transformers
threads it down to each layer's attention call. There, `paged_attention_forward` stores the step's
K/V into the paged cache at `slot_mapping`, then computes, for each row, causal attention of the
row's queries over the row's whole cached context (earlier chunks and decode history included),
GQA-aware.

Block tables are persistent: one device table `[row slots, max blocks per row]` lives across steps
and step row r reads its blocks from row `table_rows[r]`, so decode CUDA graphs read the table in
place rather than copying a per-step table in. Cells past a row's context may be stale (left by the
slot's previous request): every path reads only the columns the row's kv_len covers, or masks them.

On CUDA everything goes to the Triton kernels in kernels/triton_attention.py, which read lengths and block
tables on the device: one launch stores K/V, one covers the single-token rows (decode, split-K, the
rows CUDA graphs replay), one covers every multi-token row (prefill chunks). Elsewhere (CPU) runs
the pure-PyTorch reference path, which is also the kernels' test oracle: single-token rows batched
into one padded gather, multi-token rows one SDPA each, loop bounds from the plan on the host.

No mask is built: the implementation name is deliberately NOT registered in
`transformers.masking_utils.AttentionMaskInterface`. For unregistered names, transformers' mask
preprocessing returns `None` straight away; registering even a None-returning mask function would
instead run its packed-sequence detection, which reads a device value on the host every forward.
The function asserts the mask is None so a model that builds one anyway fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from worker_svc.kv_cache import PagedKVCache

ATTN_IMPLEMENTATION = "tandem_paged"
STEP_KWARG = "tandem_step"


@dataclass(frozen=True)
class MultiRow:
    """A row with several query tokens; host ints, so its slices need no device read."""

    row: int
    q_start: int
    q_end: int
    kv_len: int
    num_blocks: int  # columns of the row's table row that hold its context (the rest may be stale)


@dataclass(frozen=True)
class RowLayout:
    """How a step's rows split between the batched single-token path and per-row prefill."""

    single_rows: np.ndarray  # int32 [S]: rows with exactly one query token
    single_tokens: np.ndarray  # int32 [S]: that token's index in the packed step
    single_blocks: int  # table columns the single-token gather reads: the longest row's, not the table width
    multi: tuple[MultiRow, ...]

    # Cached: the layout is read once per step by the I/O slot and once per layer by attention.
    @cached_property
    def multi_rows(self) -> np.ndarray:
        return np.array([m.row for m in self.multi], dtype=np.int32)

    @cached_property
    def max_query_len(self) -> int:
        return max((m.q_end - m.q_start for m in self.multi), default=0)


def row_layout(query_start: np.ndarray, kv_lens: np.ndarray, block_size: int) -> RowLayout:
    """Splits rows by query length, from the plan's host arrays."""
    n = np.diff(query_start)
    single = np.flatnonzero(n == 1).astype(np.int32)
    single_blocks = int(-(-int(kv_lens[single].max()) // block_size)) if single.size else 0
    multi = tuple(
        MultiRow(int(r), int(query_start[r]), int(query_start[r + 1]), int(kv_lens[r]),
                 -(-int(kv_lens[r]) // block_size))
        for r in np.flatnonzero(n > 1)
    )
    return RowLayout(single, query_start[:-1][single].astype(np.int32), single_blocks, multi)


class GraphSplitter(Protocol):
    """What attention needs of a piecewise graph being captured (piecewise.PiecewiseGraph); a protocol,
    so that neither module imports the other (graph_capture joins them)."""

    def split(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              scale: float) -> torch.Tensor: ...


@dataclass
class PagedStep:
    """One step's attention metadata: device tensors (views of an I/O slot) plus the host layout."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor  # int32 [T]
    block_tables: torch.Tensor  # int32 [row slots, B]: persistent, stale past each row's context
    table_rows: torch.Tensor  # int32 [R]: step row r's row of block_tables
    kv_lens: torch.Tensor  # int32 [R]
    single_rows: torch.Tensor  # int32 [S]
    single_tokens: torch.Tensor  # int32 [S]
    query_start: torch.Tensor  # int32 [R + 1]
    multi_rows: torch.Tensor  # int32 [M]: rows with several query tokens
    layout: RowLayout
    piecewise: GraphSplitter | None = None  # set while capturing one: attention splits the graph
    # Eager CUDA forwards: called after each attention kernel is issued (Triton launches are no aten
    # op, so the busy figure's other boundaries miss them: worker_svc/step_clock.py).
    after_kernel: Callable[[], None] | None = None

    @classmethod
    def from_arrays(cls, cache: PagedKVCache, slot_mapping: np.ndarray, block_tables: np.ndarray,
                    query_start: np.ndarray, kv_lens: np.ndarray, table_rows: np.ndarray | None = None) -> PagedStep:
        """Builds a step from numpy arrays with fresh copies (tests, tools; the runner uses slot views).
        `table_rows` defaults to the identity: row r's blocks in `block_tables[r]`."""
        layout = row_layout(query_start, kv_lens, cache.cfg.block_size)
        dev = cache.cfg.device
        if table_rows is None:
            table_rows = np.arange(len(kv_lens))

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a, dtype=np.int32), device=dev)

        return cls(cache, put(slot_mapping), put(block_tables), put(table_rows), put(kv_lens),
                   put(layout.single_rows), put(layout.single_tokens), put(query_start), put(layout.multi_rows),
                   layout)

    # Every layer of a step reads the same blocks: the gather indices and masks are built once per
    # step, on the first layer, not once per layer.
    @cached_property
    def single_gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids [S * B] to gather, visibility mask [S, 1, 1, B * block_size]) of single-token rows."""
        rows = self.single_rows
        # Cells past a shorter row's end hold -1 or stale ids: -1 gathers block 0, and the mask hides
        # every position past kv_len whichever block it came from.
        tables = self.block_tables[self.table_rows[rows], : self.layout.single_blocks]
        blocks = tables.clamp(min=0).to(torch.int64)
        span = self.layout.single_blocks * self.cache.cfg.block_size
        ctx = torch.arange(span, device=blocks.device)
        visible = ctx[None, :] < self.kv_lens[rows][:, None]
        return blocks.flatten(), visible[:, None, None, :]

    @cached_property
    def multi_gather(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per multi-token row: (its block ids, causal mask over its context or None when plain causal)."""
        out = []
        for m in self.layout.multi:
            # Only the columns the context covers: those past it may be stale. A one-element index
            # slice, not table_rows[m.row], so no device value becomes a host int.
            blocks = self.block_tables[self.table_rows[m.row : m.row + 1], : m.num_blocks][0].to(torch.int64)
            n = m.q_end - m.q_start
            mask = None
            if m.kv_len != n:
                ctx = torch.arange(m.kv_len, device=blocks.device)
                qpos = torch.arange(m.kv_len - n, m.kv_len, device=blocks.device)
                mask = ctx[None, :] <= qpos[:, None]
            out.append((blocks, mask))
        return out


def paged_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: PagedStep,
                    scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of packed queries `[T, H, D]` over the paged context, into `out` `[T, H, D]`
    (allocated when not given; tokens that belong to no row are left as they are).

    The step's K/V must already be in the cache. Row r's queries sit at context positions
    `kv_lens[r] - n_r .. kv_lens[r] - 1` and see every cached position up to their own.
    """
    out = torch.empty_like(query) if out is None else out
    lay = step.layout
    if query.is_cuda:
        from worker_svc.kernels.triton_attention import paged_decode, paged_prefill  # triton is not on CPU installs

        paged_decode(query, k_cache, v_cache, out, step.block_tables, step.table_rows, step.kv_lens,
                     step.single_rows, step.single_tokens, scale)
        paged_prefill(query, k_cache, v_cache, out, step.block_tables, step.table_rows, step.kv_lens,
                      step.query_start, step.multi_rows, lay.max_query_len, scale)
        return out
    if lay.single_rows.size:
        toks = step.single_tokens
        blocks, visible = step.single_gather
        num_rows = lay.single_rows.size
        # index_select on the block axis is one contiguous copy per block, cheaper than fancy indexing.
        keys = k_cache.index_select(0, blocks).view(num_rows, -1, *k_cache.shape[2:]).transpose(1, 2)
        values = v_cache.index_select(0, blocks).view(num_rows, -1, *v_cache.shape[2:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(
            query[toks][:, :, None, :], keys, values, attn_mask=visible, scale=scale, enable_gqa=True,
        )
        out.index_copy_(0, toks.to(torch.int64), o[:, :, 0, :])
    for m, (blocks, mask) in zip(lay.multi, step.multi_gather, strict=True):
        keys = k_cache.index_select(0, blocks).flatten(0, 1)[: m.kv_len].transpose(0, 1)[None]  # [1, KVH, L, D]
        values = v_cache.index_select(0, blocks).flatten(0, 1)[: m.kv_len].transpose(0, 1)[None]
        q = query[m.q_start : m.q_end].transpose(0, 1)[None]  # [1, H, n, D]
        if mask is None:  # nothing cached before this chunk: plain causal
            o = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        out[m.q_start : m.q_end] = o[0].transpose(0, 1)
    return out


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, KVH, T, D]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `AttentionInterface` entry point; returns `[1, T, H, D]` like transformers' own paths."""
    step: PagedStep | None = kwargs.get(STEP_KWARG)
    assert step is not None, f"attention {ATTN_IMPLEMENTATION!r} needs the forward kwarg {STEP_KWARG!r}"
    assert attention_mask is None, "a dense mask was built; see the module docstring"
    assert query.shape[0] == 1, "the runner packs a step into batch 1"
    if kwargs.get("softcap"):
        raise NotImplementedError("softcapped attention is not supported by tandem_paged")
    # A `sliding_window` kwarg is ignored: models.load refused every model whose window is shorter
    # than its context limit (attention_refusal), so no context here is longer than the window.
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if step.piecewise is not None:  # capturing a piecewise graph: this call runs eagerly at replay
        return step.piecewise.split(module.layer_idx, query, key, value, scale), None
    out = torch.empty((1, query.shape[2], query.shape[1], query.shape[3]), dtype=query.dtype, device=query.device)
    attend(step, module.layer_idx, query, key, value, out, scale)
    return out, None


def attend(step: PagedStep, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           out: torch.Tensor, scale: float) -> None:
    """One layer: store the step's K/V, then attention into `out` `[1, T, H, D]` (inputs as the
    attention interface passes them: query `[1, H, T, D]`, key/value `[1, KVH, T, D]`)."""
    k = key[0].transpose(0, 1)  # [T, KVH, D]
    v = value[0].transpose(0, 1)
    if k.is_cuda:
        from worker_svc.kernels.triton_attention import store_kv

        store_kv(k, v, step.cache.k[layer], step.cache.v[layer], step.slot_mapping)
        if step.after_kernel is not None:
            step.after_kernel()
    else:
        step.cache.store(layer, step.slot_mapping, k, v)
    paged_attention(query[0].transpose(0, 1), step.cache.k[layer], step.cache.v[layer], step, scale, out[0])
    if step.after_kernel is not None:
        step.after_kernel()


def attention_refusal(config: Any, max_context: int) -> str | None:
    """Why the paged kernels cannot run this model's attention up to `max_context`, or None. A
    sliding window at least as long as the context limit never excludes a token, so it is accepted."""
    if getattr(config, "attn_logit_softcapping", None):
        return "attention logit soft-capping (Gemma-2 style) is not supported by the paged kernels"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < max_context:
        return (f"sliding-window attention ({window} tokens) is not supported by the paged kernels; "
                f"with --max-context {window} or less the window never applies")
    return None


def install(model: torch.nn.Module) -> None:
    """Registers the paged function (idempotent) and switches `model` to it."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
