"""Structured output in a step: the runner's side of the matchers (worker_svc/structured/grammar.py).

Owns, for the runner (runner.py): checking and applying a plan's constrained new slots (their key must
be held, their outputs so far must replay), which sampled rows of a launch are constrained (with the
matchers that launch saw), filling their bitmasks on the host into the I/O slot's buffer, and
applying them to the logits on the compute stream with xgrammar's kernel (Triton on CUDA, C++ on
CPU), before sampling.

When the bitmask is filled is the runner's business: as soon as the previous step's tokens are known,
while this step's forward runs (docs/structured_output.md). The host buffer of an I/O slot is
rewritten only once that slot's previous step has been collected, so no copy is still reading it; the
copy runs on the compute stream, so the sampling after it waits for it with no event.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from tandem.wire import StepPlan, WireError

from worker_svc.structured.grammar import GrammarEngine, GrammarRows


@dataclass
class _Start:
    slot: int
    matcher: object
    stop_ids: list[int]
    min_tokens: int
    accepted: int


@dataclass
class Constrained:
    """A launch's constrained sampled rows: their positions among the step's sampled rows (the
    logits' rows), their slots, and the matchers as they were at launch."""

    index: np.ndarray  # int64 [K]
    slots: list[int]
    matchers: list[object]
    rows: np.ndarray  # int64 [K]: their rows in the step (the result's rows)


class StepGrammar:
    def __init__(self, engine: GrammarEngine, num_slots: int, vocab_size: int, device: str,
                 num_io_slots: int = 2) -> None:
        self.engine = engine
        self.rows = GrammarRows(engine, num_slots)
        self.vocab_size = vocab_size
        self.cuda = device.startswith("cuda")
        words = self.rows.words
        # Per I/O slot: the bitmasks (host, pinned on CUDA; its device twin) and the rows they go to.
        self.host = [torch.empty((num_slots, words), dtype=torch.int32, pin_memory=self.cuda)
                     for _ in range(num_io_slots)]
        self.host_index = [torch.empty(num_slots, dtype=torch.int64, pin_memory=self.cuda)
                           for _ in range(num_io_slots)]
        if self.cuda:
            self.dev = [torch.empty((num_slots, words), dtype=torch.int32, device=device) for _ in range(num_io_slots)]
            self.dev_index = [torch.empty(num_slots, dtype=torch.int64, device=device) for _ in range(num_io_slots)]
        else:
            self.dev, self.dev_index = self.host, self.host_index
        from xgrammar import apply_token_bitmask_inplace

        self._apply = apply_token_bitmask_inplace
        if self.cuda:  # its Triton kernel compiles on first use: here, not in some request's step
            logits = torch.zeros((1, vocab_size), dtype=torch.float32, device=device)
            self._apply(logits, self.dev[0][:1].fill_(-1), vocab_size=vocab_size)
            torch.cuda.synchronize()

    def reset(self) -> None:
        for slot in range(len(self.rows.matchers)):
            self.rows.free(slot)

    # ----- plans -------------------------------------------------------------------------------------
    def prepare(self, plan: StepPlan, max_tokens: int, max_rows: int) -> tuple[StepPlan, list[_Start]]:
        """Checks the plan's constrained new slots (WireError, nothing changed) and builds their
        matchers; returns the plan as the penalties must see it (a constrained slot's min_tokens is
        its matcher's, not the device mask's) and the starts for `commit`."""
        g = plan.new_grammar
        if not np.any(g >= 0):
            return plan, []
        plan.validate(max_tokens, max_rows, self.vocab_size)  # index ranges first: the arrays are read below
        ends = np.cumsum(plan.new_history_len, dtype=np.int64)
        starts: list[_Start] = []
        for i in np.flatnonzero(g >= 0).tolist():
            key = plan.grammar_keys[g[i]]
            begin = ends[i] - plan.new_history_len[i]
            outputs = plan.history[begin + plan.new_prompt_len[i]:ends[i]] if plan.new_history_len[i] else \
                plan.history[:0]
            c0, c1 = int(np.sum(plan.new_mask_count[:i])), int(np.sum(plan.new_mask_count[:i + 1]))
            stop_ids = plan.mask_ids[c0:c1].tolist()
            compiled = self.engine.get(key)
            if compiled is None:
                raise WireError(f"new_grammar: constraint {key[:12]} is not compiled on this worker")
            m = self.engine.matcher(compiled, stop_ids)
            for tok in outputs.tolist():
                if m.is_terminated() or not m.accept_token(int(tok)):
                    raise WireError(f"new slot {int(plan.new_slots[i])}: its outputs do not replay under its "
                                    "constraint")
            starts.append(_Start(int(plan.new_slots[i]), m, stop_ids, int(plan.new_min_tokens[i]), len(outputs)))
        mins = plan.new_min_tokens.copy()
        mins[g >= 0] = 0
        return dataclasses.replace(plan, new_min_tokens=mins), starts

    def commit(self, plan: StepPlan, starts: list[_Start]) -> None:
        """The plan was accepted: freed slots drop their matchers, new ones take theirs."""
        for slot in plan.free_slots.tolist():
            self.rows.free(slot)
        for slot in plan.new_slots.tolist():
            self.rows.free(slot)
        r = self.rows
        for s in starts:
            r.matchers[s.slot], r.stop_ids[s.slot] = s.matcher, np.asarray(s.stop_ids, np.int64)
            r.min_tokens[s.slot], r.accepted[s.slot] = s.min_tokens, s.accepted

    # ----- steps -------------------------------------------------------------------------------------
    def constrained(self, slots: np.ndarray, rows: np.ndarray) -> Constrained | None:
        """The constrained ones among a step's sampled rows (slots [S], their rows [S]); None if none."""
        which = self.rows.constrained(slots)
        if not which.any():
            return None
        index = np.flatnonzero(which)
        picked = slots[index].tolist()
        return Constrained(index.astype(np.int64), picked, [self.rows.matchers[s] for s in picked],
                           rows[index].astype(np.int64))

    def fill(self, io: int, c: Constrained) -> float:
        """The bitmasks of `c`'s rows into I/O slot `io`'s host buffer; returns the host ms it took."""
        t0 = time.perf_counter()
        k = len(c.slots)
        self.rows.fill(c.slots, c.matchers, self.host[io][:k])
        self.host_index[io][:k].copy_(torch.from_numpy(c.index))
        return (time.perf_counter() - t0) * 1000

    def apply(self, io: int, c: Constrained, logits: torch.Tensor) -> None:
        """Masks the constrained rows of `logits` ([S, V], the step's sampled rows; any float dtype) in
        place, on the current (compute) stream; `fill` has written the host buffer. xgrammar's kernel
        on CPU too: measured faster there than unpacking the bits in torch or numpy (it skips allowed
        words), docs/structured_output.md."""
        k = len(c.slots)
        mask, index = self.dev[io][:k], self.dev_index[io][:k]
        if self.cuda:
            mask.copy_(self.host[io][:k], non_blocking=True)
            index.copy_(self.host_index[io][:k], non_blocking=True)
        if k == logits.shape[0]:
            self._apply(logits, mask, vocab_size=self.vocab_size)
        else:  # a mixed batch: only the constrained rows, gathered (the others pay nothing)
            sub = logits.index_select(0, index)
            self._apply(sub, mask, vocab_size=self.vocab_size)
            logits.index_copy_(0, index, sub)

    def accept(self, c: Constrained, sampled: np.ndarray) -> np.ndarray:
        """Advances the launch's matchers by the step's tokens (`sampled` [R], the result's rows);
        returns the rows whose token the matcher refused (only broken logits sample one)."""
        refused = self.rows.accept(c.slots, c.matchers, sampled[c.rows])
        return c.rows[refused] if refused else c.rows[:0]
