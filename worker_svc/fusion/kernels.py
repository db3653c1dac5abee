"""Triton kernels for the decode step's elementwise work: RMSNorm, residual add + RMSNorm, SiLU x up,
and RoPE applied in place to the merged QKV projection's output.

Owns the CUDA side of worker_svc/fusion; reference.py holds the PyTorch formulas they replace (the
oracle, and the CPU path). Each kernel rounds where transformers' eager code rounds, so in bf16 the
outputs match the reference to the last bit except where a reduction's order differs (RMSNorm's
mean): the sum of the residual add is rounded to the model's dtype before it is normalised, the
normalised value is rounded before the weight multiplies it, SiLU is rounded before the up product,
and RoPE's two products are rounded before their sum, as the eager ops do one tensor at a time.
Every launch passes `enable_fp_fusion=False`: with it on (Triton's default), LLVM narrows the f32
arithmetic on bf16 values to bf16 instructions and contracts RoPE's `x1 * c1` with the following
add into one `fma.rn.bf16`, so that product is never rounded and the result near a cancellation
differs from eager's by a unit of the product (seen on an H200, and in the PTX, compiled here for
sm_90). Without contraction every operation rounds as eager's do, and the kernel equals eager bit
for bit (f32 holds more than twice bf16's precision plus two bits, so eager's f32-then-bf16 double
rounding of each operation equals the kernel's single bf16 rounding).

Nothing here reads a device value on the host and every shape that matters is a grid dimension or
a constexpr of the model (hidden size, head dim), so the kernels are graph-capturable and compile
once per model, not once per token count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_EXACT = {"enable_fp_fusion": False}  # no FMA contraction: each operation rounds where eager's does


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o, stride_s, n, eps,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RES:
        # The residual stream is rounded to the model's dtype before the norm reads it, as the eager
        # `residual + hidden_states` is.
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=ok)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n
    normed = (xf * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, hidden] without a copy when its last dimension is contiguous."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x's last dimension, weight applied (the module's output dtype: x's)."""
    x2 = _rows(x)
    out = torch.empty_like(x2)
    n = x2.shape[1]
    _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, n, eps,
                                     HAS_RES=False, BLOCK=triton.next_power_of_2(n), **_EXACT)
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) with weight, x + residual): one read of each input, two writes."""
    x2, r2 = _rows(x), _rows(residual)
    out, total = torch.empty_like(x2), torch.empty_like(x2)
    n = x2.shape[1]
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, total, x2.stride(0), r2.stride(0), out.stride(0),
                                     total.stride(0), n, eps, HAS_RES=True, BLOCK=triton.next_power_of_2(n), **_EXACT)
    return out.view(x.shape), total.view(x.shape)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # eager rounds SiLU first
    tl.store(out_ptr + row * stride_o + cols, (act * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of the merged gate/up projection's output `[..., 2I]` (gate first) -> `[..., I]`."""
    gu = _rows(gate_up)
    inter = gu.shape[1] // 2
    out = gu.new_empty((gu.shape[0], inter))
    block = 1024
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(inter, block))](gu, out, gu.stride(0), out.stride(0), inter,
                                                                 BLOCK=block, **_EXACT)
    return out.view(*gate_up.shape[:-1], inter)


@triton.jit
def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, stride_t, stride_ct, stride_st, HALF: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # query heads, then key heads: contiguous in the merged output
    d = tl.arange(0, HALF)
    base = qkv_ptr + tok * stride_t + head * HEAD_DIM
    x1 = tl.load(base + d).to(tl.float32)
    x2 = tl.load(base + HALF + d).to(tl.float32)
    c1 = tl.load(cos_ptr + tok * stride_ct + d).to(tl.float32)
    c2 = tl.load(cos_ptr + tok * stride_ct + HALF + d).to(tl.float32)
    s1 = tl.load(sin_ptr + tok * stride_st + d).to(tl.float32)
    s2 = tl.load(sin_ptr + tok * stride_st + HALF + d).to(tl.float32)
    ty = qkv_ptr.dtype.element_ty
    # Eager: x * cos + rotate_half(x) * sin, each product rounded to the dtype, then the sum; the
    # launch disables FMA contraction, which would skip the first product's rounding (module docstring).
    o1 = (x1 * c1).to(ty).to(tl.float32) + (-x2 * s1).to(ty).to(tl.float32)
    o2 = (x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)
    tl.store(base + d, o1.to(ty))
    tl.store(base + HALF + d, o2.to(ty))


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
             head_dim: int) -> None:
    """Rotates, in place, the query and key heads of `qkv` `[T, (heads + 2 kv_heads) * head_dim]`
    (last dimension contiguous) by `cos`/`sin` `[T, head_dim]` (rotate-half convention)."""
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    assert head_dim % 2 == 0 and triton.next_power_of_2(head_dim) == head_dim, "head_dim: a power of two"
    _rope_kernel[(qkv.shape[0], heads + kv_heads)](qkv, cos, sin, qkv.stride(0), cos.stride(0), sin.stride(0),
                                                   HALF=head_dim // 2, HEAD_DIM=head_dim, **_EXACT)
