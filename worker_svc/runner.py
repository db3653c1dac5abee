"""Executes StepPlans: the in-process engine (no ZeroMQ) the worker loop, tests and benchmarks drive.

`Engine.launch(plan)` issues a step without waiting for it; `Engine.collect()` returns the oldest
launched step's StepResult; `execute(plan)` does both. Plans are incremental: `RowState` resolves
each against the requests the row slots hold (their block tables, context lengths, sampling
parameters) into a StepBatch. A launch, on the I/O slot the step alternates onto:
  h2d_stream:     bulk copy of the batch (IOSlot.load)          -> h2d_done
  compute_stream: wait h2d_done; the step's new block-table cells into the persistent device
                  table; carry-over (add the previous step's sampled ids, which live in
                  the other slot, to each carrying row's first input token); forward with paged
                  attention; logits at the sampling rows' last tokens only; sample -> compute_done
  d2h_stream:     wait compute_done; copy outputs to host        -> d2h_done
Nothing in the launch path reads a device value on the host (.item(), .tolist(), .cpu()) or runs
on the default stream; every shape and loop bound comes from the plan's host arrays. On CPU the
streams and events are no-ops and the same code runs synchronously.

Plans are checked on the host before any state or buffer is touched (`check_plan`, RowState): an
out-of-range index would be a device-side assert on CUDA, which kills the process.

A step with constrained rows (structured output, grammar_step.py) splits its launch: the forward is
issued at once (a decode step whose bucket exists replays the forward-only variant of the decode
graph, its logits left in the decode graphs' shared buffer; other steps run the piecewise or eager
forward); the tail (penalties, bitmask, sampling, the outputs' copy) needs the matchers advanced by
the previous step's tokens, so when that step is still in flight the tail is issued by `collect` of
the previous step, right after its tokens are read, while this step's forward runs on the device.
Only this step's sampling waits for the host; a launch that finds a tail still pending collects the
step before it first (the result is kept for `collect`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from tandem.wire import StepPlan, StepResult, WireError

from worker_svc.attention import PagedStep, install, row_layout
from worker_svc.graphs.cuda_graphs import DecodeGraphs, decode_layout, pad_decode_batch
from worker_svc.graphs.graph_capture import capture_graphs
from worker_svc.graphs.piecewise import PiecewiseGraph
from worker_svc.io_slots import DeviceSync, IOSlot, SlotLimits
from worker_svc.kv_cache import PagedKVCache, config_for_model
from worker_svc.models import LoadedModel
from worker_svc.penalties import NONE, PenaltyFlags, PenaltyState
from worker_svc.row_state import RowState, StepBatch
from worker_svc.sampler import sample
from worker_svc.step_clock import BusyUnits, StepClock, StepUnits, decoder_layers, units_per_forward
from worker_svc.step_forward import StepForward, apply_carry_over
from worker_svc.structured.grammar import GrammarEngine
from worker_svc.structured.grammar_step import Constrained, StepGrammar

__all__ = ["Engine", "EngineConfig", "SamplingHints", "apply_carry_over"]  # apply_carry_over: step_forward.py

log = logging.getLogger("tandem.worker.runner")

_TIMING_RING = 4  # event pairs: steps N-1, N, N+1 must be intact while N is collected


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0 = size from memory
    kv_cache_memory_gb: float = 0.0  # 0 = device default (see kv_cache.size_num_blocks)
    max_num_tokens: int = 512
    max_num_rows: int = 64
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA only)
    # Also capture each decode graph with the penalty transforms (and allocate the penalty state up
    # front: (max_num_rows + 1) x vocab x 5 bytes); off: penalized steps sample eagerly.
    penalty_graphs: bool = True
    debug_placeholders: bool = False  # assert on the device that no placeholder sentinel survives carry-over
    # The busy figure's units in an eager forward (step_clock.py): "op" (every aten op, attention
    # kernel and layer), "leaf" (every leaf module instead of aten ops) or "layer" (layers and
    # attention kernels);
    # finer reads closer to a kernel timeline when the host is behind and costs host time
    # (bench/busy_check.py, bench/unit_cost.py).
    busy_units: BusyUnits = "leaf"


@dataclass(frozen=True)
class SamplingHints:
    """What the sampler may skip for a step, decided from the plan's host arrays (no device read)."""

    any_random: bool  # some sampled row has temperature > 0
    sort_filters: bool  # some random row uses top-k or top-p

    @classmethod
    def of(cls, plan: StepBatch, sampling: np.ndarray) -> SamplingHints:
        random_rows = sampling & (plan.temperature > 0)
        uses_sort = (plan.top_k[random_rows] > 0) | (plan.top_p[random_rows] < 1)
        return cls(any_random=bool(random_rows.any()), sort_filters=bool(uses_sort.any()))


