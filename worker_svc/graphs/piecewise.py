"""Piecewise CUDA graphs for prefill and mixed steps: the forward is captured as graph segments
between the attention calls, and attention runs eagerly between segment replays.

Why: an eager mixed step is bound by the host issuing the transformers model's hundreds of small
ops (bench.step_probe: 27-54 ms per 8B step with 32 decode rows and a chunk of up to ~1K tokens,
against ~11 ms for a graphed decode step; piecewise: 11.6 ms with a 16-token chunk, 16.6 ms with
256), and a whole-step graph cannot serve it, because attention's work and launch
grids depend on the step's rows (how many decode rows, which prefill chunks, how long). Everything
else in the forward depends only on the number of tokens, so it is graphed per token bucket; the
attention launches take the current step's layout. Per layer that is one graph replay plus the
KV store, decode and prefill kernels: ~100 launches per 8B step instead of ~1000 ops.

Capture: the runner runs the forward once under capture with `PagedStep.piecewise` set. At each
layer's attention call, `split` copies the layer's Q, K, V (inside the segment) into `AttentionIO`,
buffers outside the graph pool shared by every layer and every piecewise graph, zeroes the shared
output buffer (so padding tokens carry no garbage), ends the current segment and begins the next,
which reads that output. Replay alternates segment replays and eager attention calls on the compute
stream, in capture order, so the shared buffers are never read and written at once. Sharing them,
rather than keeping each layer's pool tensors alive for the eager call, is what lets the graphs of
all token buckets share one pool: otherwise every graph would pin its own Q/K/V/output of every
layer (gigabytes for an 8B model at a few thousand tokens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class AttentionIO:
    """Q/K/V/output of one layer's attention at up to `max_tokens` tokens, outside the graph pool."""

    q: torch.Tensor  # [max_tokens, H, D]
    k: torch.Tensor  # [max_tokens, KVH, D]
    v: torch.Tensor
    out: torch.Tensor  # [max_tokens, H, D]

    @classmethod
    def allocate(cls, max_tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: str) -> AttentionIO:
        def new(h: int) -> torch.Tensor:
            return torch.zeros((max_tokens, h, head_dim), dtype=dtype, device=device)

        return cls(new(heads), new(kv_heads), new(kv_heads), new(heads))


# attention.attend, handed in by graph_capture: this module sits below attention and never imports it;
# the step (an attention.PagedStep) is opaque here, only passed through.
Attend = Callable[[Any, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None]


@dataclass
class PiecewiseGraph:
    """A captured forward: segments[0], attention of layer 0, segments[1], ..., segments[-1]."""

    pool: object
    io: AttentionIO
    attend: Attend  # attention.attend: store K/V, then attention into the output
    capturing: bool = True  # False: a warm-up run, attention calls return zeros and nothing is recorded
    segments: list[torch.cuda.CUDAGraph] = field(default_factory=list)
    calls: list[tuple[int, int, float]] = field(default_factory=list)  # (layer, tokens, scale) per split
    logits: torch.Tensor | None = None  # the forward's output, in the pool

    # ----- capture --------------------------------------------------------------------------------
    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(pool=self.pool)
        self.segments.append(graph)

    def split(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              scale: float) -> torch.Tensor:
        """Called by the attention function (query [1, H, T, D], key/value [1, KVH, T, D]) during
        capture; returns the layer's output [1, T, H, D], which the next segment reads."""
        tokens = query.shape[2]
        out = self.io.out[:tokens]
        if self.capturing:
            self.io.q[:tokens].copy_(query[0].transpose(0, 1))
            self.io.k[:tokens].copy_(key[0].transpose(0, 1))
            self.io.v[:tokens].copy_(value[0].transpose(0, 1))
        out.zero_()
        if self.capturing:
            self.calls.append((layer, tokens, scale))
            self.segments[-1].capture_end()
            self.begin()
        return out[None]

    def end(self, logits: torch.Tensor) -> None:
        self.segments[-1].capture_end()
        self.logits = logits
        assert len(self.segments) == len(self.calls) + 1

    # ----- replay ---------------------------------------------------------------------------------
    def replay(self, step: Any, boundary: Callable[[], None] | None = None) -> torch.Tensor:
        """Runs the step on the current stream; returns the logits (valid until the next replay).
        `boundary`, when given, is called after each segment and each attention call is issued (the
        units the step's busy time is counted in: worker_svc/step_clock.py)."""
        io = self.io
        for segment, (layer, tokens, scale) in zip(self.segments, self.calls, strict=False):
            segment.replay()
            if boundary is not None:
                boundary()
            self.attend(step, layer, io.q[:tokens].transpose(0, 1)[None], io.k[:tokens].transpose(0, 1)[None],
                        io.v[:tokens].transpose(0, 1)[None], io.out[:tokens][None], scale)
            if boundary is not None:
                boundary()
        self.segments[-1].replay()
        assert self.logits is not None
        return self.logits


# Above this many tokens an eager step is device-bound (bench.step_probe on the 8B shape: a
# 32-row + 2048-token step issues in ~40 ms and runs in ~73 ms; at ~1K tokens issue and device time
# are still about equal), so a graph would save nothing and its padding would only add work; such
# steps stay eager.
PIECEWISE_MAX_TOKENS = 2048


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts piecewise graphs are captured for: powers of two to 128, then 192, steps of 128
    to 1K and of 256 beyond (above 128 tokens, padding at most half a bucket step: < 50% at 129,
    < 1/3 from 192 on), up to the step budget or PIECEWISE_MAX_TOKENS."""
    cap = min(max_tokens, PIECEWISE_MAX_TOKENS)
    steps = [192, *range(256, 1024, 128), *range(1024, PIECEWISE_MAX_TOKENS, 256)]
    return [b for b in (16, 32, 64, 128, *steps) if b < cap] + [cap]
