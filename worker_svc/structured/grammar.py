"""Structured output in the worker: constraints compiled off the step loop, one matcher per row slot.

Owns the grammar engine side of docs/structured_output.md:
- `GrammarEngine`: xgrammar's tokenizer info and compiler for the model's vocabulary, a compile
  thread (xgrammar releases the GIL while it compiles, measured in the design doc) fed by COMPILE
  and drained by the loop (`poll`), and the compiled grammars held by key until RELEASE;
- `GrammarRows`: a matcher per constrained row slot, created when a plan starts the slot (replaying
  the outputs it already has, after a preemption or a worker loss), advanced by each sampled token,
  and asked for the next token's bitmask (32-bit words, bit v of word v // 32 set = token v allowed).

Lark grammars go to llguidance (xgrammar has no Lark front end), behind the same three matcher calls
(`accept_token`, `fill_next_token_bitmask`, `is_terminated`) and the same 32-bit bitmask layout; its
tokenizer is built on the first Lark constraint, in the compile thread. Its matchers end on the
model's EOS ids (a request's extra stop_token_ids do not end a Lark output).

Terminated matchers (the row sampled a stop token; at depth 2 it is usually in the next step
already) are never filled or advanced (xgrammar raises): their row gets the all-ones mask, and the
scheduler discards that overrun token as it does for any finished request. torch and xgrammar only;
nothing here touches the device.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import torch

log = logging.getLogger("tandem.worker.grammar")

ALL_ALLOWED = -1  # an int32 word with every bit set
# xgrammar 0.2.9 writes the character of a string with minLength / maxLength as [^"\\\r\n], which lets
# control characters (U+0000-U+001F) through unescaped: invalid JSON (RFC 8259, section 7), and a
# noise model samples them (byte-level tokens). Its other strings use the right class; so do we.
_BOUNDED_STRING_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHAR = '[^\\0-\\x1f\\"\\\\]'


def engine_name() -> str:
    """What HELLO announces ("xgrammar 0.2.9", with "; lark: llguidance 1.9.1" when that is installed);
    empty when xgrammar is not installed."""
    try:
        name = f"xgrammar {metadata.version('xgrammar')}"
    except metadata.PackageNotFoundError:
        return ""
    try:
        return f"{name}; lark: llguidance {metadata.version('llguidance')}"
    except metadata.PackageNotFoundError:
        return name


@dataclass(frozen=True)
class LarkGrammar:
    """A Lark grammar llguidance validated against the tokenizer (llguidance compiles per matcher)."""

    text: str


class LarkMatcher:
    """An llguidance matcher with xgrammar's matcher calls (the ones GrammarRows and grammar_step use).
    llguidance stops by itself once nothing but EOS can follow; xgrammar's matchers terminate only on
    accepting a stop token, and so does this one: until then, a stopped grammar allows its stop ids."""

    def __init__(self, matcher: object, stop_ids: list[int]) -> None:
        from llguidance.torch import fill_next_token_bitmask

        self._m = matcher
        self._fill = fill_next_token_bitmask
        self._stops = frozenset(stop_ids)
        self._terminated = False

    def accept_token(self, token: int) -> bool:
        if self._m.is_stopped():
            ok = token in self._stops
        else:
            ok = bool(self._m.consume_token(token)) and not self._m.is_error()
        self._terminated = ok and token in self._stops
        return ok

    def is_terminated(self) -> bool:
        return self._terminated

    def fill_next_token_bitmask(self, out: torch.Tensor, index: int) -> None:
        if self._m.is_stopped():
            out[index].zero_()
            row = out[index].numpy()
            for t in self._stops:
                row[t // 32] |= np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(-(1 << 31))
        else:
            self._fill(self._m, out, index)


@dataclass(frozen=True)
class CompileResult:
    key: str
    ok: bool
    message: str = ""
    compile_ms: float = 0.0


class GrammarEngine:
    """Compiles constraints for one tokenizer; see the module docstring."""

    def __init__(self, tokenizer_json: bytes, vocab_size: int, eos_token_ids: list[int], threads: int = 2,
                 cache_mb: int = 512) -> None:
        import xgrammar as xgr
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json.decode()))
        self._hf = hf
        self._lark_tokenizer: object | None = None  # llguidance's, built with the first Lark constraint
        # The logits' width, which may exceed the tokenizer's; each matcher overrides the stop tokens with
        # its request's (EOS and stop_token_ids).
        self.info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=eos_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=threads, cache_enabled=True,
                                            cache_limit_bytes=cache_mb << 20)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._done: queue.SimpleQueue[tuple[int, CompileResult, object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._session = 0  # results of an earlier session (before RESET) are dropped
        self._compiling: dict[str, Future] = {}
        self._ready: dict[str, object] = {}

    @property
    def name(self) -> str:
        return engine_name()

    @property
    def pending(self) -> int:
        """Compiles submitted whose results `poll` has not returned yet (the loop polls fast meanwhile)."""
        return len(self._compiling)

    def compile_now(self, kind: str, spec: str) -> object:
        """Compiles on the calling thread; raises ValueError with the compiler's message."""
        c = self.compiler
        try:
            if kind in ("json_schema", "json_object"):
                # Compact JSON, no free whitespace: a model (above all a noise model) must not be able to
                # emit whitespace forever; strict: no properties or items the schema does not name.
                g = self.xgr.Grammar.from_json_schema(spec if kind == "json_schema" else '{"type": "object"}',
                                                      any_whitespace=False, separators=(",", ":"),
                                                      strict_mode=kind == "json_schema")
                text = str(g)
                fixed = text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)
                return c.compile_grammar(fixed if fixed != text else g)
            if kind == "regex":
                return c.compile_regex(spec)
            if kind == "choice":
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in json.loads(spec)))
            if kind == "ebnf":
                return c.compile_grammar(spec)
            if kind == "lark":
                return self._compile_lark(spec)
        except RuntimeError as exc:  # xgrammar's errors carry a C++ source location first: keep the message
            message = str(exc).strip()
            raise ValueError(message.split(": ", 1)[-1] if message.startswith("[") else message) from exc
        raise ValueError(f"constraint kind {kind!r} is not supported by {self.name}")

    def _compile_lark(self, spec: str) -> LarkGrammar:
        try:
            import llguidance
            import llguidance.hf
        except ImportError:
            raise ValueError(f"Lark grammars need llguidance, which this worker lacks ({self.name})") from None
        if self._lark_tokenizer is None:
            self._lark_tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                                eos_token=self.eos_token_ids)
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(spec)
            error = llguidance.LLMatcher.validate_grammar(grammar, self._lark_tokenizer)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise ValueError(str(exc)) from exc
        if error:
            raise ValueError(error.strip())
        return LarkGrammar(grammar)

    def submit(self, key: str, kind: str, spec: str) -> None:
        """Starts compiling `key` in the compile thread (a key held or compiling already answers at once)."""
        with self._lock:
            if key in self._compiling:
                return
            session = self._session
            if key in self._ready:
                self._done.put((session, CompileResult(key, True), self._ready[key]))
                return
            self._compiling[key] = self._pool.submit(self._compile, session, key, kind, spec)

    def _compile(self, session: int, key: str, kind: str, spec: str) -> object:
        t0 = time.perf_counter()
        try:
            compiled = self.compile_now(kind, spec)
            result = CompileResult(key, True, compile_ms=(time.perf_counter() - t0) * 1000)
        except ValueError as exc:
            compiled, result = None, CompileResult(key, False, str(exc)[:2000], (time.perf_counter() - t0) * 1000)
        self._done.put((session, result, compiled))
        return compiled

    def poll(self) -> list[CompileResult]:
        """The compiles finished since the last call (never blocks); their grammars are held by key."""
        out = []
        while True:
            try:
                session, result, compiled = self._done.get_nowait()
            except queue.Empty:
                return out
            with self._lock:
                if session != self._session:
                    continue
                self._compiling.pop(result.key, None)
                if result.ok:
                    self._ready[result.key] = compiled
            out.append(result)

    def get(self, key: str) -> object | None:
        """The compiled grammar of `key`; one still compiling is waited for (a tensor-parallel follower
        can see the plan naming it before its own compile has finished). None: not held."""
        with self._lock:
            compiled = self._ready.get(key)
            future = self._compiling.get(key)
        if compiled is None and future is not None:
            compiled = future.result()
            if compiled is not None:
                with self._lock:
                    self._ready[key] = compiled
        return compiled

    def release(self, keys: list[str]) -> None:
        """No request uses these any more (xgrammar's cache still makes a recompile cheap)."""
        with self._lock:
            for key in keys:
                self._ready.pop(key, None)

    def reset(self) -> None:
        """A new scheduler session (RESET): it sends COMPILE again for what it needs."""
        with self._lock:
            self._session += 1
            self._ready.clear()
            self._compiling.clear()

    def matcher(self, compiled: object, stop_ids: list[int]) -> object:
        if isinstance(compiled, LarkGrammar):
            import llguidance

            return LarkMatcher(llguidance.LLMatcher(self._lark_tokenizer, compiled.text), stop_ids)
        return self.xgr.GrammarMatcher(compiled, override_stop_tokens=stop_ids)