@dataclass
class _Tail:
    """What a constrained step's sampling needs once its masks can be filled (after its forward)."""

    inputs: object
    # The sampled rows' logits [S, V]: the forward's output, a piecewise graph's (pool memory), or a
    # forward-only replay's (the decode graphs' shared buffer). None of them is written again before
    # the tail has been issued on the compute stream (see Engine.launch).
    logits: torch.Tensor
    num_sampled: int
    hints: SamplingHints
    pflags: PenaltyFlags
    constrained: Constrained


@dataclass
class _Launched:
    step_id: int
    slot: IOSlot
    num_rows: int
    sample: np.ndarray  # host copy of plan.sample (carry-over of the next step is checked against it)
    num_top: int
    start: object  # timing events (torch.cuda.Event or HostEvent)
    done: object
    prev_done: object | None
    state_digest: int = 0  # RowState.digest() after this plan, when it asked (check_state)
    constrained: Constrained | None = None  # its constrained rows, with the matchers its launch saw
    tail: _Tail | None = None  # sampling not issued yet: waits for the previous step's tokens
    grammar_ms: float = 0.0
    units: StepUnits | None = None  # CUDA: the step cut where the host's issue can fall behind (step_clock.py)


class Engine:
    """Model + paged KV cache + two I/O slots; see the module docstring."""

    def __init__(self, loaded: LoadedModel, cfg: EngineConfig, device: str,
                 grammar: GrammarEngine | None = None) -> None:
        self.loaded = loaded
        self.cfg = cfg
        self.device = device
        self.model = loaded.model
        install(self.model)
        dtype = next(self.model.parameters()).dtype
        kv_cfg = config_for_model(loaded.config, cfg.block_size, cfg.num_blocks, cfg.kv_cache_memory_gb,
                                  dtype, device)
        self.cache = PagedKVCache(kv_cfg)
        self.limits = SlotLimits(cfg.max_num_tokens, cfg.max_num_rows,
                                 -(-loaded.max_context // cfg.block_size), cfg.block_size)
        self.rows = RowState(cfg.max_num_rows, self.limits.max_blocks_per_row, cfg.block_size, kv_cfg.num_blocks,
                             loaded.max_context)
        # The block table of every row slot, on the device across steps; kernels and graphs read it in place.
        self.block_table = torch.full((cfg.max_num_rows, self.limits.max_blocks_per_row), -1, dtype=torch.int32,
                                      device=device)
        self.sync = DeviceSync(device)
        self.fwd = StepForward(self.model, self.cache, self.block_table, cfg.max_num_rows, cfg.debug_placeholders)
        # Penalties, logit bias, min_tokens: per-slot device state (penalties.py), big buffers on first
        # use or at graph capture; one staging buffer per I/O slot.
        self.slots = [IOSlot(i, self.limits, device, self.sync) for i in range(2)]
        self.penalties = PenaltyState(cfg.max_num_rows, loaded.vocab_size, device, num_staging=len(self.slots))
        self._timing = [(self.sync.event(timing=True), self.sync.event(timing=True)) for _ in range(_TIMING_RING)]
        # CUDA: busy time per step counted unit by unit, so a GPU starved by the host inside an eager or
        # piecewise step is not called busy (step_clock.py). Units: an eager forward's leaf modules and
        # layers, or a piecewise graph's segment and attention call per layer, plus the tail and the end.
        self.clock: StepClock | None = None
        if self.sync.cuda:
            layers = decoder_layers(self.model)
            # At least 3 a layer, above a piecewise step's 2 (segment and attention call); + tail and end.
            units = units_per_forward(layers, cfg.busy_units) + 8
            self.clock = StepClock(self.sync.compute_stream, _TIMING_RING, units)
            self.clock.hook_layers(layers, leaves=cfg.busy_units == "leaf")
        self._in_flight: deque[_Launched] = deque()
        self._ready: deque[StepResult] = deque()  # collected early (a launch needed its tokens), oldest first
        # Structured output: None when the worker has no grammar engine (no tokenizer, no xgrammar).
        self.grammar = StepGrammar(grammar, cfg.max_num_rows, loaded.vocab_size, device, len(self.slots)) \
            if grammar is not None else None
        self._last: _Launched | None = None
        self._launches = 0
        self.graphs: DecodeGraphs | None = None
        self.piecewise: dict[tuple[int, int], PiecewiseGraph] = {}  # (slot, token bucket): other steps
        self.token_buckets: list[int] = []
        self.penalty_graphs = cfg.penalty_graphs
        self.graph_memory_bytes = 0  # what capturing the graphs took from the device (reserved)
        # Steps by how they ran: "decode" / "penalized" (a decode graph without / with the penalty
        # transforms), "piecewise", "eager". Read by tests and logs; never by the launch path.
        # "constrained_decode": constrained decode steps that replayed the forward-only decode graph
        # (their tails sample eagerly). "deferred": constrained steps whose sampling waited for the
        # previous step's collect (counted besides how their forward ran).
        self.step_counts = {"decode": 0, "penalized": 0, "constrained_decode": 0, "piecewise": 0, "eager": 0,
                            "deferred": 0}
        if self.sync.cuda:
            torch.cuda.synchronize()  # weights and buffers were written on the default stream
            if cfg.cuda_graphs:
                capture_graphs(self)

    def paged_step(self, inputs, layout) -> PagedStep:
        return self.fwd.paged_step(inputs, layout)

    def forward(self, inputs, step: PagedStep, other: IOSlot, carries: bool, logits_to_keep) -> torch.Tensor:
        """Carry-over, then the model forward (step_forward.py); returns logits [kept tokens, V]."""
        return self.fwd.forward(inputs, step, other, carries, logits_to_keep)

    @property
    def is_async(self) -> bool:
        """Whether launch returns before the step is computed (CUDA) or after (CPU)."""
        return self.sync.cuda

    @property
    def num_in_flight(self) -> int:
        """Steps launched whose results `collect` has not returned yet."""
        return len(self._in_flight) + len(self._ready)

    @property
    def last_step_id(self) -> int:
        return self._last.step_id if self._last is not None else -1

    def reset_rows(self) -> None:
        """Every row slot empty, as in a fresh worker (a new scheduler session in process)."""
        assert not self._in_flight, "reset_rows with steps in flight"
        self.rows.reset()
        self.penalties.reset()
        if self.grammar is not None:
            self.grammar.reset()

    def reset_session(self) -> None:
        """A new scheduler session on this connection (RESET): the steps in flight are computed and
        dropped, every row slot emptied, and step ids count from 0 again."""
        while self.num_in_flight:
            self.collect()
        self.reset_rows()
        self._last = None

    # ----- host-side checks ------------------------------------------------------------------------
    def check_plan(self, plan: StepPlan) -> StepBatch:
        """Checks `plan` and applies it to the row slots; WireError (state untouched) if this worker
        cannot run it safely or correctly."""
        return self._check(plan)[1]

    def _check(self, plan: StepPlan) -> tuple[StepPlan, StepBatch]:
        """check_plan, also returning the plan as the penalties must see it (grammar_step.py)."""
        carry = plan.carry_index[plan.carry_index >= 0]
        if carry.size:
            prev = self._last
            if prev is None or plan.carry_from_step != prev.step_id:
                raise WireError(f"carry from step {plan.carry_from_step}, but the last step was "
                                f"{self.last_step_id}: only the immediately preceding step can be carried from")
            if np.any(carry >= prev.num_rows) or not np.all(prev.sample[carry]):
                raise WireError("carry_index points at a row that did not sample")
        PenaltyState.check(plan)
        starts = []
        if self.grammar is not None:
            plan, starts = self.grammar.prepare(plan, self.limits.max_num_tokens, self.limits.max_num_rows)
        elif np.any(plan.new_grammar >= 0):
            raise WireError("new_grammar: this worker has no grammar engine")
        batch = self.rows.prepare(plan, self.limits.max_num_tokens, self.loaded.vocab_size)
        if self.grammar is not None:
            self.grammar.commit(plan, starts)
        return plan, batch

    # ----- launch / collect ------------------------------------------------------------------------
    def launch(self, step_plan: StepPlan) -> None:
        """Issues `step_plan` (checked first; WireError leaves the engine untouched)."""
        if self._last is not None and self._last.tail is not None:
            # Its sampling waits for the step before it: collect that one now (kept for `collect`).
            self._ready.append(self._collect_next())
        assert len(self._in_flight) < len(self.slots), "both slots in flight: collect first"
        step_plan, plan = self._check(step_plan)
        digest = self.rows.digest() if step_plan.check_state else 0
        slot = self.slots[self._launches % 2]
        other = self.slots[(self._launches + 1) % 2]
        sampling = plan.sample.astype(bool)
        asked = plan.num_logprobs[sampling]
        num_top = int(asked.max(initial=0))
        start, done = self._timing[self._launches % _TIMING_RING]
        rows, num_sampled = plan.num_rows, int(sampling.sum())
        carries = bool(np.any(plan.carry_index >= 0))
        hints = SamplingHints.of(plan, sampling)
        prev = self._last
        # New slots' penalty parameters: the host mirrors now (this step's flags read them), the
        # device rows staged in this I/O slot's pinned buffer, copied on the h2d stream ahead of the
        # slot's bulk copy (its h2d_done covers both) and written on the compute stream below.
        staged = self.penalties.stage(step_plan, slot.index)
        if staged is not None:
            with self.sync.on(self.sync.h2d_stream):
                self.sync.h2d_stream.wait_event(slot.compute_done)  # its last step no longer reads it
                staged.issue_copy()
        pflags = self.penalties.flags(plan.rows[sampling])
        constrained = self.grammar.constrained(plan.rows[sampling], np.flatnonzero(sampling)) \
            if self.grammar is not None else None
        # Its tail waits for the step in flight (its tokens advance the matchers) unless none is.
        deferred = constrained is not None and bool(self._in_flight)
        tail = None

        # A decode step with penalized rows replays the graph variant that holds the transforms and
        # the count update, unless a row does not sample (the graph samples, and would count, every
        # row) or those variants were not captured; otherwise it samples eagerly after the forward.
        # A constrained decode step replays the forward-only variant instead (captured only with a
        # grammar engine; a decode graph samples inside: no room for the mask), then its tail samples
        # the sampled rows as after a piecewise graph, penalties included.
        penalized = pflags.any
        graphed = self.graphs is not None and (not penalized or (self.graphs.penalized and bool(plan.sample.all())))
        graphed = graphed and constrained is None
        forward_only = constrained is not None and self.graphs is not None and bool(self.graphs.forward_only)
        bucket = self.graphs.bucket_for(plan) if graphed or forward_only else None
        forward_only = forward_only and bucket is not None
        tokens = None
        if bucket is None and self.piecewise:
            tokens = next((b for b in self.token_buckets if b >= plan.num_tokens), None)
        if plan.append_slots.shape[0] > self.limits.max_appends:  # more than a slot carries (rare): apply now
            self._set_table_cells(plan)
            plan = dataclasses.replace(plan, append_slots=plan.append_slots[:0], append_cols=plan.append_cols[:0],
                                       append_blocks=plan.append_blocks[:0])
        appends = plan.append_slots.shape[0] > 0
        if bucket is not None:
            layout = decode_layout(bucket, self.limits.max_blocks_per_row)  # a graph's: no per-row layout to build
            # Forward-only: padding rows do not sample, so the tail's sampling inputs are the plan's own.
            inputs = slot.load(pad_decode_batch(plan, bucket, sample_all=not forward_only), layout)
        else:
            layout = row_layout(plan.query_start, plan.kv_lens, self.cache.cfg.block_size)
            # Rows (and sampled rows) never outnumber tokens: padding a piecewise graph's inputs to that
            # bound keeps lm_head small.
            pad_to = (tokens, min(tokens, self.limits.max_num_rows)) if tokens is not None else None
            inputs = slot.load(plan, layout, pad_to=pad_to)
        compute = self.sync.compute_stream
        with self.sync.on(compute), torch.inference_mode():
            compute.wait_event(slot.h2d_done)
            start.record(compute)
            units = self.clock.begin(self._launches) if self.clock is not None else None
            if staged is not None:
                self.penalties.commit(staged)
            if appends:  # on the compute stream: steps launched before this one have read the table already
                self.block_table.index_put_((inputs.append_slots.long(), inputs.append_cols.long()),
                                            inputs.append_blocks)
            if carries:
                assert prev is not None and prev.slot is other
            if forward_only:
                assert self.graphs is not None and constrained is not None
                # Every row's logits, in the decode graphs' shared buffer, which only a later replay
                # writes: this step's tail is issued before any later step's forward, in the compute
                # stream's order (a launch that finds the previous step's tail pending first collects
                # the step before it, and that collect issues the tail: `_collect_next`), so nothing
                # overwrites the rows before the tail has read them (nor while it masks them in place).
                logits = self.graphs.replay_forward_only(slot.index, bucket)
                if num_sampled < rows:  # rows that do not sample: the sampled ones, in a tensor of their own
                    logits = logits.index_select(0, inputs.sample_rows.to(torch.int64))
                else:
                    logits = logits[:num_sampled]
                tail = _Tail(inputs, logits, num_sampled, hints, pflags, constrained)
                self.step_counts["constrained_decode"] += 1
            elif bucket is not None:
                self._replay(slot, bucket, rows, num_top, hints.sort_filters, penalized)
                self.step_counts["penalized" if penalized else "decode"] += 1
            else:
                step = self.paged_step(inputs, layout)
                if tokens is not None:  # piecewise graph: logits of every padded sample row, real ones first
                    logits = self.piecewise[(slot.index, tokens)].replay(
                        step, units.boundary if units is not None else None)[:num_sampled]
                    self.step_counts["piecewise"] += 1
                else:
                    if self.clock is None:
                        logits = self.forward(inputs, step, other, carries, inputs.sample_tokens)
                    else:  # its hooks (and attention's kernels, and with "op" its aten ops) cut this forward only
                        assert units is not None
                        step.after_kernel = units.boundary
                        with self.clock.cut(units, ops=self.cfg.busy_units == "op"):
                            logits = self.forward(inputs, step, other, carries, inputs.sample_tokens)
                    self.step_counts["eager"] += 1
                if constrained is None:
                    self._sample_eager(slot, inputs, logits, rows, num_sampled, num_top, hints, pflags)
                else:
                    tail = _Tail(inputs, logits, num_sampled, hints, pflags, constrained)
            if tail is not None and units is not None:
                units.boundary()  # the forward apart from the tail, which may be issued much later
        launched = _Launched(plan.step_id, slot, rows, plan.sample.copy(), num_top, start, done,
                             prev.done if prev is not None else None, digest, constrained, tail, units=units)
        if deferred:
            self.step_counts["deferred"] += 1
        else:
            self._finish(launched)
        self._in_flight.append(launched)
        self._last = launched
        self._launches += 1

    def _finish(self, f: _Launched) -> None:
        """The end of a launch: a constrained step's tail (its masks filled now: the matchers have every
        earlier token), then `done`, compute_done and the outputs' copy."""
        compute = self.sync.compute_stream
        with self.sync.on(compute), torch.inference_mode():
            t = f.tail
            if t is not None:
                f.tail = None
                assert self.grammar is not None
                f.grammar_ms += self.grammar.fill(f.slot.index, t.constrained)
                self._sample_eager(f.slot, t.inputs, t.logits, f.num_rows, t.num_sampled, f.num_top, t.hints,
                                   t.pflags, t.constrained)
            if f.units is not None:
                f.units.close(f.done)
            f.done.record(compute)  # before compute_done: d2h_done then implies `done` completed
            f.slot.compute_done.record(compute)
        f.slot.issue_d2h(f.num_rows, f.num_top)

    def _set_table_cells(self, plan: StepBatch) -> None:
        """Block-table cells of a plan too large for an I/O slot, set with their own copy, in stream order."""
        idx = torch.from_numpy(np.stack([plan.append_slots, plan.append_cols]).astype(np.int64)).to(self.device)
        blocks = torch.from_numpy(plan.append_blocks).to(self.device)
        with self.sync.on(self.sync.compute_stream):
            self.block_table.index_put_((idx[0], idx[1]), blocks)

    def _replay(self, slot: IOSlot, bucket: int, rows: int, num_top: int, sort_filters: bool,
                penalized: bool) -> None:
        """A graphed decode step; top-n logprobs, when asked, from the graph's logits right after
        (with penalties, the transformed logits, rounded to the model's dtype)."""
        assert self.graphs is not None
        step = self.graphs.replay(slot.index, bucket, sort_filters, penalized)
        if num_top:
            vals, ids = torch.topk(step.logits[:rows], num_top, dim=-1)
            top_ids, top_lp = slot.out_top(rows, num_top)
            top_ids.copy_(ids)
            top_lp.copy_(vals.float() - step.lse[:rows, None])

    def _sample_eager(self, slot: IOSlot, inputs, logits: torch.Tensor, rows: int, num_sampled: int,
                      num_top: int, hints: SamplingHints, pflags: PenaltyFlags = NONE,
                      constrained: Constrained | None = None) -> None:
        """Samples the rows that sample and writes every row's outputs (-1 / 0 for the others).
        With penalized rows, their transforms first and their tokens counted right after, on the
        device, so the next step (maybe built before this one's tokens reach the host) sees them.
        Constrained rows: their bitmasks after the penalties (a masked token stays -inf)."""
        sampled = slot.out_sampled(rows)
        sampled.fill_(-1)
        logprob = slot.out_logprob(rows)
        logprob.fill_(0.0)
        top_ids, top_lp = slot.out_top(rows, num_top)
        top_ids.fill_(-1)
        top_lp.fill_(0.0)
        if num_sampled:
            where = inputs.sample_rows.to(torch.int64)
            if pflags.any:
                slots = inputs.table_rows.index_select(0, where).to(torch.int64)
                logits = self.penalties.apply(logits, slots, inputs.counter, pflags)
            if constrained is not None:  # in place: the forward's (or a graph's) output, read once
                assert self.grammar is not None
                self.grammar.apply(slot.index, constrained, logits)
            res = sample(logits, inputs.temperature, inputs.top_p, inputs.top_k,
                         inputs.min_p, inputs.seed, inputs.counter, num_top,
                         sort_filters=hints.sort_filters, any_random=hints.any_random)
            if pflags.any:
                self.penalties.record(slots, res.token_ids, pflags)
            sampled.index_copy_(0, where, res.token_ids)
            logprob.index_copy_(0, where, res.logprob)
            if num_top:
                top_ids.index_copy_(0, where, res.top_ids)
                top_lp.index_copy_(0, where, res.top_logprobs)

    def collect(self) -> StepResult:
        """Waits for the oldest launched step and returns its result."""
        if self._ready:
            return self._ready.popleft()
        return self._collect_next()

    def _collect_next(self) -> StepResult:
        """Waits for the oldest step in flight; its tokens advance the matchers, and the next step's
        tail, if it waited for them, is issued before this returns."""
        f = self._in_flight.popleft()
        assert f.tail is None, "collecting a step whose sampling was never issued"
        sampled, logprob, top_ids, top_lp = f.slot.read_outputs(f.num_rows, f.num_top)
        # A graphed step samples every row (fixed shapes); rows the plan did not ask for read as unsampled.
        idle = f.sample == 0
        if idle.any():
            sampled[idle], logprob[idle], top_ids[idle], top_lp[idle] = -1, 0.0, -1, 0.0
        if f.constrained is not None:
            assert self.grammar is not None
            t0 = time.perf_counter()
            refused = self.grammar.accept(f.constrained, sampled)
            f.grammar_ms += (time.perf_counter() - t0) * 1000
            if refused.size:  # a token outside the grammar: only broken logits sample one (NaN marks them)
                log.error("step %d: %d constrained rows sampled a token their grammar refuses", f.step_id,
                          refused.size)
                logprob[refused] = np.nan
        nxt = self._in_flight[0] if self._in_flight else None
        if nxt is not None and nxt.tail is not None:
            self._finish(nxt)  # its forward is running: the host fills its masks meanwhile
        f.done.synchronize()
        span_ms = f.start.elapsed_time(f.done)
        compute_ms = min(span_ms, f.units.busy_ms(f.start)) if f.units is not None else span_ms
        idle_ms = max(0.0, f.prev_done.elapsed_time(f.start)) if f.prev_done is not None else 0.0
        idle_ms += span_ms - compute_ms  # inside the span, waiting for the host
        return StepResult(
            step_id=f.step_id,
            sampled=sampled,
            compute_ms=compute_ms,
            idle_gap_ms=idle_ms,
            state_digest=f.state_digest,
            logprob=logprob,  # always: NaN marks a row with broken logits (see sampler.py)
            top_ids=top_ids if f.num_top else None,
            top_logprobs=top_lp if f.num_top else None,
            grammar_ms=f.grammar_ms,
        )

    def execute(self, plan: StepPlan) -> StepResult:
        """Synchronous launch + collect (nothing else may be in flight)."""
        assert not self._in_flight, "execute() with steps in flight; collect them first"
        self.launch(plan)
        return self.collect()

