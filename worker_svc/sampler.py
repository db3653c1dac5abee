"""Token sampling for the worker: one vectorised call turns a step's logits into tokens.

This module owns:
- greedy decoding (temperature 0: argmax of the raw logits, ties -> lowest index);
- the top-k -> top-p -> min-p filters, applied to the tempered distribution;
- the counter-based RNG: the noise for row r is a pure function of (seed[r], counter[r], vocab index),
  so a seeded request gets the same token whatever else shares its batch, its row, or the batch size;
- the logprob outputs (sampled token and top-K alternatives), always under the raw log_softmax.

Everything is tensor ops on the logits' device with shapes fixed by (R, V, num_top): no python loop
over rows, no host sync, no data-dependent shapes, so the same code runs on CPU and inside a CUDA graph.
On CUDA the token choice itself (greedy argmax, log-sum-exp, min-p / top-k / top-p cut, Gumbel-max)
is one fused kernel (kernels/triton_sampler.py) fed the per-row cut computed here; the PyTorch code below is
the CPU path and the kernel's oracle, with the same noise bit for bit.

Filters keep every token whose raw logit is >= a per-row cut, so tokens tied with the last one
that top-k/top-p would keep are kept as well (ties are rare outside low-precision logits).

Non-finite logits: a row whose logits contain NaN or +inf, or are all -inf, never crashes and always
yields a token id in [0, V) (so the next embedding lookup stays in bounds), but that token is
meaningless, and all of the row's `logprob` and `top_logprobs` are NaN. NaN logprob is therefore the
signal for "this row's logits were broken"; callers that must fail such rows test `logprob.isnan()`.
-inf entries in an otherwise finite row are ordinary masking: those tokens are never sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker_svc.kernels.noise_hash import MIX_C1 as _MIX_C1
from worker_svc.kernels.noise_hash import MIX_C2 as _MIX_C2
from worker_svc.kernels.noise_hash import SALT_COUNTER as _SALT_COUNTER
from worker_svc.kernels.noise_hash import SALT_SEED as _SALT_SEED
from worker_svc.kernels.noise_hash import SALT_VOCAB as _SALT_VOCAB

_M32 = 0xFFFFFFFF


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [R] int32
    logprob: torch.Tensor  # [R] float32, raw log_softmax of the sampled token
    top_ids: torch.Tensor  # [R, K] int32, by raw logprob, descending
    top_logprobs: torch.Tensor  # [R, K] float32
    lse: torch.Tensor  # [R] float32, raw log-sum-exp (NaN for a broken row)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) with one int64 multiply that cannot overflow.

    A constant c >= 2**31 is replaced by c - 2**32 (same residue mod 2**32), so |c| < 2**31 and
    |x * c| < 2**63; `& _M32` then reads the low 32 bits of the two's-complement product.
    """
    if c >= 1 << 31:
        c -= 1 << 32
    return (x * c) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A bijection on [0, 2**32) with full avalanche (xorshift-multiply, lowbias32 parameters)."""
    h = h ^ (h >> 16)
    h = _mul32(h, _MIX_C1)
    h = h ^ (h >> 15)
    h = _mul32(h, _MIX_C2)
    return h ^ (h >> 16)


def _row_key(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """[R] 32-bit key from all 64 bits of seed and of counter (int64 two's-complement bits)."""
    seed = seed.to(torch.int64)
    counter = counter.to(torch.int64)
    # `&` on negative int64 keeps the two's-complement bits, so uint64 seeds >= 2**63 work too.
    h = _mix32((seed & _M32) ^ _SALT_SEED)
    h = _mix32(h ^ ((seed >> 32) & _M32))
    h = _mix32(h ^ (counter & _M32) ^ _SALT_COUNTER)
    return _mix32(h ^ ((counter >> 32) & _M32))


def _gumbel_noise(seed: torch.Tensor, counter: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R, V] float32 Gumbel(0, 1) noise, a pure function of (seed[r], counter[r], v)."""
    key = _row_key(seed, counter)[:, None]
    # The per-vocab term is only [1, V]; the [R, V] work is one xor and one finaliser, which is what
    # dominates the sampler's cost on a large vocabulary. For a fixed row this is a bijection of v.
    v = torch.arange(vocab, device=seed.device, dtype=torch.int64)[None, :]
    h = _mix32(key ^ _mix32(v ^ _SALT_VOCAB))
    # Top 24 bits with the lowest forced to 1: u = m / 2**24 for odd m, exact in float32 and strictly
    # inside (0, 1), so neither log below can produce an infinity.
    u = ((h >> 8) | 1).to(torch.float32) * (2.0**-24)
    return -torch.log(-torch.log(u))


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    counter: torch.Tensor,
    num_top: int,
    *,
    sort_filters: bool = True,
    any_random: bool = True,
    fused: bool | None = None,
) -> SampleOutput:
    """Sample one token per row; see the module docstring for the contract.

    logits [R, V] (any float dtype, upcast to float32); temperature [R] >= 0 (0 = greedy);
    top_p [R] in (0, 1] (1 = off); top_k [R] >= 0 (0 = off); min_p [R] in [0, 1] (0 = off);
    seed [R] int64 (uint64 bits); counter [R] int64 (position of the sampled token);
    num_top: K, the number of top alternatives to report (0 <= K <= V).

    sort_filters: a host-side hint. Top-k and top-p need an O(V log V) sort per row, the largest
    fixed cost here; a caller that knows from its (host) batch plan that no row has top_k > 0 or
    top_p < 1 may pass False to skip it. It cannot be checked without a host sync: with False, any
    row's top-k/top-p is silently ignored (min-p and temperature still apply).

    any_random: a host-side hint of the same kind. When the plan knows every row is greedy
    (temperature 0), the noise and the filters, most of the cost on a large vocabulary, are skipped;
    the tokens are the same argmax either way.

    fused: use the Triton kernel (default: on CUDA); any_random is then moot, the kernel branches
    per row on the device.
    """
    num_rows, vocab = logits.shape
    if not 0 <= num_top <= vocab:
        raise ValueError(f"num_top={num_top} must be in [0, {vocab}]")
    if fused if fused is not None else logits.is_cuda:
        return _fused(logits, temperature, top_p, top_k, min_p, seed, counter, num_top, sort_filters)
    x = logits.to(torch.float32)
    # logprobs = x - logsumexp: same values as log_softmax without materialising another [R, V].
    lse = torch.logsumexp(x, dim=-1)

    greedy = temperature <= 0
    if not any_random:
        return _outputs(x, lse, x.argmax(dim=-1), num_top)
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).to(torch.float32)[:, None]
    row_max = x.amax(dim=-1, keepdim=True)
    # Subtracting the row max first keeps a tiny temperature from overflowing a logit to +inf.
    tempered = (x - row_max) / temp

    cut = _cut(logits, row_max, temp, top_p, top_k, min_p, sort_filters)

    # Gumbel-max: argmax(log p + G) is an exact draw from p; log p's shared normaliser cancels.
    scores = tempered + _gumbel_noise(seed, counter, vocab)
    scores = torch.where(x >= cut, scores, float("-inf"))
    sampled = scores.argmax(dim=-1)

    # torch.argmax returns the first maximal index, which is the documented greedy tie-break.
    return _outputs(x, lse, torch.where(greedy, x.argmax(dim=-1), sampled), num_top)


def _cut(logits: torch.Tensor, row_max: torch.Tensor, temp: torch.Tensor, top_p: torch.Tensor,
         top_k: torch.Tensor, min_p: torch.Tensor, sort_filters: bool) -> torch.Tensor:
    """[R, 1] float32: the filters reduced to one cut per row on the RAW logits; keep tokens >= cut.

    On raw values, not tempered ones, so that the kernel's comparison is exact: a top-k / top-p cut
    is one of the row's own logits, which both paths compare against bit-identical values.
    """
    vocab = logits.shape[1]
    # min-p: p >= min_p * p_max  <=>  (x - max) / T >= log(min_p)  <=>  x >= max + T * log(min_p).
    cut = row_max + temp * torch.log(min_p.to(torch.float32))[:, None]  # min_p = 0 -> -inf: keeps all
    if not sort_filters:
        return cut
    # Sort the raw logits (native dtype: a bf16 sort is cheaper); tempering is monotone, and the
    # same elementwise formula gives bit-identical tempered values for the sorted entries.
    sorted_raw = torch.sort(logits, dim=-1, descending=True, stable=True).values.to(torch.float32)
    sorted_t = (sorted_raw - row_max) / temp
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = top_k.to(torch.int64)[:, None]
    k = torch.where((k <= 0) | (k > vocab), vocab, k)
    # Nucleus over the top-k survivors (renormalised): a token is kept while the mass strictly
    # before it is short of top_p, so the top token always is. top_p >= 1 is forced off because a
    # float32 cumsum can reach 1.0 early and would drop the far tail.
    probs = torch.softmax(sorted_t.masked_fill(rank >= k, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    p = top_p.to(torch.float32)[:, None]
    n_p = (mass_before < p).sum(dim=-1, keepdim=True)
    n_keep = torch.minimum(k, torch.where(p >= 1.0, vocab, n_p)).clamp(min=1)
    return torch.maximum(cut, sorted_raw.gather(1, n_keep - 1))


def _fused(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           min_p: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor, num_top: int,
           sort_filters: bool) -> SampleOutput:
    """The kernel path: the cut and the row keys here, the per-token work in triton_sampler."""
    from worker_svc.kernels.triton_sampler import fused_sample  # triton is not on CPU installs

    temp = torch.where(temperature <= 0, torch.ones_like(temperature), temperature).to(torch.float32)[:, None]
    row_max = logits.amax(dim=-1, keepdim=True).to(torch.float32)
    cut = _cut(logits, row_max, temp, top_p, top_k, min_p, sort_filters)[:, 0]
    token, lse, logprob = fused_sample(logits, temperature, cut, _row_key(seed, counter))
    return _top_outputs(logits, token, lse, logprob, num_top)


def _outputs(x: torch.Tensor, lse: torch.Tensor, token: torch.Tensor, num_top: int) -> SampleOutput:
    """The sampled tokens plus their logprobs and the top-K alternatives under the raw distribution."""
    # A row is broken iff its logsumexp is not finite (any NaN, any +inf, or all -inf); NaN marks it
    # in every logprob output (x - lse alone would give -inf for some of those rows).
    lse = torch.where(torch.isfinite(lse), lse, float("nan"))
    logprob = x.gather(1, token[:, None]).squeeze(1) - lse
    return _top_outputs(x, token, lse, logprob, num_top)


def _top_outputs(x: torch.Tensor, token: torch.Tensor, lse: torch.Tensor, logprob: torch.Tensor,
                 num_top: int) -> SampleOutput:
    num_rows = x.shape[0]
    if num_top > 0:
        top_vals, top_ids = torch.topk(x, num_top, dim=-1, largest=True, sorted=True)
        top_logprobs = top_vals.to(torch.float32) - lse[:, None]
    else:
        top_logprobs = torch.empty((num_rows, 0), dtype=torch.float32, device=x.device)
        top_ids = torch.empty((num_rows, 0), dtype=torch.int64, device=x.device)
    return SampleOutput(
        token_ids=token.to(torch.int32),
        logprob=logprob,
        top_ids=top_ids.to(torch.int32),
        top_logprobs=top_logprobs,
        lse=lse,
    )
