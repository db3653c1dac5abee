"""I/O slots A/B and the stream/event plumbing that orders them.

An `IOSlot` owns one step's buffers: a host input buffer (pinned on CUDA) into which a StepBatch (a
plan resolved against the row slots, row_state.py) is written, its device twin filled by ONE bulk
copy on `h2d_stream`, and device/host output buffers (sampled ids, logprobs) joined by one copy on
`d2h_stream`. Events `h2d_done`, `compute_done`,
`d2h_done` order the three streams. Two slots alternate so the host fills step N+1 while step N
computes; a slot is reloaded only once its previous step's results have been collected (which
waited on its `d2h_done`), so no buffer is rewritten while a copy or kernel may still read it.

`DeviceSync` hides the device: real CUDA streams/events on CUDA, no-op stand-ins on CPU (where
every op is synchronous) so the same launch code runs on both. CPU events record perf_counter, so
`elapsed_time` gives wall time of the (synchronous) compute.

The block table is not in the slot: it is the engine's persistent device table, which the kernels
read in place through each row's `table_rows` entry. What a step changes in it (`append_*`: a few
cells per step) travels in the slot's bulk copy and is written into the table on the compute
stream, so a step never sees the cells of a step launched after it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from worker_svc.attention import RowLayout
from worker_svc.row_state import MAX_TOP_LOGPROBS, StepBatch

_ALIGN = 16


class HostEvent:
    """CPU stand-in for torch.cuda.Event: work before `record` is already done when it returns."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self, stream: object = None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) * 1000.0


