"""Penalties, logit bias and min_tokens: per-row-slot state on the device, applied to a step's logits
before sampling and updated by every sampled token inside the same step.

Owns, per row slot: the penalty scalars (repetition, presence, frequency), min_tokens and the prompt
length, on the device [max_rows]; the logit bias entries and the ids min_tokens masks (sparse,
[max_rows, MAX_BIAS] / [max_rows, MAX_MASK]); and the token counts the penalties read: `counts`
[max_rows, V] int32 (generated tokens only: presence/frequency) and `seen` [max_rows, V] bool
(prompt + generated: repetition). The large buffers are allocated on first use only, so a worker
that never serves a penalty spends nothing: counts + seen take max_rows x V x 5 bytes (64 rows x
49152 tokens: 15.7 MB; 256 x 128256: 164 MB), bias 12 bytes x MAX_BIAS and mask 8 bytes x MAX_MASK
per slot.

Why on the device: at pipeline depth 2 the scheduler builds step N+1 before it has step N's token,
so counts kept on the host would miss the carried-over token (vllm#27878). `record` runs on the
compute stream right after sampling, so every later step reads counts that include it. A slot that
is (re)created, after a preemption or a worker loss, rebuilds its counts from the history the plan
carries (prompt + outputs, `new_prompt_len` saying which are prompt). Host mirrors of the scalars
give the per-step flags, so a step without such rows runs none of this, and keeps its CUDA graph.

Everything in `apply` and `record` is index ops on fixed shapes with no host read (graph-capturable);
`start_slots` copies the new slots' parameters on the compute stream, from pinned buffers the caller
keeps alive until the step completes. Order (transformers' for the first two, then vLLM's): min_tokens
mask, logit bias, repetition penalty, then frequency and presence penalties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tandem.wire import StepPlan, WireError

MAX_BIAS = 300  # logit_bias entries per request (the scheduler's limit too)
MAX_MASK = 128  # stop token ids + EOS ids that min_tokens masks


@dataclass(frozen=True)
class PenaltyFlags:
    """Which transforms a step's sampled rows need (host-side, from the plan and the mirrors)."""

    mask: bool = False
    bias: bool = False
    repetition: bool = False
    counts: bool = False  # presence or frequency

    @property
    def any(self) -> bool:
        return self.mask or self.bias or self.repetition or self.counts


NONE = PenaltyFlags()


