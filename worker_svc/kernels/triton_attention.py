"""Triton kernels over the paged KV cache: decode attention (split-K), varlen prefill attention, KV store.

Owns the CUDA path of attention.py. Every loop bound (context length, query length, block table
entry) is read on the device, so no kernel needs a host value of the step beyond the grid, and the
decode path is capturable in a CUDA graph.

The block table is the worker's persistent one, `[row slots, max blocks per row]`: step row r reads
table row `table_rows[r]`. Cells past a row's context may hold stale ids of the slot's previous
user, so every walk stops at the row's own kv_len and block ids are loaded under that mask.

- `paged_decode`: one query token per row. A program owns (row, KV head, split): the query heads of
  a GQA group are stacked into the M side of one `tl.dot` (padded to 16, the tensor-core minimum),
  so K/V are read once per group. A row's context is cut into `num_splits` contiguous parts, each
  a whole number of tiles; the last part of a (row, KV head) to finish merges the parts' (output,
  log-sum-exp) (or, with `merge_inline` off, a second kernel does). The split count
  depends only on the row count and the KV heads (`decode_splits`), never on context lengths, so a
  graph captured for a row bucket and the eager path of the same bucket compute identically.
- `paged_prefill`: rows with several query tokens (prefill chunks, mixed steps). A program owns
  (row, tile of BLOCK_M queries, head), walks the row's context up to its last query's position and
  masks causally; one launch covers every multi-token row of the step.
- `store_kv`: writes the step's K/V at their slots; slot -1 (padding) writes nothing.

Softmax runs in base 2 (scale folded with log2 e); fp32 inputs use IEEE dot products, so the
float32 path matches the PyTorch reference to rounding.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
DECODE_TILE = 64  # context tokens per decode loop iteration (several pages when block_size < 64)
PREFILL_BLOCK_M = 32
PREFILL_TILE = 32
MAX_SPLITS = 16
# The decode kernel's launch: context tokens per loop iteration, warps, software-pipeline stages, and
# whether the last part of a split row merges the parts itself (no separate merge launch). Measured
# on an H200 (bench/attn_probe.py --quick, 8B shape, 32 rows, 4 parts): tiles of 128, 8 warps or 2
# stages were no faster than these (at best equal, 43.4 us a layer at 1K); the inline merge took 38.2 / 128.0 /
# 247.4 us a layer at 1K / 4K / 8K against 39.6 / 128.9 / 248.7 with the merge kernel at 2 parts
# (at 4 parts it was slower: 46.1 against 43.9 us at 1K).
DECODE_LAUNCH = {"tile": DECODE_TILE, "num_warps": 4, "num_stages": 3, "merge_inline": True}
_MIN_DOT = 16  # tl.dot needs each dimension >= 16


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_splits(num_rows: int, kv_heads: int, num_sms: int) -> int:
    """How many parts each row's context is cut into: the largest power of two that keeps the
    programs at most ~4 per SM, at least 1, at most 16.

    Rows are rounded up to a power of two first, so every row count of a CUDA graph's row bucket gets
    the bucket's own split count (buckets are powers of two up to 16, then multiples of 16): the
    eager path and the graph of a bucket add the same partial sums in the same order.
    Rounding the split count down, not up, was measured on an H200 (bench/attn_probe.py, 8B shape,
    32 rows): 2 parts (512 programs on 132 SMs) took 39.6 / 128.9 / 248.7 us a layer at 1K / 4K / 8K
    context against 43.9 / 133.3 / 251.8 us with the 4 parts rounding up gave; 8 and 16 were slower.
    """
    want = 4 * num_sms / (triton.next_power_of_2(max(1, num_rows)) * kv_heads)
    if want < 1:
        return 1
    return max(1, min(MAX_SPLITS, 1 << int(math.floor(math.log2(want)))))


@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_base, v_base, table, pos, ok, visible, d, scale_log2,
                 stride_kb, stride_ks, stride_vb, stride_vs, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step of both kernels: gather the tile's K/V through the block table (`pos`
    context positions, `ok` in range), score `q` against K where `visible`, fold into (m_i, l_i, acc).
    `ok` must imply pos < kv_len: cells past the context are stale, so they are never loaded."""
    block = tl.load(table + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    off = pos % BLOCK_SIZE
    k = tl.load(k_base + block[:, None] * stride_kb + off[:, None] * stride_ks + d[None, :],
                mask=ok[:, None], other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + block[:, None] * stride_vb + off[:, None] * stride_vs + d[None, :],
                mask=ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


# Triton specialises integer arguments by value class (== 1, divisible by 16): the block table's row
# stride (the persistent table's width, set by the worker's limits; tools pass tables of their own) is
# exempt, so no width compiles a kernel variant of its own, possibly while serving.
@triton.jit(do_not_specialize=["stride_table"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, part_o_ptr, part_lse_ptr, tables_ptr, table_rows_ptr, kv_lens_ptr, rows_ptr,
    toks_ptr, count_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_table,
    GROUP: tl.constexpr, M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, MERGE_INLINE: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    row = tl.load(rows_ptr + s)
    tok = tl.load(toks_ptr + s).to(tl.int64)
    kv_len = tl.load(kv_lens_ptr + row)  # bounds the walk: the table row may be wider than the context
    per_split = tl.cdiv(tl.cdiv(kv_len, SPLITS), TILE) * TILE
    lo = split * per_split
    hi = tl.minimum(kv_len, lo + per_split)

    g = tl.arange(0, M)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, TILE)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, HEAD_DIM], tl.float32)
    table = tables_ptr + tl.load(table_rows_ptr + row).to(tl.int64) * stride_table
    for start in range(lo, hi, TILE):
        pos = start + n
        ok = pos < hi
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh, table, pos,
                                     ok, ok[None, :], d, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs,
                                     BLOCK_SIZE, PRECISION)

    has = l_i > 0
    # An empty part, or a padding row (kv_len 0: no table cell is read), gives zeros.
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLITS == 1:
        tl.store(o_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None])
    else:
        # Parts laid out [S, H, SPLITS, D] and [S, H, SPLITS], contiguous.
        num_heads = tl.num_programs(1) * GROUP
        base = (s.to(tl.int64) * num_heads + heads) * SPLITS + split
        tl.store(part_o_ptr + base[:, None] * HEAD_DIM + d[None, :], out, mask=g_ok[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + base, lse, mask=g_ok)
        if MERGE_INLINE:
            # The last part of (row, KV head) to finish merges the group's parts: every thread's stores
            # above happen before the barrier, the counter's release/acquire orders them for the merger,
            # which reads through L2 (.cg). The merger sets the counter back to 0 for the next launch.
            tl.debug_barrier()
            counter = count_ptr + s * tl.num_programs(1) + kvh
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
                first = (s.to(tl.int64) * num_heads + heads) * SPLITS
                i = tl.arange(0, SPLITS)
                lses = tl.load(part_lse_ptr + first[:, None] + i[None, :], mask=g_ok[:, None], other=float("-inf"),
                               cache_modifier=".cg")
                top = tl.max(lses, axis=1)
                top = tl.where(top == float("-inf"), 0.0, top)
                w = tl.exp2(lses - top[:, None])  # 0 for empty parts
                total = tl.sum(w, axis=1)
                merged = tl.zeros([M, HEAD_DIM], tl.float32)
                for j in tl.static_range(SPLITS):
                    w_j = tl.sum(tl.where(i[None, :] == j, w, 0.0), axis=1)
                    o_j = tl.load(part_o_ptr + (first + j)[:, None] * HEAD_DIM + d[None, :], mask=g_ok[:, None],
                                  other=0.0, cache_modifier=".cg")
                    merged += w_j[:, None] * o_j
                merged = merged / tl.where(total > 0, total, 1.0)[:, None]
                tl.store(o_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :],
                         merged.to(o_ptr.dtype.element_ty), mask=g_ok[:, None])
                tl.store(counter, 0)


