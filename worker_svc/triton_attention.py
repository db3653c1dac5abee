"""Triton paged decode attention: one query token per row, read straight from the paged KV cache.

Owns the CUDA path for single-token rows (decode), the rows CUDA graphs replay. One program per
(row, KV head) walks the row's block table, so every query head of a GQA group shares one read of
K/V, and the loop bound (the row's context length) is read on the device: no host value, no
data-dependent shape, hence capturable in a CUDA graph. A padding row (context length 0) reads
nothing and writes zeros. Split-K for very long contexts and the varlen prefill kernel are later
work; multi-token rows still take the PyTorch path in attention.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, kv_lens_ptr, rows_ptr, toks_ptr,
    scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_table,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(rows_ptr + s)
    tok = tl.load(toks_ptr + s)
    kv_len = tl.load(kv_lens_ptr + row)

    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, HEAD_DIM)
    o = tl.arange(0, BLOCK_SIZE)
    g_ok = g < GROUP
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None], other=0.0)
    q = q.to(tl.float32) * scale

    m = tl.full([GROUP_P2], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_P2], tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM], tl.float32)
    for j in range(0, tl.cdiv(kv_len, BLOCK_SIZE)):
        block = tl.load(tables_ptr + row * stride_table + j).to(tl.int64)
        pos = j * BLOCK_SIZE + o
        ok = pos < kv_len
        k = tl.load(k_ptr + block * stride_kb + o[:, None] * stride_ks + kvh * stride_kh + d[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, BLOCK_SIZE]
        scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + block * stride_vb + o[:, None] * stride_vs + kvh * stride_vh + d[None, :],
                    mask=ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / tl.maximum(denom, 1e-30)[:, None]
    tl.store(o_ptr + tok * stride_ot + heads[:, None] * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None])


def paged_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                 block_tables: torch.Tensor, kv_lens: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor,
                 scale: float) -> None:
    """Writes attention of `query[tokens[s]]` over row `rows[s]`'s paged context into `out[tokens[s]]`.

    query/out [T, H, D]; caches [num_blocks, block_size, KVH, D]; block_tables [R, B]; kv_lens [R].
    """
    num = rows.shape[0]
    if num == 0:
        return
    heads, head_dim = query.shape[1], query.shape[2]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    assert head_dim & (head_dim - 1) == 0, "head_dim must be a power of two"
    assert query.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1 and out.stride(2) == 1
    _paged_decode_kernel[(num, kv_heads)](
        query, k_cache, v_cache, out, block_tables, kv_lens, rows, tokens,
        scale,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_P2=triton.next_power_of_2(group), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
    )
