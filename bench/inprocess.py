"""The engine without processes: the real Scheduler driving an in-process worker Engine.

Owns the pipelined loop that the scheduler process and the worker loop run across ZeroMQ, collapsed
into one thread, so that benchmarks can measure the engine alone ("engine-only") and tests can run
the GPU path without sockets. At depth 2, step N+1 is launched before step N is collected: the host
plans while the device computes, exactly as across the link.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tandem.wire import PLACEHOLDER_SENTINEL

from scheduler_svc.core.request import Request, SamplingParams
from scheduler_svc.core.scheduler import Scheduler, SchedulerLimits

HOST_PARTS = ("build", "launch", "collect", "process")


@dataclass
class LoopStats:
    wall_s: float = 0.0
    steps: int = 0
    compute_ms: float = 0.0
    idle_gap_ms: float = 0.0
    outputs: dict[str, list[int]] = field(default_factory=dict)
    prefix_hits: int = 0  # prompt tokens the prefix cache served (with prefix_caching)
    # Host time by part, summed over the run (ms): build = Scheduler.build_plan, launch = Engine.launch
    # (plan checks, inputs, the graph's replay issued), collect = Engine.collect (mostly waiting for the
    # device: the host's slack), process = Scheduler.accept_result + take_events (the latter after the next
    # launch, as the core settles a result's rows after sending the next plan). build + launch + process is
    # the host's own work per step, all of which must fit under a device step.
    host_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(HOST_PARTS, 0.0))

    def host_ms_per_step(self) -> dict[str, float]:
        return {k: round(v / self.steps, 4) for k, v in self.host_ms.items()} if self.steps else {}

    @property
    def busy_ratio(self) -> float:
        """Device busy fraction over the run: step compute time / (compute + idle gaps between steps)."""
        total = self.compute_ms + self.idle_gap_ms
        return self.compute_ms / total if total else 0.0


def scheduler_for(engine, depth: int, max_waiting: int = 100_000, check_state: bool = False,
                  prefix_caching: bool = False) -> Scheduler:
    """A Scheduler sized like the scheduler process sizes one from the engine's handshake; it sends the
    placeholder sentinel when the engine runs in debug-placeholder mode. A new scheduler is a new
    session: the engine's row slots are emptied, as a worker process starts empty."""
    engine.reset_rows()
    return Scheduler(SchedulerLimits(
        num_blocks=engine.cache.cfg.num_blocks, block_size=engine.cache.cfg.block_size,
        max_num_tokens=engine.limits.max_num_tokens, max_num_rows=engine.limits.max_num_rows,
        max_blocks_per_row=engine.limits.max_blocks_per_row, max_context=engine.loaded.max_context,
        max_waiting=max_waiting, pipeline_depth=depth,
        placeholder=PLACEHOLDER_SENTINEL if engine.cfg.debug_placeholders else 0,
        num_slots=engine.limits.max_num_rows, check_state=check_state, prefix_caching=prefix_caching,
    ))


def greedy_requests(prompts: list[list[int]], max_new: int) -> list[Request]:
    """A benchmark's requests: greedy, EOS ignored, each generating exactly `max_new` tokens."""
    return [Request(req_id=f"r{i}", prompt_ids=p, max_new_tokens=max_new,
                    sampling=SamplingParams(temperature=0.0, seed=i), stop_token_ids=frozenset(),
                    eos_token_ids=frozenset(), ignore_eos=True, arrival_time=time.monotonic())
            for i, p in enumerate(prompts)]


def run_requests(engine, requests: list[Request], depth: int, prefix_caching: bool = False) -> LoopStats:
    """Runs `requests` to completion at pipeline depth 1 or 2; returns outputs and timings. (Depth 3 is a
    link's: its third plan waits in the worker's socket, which one thread has not got.)"""
    assert depth in (1, 2), depth
    sched = scheduler_for(engine, depth, prefix_caching=prefix_caching)
    for r in requests:
        sched.add(r)
    stats = LoopStats()
    host = stats.host_ms
    clock = time.perf_counter
    t0 = clock()
    unsettled = False
    while not sched.is_idle:
        while sched.in_flight < depth:
            a = clock()
            built = sched.build_plan()
            b = clock()
            host["build"] += 1000 * (b - a)
            if built is None:
                break
            engine.launch(built[0])
            host["launch"] += 1000 * (clock() - b)
        if unsettled:  # the last result's rows, once the next step is launched (as the core does)
            a = clock()
            sched.take_events()
            host["process"] += 1000 * (clock() - a)
            unsettled = False
        a = clock()
        result = engine.collect()
        b = clock()
        host["collect"] += 1000 * (b - a)
        stats.steps += 1
        stats.compute_ms += result.compute_ms
        if stats.steps > 1:  # the first step's gap is the time since the previous run
            stats.idle_gap_ms += result.idle_gap_ms
        sched.accept_result(result)
        unsettled = True
        host["process"] += 1000 * (clock() - b)
    sched.take_events()
    stats.wall_s = clock() - t0
    stats.outputs = {r.req_id: list(r.output_ids) for r in requests}
    stats.prefix_hits = sched.blocks.hits
    return stats