class HostStream:
    """CPU stand-in for torch.cuda.Stream."""

    def wait_event(self, event: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


class DeviceSync:
    """Streams and events for a device; on CPU everything is an ordered no-op."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.h2d_stream = self.stream()
        self.compute_stream = self.stream()
        self.d2h_stream = self.stream()

    def stream(self) -> torch.cuda.Stream | HostStream:
        return torch.cuda.Stream() if self.cuda else HostStream()

    def event(self, timing: bool = False) -> torch.cuda.Event | HostEvent:
        return torch.cuda.Event(enable_timing=timing) if self.cuda else HostEvent()

    @contextlib.contextmanager
    def on(self, stream: torch.cuda.Stream | HostStream) -> Iterator[None]:
        """Makes `stream` current, so every op issued inside runs on it (never the default stream)."""
        if self.cuda:
            with torch.cuda.stream(stream):
                yield
        else:
            yield


@dataclass(frozen=True)
class SlotLimits:
    max_num_tokens: int
    max_num_rows: int
    max_blocks_per_row: int
    block_size: int = 16

    @property
    def max_appends(self) -> int:
        """Block-table cells one slot carries: every block a step's tokens can start (T / block size, plus
        one per row for a partly filled first block). A plan with more is applied outside the slot."""
        return self.max_num_tokens // self.block_size + 2 * self.max_num_rows


class _Packed:
    """Named typed fields laid out in one byte buffer, each starting on a 16-byte boundary."""

    def __init__(self, fields: list[tuple[str, torch.dtype, int]]) -> None:
        self.offsets: dict[str, tuple[int, torch.dtype, int, int]] = {}  # offset, dtype, capacity, itemsize
        at = 0
        for name, dtype, count in fields:
            itemsize = torch.empty((), dtype=dtype).element_size()
            self.offsets[name] = (at, dtype, count, itemsize)
            at += -(-count * itemsize // _ALIGN) * _ALIGN
        self.nbytes = at

    def end(self, name: str, count: int) -> int:
        """Byte offset just past the first `count` elements of field `name`."""
        at, _, _, itemsize = self.offsets[name]
        return at + count * itemsize

    def view(self, buf: torch.Tensor, name: str, count: int) -> torch.Tensor:
        at, dtype, cap, itemsize = self.offsets[name]
        assert count <= cap, f"{name}: {count} > capacity {cap}"
        return buf[at : at + cap * itemsize].view(dtype)[:count]


@dataclass
class StepInputs:
    """Device views of a loaded step (the slot's buffers; valid until the slot is reloaded)."""

    input_ids: torch.Tensor  # int32 [T]
    carry_ids: torch.Tensor  # int32 [T] (= input_ids), or [T + 1] when padded: what carry-over writes
    positions: torch.Tensor  # int32 [T]
    slot_mapping: torch.Tensor  # int32 [T]
    first_tokens: torch.Tensor  # int32 [R]: query_start[:-1]
    kv_lens: torch.Tensor  # int32 [R]
    table_rows: torch.Tensor  # int32 [R]: the block-table row (slot) of each row
    carry_index: torch.Tensor  # int32 [R]
    single_rows: torch.Tensor  # int32 [S1]
    single_tokens: torch.Tensor  # int32 [S1]
    query_start: torch.Tensor  # int32 [R + 1]
    multi_rows: torch.Tensor  # int32 [M]: rows with several query tokens
    sample_rows: torch.Tensor  # int32 [S]: rows that sample
    sample_tokens: torch.Tensor  # int32 [S]: their last token
    temperature: torch.Tensor  # float32 [S] (sampling params compacted to the sampling rows)
    top_p: torch.Tensor
    top_k: torch.Tensor  # int32 [S]
    min_p: torch.Tensor
    seed: torch.Tensor  # int64 [S], the uint64 seed's bits
    counter: torch.Tensor  # int64 [S] = kv_lens of the row: the position the sampled token takes
    append_slots: torch.Tensor  # int32 [A]: block-table cells to set before the forward
    append_cols: torch.Tensor  # int32 [A]
    append_blocks: torch.Tensor  # int32 [A]


# (field, dtype, how it is sized): T tokens, R rows, R1 = R + 1, A = block-table cells set.
_INPUT_FIELDS = [
    ("input_ids", torch.int32, "T1"), ("positions", torch.int32, "T"), ("slot_mapping", torch.int32, "T"),
    ("first_tokens", torch.int32, "R"), ("kv_lens", torch.int32, "R"), ("table_rows", torch.int32, "R"),
    ("carry_index", torch.int32, "R"),
    ("single_rows", torch.int32, "R"), ("single_tokens", torch.int32, "R"),
    ("query_start", torch.int32, "R1"), ("multi_rows", torch.int32, "R"),
    ("sample_rows", torch.int32, "R"), ("sample_tokens", torch.int32, "R"),
    ("temperature", torch.float32, "R"), ("top_p", torch.float32, "R"), ("top_k", torch.int32, "R"),
    ("min_p", torch.float32, "R"), ("seed", torch.int64, "R"), ("counter", torch.int64, "R"),
    ("append_slots", torch.int32, "A"), ("append_cols", torch.int32, "A"),
    # Last: the bulk copy stops right after its used cells.
    ("append_blocks", torch.int32, "A"),
]


# Step shapes whose device views an I/O slot keeps (the oldest goes first): every decode bucket in use
# and the recent mixed shapes.
_VIEW_SHAPES = 256


class IOSlot:
    """One of the two alternating step buffers; see the module docstring for the protocol."""

    def __init__(self, index: int, limits: SlotLimits, device: str, sync: DeviceSync) -> None:
        self.index = index
        self.limits = limits
        self.sync = sync
        sizes = {"T": limits.max_num_tokens, "T1": limits.max_num_tokens + 1, "R": limits.max_num_rows,
                 "R1": limits.max_num_rows + 1, "A": limits.max_appends}
        self._in = _Packed([(n, dt, sizes[s]) for n, dt, s in _INPUT_FIELDS])
        rows, k = limits.max_num_rows, MAX_TOP_LOGPROBS
        self._out = _Packed([("sampled", torch.int32, rows), ("logprob", torch.float32, rows),
                             ("top_ids", torch.int32, rows * k), ("top_logprobs", torch.float32, rows * k)])
        pin = sync.cuda
        self.host_in = torch.zeros(self._in.nbytes, dtype=torch.uint8, pin_memory=pin)
        self.dev_in = torch.zeros(self._in.nbytes, dtype=torch.uint8, device=device)
        self.dev_out = torch.zeros(self._out.nbytes, dtype=torch.uint8, device=device)
        self.host_out = torch.zeros(self._out.nbytes, dtype=torch.uint8, pin_memory=pin)
        # numpy views over the whole capacity of each field, built once: load() only slices them.
        # Device views of every field's whole capacity, likewise: a step's views are one slice each.
        self._dev_fields = {name: self._in.view(self.dev_in, name, cap)
                            for name, (_at, _dt, cap, _size) in self._in.offsets.items()}
        self._host_fields = {name: self._in.view(self.host_in, name, cap).numpy()
                             for name, (_at, _dt, cap, _size) in self._in.offsets.items()}
        self._fields: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}  # views by step shape (load)
        self.h2d_done = sync.event()
        self.compute_done = sync.event()
        self.d2h_done = sync.event()
        self.in_use = False  # launched and not yet collected

    def load(self, plan: StepBatch, layout: RowLayout, pad_to: tuple[int, int] | None = None) -> StepInputs:
        """Writes `plan` into the host buffer and issues the bulk H2D copy; returns device views.

        `pad_to = (tokens, rows)`: the views a piecewise graph reads are grown to those sizes, padding
        that does nothing: token ids and positions 0, KV slot -1, extra logit rows read from token 0
        (the sampler only takes the real ones), and rows that carry nothing. Carry-over writes every
        row's first token (a fixed shape, hence also the padding rows'), so padding rows point at a
        spare token past the end, `carry_ids[tokens]`, which the forward does not read: pointing them
        at a real row's token would race with that row's carried write.
        """
        assert not self.in_use, f"slot {self.index} reloaded before its result was collected"
        self.d2h_done.synchronize()  # already passed once collected; states the hazard
        t, r = plan.num_tokens, plan.num_rows
        a = plan.append_slots.shape[0]
        assert a <= self.limits.max_appends, f"{a} block-table cells in one slot"
        sample_rows = np.flatnonzero(plan.sample).astype(np.int32)
        multi_rows = layout.multi_rows
        s, s1, m = sample_rows.size, layout.single_rows.size, multi_rows.size
        host = {
            "input_ids": plan.input_ids, "positions": plan.positions, "slot_mapping": plan.slot_mapping,
            "first_tokens": plan.query_start[:-1], "kv_lens": plan.kv_lens, "table_rows": plan.rows,
            "carry_index": plan.carry_index,
            "single_rows": layout.single_rows, "single_tokens": layout.single_tokens,
            "query_start": plan.query_start, "multi_rows": multi_rows,
            "sample_rows": sample_rows, "sample_tokens": plan.query_start[1:][sample_rows] - 1,
            "temperature": plan.temperature[sample_rows], "top_p": plan.top_p[sample_rows],
            "top_k": plan.top_k[sample_rows], "min_p": plan.min_p[sample_rows],
            "seed": plan.seed[sample_rows].view(np.int64), "counter": plan.kv_lens[sample_rows],
            "append_slots": plan.append_slots, "append_cols": plan.append_cols, "append_blocks": plan.append_blocks,
        }
        for name, arr in host.items():
            self._host_fields[name][: arr.shape[0]] = arr
        if pad_to is not None:
            tokens, rows = pad_to
            assert t <= tokens and r <= rows and s <= rows
            for name, start, end, fill in (
                ("input_ids", t, tokens, 0), ("positions", t, tokens, 0), ("slot_mapping", t, tokens, -1),
                ("input_ids", tokens, tokens + 1, 0), ("first_tokens", r, rows, tokens), ("carry_index", r, rows, -1),
                ("sample_tokens", s, rows, 0),
            ):
                self._host_fields[name][start:end] = fill
            t, r, s_keep, carry_len = tokens, rows, rows, tokens + 1
        else:
            s_keep, carry_len = s, t
        nbytes = self._in.end("append_blocks", a)
        with self.sync.on(self.sync.h2d_stream):
            self.sync.h2d_stream.wait_event(self.compute_done)  # device inputs no longer read
            self.dev_in[:nbytes].copy_(self.host_in[:nbytes], non_blocking=True)
            self.h2d_done.record(self.sync.h2d_stream)
        self.in_use = True

        fields = self._fields.get(key := (t, r, plan.num_rows, s, s1, m, s_keep, carry_len))
        if fields is None:  # the views of one shape, built once: a decode bucket's come back every step
            fields = self._views(*key)
            if len(self._fields) >= _VIEW_SHAPES:
                self._fields.pop(next(iter(self._fields)))
            self._fields[key] = fields
        dev = self._dev_fields
        return StepInputs(**fields, append_slots=dev["append_slots"][:a], append_cols=dev["append_cols"][:a],
                          append_blocks=dev["append_blocks"][:a])

    def _views(self, t: int, r: int, rows: int, s: int, s1: int, m: int, s_keep: int,
               carry_len: int) -> dict[str, torch.Tensor]:
        """StepInputs' device views but the appends' (which change every step), for one step shape."""

        def dev(name: str, count: int) -> torch.Tensor:
            return self._dev_fields[name][:count]

        return dict(
            input_ids=dev("input_ids", t), carry_ids=dev("input_ids", carry_len), positions=dev("positions", t),
            slot_mapping=dev("slot_mapping", t),
            first_tokens=dev("first_tokens", r), kv_lens=dev("kv_lens", rows),
            table_rows=dev("table_rows", rows), carry_index=dev("carry_index", r),
            single_rows=dev("single_rows", s1), single_tokens=dev("single_tokens", s1),
            query_start=dev("query_start", rows + 1), multi_rows=dev("multi_rows", m),
            sample_rows=dev("sample_rows", s), sample_tokens=dev("sample_tokens", s_keep),
            temperature=dev("temperature", s), top_p=dev("top_p", s), top_k=dev("top_k", s),
            min_p=dev("min_p", s), seed=dev("seed", s), counter=dev("counter", s),
        )

    # ----- outputs: written by the compute stream, copied out on the d2h stream ----------------------
    def out_sampled(self, rows: int) -> torch.Tensor:
        """Device int32 [rows]: this slot's sampled ids (carry-over reads them from the next step)."""
        return self._out.view(self.dev_out, "sampled", rows)

    def out_logprob(self, rows: int) -> torch.Tensor:
        return self._out.view(self.dev_out, "logprob", rows)

    def out_top(self, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert k <= MAX_TOP_LOGPROBS
        ids = self._out.view(self.dev_out, "top_ids", rows * k).view(rows, k)
        return ids, self._out.view(self.dev_out, "top_logprobs", rows * k).view(rows, k)

    def issue_d2h(self, rows: int, k: int) -> None:
        """After compute_done: one copy of the used output prefix into host memory, then d2h_done."""
        end = self._out.end("top_logprobs", rows * k) if k else self._out.end("logprob", rows)
        with self.sync.on(self.sync.d2h_stream):
            self.sync.d2h_stream.wait_event(self.compute_done)
            self.host_out[:end].copy_(self.dev_out[:end], non_blocking=True)
            self.d2h_done.record(self.sync.d2h_stream)

    def read_outputs(self, rows: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Waits for d2h_done; returns copies (sampled, logprob, top_ids, top_logprobs) and frees the slot."""
        assert self.in_use
        self.d2h_done.synchronize()
        # Copies: the results are sent zero-copy and the slot's host buffer is reused two steps on.
        sampled = self._out.view(self.host_out, "sampled", rows).numpy().copy()
        logprob = self._out.view(self.host_out, "logprob", rows).numpy().copy()
        top_ids = self._out.view(self.host_out, "top_ids", rows * k).numpy().reshape(rows, k).copy()
        top_lp = self._out.view(self.host_out, "top_logprobs", rows * k).numpy().reshape(rows, k).copy()
        self.in_use = False
        return sampled, logprob, top_ids, top_lp
