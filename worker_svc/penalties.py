"""Penalties, logit bias and min_tokens: per-row-slot state on the device, applied to a step's logits
before sampling and updated by every sampled token inside the same step.

Owns, per row slot: the penalty scalars (repetition, presence, frequency), min_tokens and the prompt
length, on the device [max_rows + 1]; the logit bias entries and the ids min_tokens masks (sparse,
[max_rows + 1, MAX_BIAS] / [max_rows + 1, MAX_MASK]); the token counts the penalties read: `counts`
[max_rows + 1, V] int32 (generated tokens only: presence/frequency) and `seen` [max_rows + 1, V] bool
(prompt + generated: repetition); and the staging buffers that carry new slots' parameters to the
device. The extra row, `trash`, is neutral: the padding rows of a decode CUDA graph read and record
there, so they never touch a real slot. The large buffers are allocated on first use, or at graph
capture (`allocate`: a captured graph holds their addresses); counts + seen take (max_rows + 1) x V x
5 bytes (64 rows x 49152 tokens: 16 MB; 256 x 128256: 165 MB), bias 12 bytes x MAX_BIAS and mask 8
bytes x MAX_MASK per slot.

Why on the device: at pipeline depth 2 the scheduler builds step N+1 before it has step N's token,
so counts kept on the host would miss the carried-over token (vllm#27878). `record` runs on the
compute stream right after sampling (inside the decode graph when one replays), so every later step
reads counts that include it. A slot that is (re)created, after a preemption or a worker loss,
rebuilds its counts from the history the plan carries (prompt + outputs, `new_prompt_len` saying
which are prompt). Host mirrors of the scalars give the per-step flags, so a step without such rows
runs none of this, and keeps its plain CUDA graph.

Admitting slots never waits for the device: `stage` writes the new slots' parameters, flat, into
the pinned staging buffer of the step's I/O slot (reused only once that I/O slot's previous step has
been collected, as the I/O slot's own buffers are), `issue_copy` copies it on the h2d stream ahead of
the I/O slot's bulk copy (so the step's `h2d_done` covers both), and `commit` scatters it into the
state on the compute stream before the forward. Everything in `commit`, `apply` and `record` is index
ops on fixed shapes with no host read (`apply` and `record` are captured in the decode graphs).
Order (transformers' for the first two, then vLLM's): min_tokens mask, logit bias, repetition
penalty, then frequency and presence penalties.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tandem.wire import StepPlan, WireError

MAX_BIAS = 300  # logit_bias entries per request (the scheduler's limit too)
MAX_MASK = 128  # stop token ids + EOS ids that min_tokens masks
_ALIGN = 16
_STAGING_BYTES = 1 << 16  # initial capacity of each staging buffer; grows (rarely) for long histories


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
ALL = PenaltyFlags(True, True, True, True)  # what a graph holds: every transform (neutral rows: exact no-ops)


class _Staging:
    """One I/O slot's host buffer (pinned on CUDA) and its device twin: flat arrays packed at 16-byte
    boundaries. On CPU the device twin is the host buffer itself."""

    def __init__(self, device: str, nbytes: int) -> None:
        self.device, self.cuda = device, device.startswith("cuda")
        self._allocate(nbytes)
        self.used = 0
        self.views: dict[str, tuple[int, torch.dtype, int]] = {}

    def _allocate(self, nbytes: int) -> None:
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device=self.device) if self.cuda else self.host

    def pack(self, arrays: dict[str, np.ndarray]) -> None:
        """Writes `arrays` into the host buffer. Called only once the previous step that used this
        buffer has completed (its I/O slot was collected), so growing it may drop the old one."""
        layout, at = {}, 0
        for name, arr in arrays.items():
            layout[name] = at
            at += -(-arr.nbytes // _ALIGN) * _ALIGN
        if at > self.host.numel():  # a long history (a recreated slot): rare, and the only allocation
            self._allocate(max(at, 2 * self.host.numel()))
        buf = self.host.numpy()
        self.views = {}
        for name, arr in arrays.items():
            start = layout[name]
            buf[start:start + arr.nbytes] = np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
            self.views[name] = (start, _TORCH_DTYPES[arr.dtype.str], arr.shape[0])
        self.used = at

    def issue_copy(self) -> None:
        """The packed bytes to the device, asynchronously, on the current stream (the h2d stream)."""
        if self.cuda and self.used:
            self.dev[:self.used].copy_(self.host[:self.used], non_blocking=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        start, dtype, count = self.views[name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        return self.dev[start:start + count * itemsize].view(dtype)


_TORCH_DTYPES = {np.dtype(n).str: t for n, t in (("int64", torch.int64), ("int32", torch.int32),
                                                  ("float32", torch.float32))}


@dataclass
class Staged:
    """A plan's new-slot parameters, packed into a staging buffer: what `commit` writes on the device."""

    staging: _Staging
    bias: bool  # bias rows to rewrite
    mask: bool  # mask rows to rewrite
    rebuild: bool  # counts/seen of slots with a history to rebuild

    def issue_copy(self) -> None:
        self.staging.issue_copy()


