"""The core's engine loop: requests in, step plans out, step results back as token batches.

Runs in the scheduler's core process (scheduler_svc/core/__main__.py), apart from the front end (gRPC,
detokenizing, stop strings: frontend/engine_client.py), so that no per-stream work ever delays the next plan.
Owns the pipeline: at depth 1 (synchronous) one step is in flight and the worker idles while the
scheduler plans the next; at depth 2 (asynchronous) the next plan is built and sent while the
worker computes the current one, its decode rows carrying the pending tokens over on the worker.
Depth 3 (opt-in) sends one plan more: the worker still launches at most two steps, and the third
waits in its socket, so that the core's part of the chain (result in, plan out) and the worker's
(launch) each have a whole device step to fit in, instead of sharing one.
Everything runs on the asyncio loop: results are processed, then the pipeline is topped up, then the
step's tokens go to the front end, in the same callback, so a plan is never built from stale state.
One `WorkerSession` per connected worker: a worker that dies takes its session (allocator, in-flight
steps) with it, and the front end is told (LOST). The requests it held are not lost with it: they
are held, with the tokens they have, for `worker_reconnect_timeout_s`, and new ones queue beside
them; when a worker connects they are scheduled again and recompute what they had. The worker's
sampler draws from a counter-based RNG keyed by (seed, position), so a greedy or seeded request
produces the very tokens it would have without the loss. Only past the timeout do they end.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import zmq
from tandem import wire
from tandem.v1 import core_pb2 as cpb

from scheduler_svc.core.core_link import (
    KIND_ABORT,
    KIND_ADMITTED,
    KIND_LOST,
    KIND_SERVING,
    KIND_STATS,
    KIND_SUBMIT,
    CoreLink,
    OutputBatch,
)
from scheduler_svc.core.grammar_book import FAILED, READY, GrammarBook
from scheduler_svc.core.link import EngineLink
from scheduler_svc.core.request import Constraint, FinishReason, Request, SamplingParams
from scheduler_svc.core.scheduler import NeverFits, QueueFull, Scheduler, SchedulerLimits, TokenEvent, check_fits

log = logging.getLogger("tandem.engine")

MAX_REFUSALS = 3  # refused plans within REFUSALS_WINDOW_S after which the requests fail, not resume
REFUSALS_WINDOW_S = 60.0


@dataclass
class EngineConfig:
    pipeline_depth: int = 0  # 0 = auto: 2 when the worker computes asynchronously (CUDA), else 1; 3 opt-in
    max_waiting: int = 256
    max_num_rows: int = 0  # 0 = the worker's limit
    step_timeout_s: float = 60.0  # watchdog: no result for this long with steps in flight = dead worker
    max_num_tokens: int = 0  # 0 = the worker's limit
    debug_placeholders: bool = False  # carry-over placeholders are wire.PLACEHOLDER_SENTINEL, not 0
    debug_check_state: bool = False  # every step, the worker's row slots are checked against ours (digest)
    prefix_caching: bool = True  # full KV blocks are kept and shared by requests with the same prefix
    step_trace: str = ""  # a file: one JSON line per submit, plan and result (for diagnosing schedules)
    worker_reconnect_timeout_s: float = 60.0  # requests of a lost worker wait this long for the next (0 = fail)


@dataclass
class BusyMeter:
    """Worker busy fraction from the compute times the worker measures per step.

    The worker reports each step's idle gap as the time from the previous step's end to this one's
    start. A step planned when the pipeline was empty because there was no work (a request arrived
    at an idle server, or a grammar finished compiling) carries the whole idle time as its gap: the
    GPU was idle with nothing to do, not because the host was late, so that gap is left out
    (`idle_without_work_ms` keeps it). Gaps of steps planned from a result always count: in sync
    mode that is the host's planning time, the very idleness the meter exists to show."""

    compute_ms: float = 0.0
    idle_gap_ms: float = 0.0
    idle_without_work_ms: float = 0.0
    steps: int = 0
    started: float = field(default_factory=time.monotonic)
    after_idle: set[int] = field(default_factory=set)  # step ids planned into an empty, workless pipeline

    def add(self, result: wire.StepResult) -> None:
        self.compute_ms += result.compute_ms
        if result.step_id in self.after_idle:
            self.after_idle.discard(result.step_id)
            self.idle_without_work_ms += result.idle_gap_ms
        else:
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
    scheduler: Scheduler
    flushed: bool = False  # a FLUSH went out since the last plan
    meter: BusyMeter = field(default_factory=BusyMeter)
    grammars: GrammarBook = field(default_factory=GrammarBook)  # constraints the worker holds compiled


