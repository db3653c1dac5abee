"""The front end's engine: requests go to the core process, their tokens come back into handles.

The scheduler side is two processes (vLLM v1 draws the same line): this one serves gRPC and does
the per-stream work (tokenizing, incremental detokenizing, stop strings, metrics, streaming); the
core (`python -m scheduler_svc.core`, started and supervised from here) schedules and drives the
worker. Measured at 1024 streams (docs/benchmarks.md), the per-stream work was some 42 ms per step
and the core's 2.6 ms: in one process the next plan waited behind the streams. Now a backlog of
steps only makes each stream's next message carry more tokens (`RequestHandle.take`), while the
core keeps the worker fed.

`EngineClient` keeps the interface the servicer and the server use: `submit` (answered by the core:
admitted, or QueueFull / NeverFits / Unavailable), `abort`, `serving`, `hello`, `tokenizer`,
`stats`, `handles`, drain. A stop string found here finishes the request in the core with an ABORT
(reason STOP_STRING); the tokens the core produced past it in the meantime are discarded here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import structlog
from tandem import wire
from tandem.v1 import core_pb2 as cpb

from scheduler_svc.core import core_link as cl
from scheduler_svc.core.engine import EngineConfig
from scheduler_svc.core.request import FinishReason
from scheduler_svc.core.scheduler import NeverFits, QueueFull
from scheduler_svc.frontend.handle import RequestHandle
from scheduler_svc.frontend.metrics import Metrics
from scheduler_svc.frontend.tokenizer import TandemTokenizer

log = logging.getLogger("tandem.engine")
rlog = structlog.get_logger("tandem.requests")  # one canonical line per finished request

CORE_POLL_S = 0.2
STATS_TIMEOUT_S = 5.0
# How long one pass over a backlog from the core may hold the event loop before the RPCs get a turn.
BACKLOG_SLICE_S = 0.05


class Unavailable(Exception):
    """No worker is connected (or it just went away), or the server is shutting down."""


class GrammarInvalid(Exception):
    """The worker's grammar engine could not compile the request's constraint: the compiler's message."""


class CoreExited(RuntimeError):
    """The core process ended: this scheduler cannot serve any more."""


@dataclass(frozen=True)
class CoreConfig:
    engine_address: str
    engine: EngineConfig
    link_curve_secret: str = ""
    link_curve_clients: str = ""
    log_level: str = "INFO"