class PenaltyState:
    def __init__(self, num_slots: int, vocab_size: int, device: str, num_staging: int = 2) -> None:
        self.num_slots, self.vocab, self.device = num_slots, vocab_size, device
        n = num_slots
        self.trash = n  # the neutral row padding rows of a graph read and record into
        # Host mirrors of what the device holds per slot; `neutral` = its device row changes nothing.
        self.rep = np.ones(n, np.float32)
        self.pf = np.zeros(n, bool)  # presence or frequency set
        self.min_tokens = np.zeros(n, np.int32)
        self.biased = np.zeros(n, bool)
        self.neutral = np.ones(n, bool)
        rows = n + 1
        self.d_rep = torch.ones(rows, dtype=torch.float32, device=device)
        self.d_pres = torch.zeros(rows, dtype=torch.float32, device=device)
        self.d_freq = torch.zeros(rows, dtype=torch.float32, device=device)
        self.d_min = torch.zeros(rows, dtype=torch.int32, device=device)
        self.d_prompt = torch.zeros(rows, dtype=torch.int32, device=device)
        self.bias_ids: torch.Tensor | None = None  # int64 [S + 1, MAX_BIAS] (0 with value 0 = no entry)
        self.bias_vals: torch.Tensor | None = None  # float32 [S + 1, MAX_BIAS]
        self.mask_ids: torch.Tensor | None = None  # int64 [S + 1, MAX_MASK] (-1 = no entry)
        self.counts: torch.Tensor | None = None  # int32 [S + 1, V]
        self.seen: torch.Tensor | None = None  # bool [S + 1, V]
        # One staging buffer per I/O slot, allocated up front: pinning memory in the launch path could
        # wait on the device (cudaHostAlloc), which is exactly what admission must not do.
        self._staging = [_Staging(device, _STAGING_BYTES) for _ in range(num_staging)]

    def reset(self) -> None:
        """Every slot empty (a new session): mirrors say every device row must be rewritten on use."""
        self.rep[:], self.pf[:], self.min_tokens[:], self.biased[:] = 1.0, False, 0, False
        self.neutral[:] = False

    def allocate(self) -> None:
        """Every buffer now (on the current stream), so that a captured graph can hold their addresses."""
        rows = self.num_slots + 1
        if self.bias_ids is None:
            self.bias_ids = torch.zeros((rows, MAX_BIAS), dtype=torch.int64, device=self.device)
            self.bias_vals = torch.zeros((rows, MAX_BIAS), dtype=torch.float32, device=self.device)
        if self.mask_ids is None:
            self.mask_ids = torch.full((rows, MAX_MASK), -1, dtype=torch.int64, device=self.device)
        if self.counts is None:
            self.counts = torch.zeros((rows, self.vocab), dtype=torch.int32, device=self.device)
            self.seen = torch.zeros((rows, self.vocab), dtype=torch.bool, device=self.device)

    @property
    def allocated(self) -> bool:
        return self.bias_ids is not None and self.mask_ids is not None and self.counts is not None

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

    def stage(self, plan: StepPlan, staging: int) -> Staged | None:
        """The plan's new slots take their parameters: the host mirrors now, the device rows packed
        into staging buffer `staging` (the step's I/O slot index) for `issue_copy` and `commit`.
        None when nothing changes on the device: slots whose request and device row are both neutral
        cost nothing."""
        new = plan.new_slots
        rep, pres, freq = plan.new_repetition_penalty, plan.new_presence_penalty, plan.new_frequency_penalty
        mins, nb, nm, nh = plan.new_min_tokens, plan.new_bias_count, plan.new_mask_count, plan.new_history_len
        wanted = (rep != 1.0) | (pres != 0) | (freq != 0) | (mins > 0) | (nb > 0)
        write = wanted | ~self.neutral[new]
        if not np.any(write):
            return None
        idx = np.flatnonzero(write)
        s = new[idx]
        self.rep[s], self.pf[s], self.min_tokens[s] = rep[idx], (pres[idx] != 0) | (freq[idx] != 0), mins[idx]
        self.biased[s], self.neutral[s] = nb[idx] > 0, ~wanted[idx]
        arrays: dict[str, np.ndarray] = {
            "slots": s.astype(np.int64), "rep": rep[idx], "pres": pres[idx], "freq": freq[idx],
            "min": mins[idx], "prompt": plan.new_prompt_len[idx],
        }
        bias = self.bias_ids is not None or bool(np.any(nb[idx] > 0))
        if bias:
            cells, entries = self._cells(nb, idx, new, MAX_BIAS)
            arrays |= {"bias_cells": cells, "bias_ids": plan.bias_ids[entries].astype(np.int64),
                       "bias_vals": plan.bias_values[entries]}
        mask = self.mask_ids is not None or bool(np.any((nm[idx] > 0) & (mins[idx] > 0)))
        if mask:
            cells, entries = self._cells(nm, idx, new, MAX_MASK)
            arrays |= {"mask_cells": cells, "mask_ids": plan.mask_ids[entries].astype(np.int64)}
        pen = idx[nh[idx] > 0]
        rebuild = pen.size > 0
        if rebuild:
            starts = np.concatenate([[0], np.cumsum(nh, dtype=np.int64)])
            entries = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in pen])
            slot_of = np.repeat(new[pen].astype(np.int64), nh[pen])
            flat = slot_of * self.vocab + plan.history[entries].astype(np.int64)
            generated = np.concatenate([np.arange(nh[j]) >= plan.new_prompt_len[j] for j in pen])
            arrays |= {"rebuild_slots": new[pen].astype(np.int64), "seen_cells": flat,
                       "count_cells": flat[generated]}
        buf = self._staging[staging]
        buf.pack(arrays)
        return Staged(buf, bias, mask, rebuild)

    def start_slots(self, plan: StepPlan, staging: int = 0) -> None:
        """stage + issue_copy + commit, all on the current stream (tests and tools; the runner splits
        them over its streams)."""
        staged = self.stage(plan, staging)
        if staged is not None:
            staged.issue_copy()
            self.commit(staged)

    @staticmethod
    def _cells(counts: np.ndarray, idx: np.ndarray, new: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """For the chosen new slots' entries of a flat per-slot list: their flat cells in a
        [slots, width] table (slot * width + position in its list) and their indices in the list."""
        starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        n = counts[idx].astype(np.int64)
        entries = np.concatenate([np.arange(starts[j], starts[j + 1]) for j in idx]) if n.sum() else \
            np.zeros(0, np.int64)
        within = entries - np.repeat(starts[idx], n)
        return np.repeat(new[idx].astype(np.int64), n) * width + within, entries

    # ----- device side (the step) --------------------------------------------------------------------
    def commit(self, staged: Staged) -> None:
        """Writes the staged rows into the state; on the compute stream, after the step's h2d_done."""
        st = staged.staging
        s = st["slots"]
        for dst, name in ((self.d_rep, "rep"), (self.d_pres, "pres"), (self.d_freq, "freq"), (self.d_min, "min"),
                          (self.d_prompt, "prompt")):
            dst.index_copy_(0, s, st[name])
        if staged.bias:
            if self.bias_ids is None:
                self.bias_ids = torch.zeros((self.num_slots + 1, MAX_BIAS), dtype=torch.int64, device=self.device)
                self.bias_vals = torch.zeros((self.num_slots + 1, MAX_BIAS), dtype=torch.float32, device=self.device)
            assert self.bias_vals is not None
            self.bias_ids.index_fill_(0, s, 0)
            self.bias_vals.index_fill_(0, s, 0.0)
            self.bias_ids.view(-1).index_copy_(0, st["bias_cells"], st["bias_ids"])
            self.bias_vals.view(-1).index_copy_(0, st["bias_cells"], st["bias_vals"])
        if staged.mask:
            if self.mask_ids is None:
                self.mask_ids = torch.full((self.num_slots + 1, MAX_MASK), -1, dtype=torch.int64, device=self.device)
            self.mask_ids.index_fill_(0, s, -1)
            self.mask_ids.view(-1).index_copy_(0, st["mask_cells"], st["mask_ids"])
        if staged.rebuild:
            if self.counts is None:
                self.counts = torch.zeros((self.num_slots + 1, self.vocab), dtype=torch.int32, device=self.device)
                self.seen = torch.zeros((self.num_slots + 1, self.vocab), dtype=torch.bool, device=self.device)
            assert self.seen is not None
            rebuild = st["rebuild_slots"]
            self.counts.index_fill_(0, rebuild, 0)
            self.seen.index_fill_(0, rebuild, False)
            self.seen.view(-1).index_fill_(0, st["seen_cells"], True)
            cells = st["count_cells"]
            self.counts.view(-1).index_add_(0, cells, torch.ones_like(cells, dtype=torch.int32))

    def apply(self, logits: torch.Tensor, slots: torch.Tensor, counter: torch.Tensor,
              flags: PenaltyFlags, *, fused: bool | None = None) -> torch.Tensor:
        """float32 [S, V]: the sampled rows' logits with the transforms applied (a new tensor).
        slots [S] int64: each row's slot; counter [S] int64: the position its token will take.
        In place on that copy, one [S, V] temporary at a time: inside a graph every temporary is pool
        memory. Dividing or multiplying by 1 and subtracting 0 are exact, so neutral rows keep their
        logits bit for bit (what lets a graph apply every transform to every row).
        fused: repetition and counts in one Triton kernel (kernels/triton_penalties.py; default: on
        CUDA), the same values bit for bit; the PyTorch code below is the CPU path and its oracle."""
        x = logits.to(torch.float32, copy=True)
        if flags.mask and self.mask_ids is not None:
            ids = self.mask_ids.index_select(0, slots)
            generated = counter - self.d_prompt.index_select(0, slots).to(torch.int64)
            masking = (generated < self.d_min.index_select(0, slots).to(torch.int64))[:, None] & (ids >= 0)
            x.scatter_add_(1, ids.clamp(min=0), torch.where(masking, float("-inf"), 0.0))
        if flags.bias and self.bias_ids is not None and self.bias_vals is not None:
            x.scatter_add_(1, self.bias_ids.index_select(0, slots), self.bias_vals.index_select(0, slots))
        if (flags.repetition or flags.counts) and self.counts is not None and self.seen is not None:
            if fused if fused is not None else x.is_cuda:
                from worker_svc.kernels.triton_penalties import fused_penalties  # triton: not on CPU installs

                return fused_penalties(x, slots, self.seen, self.counts, self.d_rep, self.d_freq, self.d_pres,
                                       repetition=flags.repetition, with_counts=flags.counts)
            if flags.repetition:
                # transformers: x / p where seen and x >= 0, x * p where seen and x < 0 (same values).
                p = self.d_rep.index_select(0, slots)[:, None]
                seen = self.seen.index_select(0, slots)
                neg = x < 0
                x.div_(torch.where(seen & ~neg, p, 1.0))
                x.mul_(torch.where(seen & neg, p, 1.0))
                del seen, neg
            if flags.counts:
                # x - (frequency * count + presence * (count > 0)), the reference's expression.
                c = self.counts.index_select(0, slots).to(torch.float32)
                pos = c > 0
                c.mul_(self.d_freq.index_select(0, slots)[:, None])
                c.add_(pos * self.d_pres.index_select(0, slots)[:, None])
                x.sub_(c)
        return x

    def record(self, slots: torch.Tensor, tokens: torch.Tensor, flags: PenaltyFlags) -> None:
        """The step's sampled tokens into the counts, on the device, before any later step reads them.
        Rows of unpenalized slots are counted too (harmless: their penalties are off, and a slot that
        turns penalized rebuilds its counts). Flat atomic adds: the trash row may repeat in a graph."""
        if not (flags.repetition or flags.counts) or self.counts is None or self.seen is None:
            return
        cells = slots * self.vocab + tokens.to(torch.int64)
        self.counts.view(-1).index_add_(0, cells, torch.ones_like(cells, dtype=torch.int32))
        self.seen.view(-1).index_fill_(0, cells, True)