class GrammarRows:
    """A matcher per constrained row slot; see the module docstring."""

    def __init__(self, engine: GrammarEngine, num_slots: int) -> None:
        self.engine = engine
        self.words = -(-engine.vocab_size // 32)
        self.matchers: list[object | None] = [None] * num_slots
        self.stop_ids: list[np.ndarray] = [np.zeros(0, np.int64)] * num_slots
        self.min_tokens = np.zeros(num_slots, np.int64)
        self.accepted = np.zeros(num_slots, np.int64)  # output tokens each slot's matcher has taken

    def start(self, slot: int, key: str, stop_ids: list[int], min_tokens: int, outputs: np.ndarray) -> bool:
        """A constrained request starts in `slot`, its matcher replaying the outputs it has; False when
        the key is not held or the replay is refused (the plan is then refused)."""
        compiled = self.engine.get(key)
        if compiled is None:
            return False
        m = self.engine.matcher(compiled, stop_ids)
        for tok in outputs.tolist():
            if m.is_terminated() or not m.accept_token(int(tok)):
                return False
        self.matchers[slot] = m
        self.stop_ids[slot] = np.asarray(stop_ids, np.int64)
        self.min_tokens[slot] = min_tokens
        self.accepted[slot] = len(outputs)
        return True

    def free(self, slot: int) -> None:
        self.matchers[slot] = None

    def constrained(self, slots: np.ndarray) -> np.ndarray:
        """bool per slot: whether it runs under a constraint."""
        return np.fromiter((self.matchers[s] is not None for s in slots.tolist()), bool, len(slots))

    def accept(self, slots: list[int], matchers: list[object], tokens: np.ndarray) -> list[int]:
        """Advances each matcher (as it was when its step launched) by its row's token; returns the
        indices whose token the matcher refused (only a row with broken logits can sample one)."""
        refused = []
        for i, (slot, m) in enumerate(zip(slots, matchers, strict=True)):
            if m.is_terminated():
                continue  # an overrun row after its stop token: the scheduler discards the token
            if m.accept_token(int(tokens[i])):
                if self.matchers[slot] is m:
                    self.accepted[slot] += 1
            else:
                refused.append(i)
        return refused

    def fill(self, slots: list[int], matchers: list[object], out: torch.Tensor) -> None:
        """Row i of `out` ([len(slots), words] int32) becomes the bitmask of the next token of
        matchers[i]; stop tokens are cleared while the slot is short of its min_tokens, unless
        nothing else is allowed (the grammar then wins)."""
        for i, (slot, m) in enumerate(zip(slots, matchers, strict=True)):
            if m.is_terminated():
                out[i].fill_(ALL_ALLOWED)
                continue
            m.fill_next_token_bitmask(out, i)
            if self.accepted[slot] < self.min_tokens[slot] and self.stop_ids[slot].size:
                stops = self.stop_ids[slot]
                words, bits = stops // 32, stops % 32
                row = out[i].numpy()
                kept = row.copy()
                np.bitwise_and.at(kept, words, ~(np.int32(1) << bits.astype(np.int32)))
                if np.any(kept != 0):
                    row[:] = kept