@triton.jit
def _merge_kernel(part_o_ptr, part_lse_ptr, o_ptr, toks_ptr, stride_ot, stride_oh,
                  HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
    s = tl.program_id(0)
    h = tl.program_id(1)
    tok = tl.load(toks_ptr + s).to(tl.int64)
    base = (s.to(tl.int64) * tl.num_programs(1) + h) * SPLITS
    i = tl.arange(0, SPLITS)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + base + i)
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # 0 for empty parts
    o = tl.load(part_o_ptr + (base + i)[:, None] * HEAD_DIM + d[None, :])
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + tok * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def paged_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                 block_tables: torch.Tensor, table_rows: torch.Tensor, kv_lens: torch.Tensor, rows: torch.Tensor,
                 tokens: torch.Tensor, scale: float, num_splits: int | None = None,
                 launch: dict | None = None) -> None:
    """Writes attention of `query[tokens[s]]` over row `rows[s]`'s paged context into `out[tokens[s]]`.

    query/out [T, H, D]; caches [num_blocks, block_size, KVH, D]; block_tables [row slots, B], row r's
    blocks in `block_tables[table_rows[r]]`; table_rows and kv_lens [R].
    `num_splits` defaults to `decode_splits` of the row count; graphs pass their bucket's.
    `launch` overrides DECODE_LAUNCH's entries (bench/attn_probe.py sweeps them).
    """
    num = rows.shape[0]
    if num == 0:
        return
    heads, head_dim = query.shape[1], query.shape[2]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    _check(query, k_cache, v_cache, out)
    opts = {**DECODE_LAUNCH, **(launch or {})}
    if num_splits is None:
        num_splits = decode_splits(num, kv_heads, _num_sms(query.device.index or 0))
    part_o = part_lse = counts = out  # unused placeholders when one part
    inline = False
    if num_splits > 1:
        part_o = torch.empty((num, heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num, heads, num_splits), dtype=torch.float32, device=query.device)
        if opts["merge_inline"]:
            counts = _merge_counters(query.device, num * kv_heads)
            inline = counts is not None
            counts = out if counts is None else counts
    _decode_kernel[(num, kv_heads, num_splits)](
        query, k_cache, v_cache, out, part_o, part_lse, block_tables, table_rows, kv_lens, rows, tokens, counts,
        scale * LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, M=max(_MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        TILE=opts["tile"], SPLITS=num_splits, PRECISION=_precision(query.dtype), MERGE_INLINE=inline,
        num_warps=opts["num_warps"], num_stages=opts["num_stages"],
    )
    if num_splits > 1 and not inline:
        _merge_kernel[(num, heads)](part_o, part_lse, out, tokens, out.stride(0), out.stride(1),
                                    HEAD_DIM=head_dim, SPLITS=num_splits)


_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}


