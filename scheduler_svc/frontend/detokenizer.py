"""Streaming output text: sampled token ids -> text deltas, with stop strings cut out exactly.

Owns the two hazards of streaming text (docs/internals.md, design "Stop strings span token
boundaries"): a token may end in the middle of a multi-byte UTF-8 character, and a stop string may
be spread over many tokens. Text that could still change or still turn out to be part of a stop is
held back; everything else is released as soon as it is final. And `min_tokens`: a stop string
completed while fewer than min_tokens tokens have been generated is ordinary text (vLLM's stop
checker likewise skips stops before min_tokens), so it neither ends the request nor is cut out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler_svc.frontend.tokenizer import TandemTokenizer

log = logging.getLogger("tandem.detokenizer")
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, only the new text out; the deltas concatenate to `tokenizer.decode(all ids)`.

    tokenizers' own incremental decoder (`DecodeStream`, in Rust) does the work: it decodes each push
    with a short window of context, so that the decoder's word-boundary rules (leading-space
    stripping, byte merging) are those of a full decode, and holds tokens that end inside a UTF-8
    character until the character is complete. Cost per token is bounded by that window, not by the
    length of the output; one call per push. `flush` releases what is still held when generation ends
    (the output is then final even if its last bytes are invalid UTF-8). Should the stream refuse a
    sequence (its prefix check), this request's text goes on from full decodes instead.
    """

    def __init__(self, tokenizer: TandemTokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._step = tokenizer.stream(skip_special_tokens)
        self._ids: list[int] = []
        self._released = 0  # characters released so far
        self._holding = False  # pushed tokens have not all reached the text (or decoded to nothing)
        self._full = False  # the stream refused a push: every push decodes the whole output

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def push(self, token_ids: Sequence[int]) -> str:
        ids = [int(t) for t in token_ids]
        if not ids:
            return ""
        self._ids.extend(ids)
        if not self._full:
            try:
                text = self._step(ids)
            except Exception as exc:  # tokenizers' DecodeStreamError, raised as a plain Exception
                log.warning("incremental decoding refused a token sequence (%s); this request's text "
                            "continues from full decodes", exc)
                self._full = True
            else:
                if text is None:
                    # Held (an incomplete character) or nothing to show (skipped special tokens, ids
                    # past the vocabulary): only the first kind must be released by `flush`.
                    self._holding = self._holding or any(not (self._skip and self._tok.is_special(t)) for t in ids)
                    return ""
                self._holding = False
                self._released += len(text)
                return text
        return self._from_full(final=False)

    def flush(self) -> str:
        """Release whatever is held (generation ended): the rest of the full decode."""
        if not (self._holding or self._full):
            return ""
        self._holding = False
        return self._from_full(final=True)

    def _from_full(self, final: bool) -> str:
        text = self._tok.decode(self._ids, self._skip)
        if not final:
            text = text.rstrip(REPLACEMENT)  # a trailing U+FFFD may still become a character
        delta = text[self._released:]
        self._released += len(delta)
        return delta


class StopStringMatcher:
    """Finds stop strings in streamed text; holds back text that may still become a stop.

    The match reported is the one that completes first in the stream (ties: the one starting
    first), so the outcome does not depend on how the text was split into chunks. Only a stop that
    completes in the text of this push counts: held text never holds a whole stop, except one
    completed while the matcher was not `armed` (before min_tokens), which stays ordinary text.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(dict.fromkeys(stops))
        self._held = ""
        self.matched: str | None = None

    def push(self, text: str, armed: bool = True) -> tuple[str, str | None]:
        """(text safe to emit now, the stop just matched or None). After a match, returns ('', None).
        Not `armed`: stops complete in this text are ignored (released as text); a suffix that may
        still become one is held as usual, so a stop that ends after arming is found whole."""
        if self.matched is not None:
            return "", None
        buf = self._held + text
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stops if armed else ():
            at = buf.find(stop, max(0, len(self._held) - len(stop) + 1))  # it must end in the new text
            if at >= 0:
                cand = (at + len(stop), at, stop)
                if best is None or cand[:2] < best[:2]:
                    best = cand
        if best is not None:
            self._held = ""
            self.matched = best[2]
            return buf[: best[1]], best[2]
        keep = self._longest_partial(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], None

    def flush(self) -> str:
        """Release held text when generation ends for another reason than a stop string."""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best


@dataclass
class TextDelta:
    text: str
    matched_stop: str | None = None


class OutputText:
    """One request's output: token ids in, stop-aware text deltas out. `min_tokens`: stop strings
    count only from the min_tokens-th generated token on (the request's min_tokens)."""

    def __init__(
        self, tokenizer: TandemTokenizer | None, stops: Sequence[str] = (), skip_special_tokens: bool = True
    ) -> None:
        # None: a server without a tokenizer (--skip-tokenizer) answers token ids only, and no text.
        assert tokenizer is not None or not stops, "stop strings need a tokenizer"
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens) if tokenizer is not None else None
        self._stops = StopStringMatcher(stops) if stops else None
        self._chunks: list[str] = []
        self.matched_stop: str | None = None
        self.min_tokens = 0
        self._pushed = 0  # tokens pushed (the generated tokens that reach the text)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    @property
    def stopped(self) -> bool:
        return self.matched_stop is not None

    @property
    def has_stops(self) -> bool:
        return self._stops is not None

    def push(self, token_ids: Sequence[int]) -> TextDelta:
        if self.stopped or self._detok is None:
            return TextDelta("")
        if self._stops is not None and self._pushed + 1 < self.min_tokens <= self._pushed + len(token_ids):
            # Crossing the point where stops start to count: one token at a time, so each is
            # checked with what it completes.
            parts = [self.push([t]) for t in token_ids]
            return TextDelta("".join(p.text for p in parts), next((p.matched_stop for p in parts
                                                                   if p.matched_stop), None))
        self._pushed += len(token_ids)
        return self._filter(self._detok.push(token_ids))

    def finish(self) -> str:
        """Text still held when generation ends (EOS, length, abort); '' after a stop matched."""
        if self.stopped or self._detok is None:
            return ""
        delta = self._filter(self._detok.flush())
        if self.stopped or self._stops is None:
            return delta.text
        held = self._stops.flush()
        self._chunks.append(held)
        return delta.text + held

    def _filter(self, text: str) -> TextDelta:
        if self._stops is None:
            out, stop = text, None
        elif not text:
            return TextDelta("")
        else:
            out, stop = self._stops.push(text, armed=self._pushed >= self.min_tokens)
        self.matched_stop = stop
        self._chunks.append(out)
        return TextDelta(out, stop)