class PenaltyState:
    def __init__(self, num_slots: int, vocab_size: int, device: str) -> None:
        self.num_slots, self.vocab, self.device = num_slots, vocab_size, device
        n = num_slots
        # Host mirrors of what the device holds per slot; `neutral` = its device row changes nothing.
        self.rep = np.ones(n, np.float32)
        self.pf = np.zeros(n, bool)  # presence or frequency set
        self.min_tokens = np.zeros(n, np.int32)
        self.biased = np.zeros(n, bool)
        self.neutral = np.ones(n, bool)
        self.d_rep = torch.ones(n, dtype=torch.float32, device=device)
        self.d_pres = torch.zeros(n, dtype=torch.float32, device=device)
        self.d_freq = torch.zeros(n, dtype=torch.float32, device=device)
        self.d_min = torch.zeros(n, dtype=torch.int32, device=device)
        self.d_prompt = torch.zeros(n, dtype=torch.int32, device=device)
        self.bias_ids: torch.Tensor | None = None  # int64 [S, MAX_BIAS] (0 with value 0 = no entry)
        self.bias_vals: torch.Tensor | None = None  # float32 [S, MAX_BIAS]
        self.mask_ids: torch.Tensor | None = None  # int64 [S, MAX_MASK] (-1 = no entry)
        self.counts: torch.Tensor | None = None  # int32 [S, V]
        self.seen: torch.Tensor | None = None  # bool [S, V]

    def reset(self) -> None:
        """Every slot empty (a new session): mirrors say every device row must be rewritten on use."""
        self.rep[:], self.pf[:], self.min_tokens[:], self.biased[:] = 1.0, False, 0, False
        self.neutral[:] = False

    # ----- host side ---------------------------------------------------------------------------------
    @staticmethod
    def check(plan: StepPlan) -> None:
        if np.any(plan.new_bias_count > MAX_BIAS) or np.any(plan.new_mask_count > MAX_MASK):
            raise WireError(f"more than {MAX_BIAS} logit-bias or {MAX_MASK} min_tokens ids for one slot")

    def flags(self, slots: np.ndarray) -> PenaltyFlags:
        """What the step's sampled rows (their slots) need."""
        if slots.size == 0 or not np.any(~self.neutral[slots]):
            return NONE
        return PenaltyFlags(mask=bool(np.any(self.min_tokens[slots] > 0)), bias=bool(np.any(self.biased[slots])),
                            repetition=bool(np.any(self.rep[slots] != 1.0)), counts=bool(np.any(self.pf[slots])))

    def start_slots(self, plan: StepPlan) -> list[torch.Tensor]:
        """The plan's new slots take their parameters; returns the host staging tensors, which must
        outlive the copies (until the step completes). Call on the compute stream. Slots whose request
        and device row are both neutral cost nothing."""
        new = plan.new_slots
        rep, pres, freq = plan.new_repetition_penalty, plan.new_presence_penalty, plan.new_frequency_penalty
        mins, nb, nm, nh = plan.new_min_tokens, plan.new_bias_count, plan.new_mask_count, plan.new_history_len
        wanted = (rep != 1.0) | (pres != 0) | (freq != 0) | (mins > 0) | (nb > 0)
        write = wanted | ~self.neutral[new]
        if not np.any(write):
            return []
        idx = np.flatnonzero(write)
        s = new[idx]
        self.rep[s], self.pf[s], self.min_tokens[s] = rep[idx], (pres[idx] != 0) | (freq[idx] != 0), mins[idx]
        self.biased[s], self.neutral[s] = nb[idx] > 0, ~wanted[idx]
        keep: list[torch.Tensor] = []
        d_s = self._to_device(s.astype(np.int64), keep)
        for dst, src in ((self.d_rep, rep), (self.d_pres, pres), (self.d_freq, freq)):
            dst.index_copy_(0, d_s, self._to_device(src[idx], keep))
        self.d_min.index_copy_(0, d_s, self._to_device(mins[idx], keep))
        self.d_prompt.index_copy_(0, d_s, self._to_device(plan.new_prompt_len[idx], keep))
        if self.bias_ids is not None or np.any(nb[idx] > 0):
            self._write_bias(plan, idx, d_s, keep)
        if self.mask_ids is not None or np.any((nm[idx] > 0) & (mins[idx] > 0)):
            self._write_mask(plan, idx, d_s, keep)
        if np.any(nh[idx] > 0):
            self._rebuild_counts(plan, idx, keep)
        return keep

    def _to_device(self, arr: np.ndarray, keep: list[torch.Tensor]) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(arr))
        if self.device == "cpu":
            return host
        host = host.pin_memory()
        keep.append(host)
        return host.to(self.device, non_blocking=True)

    def _rows(self, counts: np.ndarray, flat: np.ndarray, idx: np.ndarray, width: int, fill: float,
              dtype: str) -> np.ndarray:
        """[len(idx), width] of each chosen new slot's entries of a flat list, padded with `fill`."""
        starts = np.concatenate([[0], np.cumsum(counts)])
        out = np.full((idx.size, width), fill, dtype)
        for i, j in enumerate(idx.tolist()):
            entries = flat[starts[j]:starts[j + 1]]
            out[i, :entries.size] = entries
        return out

    def _write_bias(self, plan: StepPlan, idx: np.ndarray, d_s: torch.Tensor, keep: list[torch.Tensor]) -> None:
        if self.bias_ids is None:
            self.bias_ids = torch.zeros((self.num_slots, MAX_BIAS), dtype=torch.int64, device=self.device)
            self.bias_vals = torch.zeros((self.num_slots, MAX_BIAS), dtype=torch.float32, device=self.device)
        assert self.bias_vals is not None
        nb = plan.new_bias_count
        self.bias_ids.index_copy_(0, d_s, self._to_device(self._rows(nb, plan.bias_ids, idx, MAX_BIAS, 0, "int64"),
                                                           keep))
        self.bias_vals.index_copy_(0, d_s, self._to_device(
            self._rows(nb, plan.bias_values, idx, MAX_BIAS, 0.0, "float32"), keep))

    def _write_mask(self, plan: StepPlan, idx: np.ndarray, d_s: torch.Tensor, keep: list[torch.Tensor]) -> None:
        if self.mask_ids is None:
            self.mask_ids = torch.full((self.num_slots, MAX_MASK), -1, dtype=torch.int64, device=self.device)
        rows = self._rows(plan.new_mask_count, plan.mask_ids, idx, MAX_MASK, -1, "int64")
        self.mask_ids.index_copy_(0, d_s, self._to_device(rows, keep))

    def _rebuild_counts(self, plan: StepPlan, idx: np.ndarray, keep: list[torch.Tensor]) -> None:
        """Counts of the penalized new slots from their history: seen = prompt + outputs, counts = outputs."""
        if self.counts is None:
            self.counts = torch.zeros((self.num_slots, self.vocab), dtype=torch.int32, device=self.device)
            self.seen = torch.zeros((self.num_slots, self.vocab), dtype=torch.bool, device=self.device)
        assert self.seen is not None
        nh = plan.new_history_len
        starts = np.concatenate([[0], np.cumsum(nh)])
        pen = idx[nh[idx] > 0]
        slot_of = np.concatenate([np.full(nh[j], plan.new_slots[j], np.int64) for j in pen])
        tokens = np.concatenate([plan.history[starts[j]:starts[j + 1]] for j in pen]).astype(np.int64)
        generated = np.concatenate([np.arange(nh[j]) >= plan.new_prompt_len[j] for j in pen])
        d_slots = self._to_device(plan.new_slots[pen].astype(np.int64), keep)
        self.counts.index_fill_(0, d_slots, 0)
        self.seen.index_fill_(0, d_slots, False)
        d_rows, d_tok = self._to_device(slot_of, keep), self._to_device(tokens, keep)
        self.seen.index_put_((d_rows, d_tok), torch.ones_like(d_tok, dtype=torch.bool))
        g_rows, g_tok = self._to_device(slot_of[generated], keep), self._to_device(tokens[generated], keep)
        self.counts.index_put_((g_rows, g_tok), torch.ones_like(g_tok, dtype=torch.int32), accumulate=True)

    # ----- device side (the step) --------------------------------------------------------------------
    def apply(self, logits: torch.Tensor, slots: torch.Tensor, counter: torch.Tensor,
              flags: PenaltyFlags) -> torch.Tensor:
        """float32 [S, V]: the sampled rows' logits with the transforms applied (a new tensor).
        slots [S] int64: each row's slot; counter [S] int64: the position its token will take."""
        x = logits.to(torch.float32).clone()
        if flags.mask and self.mask_ids is not None:
            ids = self.mask_ids.index_select(0, slots)
            generated = counter - self.d_prompt.index_select(0, slots).to(torch.int64)
            masking = (generated < self.d_min.index_select(0, slots).to(torch.int64))[:, None] & (ids >= 0)
            x.scatter_add_(1, ids.clamp(min=0), torch.where(masking, float("-inf"), 0.0))
        if flags.bias and self.bias_ids is not None and self.bias_vals is not None:
            x.scatter_add_(1, self.bias_ids.index_select(0, slots), self.bias_vals.index_select(0, slots))
        if (flags.repetition or flags.counts) and self.counts is not None and self.seen is not None:
            if flags.repetition:
                p = self.d_rep.index_select(0, slots)[:, None]
                x = torch.where(self.seen.index_select(0, slots), torch.where(x < 0, x * p, x / p), x)
            if flags.counts:
                c = self.counts.index_select(0, slots).to(torch.float32)
                freq = self.d_freq.index_select(0, slots)[:, None]
                pres = self.d_pres.index_select(0, slots)[:, None]
                x = x - (c * freq + (c > 0).to(torch.float32) * pres)
        return x

    def record(self, slots: torch.Tensor, tokens: torch.Tensor, flags: PenaltyFlags) -> None:
        """The step's sampled tokens into the counts, on the device, before any later step reads them.
        Rows of unpenalized slots are counted too (harmless: their penalties are off, and a slot that
        turns penalized rebuilds its counts)."""
        if not (flags.repetition or flags.counts) or self.counts is None or self.seen is None:
            return
        tok = tokens.to(torch.int64)
        self.counts.index_put_((slots, tok), torch.ones_like(tok, dtype=torch.int32), accumulate=True)
        self.seen.index_put_((slots, tok), torch.ones_like(tok, dtype=torch.bool))