def _merge_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """Zeroed int32 counters, one per (row, KV head), for the inline merge; each launch leaves them
    zero again. One buffer per (device, stream): decode launches on one stream run one after another,
    and graphs replay on the stream they were captured on. None while a graph is being captured and
    the buffer does not exist yet or is too small (allocating then would put it in the graph's pool):
    that launch merges with the separate kernel. The engine's eager warm-up before each capture
    allocates it."""
    if device.type != "cuda":  # Triton's interpreter (tests on the CPU)
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (str(device), torch.cuda.current_stream(device).stream_id)
    have = _COUNTERS.get(key)
    if have is not None and have.numel() >= n:
        return have
    if torch.cuda.is_current_stream_capturing():
        return None
    _COUNTERS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return _COUNTERS[key]


@triton.jit(do_not_specialize=["stride_table"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, table_rows_ptr, kv_lens_ptr, qstart_ptr, rows_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
):
    row = tl.load(rows_ptr + tl.program_id(0))
    mt = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    q0 = tl.load(qstart_ptr + row)
    n_q = tl.load(qstart_ptr + row + 1) - q0
    kv_len = tl.load(kv_lens_ptr + row)
    ctx0 = kv_len - n_q  # context position of the row's first query
    qi = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = qi < n_q
    qpos = ctx0 + qi
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, TILE)
    toks = (q0 + qi).to(tl.int64)
    q = tl.load(q_ptr + toks[:, None] * stride_qt + h * stride_qh + d[None, :], mask=q_ok[:, None], other=0.0)

    # Tiles past this row's queries do nothing: no early return, an empty loop and masked stores. The
    # walk ends at kv_len at the latest: the table row's cells past it are stale.
    end = tl.where(mt * BLOCK_M < n_q, tl.minimum(kv_len, ctx0 + (mt + 1) * BLOCK_M), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    table = tables_ptr + tl.load(table_rows_ptr + row).to(tl.int64) * stride_table
    for start in range(0, end, TILE):
        pos = start + n
        ok = pos < end
        # Position 0 is visible to every query, so no row of a tile is all -inf after the first.
        visible = ok[None, :] & (pos[None, :] <= qpos[:, None])
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptr + kvh * stride_kh, v_ptr + kvh * stride_vh, table, pos,
                                     ok, visible, d, scale_log2, stride_kb, stride_ks, stride_vb, stride_vs,
                                     BLOCK_SIZE, PRECISION)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + toks[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=q_ok[:, None])


