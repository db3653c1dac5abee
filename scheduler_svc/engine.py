"""The scheduler process's engine loop: requests in, step plans out, step results back to requests.

Owns the pipeline: at depth 1 (synchronous) one step is in flight and the worker idles while the
scheduler plans the next; at depth 2 (asynchronous) the next plan is built and sent while the
worker computes the current one, its decode rows carrying the pending tokens over on the worker.
Everything runs on the asyncio loop: results are processed, then the pipeline is topped up, in the
same callback, so a plan is never built from stale state. One `WorkerSession` per connected worker:
a worker that dies takes its session (allocator, in-flight steps) with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
import zmq
from tandem import wire

from scheduler_svc.handle import RequestHandle
from scheduler_svc.link import EngineLink
from scheduler_svc.metrics import Metrics
from scheduler_svc.request import FinishReason
from scheduler_svc.scheduler import Scheduler, SchedulerLimits
from scheduler_svc.tokenizer import TandemTokenizer

log = logging.getLogger("tandem.engine")
rlog = structlog.get_logger("tandem.requests")  # one canonical line per finished request


class Unavailable(Exception):
    """No worker is connected (or it just went away)."""


@dataclass
class EngineConfig:
    pipeline_depth: int = 0  # 0 = auto: 2 when the worker computes asynchronously (CUDA), else 1
    max_waiting: int = 256
    max_num_rows: int = 0  # 0 = the worker's limit
    step_timeout_s: float = 60.0  # watchdog: no result for this long with steps in flight = dead worker
    max_num_tokens: int = 0  # 0 = the worker's limit
    debug_placeholders: bool = False  # carry-over placeholders are wire.PLACEHOLDER_SENTINEL, not 0
    debug_check_state: bool = False  # every step, the worker's row slots are checked against ours (digest)


@dataclass
class BusyMeter:
    """Worker busy fraction from the compute times the worker measures per step."""

    compute_ms: float = 0.0
    idle_gap_ms: float = 0.0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, result: wire.StepResult) -> None:
        self.compute_ms += result.compute_ms
        self.idle_gap_ms += result.idle_gap_ms
        self.steps += 1

    @property
    def busy_ratio(self) -> float:
        total = self.compute_ms + self.idle_gap_ms
        return self.compute_ms / total if total > 0 else 0.0


@dataclass
class WorkerSession:
    peer: bytes
    hello: wire.Hello
    tokenizer: TandemTokenizer
    scheduler: Scheduler
    flushed: bool = False  # a FLUSH went out since the last plan
    meter: BusyMeter = field(default_factory=BusyMeter)


class Engine:
    def __init__(self, link: EngineLink, config: EngineConfig,
                 on_serving_change: Callable[[bool], None] | None = None) -> None:
        assert config.pipeline_depth in (0, 1, 2)
        self.link = link
        self.config = config
        self.session: WorkerSession | None = None
        self.handles: dict[str, RequestHandle] = {}
        self._on_serving_change = on_serving_change or (lambda serving: None)
        self.last_session_stats: dict[str, float] = {}
        self.requests_finished = 0
        self.depth = config.pipeline_depth  # resolved per worker when it is 0 (auto)
        self._serving_event = asyncio.Event()
        self.metrics = Metrics()
        self.draining = False  # shutting down: admit nothing new, let what runs finish
        self._last_progress = time.monotonic()  # last step result, or the first send after an idle spell

    # ----- public API used by the gRPC servicer -------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self.session is not None

    async def wait_serving(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._serving_event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def tokenizer(self) -> TandemTokenizer:
        if self.session is None:
            raise Unavailable("no worker connected")
        return self.session.tokenizer

    def hello(self) -> wire.Hello:
        if self.session is None:
            raise Unavailable("no worker connected")
        return self.session.hello

    def submit(self, handle: RequestHandle) -> None:
        """Admits a request; raises Unavailable, QueueFull or NeverFits (nothing is kept then)."""
        if self.draining:
            raise Unavailable("shutting down")
        if self.session is None:
            raise Unavailable("no worker connected")
        self.session.scheduler.add(handle.request)
        self.handles[handle.req_id] = handle
        self.metrics.admitted(len(handle.request.prompt_ids))
        self._pump()
        self._update_load()

    def abort(self, req_id: str) -> None:
        """Client cancel or deadline: idempotent; KV blocks come back once in-flight steps report."""
        handle = self.handles.pop(req_id, None)
        if handle is not None:
            handle.complete(FinishReason.ABORTED)
            self._record_finish(handle)
        if self.session is not None:
            self.session.scheduler.abort(req_id)
            self._pump()
            self._check_idle()
            self._update_load()

    def start_drain(self) -> None:
        """Shutdown begins: new requests get UNAVAILABLE, requests in flight go on."""
        self.draining = True

    def fail_remaining(self, code: grpc.StatusCode, message: str) -> int:
        """Ends every request still in flight with `code`; their KV blocks return as steps report."""
        handles, self.handles = self.handles, {}
        for handle in handles.values():
            handle.fail(code, message)
            if self.session is not None:
                self.session.scheduler.abort(handle.req_id)
        if self.session is not None:
            self._pump()
            self._check_idle()
        return len(handles)

    def _record_finish(self, handle: RequestHandle) -> None:
        c = handle.completion
        if c is not None:
            reason = c.finish_reason.name.lower()
            self.metrics.finished(reason, c.total_s, c.queue_s)
            rlog.info("request finished", request_id=handle.client_request_id, prompt_tokens=c.prompt_tokens,
                      output_tokens=c.completion_tokens, finish_reason=reason, ttft_s=round(c.ttft_s, 6),
                      total_s=round(c.total_s, 6), queue_s=round(c.queue_s, 6))

    def _update_load(self) -> None:
        s = self.session
        if s is not None:
            sch = s.scheduler
            self.metrics.set_load(sch.num_running, sch.num_waiting, sch.kv_usage, s.meter.busy_ratio,
                                  sch.num_preemptions)

    def stats(self) -> dict[str, float]:
        s = self.session
        if s is None:
            return dict(self.last_session_stats)
        return {
            "running": s.scheduler.num_running,
            "waiting": s.scheduler.num_waiting,
            "kv_usage": s.scheduler.kv_usage,
            "preemptions": s.scheduler.num_preemptions,
            "kv_blocks_total": s.hello.num_blocks,
            "kv_blocks_free": s.scheduler.blocks.num_free,
            "steps": s.meter.steps,
            "busy_ratio": s.meter.busy_ratio,
            "compute_ms": s.meter.compute_ms,
            "idle_gap_ms": s.meter.idle_gap_ms,
        }

    # ----- the loop ----------------------------------------------------------------------------------
    async def run(self) -> None:
        await asyncio.gather(self._recv_loop(), self.link.watch_disconnects(self._on_disconnect), self._watchdog())

    async def _watchdog(self) -> None:
        """A worker that is connected but returns no step result for `step_timeout_s` while steps are
        in flight (a hang, a deadlocked device) is treated as dead, like a disconnected one."""
        timeout = self.config.step_timeout_s
        while timeout > 0:
            await asyncio.sleep(min(1.0, timeout / 4))
            s = self.session
            if s is not None and s.scheduler.in_flight and time.monotonic() - self._last_progress > timeout:
                log.error("no step result for %.1f s with %d steps in flight: treating the worker as dead",
                          time.monotonic() - self._last_progress, s.scheduler.in_flight)
                self._lose_worker(f"worker unresponsive (no step result in {timeout:g} s)")

    async def _recv_loop(self) -> None:
        while True:
            msg = await self.link.recv()
            try:
                if msg.kind == wire.KIND_HELLO:
                    self._on_hello(msg.peer, wire.Hello.from_header(msg.header))
                elif msg.kind == wire.KIND_RESULT:
                    self._on_result(msg.peer, wire.StepResult.decode(msg.header, msg.frames))
                else:
                    log.warning("unexpected %r from worker", msg.kind)
            except wire.WireError as exc:
                log.warning("dropping malformed %r from worker: %s", msg.kind, exc)
            except Exception:
                log.exception("engine failure handling %r; dropping the worker session", msg.kind)
                self._lose_worker("internal error in the scheduler engine", grpc.StatusCode.INTERNAL)

    def _on_hello(self, peer: bytes, hello: wire.Hello) -> None:
        if hello.protocol_version != wire.PROTOCOL_VERSION:
            log.error("worker speaks protocol %d, we speak %d", hello.protocol_version, wire.PROTOCOL_VERSION)
            return
        if self.session is not None:
            self._lose_worker("worker restarted")
        self.depth = self.config.pipeline_depth or auto_depth(hello.device)
        limits = SchedulerLimits(
            num_blocks=hello.num_blocks,
            block_size=hello.block_size,
            max_num_tokens=_cap(hello.max_num_tokens, self.config.max_num_tokens),
            max_num_rows=_cap(hello.max_num_rows, self.config.max_num_rows),
            max_blocks_per_row=hello.max_blocks_per_row,
            max_context=hello.max_context,
            max_waiting=self.config.max_waiting,
            pipeline_depth=self.depth,
            placeholder=wire.PLACEHOLDER_SENTINEL if self.config.debug_placeholders else 0,
            num_slots=hello.max_num_rows,
            check_state=self.config.debug_check_state,
        )
        self.session = WorkerSession(peer, hello, TandemTokenizer.from_hello(hello), Scheduler(limits))
        log.info(
            "worker %s connected: model %s on %s (%s), %d KV blocks x %d tokens, context %d, depth %d",
            hello.worker_id, hello.model_name, hello.device, hello.dtype, hello.num_blocks,
            hello.block_size, hello.max_context, self.depth,
        )
        self._serving_event.set()
        self._on_serving_change(True)

    def _on_result(self, peer: bytes, result: wire.StepResult) -> None:
        s = self.session
        if s is None or peer != s.peer:
            return  # a late result from a worker we already gave up on
        self._last_progress = time.monotonic()
        s.meter.add(result)
        info = s.scheduler.oldest_in_flight
        if info is not None and info.step_id == result.step_id:
            self.metrics.step_done(info.num_tokens == len(info.requests), result.compute_ms / 1000)
        events = s.scheduler.process_result(result)
        # The next plan goes out before any per-token client work (detokenising, stop strings,
        # waking RPCs): that work is off the worker's critical path. A stop string found below
        # finishes its request one step late at most, the overrun the scheduler already discards.
        self._pump()
        now = time.monotonic()
        metrics = self.metrics
        for ev in events:
            handle = self.handles.get(ev.request.req_id)
            if handle is None:
                continue
            if ev.error is not None:  # only this request: its batch-mates go on
                log.error("request %s: %s", handle.client_request_id, ev.error)
                handle.fail(grpc.StatusCode.INTERNAL, ev.error)
                del self.handles[handle.req_id]
                continue
            if handle.first_token_at is None:
                metrics.first_token(now - handle.accepted_at)
            else:
                metrics.next_token(now - handle.last_token_at)
            matched = handle.on_token(ev.token_id, ev.logprob, ev.top, ev.finish, now)
            if matched is not None:
                s.scheduler.finish(handle.req_id, FinishReason.STOP_STRING)
                handle.complete(FinishReason.STOP_STRING, stop_string=matched)
            elif ev.finish is not None:
                handle.complete(ev.finish)
            if handle.done:
                del self.handles[handle.req_id]
                self.requests_finished += 1
                self._record_finish(handle)
        self._pump()
        self._check_idle()
        self._update_load()

    def _pump(self) -> None:
        """Tops the pipeline up to its depth; asks for pending results when nothing more can go."""
        s = self.session
        if s is None:
            return
        depth = self.depth
        try:
            while s.scheduler.in_flight < depth:
                built = s.scheduler.build_plan()
                if built is None:
                    break
                plan, _info = built
                if s.scheduler.in_flight == 1:  # the pipeline was empty: the clock starts now
                    self._last_progress = time.monotonic()
                self.link.send(s.peer, plan.encode())
                s.flushed = False
            else:
                return  # stopped by the depth limit: the worker returns a result as the next step launches
            if s.scheduler.in_flight > 0 and not s.flushed:
                self.link.send(s.peer, wire.flush_message())
                s.flushed = True
        except zmq.ZMQError as exc:
            log.warning("worker unreachable (%s)", exc)
            self._lose_worker("worker disconnected")

    def _check_idle(self) -> None:
        s = self.session
        if s is not None and s.scheduler.is_idle:
            s.scheduler.check_integrity()

    async def _on_disconnect(self) -> None:
        """A connection dropped: find out whether it was our worker's (the probe raises if so)."""
        for _ in range(5):
            s = self.session
            if s is None:
                return
            try:
                self.link.send(s.peer, wire.flush_message())
            except zmq.ZMQError:
                self._lose_worker("worker disconnected")
                return
            await asyncio.sleep(0.05)

    def _lose_worker(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        s = self.session
        if s is None:
            return
        self.last_session_stats = self.stats()
        self.metrics.end_session(s.scheduler.num_preemptions)
        self.session = None
        self._serving_event.clear()
        self._on_serving_change(False)
        s.scheduler.drain()
        handles, self.handles = self.handles, {}
        for handle in handles.values():
            handle.fail(code, reason)
        log.warning("%s: failed %d requests, not serving until a worker connects", reason, len(handles))


def auto_depth(device: str) -> int:
    """Run ahead only where the worker's device computes while the host plans (CUDA). On a CPU worker
    the "device" is the cores the scheduler needs too: measured on 2 cores (docs/benchmarks.md),
    depth 2 only adds contention, so auto picks the synchronous loop there."""
    return 2 if device.startswith("cuda") else 1


def _cap(worker_limit: int, ours: int) -> int:
    return min(worker_limit, ours) if ours > 0 else worker_limit
