"""The output side of one accepted request: what its RPC has yet to send.

Owns the text pipeline of a request (incremental detokenization, stop-string hold-back) and the
hand-off between the engine, which pushes tokens as step results arrive, and the gRPC handler,
which takes whatever accumulated since its last write. Nothing is queued per token: a slow client
makes deltas larger, never the buffer longer than the request's own output.

Text is made only when someone will read it: a stream's tokens are detokenized when it is woken
(every token, or every `stream_interval`), a unary call's in batches of UNARY_TEXT_BATCH and at its
end, since detokenizing one token at a time costs several times more per token (bench/detok_cost.py)
and at a thousand rows that is milliseconds of this event loop every step. With stop strings every
token is detokenized as it comes: a stop must end the request at the token that completes it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from scheduler_svc.core.request import FinishReason, Request
from scheduler_svc.frontend.detokenizer import OutputText

UNARY_TEXT_BATCH = 64  # tokens a unary call's handle holds before detokenizing them (its end flushes)


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
    streamed: bool = True  # False: a unary call, which reads the handle once, at its end
    unary_text_batch: int = UNARY_TEXT_BATCH  # a unary call's tokens held before detokenizing them
    _untexted: list[int] = field(default_factory=list)  # tokens not detokenized yet
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
        # EOS and stop tokens end the request and stay out of the text (they stay in token_ids).
        if finish not in (FinishReason.EOS, FinishReason.STOP_TOKEN):
            self._untexted.append(token_id)
        wake = first or len(self._token_ids) >= self.stream_interval
        # A stream's text when it wakes, a unary call's in batches; with stop strings every token.
        due = wake if self.streamed else len(self._untexted) >= self.unary_text_batch
        matched = None
        if self._untexted and (due or self.output.has_stops):
            matched = self._detokenize()
        if wake:
            self.changed.set()  # else held until the interval fills or the request ends (complete/fail)
        return matched

    def _detokenize(self) -> str | None:
        """The held tokens into text; returns the stop string they completed, if any."""
        delta = self.output.push(self._untexted)
        self._untexted = []
        if delta.text:
            self._text.append(delta.text)
        return delta.matched_stop

    def complete(self, reason: FinishReason, stop_string: str | None = None) -> None:
        if self.done:
            return
        if stop_string is None:
            if self._untexted:
                self._detokenize()  # no stop string can match here: with stops nothing is held
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