def paged_prefill(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                  block_tables: torch.Tensor, table_rows: torch.Tensor, kv_lens: torch.Tensor,
                  query_start: torch.Tensor, rows: torch.Tensor, max_query_len: int, scale: float) -> None:
    """Causal attention of each multi-token row `rows[i]` (queries `query_start[r]..query_start[r+1]`,
    at the end of its `kv_lens[r]`-token context) over its paged context, written into `out`; tables
    as in `paged_decode`.

    `max_query_len` (a host int from the plan) sizes the grid; shorter rows' extra programs idle.
    """
    num = rows.shape[0]
    if num == 0:
        return
    heads, head_dim = query.shape[1], query.shape[2]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    _check(query, k_cache, v_cache, out)
    grid = (num, triton.cdiv(max_query_len, PREFILL_BLOCK_M), heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, block_tables, table_rows, kv_lens, query_start, rows,
        scale * LOG2E,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=heads // kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=PREFILL_BLOCK_M, TILE=PREFILL_TILE, PRECISION=_precision(query.dtype),
    )


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cache_slot, stride_cache_head,
                     KV_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    h = tl.arange(0, HEADS_P2)
    d = tl.arange(0, HEAD_DIM)
    ok = (h[:, None] < KV_HEADS) & (slot >= 0)  # slot -1: a padding token, stored nowhere
    dst = slot * stride_cache_slot + h[:, None] * stride_cache_head + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=ok)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=ok)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=ok)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Writes key/value [T, KVH, D] into caches [blocks, block_size, KVH, D] at `slot_mapping[T]`."""
    num, kv_heads, head_dim = key.shape
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    if num == 0:
        return
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape == v_cache.shape
    assert key.stride(2) == 1 and value.stride(2) == 1
    _store_kv_kernel[(num,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), k_cache.stride(1), k_cache.stride(2),
        KV_HEADS=kv_heads, HEADS_P2=triton.next_power_of_2(kv_heads), HEAD_DIM=head_dim,
    )


def _check(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
    head_dim = query.shape[2]
    assert head_dim & (head_dim - 1) == 0 and head_dim >= _MIN_DOT, "head_dim must be a power of two >= 16"
    assert query.shape[1] % k_cache.shape[2] == 0, "query heads must be a multiple of KV heads"
    assert query.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and out.stride(2) == 1
