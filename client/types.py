"""Typed results and the error type of the Tandem client: plain dataclasses, free of protobuf.

Callers of `TandemClient`/`AsyncTandemClient` only ever see these; the protobuf messages stay inside
`client._convert`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

# Finish reasons as the client reports them: FinishReason enum names, lower-cased, prefix dropped.
FINISH_REASONS = ("unspecified", "eos", "stop_string", "stop_token", "length", "aborted")


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server's prefix cache served


@dataclass
class Timings:
    """Server-side seconds, all measured from the moment the request was accepted."""

    queue_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


@dataclass
class TopLogprob:
    token_id: int
    logprob: float


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[TopLogprob] = field(default_factory=list)


@dataclass
class Completion:
    """How a generation ended; carried by a unary result and by the last chunk of a stream."""

    finish_reason: str = "unspecified"
    # The stop string (str) or stop token id (int) that ended the generation, if one did.
    matched_stop: str | int | None = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    matched_stop: str | int | None
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprob]
    request_id: str
    index: int = 0  # which of the request's n samples this is
    # A request of n > 1 samples: one whole result per sample, by index (the fields above are empty).
    choices: list[GenerationResult] = field(default_factory=list)


@dataclass
class StreamChunk:
    """One delta of a stream. `text` may lag `token_ids` (held-back stop-string prefixes, partial UTF-8)."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    completion: Completion | None
    request_id: str
    index: int = 0  # which of the request's n samples this chunk is about (streams of n > 1 interleave)

    @property
    def is_last(self) -> bool:
        return self.completion is not None


@dataclass
class TokenizeResult:
    """Token ids (with their token strings); behaves as the sequence of ids."""

    token_ids: list[int]
    tokens: list[str]

    def __len__(self) -> int:
        return len(self.token_ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self.token_ids)

    def __getitem__(self, index: int) -> int:
        return self.token_ids[index]


@dataclass
class ModelInfo:
    model: str
    vocab_size: int
    max_context: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    kv_blocks: int
    kv_block_size: int
    pipeline_depth: int
    server_version: str
    worker_connected: bool
    max_new_tokens_default: int
    default_temperature: float = 0.0
    default_top_p: float = 1.0
    default_top_k: int = 0
    default_min_p: float = 0.0
    tensor_parallel_size: int = 1
    structured_output_engine: str = ""  # e.g. "xgrammar 0.2.9"; empty: constraints are refused


class TandemError(Exception):
    """A failed RPC: the gRPC status code and message plus the google.rpc details the server attached.

    `field_violations` comes from a google.rpc.BadRequest (the server names the offending request
    field); `retry_delay` (seconds) from a google.rpc.RetryInfo, typically on RESOURCE_EXHAUSTED.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        field_violations: list[tuple[str, str]] | None = None,
        retry_delay: float | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.field_violations = list(field_violations or [])
        self.retry_delay = retry_delay
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.field_violations:
            text += " (" + "; ".join(f"{f}: {d}" for f, d in self.field_violations) + ")"
        if self.retry_delay is not None:
            text += f" [retry after {self.retry_delay:g} s]"
        return text

    def __repr__(self) -> str:
        return (
            f"TandemError(code={self.code!r}, message={self.message!r}, "
            f"field_violations={self.field_violations!r}, retry_delay={self.retry_delay!r})"
        )
