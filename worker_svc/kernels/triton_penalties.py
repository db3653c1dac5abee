"""The fused penalties kernel: repetition, frequency and presence penalties in one pass over a step's
float32 logits, in place, reading each row's slot of the device counts (penalties.py owns the state).

Owns the CUDA path of `PenaltyState.apply`'s two dense transforms, with the same arithmetic as the
PyTorch path there, which stays the CPU path and the oracle:
- repetition (transformers'): where the slot has seen the token, x / p if x >= 0, x * p if x < 0;
- counts (OpenAI's, output only): x - (frequency * count + presence * (count > 0)).
The PyTorch path spends about a dozen passes over [rows, V] float32 (gathers of `seen` and `counts`,
two `where`s, the divide and multiply, the count arithmetic); this reads the logits, the slot's
`seen` and `counts` rows once and writes the logits once. The sparse transforms before them (min_tokens
mask, logit bias) stay scatters in penalties.py. Division is IEEE round-to-nearest and the launch
turns off multiply-add contraction, so each element rounds as the PyTorch ops do: the two paths
agree bit for bit (tests/test_kernels.py). Shapes depend on (rows, V) only and nothing is read on
the host, so the kernel is captured inside the penalised decode graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024


@triton.jit
def _penalties_kernel(
    x_ptr, stride_x, slots_ptr, seen_ptr, counts_ptr, stride_state, rep_ptr, freq_ptr, pres_ptr, vocab,
    REPETITION: tl.constexpr, COUNTS: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = offs < vocab
    slot = tl.load(slots_ptr + r).to(tl.int64)
    row = x_ptr + r.to(tl.int64) * stride_x + offs
    x = tl.load(row, mask=live, other=0.0)
    state = slot * stride_state + offs
    if REPETITION:
        p = tl.load(rep_ptr + slot)
        seen = tl.load(seen_ptr + state, mask=live, other=0) != 0
        neg = x < 0
        x = tl.where(seen & ~neg, tl.math.div_rn(x, p), x)
        x = tl.where(seen & neg, x * p, x)
    if COUNTS:
        c = tl.load(counts_ptr + state, mask=live, other=0).to(tl.float32)
        scaled = c * tl.load(freq_ptr + slot)
        scaled = scaled + tl.where(c > 0, tl.load(pres_ptr + slot), 0.0)
        x = x - scaled
    tl.store(row, x, mask=live)


def fused_penalties(x: torch.Tensor, slots: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor,
                    rep: torch.Tensor, freq: torch.Tensor, pres: torch.Tensor, *, repetition: bool,
                    with_counts: bool) -> torch.Tensor:
    """x float32 [S, V] (rows contiguous), modified in place and returned; slots [S] int64 into the
    state; seen bool / counts int32 [slots, V]; rep / freq / pres float32 [slots]."""
    assert x.dtype == torch.float32 and x.stride(1) == 1, "the kernel reads float32 rows"
    assert seen.shape == counts.shape and seen.stride() == counts.stride() and seen.stride(1) == 1
    num_rows, vocab = x.shape
    if num_rows == 0 or not (repetition or with_counts):
        return x
    grid = (num_rows, triton.cdiv(vocab, BLOCK_V))
    _penalties_kernel[grid](
        x, x.stride(0), slots, seen.view(torch.uint8), counts, seen.stride(0), rep, freq, pres, vocab,
        REPETITION=repetition, COUNTS=with_counts, BLOCK=BLOCK_V, enable_fp_fusion=False,
    )
    return x
