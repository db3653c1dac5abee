"""The output side of one accepted request: what its RPC has yet to send.

Owns the text pipeline of a request (incremental detokenization, stop-string hold-back) and the
hand-off between the engine, which pushes tokens as step results arrive, and the gRPC handler,
which takes whatever accumulated since its last write. Nothing is queued per token: a slow client
makes deltas larger, never the buffer longer than the request's own output.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from scheduler_svc.core.request import FinishReason, Request
from scheduler_svc.frontend.detokenizer import OutputText


@dataclass
class Completion:
    finish_reason: FinishReason
    stop_string: str | None
    stop_token_id: int | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_s: float
    ttft_s: float
    total_s: float


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[tuple[int, float, list[tuple[int, float]]]]
    completion: Completion | None
    error: tuple[grpc.StatusCode, str] | None


@dataclass
class RequestHandle:
    request: Request
    client_request_id: str
    output: OutputText
    accepted_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    _text: list[str] = field(default_factory=list)
    _token_ids: list[int] = field(default_factory=list)
    _logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    completion: Completion | None = None
    error: tuple[grpc.StatusCode, str] | None = None
    stream_interval: int = 1  # tokens accumulated before `changed` wakes a stream (the first at once)
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # something new to send (streams)
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # completed or failed (unary calls)

    def __post_init__(self) -> None:
        # min_tokens holds off stop strings as the worker's mask holds off EOS and stop tokens.
        self.output.min_tokens = self.request.sampling.min_tokens

    @property
    def req_id(self) -> str:
        return self.request.req_id

    @property
    def done(self) -> bool:
        return self.completion is not None or self.error is not None

    def on_token(
        self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None,
        finish: FinishReason | None, now: float | None = None,
    ) -> str | None:
        """Adds one accepted token (arrived at `now`, monotonic); returns the stop string it completed, if any."""
        assert not self.done, f"token for finished request {self.req_id}"
        now = time.monotonic() if now is None else now
        first = self.first_token_at is None
        if first:
            self.first_token_at = now
        self.last_token_at = now
        self._token_ids.append(token_id)
        if logprob is not None:
            self._logprobs.append((token_id, logprob, top or []))
        matched = None
        # EOS and stop tokens end the request and stay out of the text (they stay in token_ids).
        if finish not in (FinishReason.EOS, FinishReason.STOP_TOKEN):
            delta = self.output.push([token_id])
            if delta.text:
                self._text.append(delta.text)
            matched = delta.matched_stop
        if first or len(self._token_ids) >= self.stream_interval:
            self.changed.set()  # else held until the interval fills or the request ends (complete/fail)
        return matched

    def complete(self, reason: FinishReason, stop_string: str | None = None) -> None:
        if self.done:
            return
        if stop_string is None:
            tail = self.output.finish()
            if tail:
                self._text.append(tail)
        now = time.monotonic()
        req = self.request
        last_token = req.output_ids[-1] if req.output_ids else None
        started = req.first_scheduled_time or now
        self.completion = Completion(
            finish_reason=reason,
            stop_string=stop_string,
            stop_token_id=last_token if reason == FinishReason.STOP_TOKEN else None,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.num_cached_tokens,
            queue_s=max(0.0, started - self.accepted_at),
            ttft_s=(self.first_token_at - self.accepted_at) if self.first_token_at else 0.0,
            total_s=now - self.accepted_at,
        )
        self.changed.set()
        self.ended.set()

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        if self.done:
            return
        self.error = (code, message)
        self.changed.set()
        self.ended.set()

    def take(self) -> Delta:
        """Everything accumulated since the last take (and the end, once there is one)."""
        delta = Delta("".join(self._text), self._token_ids, self._logprobs, self.completion, self.error)
        self._text, self._token_ids, self._logprobs = [], [], []
        self.changed.clear()
        return delta
