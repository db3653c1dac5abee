"""The physical floor of a decode step and the timed parts it is compared with (used by bench floor).

Owns the byte accounting: a decode step must stream every weight once (the input embedding only
for the rows it looks up; the LM head fully, tied or not) and read every row's KV cache once, so
`physical_floor_ms = (weight bytes + KV bytes) / HBM bandwidth`, the bandwidth being the copy
bandwidth measured in the same run. Also owns the graph-timed parts of a step: attention alone
(KV store + paged decode, every layer) and the GEMMs alone (every weight matrix the forward
multiplies by, at the step's row count), each timed as CUDA graph replays, so that neither figure
carries the host's launch cost, which a graph-captured step does not pay either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def weight_bytes_per_step(model: torch.nn.Module, rows: int) -> int:
    """Bytes of weights one decode step of `rows` tokens reads: every parameter once, except that the
    input embedding (when not tied to the LM head) contributes only the `rows` rows looked up."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    total = 0
    for p in model.parameters():  # tied or shared parameters are listed once
        if p is embedding and not tied:
            total += rows * p.shape[1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def physical_floor_ms(weight_bytes: float, kv_bytes: float, hbm_gb_s: float) -> float:
    return (weight_bytes + kv_bytes) / (hbm_gb_s * 1e9) * 1000


def graph_ms(fn: Callable[[], None], stream: torch.cuda.Stream, reps: int = 20) -> float:
    """Mean device time of one replay of a CUDA graph of `fn` (warmed up once outside the capture)."""
    with torch.cuda.stream(stream):
        fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    with torch.cuda.stream(stream):
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            graph.replay()
        end.record(stream)
    end.synchronize()
    del graph
    return start.elapsed_time(end) / reps


def linear_ms(weights: list[torch.Tensor], rows: int, stream: torch.cuda.Stream,
              lt: set[int] | None = None) -> float:
    """Device time of the step's GEMMs alone: `rows` tokens through every matrix in `weights`; those
    whose id is in `lt` with cuBLASLt preferred at rows the fused forward prefers it (fusion.lt_weights)."""
    from worker_svc.fusion.install import LT_MAX_ROWS

    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype, device=w.device) for w in weights}
    lt = lt if lt and rows <= LT_MAX_ROWS else set()
    backends = torch.backends.cuda
    default = backends.preferred_blas_library()

    def all_gemms() -> None:
        for w in weights:
            if id(w) in lt:
                backends.preferred_blas_library("cublaslt")
            F.linear(inputs[w.shape[1]], w)
            if id(w) in lt:
                backends.preferred_blas_library(default)

    with torch.inference_mode():
        return graph_ms(all_gemms, stream)


def logits_check(before: torch.Tensor, after: torch.Tensor) -> dict[str, float]:
    """How far two logit tensors [T, V] of one input are apart: greedy agreement and the worst
    difference, absolute and relative to the logits' scale."""
    b, a = before.float(), after.float()
    return {
        "argmax_agree": float((b.argmax(-1) == a.argmax(-1)).float().mean()),
        "max_abs_diff": float((b - a).abs().max()),
        "logit_abs_max": float(b.abs().max()),
        "max_logprob_diff": float((b.log_softmax(-1) - a.log_softmax(-1)).abs().max()),
    }