class Engine:
    """The core's loop over its two links: `front` (the front end: requests in, tokens out) and
    `link` (the worker: plans out, results in)."""

    def __init__(self, link: EngineLink, front: CoreLink, config: EngineConfig, instance_token: str = "") -> None:
        assert config.pipeline_depth in (0, 1, 2, 3)
        self.link = link
        # When set, only a worker whose HELLO carries it is served (it belongs to this instance); kept
        # out of EngineConfig, which travels on the core's command line.
        self.instance_token = instance_token
        self.front = front
        self.config = config
        self.session: WorkerSession | None = None
        self.depth = config.pipeline_depth  # resolved per worker when it is 0 (auto)
        self._by_uid: dict[int, Request] = {}  # every request the scheduler holds, by the front end's uid
        self._last_progress = time.monotonic()  # last step result, or the first send after an idle spell
        self.last_session_stats = cpb.Stats()
        # Requests held through a worker loss, in arrival order, and since when; the lost session's limits
        # (to refuse what can never fit) while no worker is connected.
        self._held: list[Request] = []
        self._held_since: float | None = None
        self._held_limits: SchedulerLimits | None = None
        self.resumed_total = 0
        self._refusals: list[float] = []  # when the worker refused a plan (REFUSED), recent ones
        self._trace = open(config.step_trace, "a", buffering=1 << 20) if config.step_trace else None  # noqa: SIM115

    def trace(self, event: str, **fields: object) -> None:
        """--step-trace: what the core saw when (monotonic clock, shared by the processes of one host)."""
        if self._trace is not None:
            self._trace.write(json.dumps({"ev": event, "t": time.monotonic(), **fields}) + "\n")

    def close(self, bye: bool = False) -> bool:
        """With `bye` (an orderly shutdown) the worker is told, so it exits 0 and logs no error; returns
        whether a BYE was queued (the link must then linger a moment to send it)."""
        sent = False
        if bye and self.session is not None:
            try:
                self.link.send(self.session.peer, wire.bye_message())
                sent = True
            except zmq.ZMQError:
                pass
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        return sent

    # ----- the loops ---------------------------------------------------------------------------------
    async def run(self) -> None:
        await asyncio.gather(self._recv_worker(), self._recv_front(),
                             self.link.watch_disconnects(self._on_disconnect), self._watchdog(),
                             self._reconnect_watchdog())

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

    async def _reconnect_watchdog(self) -> None:
        """Requests held through a worker loss end UNAVAILABLE once no worker has connected for
        `worker_reconnect_timeout_s`."""
        timeout = self.config.worker_reconnect_timeout_s
        while timeout > 0:
            await asyncio.sleep(min(0.25, timeout / 4))
            if self._held_since is not None and time.monotonic() - self._held_since > timeout:
                self._fail_held(f"worker lost, and none connected within {timeout:g} s")

    def _fail_held(self, reason: str) -> None:
        n = len(self._held)
        self._held, self._held_since, self._held_limits = [], None, None
        self._by_uid.clear()
        self.front.send(KIND_LOST, cpb.Lost(code=grpc.StatusCode.UNAVAILABLE.value[0], reason=reason,
                                            last=self.last_session_stats).SerializeToString())
        log.warning("%s: %d requests held through the loss end UNAVAILABLE", reason, n)

    async def _recv_worker(self) -> None:
        while True:
            msg = await self.link.recv()
            try:
                if msg.kind == wire.KIND_HELLO:
                    self._on_hello(msg.peer, wire.Hello.from_header(msg.header))
                elif msg.kind == wire.KIND_RESULT:
                    self._on_result(msg.peer, wire.StepResult.decode(msg.header, msg.frames))
                elif msg.kind == wire.KIND_REFUSED:
                    self._on_refused(msg.peer, *wire.decode_refused(msg.header))
                elif msg.kind == wire.KIND_COMPILED:
                    self._on_compiled(msg.peer, *wire.decode_compiled(msg.header))
                else:
                    log.warning("unexpected %r from worker", msg.kind)
            except wire.WireError as exc:
                log.warning("dropping malformed %r from worker: %s", msg.kind, exc)
            except Exception:
                log.exception("engine failure handling %r; dropping the worker session", msg.kind)
                self._lose_worker("internal error in the scheduler engine", grpc.StatusCode.INTERNAL)
                if msg.kind == wire.KIND_RESULT:  # a fresh session for the worker (not for a HELLO that
                    self._reset_worker(msg.peer)  # failed: resetting would only make it fail again)

    async def _recv_front(self) -> None:
        while True:
            kind, header, _frames = await self.front.recv()
            if kind == KIND_SUBMIT:
                self._on_submit(cpb.Submit.FromString(header))
            elif kind == KIND_ABORT:
                msg = cpb.Abort.FromString(header)
                self._on_abort(list(msg.uids), FinishReason(msg.reason))
            elif kind == KIND_STATS:
                self.front.send(KIND_STATS, self.stats(cpb.Stats.FromString(header).nonce).SerializeToString())
            else:
                log.warning("unexpected %r from the front end", kind)

    # ----- requests ----------------------------------------------------------------------------------
    def _on_submit(self, msg: cpb.Submit) -> None:
        refusal, why = cpb.ACCEPTED, ""
        s = self.session
        if s is None and self._held_since is None:
            refusal, why = cpb.NO_WORKER, "no worker connected"
        else:
            req = Request(
                req_id=msg.req_id, prompt_ids=list(msg.prompt_ids), max_new_tokens=msg.max_new_tokens,
                sampling=SamplingParams(temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k,
                                        min_p=msg.min_p, seed=msg.seed, num_logprobs=msg.num_logprobs,
                                        repetition_penalty=msg.repetition_penalty,
                                        presence_penalty=msg.presence_penalty,
                                        frequency_penalty=msg.frequency_penalty,
                                        logit_bias=dict(sorted(msg.logit_bias.items())), min_tokens=msg.min_tokens),
                stop_token_ids=frozenset(msg.stop_token_ids), eos_token_ids=frozenset(msg.eos_token_ids),
                ignore_eos=msg.ignore_eos, arrival_time=msg.arrival_time, client_id=msg.client_id, uid=msg.uid,
                cache_salt=msg.cache_salt,
                constraint=Constraint(msg.constraint_kind, msg.constraint_spec) if msg.constraint_kind else None,
                # Sample i > 0 of n waits for the first to compute the prompt (scheduler.py); a leader
                # already gone (finished, aborted) leaves nothing to wait for.
                leader=self._by_uid.get(msg.leader_uid) if msg.leader_uid else None,
            )
            try:
                if s is not None and req.constraint is not None:
                    check_fits(s.scheduler.limits, req)  # before compiling for a request that never fits
                    state, why = s.grammars.admit(req)
                    if state == FAILED:
                        refusal = cpb.GRAMMAR_INVALID
                    elif state != READY:  # ADMITTED once the worker has compiled it (_on_compiled)
                        self._send_grammar_work(s)
                        return
                if refusal == cpb.ACCEPTED:
                    self._accept(req)
            except QueueFull as exc:
                refusal, why = cpb.QUEUE_FULL, str(exc)
            except NeverFits as exc:
                refusal, why = cpb.NEVER_FITS, str(exc)
        self._admitted(msg.uid, refusal, why)

    def _accept(self, req: Request) -> None:
        """Queues an admissible request (QueueFull, NeverFits: nothing kept)."""
        s = self.session
        if s is not None:
            try:
                s.scheduler.add(req)
            except (QueueFull, NeverFits):
                s.grammars.done(req)
                raise
        else:  # a worker was lost a moment ago: wait with the requests it held
            self._hold(req)
        self._by_uid[req.uid] = req
        self.trace("submit", uid=req.uid, arrival=req.arrival_time, prompt=len(req.prompt_ids))

    def _admitted(self, uid: int, refusal: int, why: str) -> None:
        self.front.send(KIND_ADMITTED, cpb.Admitted(uid=uid, refusal=refusal, message=why).SerializeToString())
        if refusal == cpb.ACCEPTED:
            self._pump()

    def _on_compiled(self, peer: bytes, key: str, ok: bool, message: str, compile_ms: float) -> None:
        """The worker compiled (or could not compile) a constraint: the requests waiting on it go on."""
        s = self.session
        if s is None or peer != s.peer:
            return
        waiting = s.grammars.compiled(key, ok, message)
        log.info("constraint %s %s in %.1f ms (%d requests waited)%s", key[:12], "compiled" if ok else "refused",
                 compile_ms, len(waiting), "" if ok else f": {message}")
        resumed_lost = []
        for w in waiting:
            if w.admitted:  # held through a worker loss: resumes here, or ends (it cannot run any more)
                try:
                    if not ok:
                        raise NeverFits(f"its constraint does not compile on this worker: {message}")
                    s.scheduler.resume(w.req)
                except NeverFits as exc:
                    log.warning("request %s cannot resume: %s", w.req.client_id, exc)
                    s.grammars.done(w.req)
                    self._by_uid.pop(w.req.uid, None)
                    resumed_lost.append(w.req.uid)
                continue
            refusal, why = cpb.ACCEPTED, ""
            if not ok:
                refusal, why = cpb.GRAMMAR_INVALID, message
            else:
                try:
                    self._accept(w.req)
                except QueueFull as exc:
                    refusal, why = cpb.QUEUE_FULL, str(exc)
                except NeverFits as exc:
                    refusal, why = cpb.NEVER_FITS, str(exc)
            self.front.send(KIND_ADMITTED, cpb.Admitted(uid=w.req.uid, refusal=refusal,
                                                        message=why).SerializeToString())
        if resumed_lost:
            self.front.send(KIND_LOST, cpb.Lost(code=grpc.StatusCode.INTERNAL.value[0], uids=resumed_lost,
                                                reason=f"held through a worker loss, its constraint does not "
                                                       f"compile on the new worker: {message}").SerializeToString())
        self._send_grammar_work(s)
        self._pump()

    def _send_grammar_work(self, s: WorkerSession) -> None:
        """RELEASE and COMPILE what the ledger asks for, in order with the plans. RELEASE first: a key
        evicted and asked for again before this call must end up compiled, not released."""
        compiles, releases = s.grammars.take_compiles(), s.grammars.take_releases()
        try:
            if releases:
                self.link.send(s.peer, wire.release_message(releases))
            if compiles:
                self.link.send(s.peer, wire.compile_message(compiles))
        except zmq.ZMQError as exc:
            log.warning("worker unreachable (%s)", exc)
            self._lose_worker("worker disconnected")

    def _hold(self, req: Request) -> None:
        """Queues a request that arrives while no worker is connected, within the reconnect window."""
        assert self._held_limits is not None
        check_fits(self._held_limits, req)
        waiting = sum(1 for r in self._held if r.first_scheduled_time is None)
        if waiting >= self.config.max_waiting:
            raise QueueFull(f"{waiting} requests waiting for a worker (limit {self.config.max_waiting})")
        self._held.append(req)

    def _on_abort(self, uids: list[int], reason: FinishReason) -> None:
        """Client cancels, deadlines and stop strings: idempotent; KV blocks come back once in-flight
        steps report."""
        s = self.session
        for uid in uids:
            req = self._by_uid.pop(uid, None)
            if s is not None:
                if s.grammars.forget(uid) is None and req is not None:  # (forget: it waited on its compile)
                    s.scheduler.abort(req.req_id, reason)
                    s.grammars.done(req)
            elif req is not None and req in self._held:
                self._held.remove(req)
        if s is not None:
            self._send_grammar_work(s)
            self._pump()
            self._check_idle()

    def stats(self, nonce: int = 0) -> cpb.Stats:
        s = self.session
        if s is None:
            out = cpb.Stats()
            out.CopyFrom(self.last_session_stats)
            out.nonce, out.connected = nonce, False
            return out
        sch = s.scheduler
        return cpb.Stats(
            nonce=nonce, connected=True, running=sch.num_running, waiting=sch.num_waiting, kv_usage=sch.kv_usage,
            preemptions=sch.num_preemptions, kv_blocks_total=s.hello.num_blocks, kv_blocks_free=sch.blocks.num_free,
            steps=s.meter.steps, busy_ratio=s.meter.busy_ratio, compute_ms=s.meter.compute_ms,
            idle_gap_ms=s.meter.idle_gap_ms, prefix_cache_queries=sch.blocks.queries,
            prefix_cache_hits=sch.blocks.hits, prefix_cached_blocks=sch.blocks.num_cached,
            prefix_evictable_blocks=sch.blocks.num_evictable,
        )

    # ----- the worker --------------------------------------------------------------------------------
    def _on_hello(self, peer: bytes, hello: wire.Hello) -> None:
        if hello.protocol_version != wire.PROTOCOL_VERSION:
            log.error("worker speaks protocol %d, we speak %d", hello.protocol_version, wire.PROTOCOL_VERSION)
            return
        if self.instance_token and not hmac.compare_digest(hello.instance_token.encode(), self.instance_token.encode()):
            why = ("its instance token is not this scheduler's: it belongs to another Tandem instance (give "
                   "it that instance's --engine-address, or this one's TANDEM_INSTANCE_TOKEN)")
            log.error("refusing worker %s: %s", hello.worker_id, why)
            self._send_quietly(peer, wire.reject_message(why, final=True))
            return
        s = self.session
        if s is not None and peer != s.peer and self._alive(s.peer):
            if not hello.replace:
                # Two workers on one link address: never drop a live worker's session for a newcomer.
                why = (f"this scheduler already serves worker {s.hello.worker_id}, which is alive; give each "
                       f"worker its own scheduler (--engine-address), or start it with --replace")
                log.error("refusing worker %s: %s", hello.worker_id, why)
                self._send_quietly(peer, wire.reject_message(why))
                return
            # A deliberate replacement: the old worker is told to exit, its requests resume on the new one.
            log.warning("worker %s replaces worker %s", hello.worker_id, s.hello.worker_id)
            self._send_quietly(s.peer, wire.bye_message(replaced=True, reason=f"replaced by worker {hello.worker_id}"))
            self._lose_worker(f"worker replaced by {hello.worker_id}")
        elif s is not None:
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
            prefix_caching=self.config.prefix_caching,
        )
        self.session = WorkerSession(peer, hello, Scheduler(limits))
        log.info(
            "worker %s connected: model %s on %s (%s), %d KV blocks x %d tokens, context %d, depth %d",
            hello.worker_id, hello.model_name, hello.device, hello.dtype, hello.num_blocks,
            hello.block_size, hello.max_context, self.depth,
        )
        resumed, misfits = self._resume_held()
        self.front.send(KIND_SERVING, cpb.Serving(hello=hello.encode()[1], pipeline_depth=self.depth,
                                                  resumed=resumed).SerializeToString())
        if misfits:
            self.front.send(KIND_LOST, cpb.Lost(code=grpc.StatusCode.UNAVAILABLE.value[0], uids=misfits,
                                                reason="held through a worker loss, it does not fit the new "
                                                       "worker's limits").SerializeToString())
        self._pump()

    def _send_quietly(self, peer: bytes, frames: list) -> None:
        """A courtesy message (REJECT, BYE): a peer that vanished meanwhile needs no answer."""
        try:
            self.link.send(peer, frames)
        except zmq.ZMQError:
            pass

    def _resume_held(self) -> tuple[int, list[int]]:
        """Hands the requests held through a loss to the new session's scheduler: (resumed, the uids of
        those that do not fit the new worker)."""
        held, self._held, self._held_since, self._held_limits = self._held, [], None, None
        s = self.session
        sch = s.scheduler
        misfits = []
        for req in held:
            try:
                if req.constraint is not None:  # compiled on this worker first (_on_compiled resumes it)
                    check_fits(sch.limits, req)
                    state, why = s.grammars.admit(req, admitted=True)
                    if state == FAILED:
                        raise NeverFits(f"its constraint does not compile on this worker: {why}")
                    if state != READY:
                        continue
                sch.resume(req)
            except NeverFits as exc:
                log.warning("request %s cannot resume: %s", req.client_id, exc)
                self._by_uid.pop(req.uid, None)
                misfits.append(req.uid)
        self._send_grammar_work(s)
        resumed = len(held) - len(misfits)
        self.resumed_total += resumed
        if held:
            log.info("%d requests held through the worker loss resume (%d do not fit)", resumed, len(misfits))
        return resumed, misfits

    def _alive(self, peer: bytes) -> bool:
        """Whether `peer` is still connected (a FLUSH to it is harmless: it sends what it has)."""
        try:
            self.link.send(peer, wire.flush_message())
            return True
        except zmq.ZMQError:
            return False

    def _on_refused(self, peer: bytes, step_id: int, why: str) -> None:
        """The worker did not run a plan: our view of its row slots has parted from its own. The session
        is reset on the same connection (the model stays loaded) and the requests resume by recompute;
        the third refusal within REFUSALS_WINDOW_S fails them instead (INTERNAL), lest one bad request
        loop forever."""
        s = self.session
        if s is None or peer != s.peer:
            return  # the steps sent after the refused one are refused too: one reset answers them all
        now = time.monotonic()
        self._refusals = [t for t in self._refusals if now - t < REFUSALS_WINDOW_S] + [now]
        reason = f"worker refused step {step_id}: {why}"
        if len(self._refusals) >= MAX_REFUSALS:
            log.error("%s (%d times in %g s): failing the requests it held", reason, len(self._refusals),
                      REFUSALS_WINDOW_S)
            self._lose_worker(reason, grpc.StatusCode.INTERNAL)
        else:
            log.error("%s: resetting the session, its requests resume by recompute", reason)
            self._lose_worker(reason)
        self._reset_worker(peer)

    def _reset_worker(self, peer: bytes) -> None:
        """Asks a worker whose session we dropped (still connected) for a fresh one: it says HELLO again."""
        try:
            self.link.send(peer, wire.reset_message())
        except zmq.ZMQError:
            pass  # gone meanwhile: its replacement will say HELLO

    def _on_result(self, peer: bytes, result: wire.StepResult) -> None:
        s = self.session
        if s is None or peer != s.peer:
            return  # a late result from a worker we already gave up on
        self._last_progress = time.monotonic()
        s.meter.add(result)
        self.trace("result", step=result.step_id, compute_ms=result.compute_ms, idle_gap_ms=result.idle_gap_ms)
        info = s.scheduler.oldest_in_flight
        decode = info is not None and info.step_id == result.step_id and info.num_tokens == len(info.requests)
        s.scheduler.accept_result(result)  # counters and finishes: what the next plan depends on
        self._pump(after_result=True)  # the next plan goes out before the rows' Python and the front end's tokens
        events = s.scheduler.take_events()
        if events:
            self.front.send_frames(self._outputs(result, events, decode).encode())
        self._check_idle()

    def _outputs(self, result: wire.StepResult, events: list[TokenEvent], decode: bool) -> OutputBatch:
        n = len(events)
        reqs = [ev.request for ev in events]
        book = self.session.grammars if self.session is not None else None
        for ev in events:
            if ev.finish is not None:
                self._by_uid.pop(ev.request.uid, None)
                if book is not None:
                    book.done(ev.request)
        top_ids = top_lp = None
        if result.top_ids is not None and any(ev.top for ev in events):
            k = result.top_ids.shape[1]
            top_ids, top_lp = np.full((n, k), -1, np.int32), np.zeros((n, k), np.float32)
            for i, ev in enumerate(events):
                if ev.top:
                    ids, lps = zip(*ev.top, strict=True)
                    top_ids[i, : len(ids)], top_lp[i, : len(lps)] = ids, lps
        sch = self.session.scheduler if self.session is not None else None
        load = cpb.Load()
        if sch is not None:
            load = cpb.Load(running=sch.num_running, waiting=sch.num_waiting, kv_usage=sch.kv_usage,
                            busy_ratio=self.session.meter.busy_ratio, preemptions=sch.num_preemptions,
                            prefix_cache_queries=sch.blocks.queries, prefix_cache_hits=sch.blocks.hits,
                            prefix_cached_blocks=sch.blocks.num_cached,
                            prefix_evictable_blocks=sch.blocks.num_evictable)
        return OutputBatch(
            step_id=result.step_id,
            uid=np.fromiter((r.uid for r in reqs), np.uint64, n),
            token=np.fromiter((ev.token_id for ev in events), np.int32, n),
            finish=np.fromiter((0 if ev.finish is None else int(ev.finish) for ev in events), np.int32, n),
            error=np.fromiter((ev.error is not None for ev in events), np.int8, n),
            scheduled_at=np.fromiter((r.first_scheduled_time or 0.0 for r in reqs), np.float64, n),
            cached_tokens=np.fromiter((r.num_cached_tokens for r in reqs), np.int32, n),
            logprob=np.fromiter((np.nan if ev.logprob is None else ev.logprob for ev in events), np.float32, n),
            top_ids=top_ids, top_logprobs=top_lp, load=load, decode_only=decode, compute_s=result.compute_ms / 1000,
        )

    def _pump(self, after_result: bool = False) -> None:
        """Tops the pipeline up to its depth; asks for pending results when nothing more can go.
        `after_result`: called as a step's result was processed (else: new work arrived)."""
        s = self.session
        if s is None:
            return
        depth = self.depth
        workless = not after_result and s.scheduler.in_flight == 0  # the pipeline ran dry for want of work
        try:
            while s.scheduler.in_flight < depth:
                built = s.scheduler.build_plan()
                if built is None:
                    break
                plan, info = built
                if self._trace is not None:
                    self.trace("plan", step=plan.step_id, rows=len(info.requests), tokens=info.num_tokens,
                               new=len(plan.new_slots), running=s.scheduler.num_running,
                               waiting=s.scheduler.num_waiting, free_blocks=s.scheduler.blocks.num_free)
                if s.scheduler.in_flight == 1:  # the pipeline was empty: the clock starts now
                    self._last_progress = time.monotonic()
                    if workless:
                        s.meter.after_idle.add(plan.step_id)
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
            s.grammars.check(set())  # no request in the scheduler: no key has a user

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
        self.session = None
        lost = s.scheduler.drain()
        for w in s.grammars.all_waiting():  # waiting on a compile the worker will never answer
            if w.admitted:
                lost.append(w.req)
            else:
                self.front.send(KIND_ADMITTED, cpb.Admitted(uid=w.req.uid, refusal=cpb.NO_WORKER,
                                                            message=f"{reason} while its constraint compiled")
                                .SerializeToString())
        # A worker that went away (not a fault of ours: INTERNAL) leaves its requests to the next one.
        hold = code == grpc.StatusCode.UNAVAILABLE and self.config.worker_reconnect_timeout_s > 0
        if hold:
            self._held, self._held_limits = lost, s.scheduler.limits
            self._held_since = time.monotonic()
        else:
            self._by_uid.clear()
        self.front.send(KIND_LOST, cpb.Lost(code=code.value[0], reason=reason, preemptions=s.scheduler.num_preemptions,
                                            last=self.last_session_stats, resumable=hold).SerializeToString())
        if hold:
            log.warning("%s: holding %d requests for up to %g s until a worker connects", reason, len(lost),
                        self.config.worker_reconnect_timeout_s)
        else:
            log.warning("%s: %d requests lost, not serving until a worker connects", reason, len(lost))


def auto_depth(device: str) -> int:
    """Run ahead only where the worker's device computes while the host plans (CUDA). On a CPU worker
    the "device" is the cores the scheduler needs too: measured on 2 cores (docs/benchmarks.md),
    depth 2 only adds contention, so auto picks the synchronous loop there."""
    return 2 if device.startswith("cuda") else 1


def _cap(worker_limit: int, ours: int) -> int:
    return min(worker_limit, ours) if ours > 0 else worker_limit
