"""The fused ops as the fused module forwards call them: a Triton kernel (kernels.py) or the PyTorch
formula it replaces, written exactly as transformers' eager modules compute it.

Owns the choice between the two (`kernels`: the caller's, fixed when the forwards are installed) and
the reference formulas, which are the CPU path and the tests' oracle. Triton is imported only when a
kernel is asked for, so CPU installs without triton never import it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm.forward: float32 statistics, normalised value back in x's dtype, then the weight."""
    xf = x.to(torch.float32)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def ref_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb for one tensor `[T, heads, D]` with cos/sin `[T, D]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels: bool) -> torch.Tensor:
    if kernels:
        from worker_svc.fusion import kernels as k

        return k.rms_norm(x, weight, eps)
    return ref_rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x)."""
    if kernels:
        from worker_svc.fusion import kernels as k

        return k.add_rms_norm(x, residual, weight, eps)
    total = residual + x
    return ref_rms_norm(total, weight, eps), total


def silu_mul(gate_up: torch.Tensor, kernels: bool) -> torch.Tensor:
    """SiLU(gate) * up from the merged projection's output `[..., 2I]`, gate first."""
    if kernels:
        from worker_svc.fusion import kernels as k

        return k.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_qk_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
             head_dim: int, kernels: bool) -> None:
    """Rotates the query and key heads of the merged QKV output `[T, (H + 2 KVH) * D]` in place."""
    if kernels:
        from worker_svc.fusion import kernels as k

        k.rope_qk_(qkv, cos, sin, heads, kv_heads, head_dim)
        return
    qk = qkv[:, : (heads + kv_heads) * head_dim].unflatten(-1, (heads + kv_heads, head_dim))
    qk.copy_(ref_rotate(qk, cos, sin))