class EngineClient:
    def __init__(self, config: CoreConfig, on_serving_change: Callable[[bool], None] | None = None) -> None:
        self.config = config
        self.handles: dict[int, RequestHandle] = {}
        self.metrics = Metrics()
        self.draining = False  # shutting down: admit nothing new, let what runs finish
        self.requests_finished = 0
        self.depth = config.engine.pipeline_depth
        self.last_session_stats = cpb.Stats()
        self._on_serving_change = on_serving_change or (lambda serving: None)
        # The last worker's Hello and tokenizer: kept through a resumable loss, so that requests arriving
        # meanwhile are validated and wait (in the core) for the next worker.
        self._hello: wire.Hello | None = None
        self._tokenizer: TandemTokenizer | None = None
        self._connected = False
        self._serving_event = asyncio.Event()
        self._uids = itertools.count(1)
        self._admits: dict[int, asyncio.Future] = {}
        self._stats: dict[int, asyncio.Future] = {}
        address = cl.private_address()
        self._dir = Path(address.removeprefix("ipc://")).parent
        self.front = cl.CoreLink(address, bind=True)
        cmd = [sys.executable, "-m", "scheduler_svc.core", "--front-address", address,
               "--engine-address", config.engine_address, "--engine-config", json.dumps(asdict(config.engine)),
               "--log-level", config.log_level]
        if config.link_curve_secret:
            cmd += ["--link-curve-secret", config.link_curve_secret, "--link-curve-clients", config.link_curve_clients]
        self.core = subprocess.Popen(cmd)

    # ----- what the servicer and the server use ------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self._connected

    async def wait_serving(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._serving_event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def tokenizer(self) -> TandemTokenizer | None:
        """The worker's tokenizer; None when it serves token ids only (worker --skip-tokenizer)."""
        if self._hello is None:
            raise Unavailable("no worker connected")
        return self._tokenizer

    def hello(self) -> wire.Hello:
        if self._hello is None:
            raise Unavailable("no worker connected")
        return self._hello

    async def submit(self, handle: RequestHandle) -> None:
        """Admits a request; raises Unavailable, QueueFull, NeverFits or GrammarInvalid (nothing is kept
        then). A constrained request is answered once the worker has compiled its constraint (tens of ms
        for a new schema); a caller that gives up meanwhile has its request aborted in the core."""
        if self.draining:
            raise Unavailable("shutting down")
        if self._hello is None:
            raise Unavailable("no worker connected")
        req = handle.request
        req.uid = next(self._uids)
        sp = req.sampling
        msg = cpb.Submit(
            uid=req.uid, req_id=req.req_id, client_id=req.client_id, prompt_ids=req.prompt_ids,
            max_new_tokens=req.max_new_tokens, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
            min_p=sp.min_p, seed=sp.seed, num_logprobs=sp.num_logprobs, stop_token_ids=sorted(req.stop_token_ids),
            eos_token_ids=sorted(req.eos_token_ids), ignore_eos=req.ignore_eos, arrival_time=req.arrival_time,
            cache_salt=req.cache_salt, repetition_penalty=sp.repetition_penalty,
            presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
            logit_bias=sp.logit_bias, min_tokens=sp.min_tokens,
            leader_uid=req.leader.uid if req.leader is not None else 0,
        )
        if req.constraint is not None:
            msg.constraint_kind, msg.constraint_spec = req.constraint.kind, req.constraint.spec
        answer = asyncio.get_running_loop().create_future()
        self._admits[req.uid] = answer
        self.handles[req.uid] = handle  # before the core can send its first token
        self.front.send(cl.KIND_SUBMIT, msg.SerializeToString())
        try:
            refusal, why = await answer
        except BaseException:
            # Cancelled (the caller's deadline, a disconnect) while the core decides: the core has the
            # SUBMIT and may admit it, so end it there too (ABORT is idempotent), or it runs for nobody.
            self._admits.pop(req.uid, None)
            self._forget(handle)
            self._send_abort([req.uid], FinishReason.ABORTED)
            raise
        if refusal != cpb.ACCEPTED:
            self._forget(handle)
            raise {cpb.QUEUE_FULL: QueueFull, cpb.NEVER_FITS: NeverFits,
                   cpb.GRAMMAR_INVALID: GrammarInvalid}.get(refusal, Unavailable)(why)
        self.metrics.admitted(len(req.prompt_ids))

    def abort(self, handle: RequestHandle) -> None:
        """Client cancel or deadline: idempotent; KV blocks come back once the core's in-flight steps report."""
        if self.handles.pop(handle.request.uid, None) is not None:
            handle.complete(FinishReason.ABORTED)
            self._record_finish(handle)
            self._send_abort([handle.request.uid], FinishReason.ABORTED)

    def start_drain(self) -> None:
        """Shutdown begins: new requests get UNAVAILABLE, requests in flight go on."""
        self.draining = True

    def fail_remaining(self, code: grpc.StatusCode, message: str) -> int:
        """Ends every request still in flight with `code`; the core frees their KV blocks."""
        handles, self.handles = self.handles, {}
        for handle in handles.values():
            handle.fail(code, message)
        self._send_abort(list(handles), FinishReason.ABORTED)
        return len(handles)

    async def stats(self) -> cpb.Stats:
        """The core's counters, asked for now (the last session's when no worker is connected)."""
        if self.core.poll() is not None:
            return self.last_session_stats
        nonce = next(self._uids)
        answer = asyncio.get_running_loop().create_future()
        self._stats[nonce] = answer
        self.front.send(cl.KIND_STATS, cpb.Stats(nonce=nonce).SerializeToString())
        try:
            return await asyncio.wait_for(answer, STATS_TIMEOUT_S)
        finally:
            self._stats.pop(nonce, None)

    # ----- the loop ----------------------------------------------------------------------------------
    async def run(self) -> None:
        """Reads the core's messages until the core exits (then raises CoreExited)."""
        recv = asyncio.ensure_future(self._recv_loop())
        probe = (asyncio.ensure_future(self._lag_probe(self.config.engine.step_trace + ".front"))
                 if self.config.engine.step_trace else None)
        try:
            while self.core.poll() is None:
                await asyncio.sleep(CORE_POLL_S)
                if recv.done():
                    recv.result()
        finally:
            recv.cancel()
            if probe is not None:
                probe.cancel()
        self._core_gone()
        raise CoreExited(f"the scheduler core exited with status {self.core.returncode}")

    async def _recv_loop(self) -> None:
        while True:
            msg = await self.front.recv()
            # A backlog is handled at once before any RPC wakes, so each stream then sends one message
            # with every token it got rather than one per step; but for a slice of time at most, so
            # that a core that outruns this process never starves the RPCs of the event loop.
            until = time.monotonic() + BACKLOG_SLICE_S
            while msg is not None:
                try:
                    self._dispatch(*msg)
                except wire.WireError as exc:
                    log.warning("dropping malformed %r from the core: %s", msg[0], exc)
                msg = self.front.recv_nowait() if time.monotonic() < until else None
            await asyncio.sleep(0)  # a turn for the RPCs even when the next message is already queued

    async def _lag_probe(self, path: str) -> None:
        """--step-trace: how late a 1 ms sleep of this event loop wakes (worst of ten) and the requests
        in flight, every 10 ms, as JSON lines: how busy the front end is, over time."""
        with open(path, "a", buffering=1) as f:
            while True:
                worst = 0.0
                for _ in range(10):
                    t = time.monotonic()
                    await asyncio.sleep(0.001)
                    worst = max(worst, time.monotonic() - t - 0.001)
                f.write(json.dumps({"t": time.monotonic(), "lag_ms": 1000 * worst, "handles": len(self.handles)})
                        + "\n")

    def _dispatch(self, kind: bytes, header: bytes, frames: list) -> None:
        if kind == cl.KIND_OUTPUTS:
            self._on_outputs(cl.OutputBatch.decode(header, frames))
        elif kind == cl.KIND_ADMITTED:
            msg = cpb.Admitted.FromString(header)
            answer = self._admits.pop(msg.uid, None)
            if answer is not None and not answer.done():
                answer.set_result((msg.refusal, msg.message))
        elif kind == cl.KIND_SERVING:
            self._on_serving(cpb.Serving.FromString(header))
        elif kind == cl.KIND_LOST:
            self._on_lost(cpb.Lost.FromString(header))
        elif kind == cl.KIND_STATS:
            msg = cpb.Stats.FromString(header)
            answer = self._stats.get(msg.nonce)
            if answer is not None and not answer.done():
                answer.set_result(msg)
        else:
            log.warning("unexpected %r from the core", kind)

    def _on_serving(self, msg: cpb.Serving) -> None:
        hello = wire.Hello.from_header(msg.hello)
        self._tokenizer = TandemTokenizer.from_hello(hello) if hello.tokenizer_json else None
        self._hello, self.depth = hello, msg.pipeline_depth
        self._connected = True
        self.metrics.resumed(msg.resumed)
        self._serving_event.set()
        self._on_serving_change(True)

    def _on_lost(self, msg: cpb.Lost) -> None:
        code = next((c for c in grpc.StatusCode if c.value[0] == msg.code), grpc.StatusCode.UNAVAILABLE)
        if msg.uids:  # only these requests are gone
            for uid in msg.uids:
                handle = self.handles.pop(uid, None)
                if handle is not None:
                    handle.fail(code, msg.reason)
            return
        if self._connected:  # the session ended (not the end of a reconnect window)
            self.last_session_stats = msg.last
            self.metrics.end_session(msg.preemptions)
            self._connected = False
            self._serving_event.clear()
            self._on_serving_change(False)
        if msg.resumable:
            log.warning("%s: %d requests paused until a worker connects", msg.reason, len(self.handles))
            return
        self._hello = self._tokenizer = None
        handles, self.handles = self.handles, {}
        for handle in handles.values():
            handle.fail(code, msg.reason)
        log.warning("%s: failed %d requests, not serving until a worker connects", msg.reason, len(handles))

    def _on_outputs(self, out: cl.OutputBatch) -> None:
        metrics = self.metrics
        load = out.load
        metrics.set_load(load.running, load.waiting, load.kv_usage, load.busy_ratio, load.preemptions)
        metrics.step_done(out.decode_only, out.compute_s)
        metrics.set_prefix_cache(load.prefix_cached_blocks, load.prefix_evictable_blocks)
        now = time.monotonic()
        stops: list[int] = []
        top_k = out.top_ids.shape[1] if out.top_ids is not None else 0
        for i, (uid, token, finish, error, logprob) in enumerate(zip(
                out.uid.tolist(), out.token.tolist(), out.finish.tolist(), out.error.tolist(), out.logprob.tolist(),
                strict=True)):
            handle = self.handles.get(uid)
            if handle is None:
                continue  # aborted or failed here while the core was still computing it
            if error:  # only this request: its batch-mates go on
                log.error("request %s: non-finite logits", handle.client_request_id)
                handle.fail(grpc.StatusCode.INTERNAL, "non-finite logits")
                del self.handles[uid]
                continue
            req = handle.request
            if req.first_scheduled_time is None:
                req.first_scheduled_time = float(out.scheduled_at[i]) or None
                req.num_cached_tokens = int(out.cached_tokens[i])
                metrics.prefix_lookup(len(req.prompt_ids), req.num_cached_tokens)
            req.output_ids.append(token)
            if handle.first_token_at is None:
                metrics.first_token(now - handle.accepted_at)
            else:
                metrics.next_token(now - handle.last_token_at)
            top = None
            n = req.sampling.num_logprobs
            if n > 0 and top_k:
                k = min(n, top_k)
                top = list(zip(out.top_ids[i, :k].tolist(), out.top_logprobs[i, :k].tolist(), strict=True))
            reason = FinishReason(finish) if finish else None
            matched = handle.on_token(token, None if math.isnan(logprob) else logprob, top, reason, now)
            if matched is not None:
                stops.append(uid)
                handle.complete(FinishReason.STOP_STRING, stop_string=matched)
            elif reason is not None:
                handle.complete(reason)
            if handle.done:
                del self.handles[uid]
                self.requests_finished += 1
                self._record_finish(handle)
        if stops:
            self._send_abort(stops, FinishReason.STOP_STRING)

    # ----- helpers -----------------------------------------------------------------------------------
    def _forget(self, handle: RequestHandle) -> None:
        self.handles.pop(handle.request.uid, None)

    def _send_abort(self, uids: list[int], reason: FinishReason) -> None:
        if uids and self.core.poll() is None:
            self.front.send(cl.KIND_ABORT, cpb.Abort(uids=uids, reason=int(reason)).SerializeToString())

    def _record_finish(self, handle: RequestHandle) -> None:
        c = handle.completion
        if c is not None:
            reason = c.finish_reason.name.lower()
            self.metrics.finished(reason, c.total_s, c.queue_s)
            rlog.info("request finished", request_id=handle.client_request_id, prompt_tokens=c.prompt_tokens,
                      output_tokens=c.completion_tokens, finish_reason=reason, ttft_s=round(c.ttft_s, 6),
                      total_s=round(c.total_s, 6), queue_s=round(c.queue_s, 6))

    def _core_gone(self) -> None:
        log.error("the scheduler core exited (status %s)", self.core.returncode)
        self._hello = self._tokenizer = None
        self._connected = False
        self._serving_event.clear()
        self._on_serving_change(False)
        for answer in self._admits.values():
            if not answer.done():
                answer.set_result((cpb.NO_WORKER, "the scheduler core exited"))
        handles, self.handles = self.handles, {}
        for handle in handles.values():
            handle.fail(grpc.StatusCode.UNAVAILABLE, "the scheduler core exited")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops the core (SIGTERM, then SIGKILL) and closes the link."""
        if self.core.poll() is None:
            self.core.terminate()
            try:
                self.core.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.core.kill()
                self.core.wait()
        self.front.close()
        shutil.rmtree(self._dir, ignore_errors=True)
