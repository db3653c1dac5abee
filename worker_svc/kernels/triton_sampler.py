"""The fused sampling kernel: one program per row turns a row of logits into its token, log-sum-exp
and the token's logprob, reading the logits in their own dtype (no float32 copy of [R, V]).

Owns the CUDA path of sampler.py, with the same contract, bit for bit in the noise:
- pass 1 over the vocabulary: running max and first argmax (the greedy token) and the running sum
  of exp(x - max), i.e. the raw log-sum-exp;
- pass 2, only for rows with temperature > 0 (a branch on the device value, so one kernel serves
  greedy and random rows alike and needs no host hint): Gumbel-max over the tempered logits
  (x - max) / T of the tokens whose raw logit x is >= the row's cut, the noise of (row key, vocab
  index) from the same counter-based hash as sampler.py.
The cut (min-p, and top-k / top-p when the step has such rows) is computed by sampler.py on the
device before the kernel. Shapes depend on (R, V) only and nothing is read on the host, so the
kernel is captured inside decode CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from worker_svc.kernels.noise_hash import MIX_C1 as _MIX_C1
from worker_svc.kernels.noise_hash import MIX_C2 as _MIX_C2
from worker_svc.kernels.noise_hash import SALT_VOCAB as _SALT_VOCAB

BLOCK_V = 2048


def _signed32(c: int) -> int:
    """The int32 value with the same low 32 bits (kernel constants must fit int32)."""
    return c - (1 << 32) if c >= 1 << 31 else c


@triton.jit
def _lo32(x):
    """x mod 2**32 for int64 x (also for negative x, as two's-complement low bits)."""
    return x - ((x >> 32) << 32)


@triton.jit
def _mix32(h, C1: tl.constexpr, C2: tl.constexpr):
    """sampler._mix32 on int64 values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _lo32(h * C1)
    h = h ^ (h >> 15)
    h = _lo32(h * C2)
    return h ^ (h >> 16)


@triton.jit
def _sample_kernel(
    logits_ptr, stride_row, temperature_ptr, cut_ptr, key_ptr, token_ptr, lse_ptr, logprob_ptr,
    vocab,
    BLOCK: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, SALT_VOCAB: tl.constexpr,
):
    r = tl.program_id(0)
    row = logits_ptr + r.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)

    m = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    best = tl.zeros([], tl.int32)
    bad = tl.zeros([], tl.int32)  # NaN or +inf seen: the row's logprobs become NaN
    for start in range(0, vocab, BLOCK):
        v = start + offs
        x = tl.load(row + v, mask=v < vocab, other=float("-inf")).to(tl.float32)
        bad = bad | tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=0)
        chunk_max = tl.max(x, axis=0)
        chunk_arg = tl.argmax(x, axis=0, tie_break_left=True)
        best = tl.where(chunk_max > m, start + chunk_arg, best)  # strictly greater: first index wins
        new_m = tl.maximum(m, chunk_max)
        alpha = tl.where(new_m == float("-inf"), 1.0, tl.exp(m - new_m))
        p = tl.where(x == float("-inf"), 0.0, tl.exp(x - new_m))
        total = total * alpha + tl.sum(p, axis=0)
        m = new_m

    temperature = tl.load(temperature_ptr + r)
    if temperature > 0:
        cut = tl.load(cut_ptr + r)
        key = tl.load(key_ptr + r)
        top = tl.full([], float("-inf"), tl.float32)
        pick = best
        for start in range(0, vocab, BLOCK):
            v = start + offs
            ok = v < vocab
            x = tl.load(row + v, mask=ok, other=float("-inf")).to(tl.float32)
            tempered = (x - m) / temperature
            h = _mix32(key ^ _mix32(_lo32(v.to(tl.int64) ^ SALT_VOCAB), C1, C2), C1, C2)
            u = ((h >> 8) | 1).to(tl.float32) * (2.0**-24)
            score = tl.where(ok & (x >= cut), tempered - tl.log(-tl.log(u)), float("-inf"))
            chunk_max = tl.max(score, axis=0)
            chunk_arg = tl.argmax(score, axis=0, tie_break_left=True)
            pick = tl.where(chunk_max > top, start + chunk_arg, pick)
            top = tl.maximum(top, chunk_max)
        best = pick

    lse = m + tl.log(total)
    lse = tl.where((bad != 0) | (m == float("-inf")), float("nan"), lse)
    chosen = tl.load(row + best).to(tl.float32)
    tl.store(token_ptr + r, best)
    tl.store(lse_ptr + r, lse)
    tl.store(logprob_ptr + r, chosen - lse)


def fused_sample(logits: torch.Tensor, temperature: torch.Tensor, cut: torch.Tensor,
                 key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token int32 [R], lse float32 [R], logprob float32 [R]) for logits [R, V] (any float dtype).

    temperature [R] float32 (<= 0: greedy); cut [R] float32 on the raw logits (keep x >= cut);
    key [R] int64 in [0, 2**32), sampler._row_key of (seed, counter).
    """
    rows, vocab = logits.shape
    token = torch.empty(rows, dtype=torch.int32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    logprob = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return token, lse, logprob
    assert logits.stride(1) == 1
    _sample_kernel[(rows,)](
        logits, logits.stride(0), temperature.to(torch.float32).contiguous(), cut.to(torch.float32).contiguous(),
        key.contiguous(), token, lse, logprob, vocab,
        BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)), C1=_signed32(_MIX_C1), C2=_signed32(_MIX_C2),
        SALT_VOCAB=_signed32(_SALT_VOCAB),
    )
    return token, lse, logprob
