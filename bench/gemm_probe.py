"""A skinny GEMM for decode steps (few rows, large weights) in Triton, and a probe that times it
against cuBLAS on the decode step's weight shapes.

Owns an experiment, not a path of the forward (so it lives with the benchmarks, not in worker_svc):
a decode GEMM with 32 to 256 rows is bound by streaming the weight, and whether a hand-tiled kernel
streams it faster than cuBLAS's choice is measured here (`python -m bench.gemm_probe --json F` on a
GPU) before anything is wired into worker_svc/fusion/install.py. Split-K programs add fp32 partial
sums atomically into a workspace, then one cast writes the output.
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, acc_ptr, M, N, K, stride_xm, stride_wn, stride_am, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr):
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k0 = split * K_PER_SPLIT
    for i in range(K_PER_SPLIT // BLOCK_K):
        k = k0 + i * BLOCK_K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k + rk)[None, :], mask=m_ok[:, None], other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + (k + rk)[None, :], mask=n_ok[:, None],
                    other=0.0)
        acc += tl.dot(x, tl.trans(w))
    tl.atomic_add(acc_ptr + rm[:, None] * stride_am + rn[None, :], acc, mask=m_ok[:, None] & n_ok[None, :],
                  sem="relaxed")


def skinny_linear(x: torch.Tensor, w: torch.Tensor, block_n: int = 64, block_k: int = 128, split_k: int = 1,
                  num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T in x's dtype; K must be a multiple of block_k * split_k."""
    m, k = x.shape
    n = w.shape[0]
    assert k % (block_k * split_k) == 0 and x.stride(1) == 1 and w.stride(1) == 1
    acc = torch.zeros((m, n), dtype=torch.float32, device=x.device)
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split_k)
    _skinny_kernel[grid](x, w, acc, m, n, k, x.stride(0), w.stride(0), acc.stride(0), BLOCK_M=block_m,
                         BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=k // split_k, num_warps=num_warps,
                         num_stages=num_stages)
    return acc.to(x.dtype)


_STREAM: list[torch.cuda.Stream] = []


def _time(fn, reps: int = 50) -> float:
    from bench.floor_parts import graph_ms

    if not _STREAM:
        _STREAM.append(torch.cuda.Stream())  # graphs are captured on a side stream
    return graph_ms(fn, _STREAM[0], reps)


# The 8B shape's decode GEMMs, merged: (N, K).
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
CONFIGS = [(bn, 128, sk, 4) for bn in (32, 64, 128) for sk in (1, 2, 4)]  # few: each one compiles per shape


def _measure(w: torch.Tensor, m: int, search: bool) -> dict:
    x = torch.randn(m, w.shape[1], dtype=torch.bfloat16, device="cuda")
    gb = w.numel() * 2 / 1e6
    cublas = _time(lambda: torch.nn.functional.linear(x, w))
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        lt = _time(lambda: torch.nn.functional.linear(x, w))
    finally:
        torch.backends.cuda.preferred_blas_library("cublas")
    ref = torch.nn.functional.linear(x, w).float()
    best: tuple[float, tuple | None] = (float("inf"), None)
    for cfg in CONFIGS if search else []:
        if w.shape[1] % (cfg[1] * cfg[2]):
            continue
        try:
            got = skinny_linear(x, w, cfg[0], cfg[1], cfg[2], num_stages=cfg[3]).float()
            if (got - ref).abs().max() > 0.05 * ref.abs().max():
                continue
            ms = _time(lambda c=cfg: skinny_linear(x, w, c[0], c[1], c[2], num_stages=c[3]))
        except Exception:  # a config that does not compile or fit: skipped
            continue
        best = min(best, (ms, cfg), key=lambda t: t[0])
    return {"cublas_gb_s": gb / cublas, "cublas_ms": cublas, "cublaslt_gb_s": gb / lt,
            "skinny_gb_s": gb / best[0] if best[1] else None, "skinny_config": best[1]}


def probe(rows: tuple[int, ...] = (32, 128, 256), search_rows: int = 32, out: str | None = None) -> dict:
    """GB/s of the weight stream per shape and row count: cuBLAS (F.linear), and at `search_rows`
    the best skinny config too."""
    result: dict = {}
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5
            for m in rows:
                result[f"{name}_m{m}"] = _measure(weight, m, m == search_rows)
                print(name, m, json.dumps(result[f"{name}_m{m}"]), flush=True)
            del weight
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the record here")
    probe(out=parser.parse_args().json)
