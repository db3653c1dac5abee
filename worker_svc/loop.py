"""The worker's step loop: HELLO, then PLAN/FLUSH in and RESULT out, in step order.

Owns the result ordering of docs/internals.md:
- async device (CUDA): launch step N, then send the results of the steps before it, so the GPU
  always has queued work while the host waits on a copy;
- sync device (CPU): compute is done when launch returns, so pending results go out first, then
  step N is computed while the scheduler digests them;
- a plan with `flush`, or a FLUSH message, sends everything pending right away.
COMPILE starts compiles in the grammar engine's thread; the loop polls it (every millisecond while
one is pending) and answers COMPILED for each; RELEASE drops held grammars; RESET drops them all.
A malformed or unsafe message is logged and dropped (the protocol has no error reply); it never
takes the worker down. Losing the scheduler ends the loop with exit status 1; a stop request
(SIGTERM/SIGINT) ends it with 0; a message that keeps the loop busy past `hang_timeout_s`
(`--hang-timeout`: a hung device, a deadlock) ends the process with 3 from the `StepWatchdog`
thread, since the loop itself cannot: a supervisor (`tandem serve`, compose's restart policy) then
starts a fresh worker, where a live but hung one would hold the GPU forever.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

import numpy as np
import structlog
from tandem import exit_codes, wire

from worker_svc.link import WorkerLink
from worker_svc.runner import Engine

log = logging.getLogger("tandem.worker.loop")

# Fault hooks for the reliability tests, off unless this variable is set: "hang_at_step=N" makes
# the worker stop answering (alive, connected, silent) when step N arrives; "nan_logits_at_step=N"
# (with "nan_row=R", default 0) reports row R of step N as having non-finite logits; "refuse_step=N"
# refuses plan N once; "step_sleep_ms=M" makes every step M ms slower (a slow device, for tests that
# must act while streams still run).
FAULTS_ENV = "TANDEM_FAULTS"


def parse_faults(spec: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, _, value = item.partition("=")
        out[name] = int(value)
    return out
rlog = structlog.get_logger("tandem.worker.requests")

POLL_MS = 100  # how often an idle loop looks at the stop flag
COMPILE_POLL_MS = 1  # ... and at finished compiles, while one is pending (a request's admission waits)
# Exit statuses (tandem.exit_codes says what each tells a supervisor). A plain REJECT is not 2: a
# replacement that came a moment too early, before the dead worker's connection timed out, is worth a
# restart, and a supervisor's crash-loop guard stops a second worker that is refused every time.
REJECTED_EXIT = exit_codes.REJECTED
REJECTED_FINAL_EXIT = exit_codes.LOAD_ERROR  # another instance's scheduler: restarting cannot help
REPLACED_EXIT = exit_codes.REPLACED
WAIT_LOG_S = 10.0
EXIT_HUNG = exit_codes.HUNG


class StepWatchdog:
    """Ends the process when one message keeps the loop busy longer than `timeout_s` (0 = never).
    A thread, because a loop stuck in a device wait never gets back to check a clock; the wait
    releases the GIL, so the thread still runs."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._busy_since: float | None = None
        self._step = -1
        if timeout_s > 0:
            threading.Thread(target=self._watch, name="step-watchdog", daemon=True).start()

    def busy(self, last_step_id: int) -> None:
        self._step = last_step_id
        self._busy_since = time.monotonic()

    def idle(self) -> None:
        self._busy_since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.timeout_s:
                log.critical("one message has kept the loop busy for over %g s (last step launched before it: "
                             "%d; hung device?): exiting with status %d so that a supervisor restarts the worker",
                             self.timeout_s, self._step, EXIT_HUNG)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os._exit(EXIT_HUNG)  # the main thread is stuck: no orderly shutdown is possible


def make_hello(engine: Engine, instance_token: str = "", replace: bool = False, tensor_parallel_size: int = 1,
               num_blocks: int | None = None) -> wire.Hello:
    """`num_blocks`: a group's capacity (the least of its ranks'), else this engine's."""
    m = engine.loaded
    cache = engine.cache.cfg
    return wire.Hello(
        worker_id=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        pid=os.getpid(),
        model_name=m.name,
        vocab_size=m.vocab_size,
        eos_token_ids=m.eos_token_ids,
        max_context=m.max_context,
        dtype=str(cache.dtype).removeprefix("torch."),
        device=engine.device,
        num_blocks=cache.num_blocks if num_blocks is None else num_blocks,
        block_size=cache.block_size,
        max_num_tokens=engine.limits.max_num_tokens,
        max_num_rows=engine.limits.max_num_rows,
        max_blocks_per_row=engine.limits.max_blocks_per_row,
        tokenizer_json=m.tokenizer_json,
        grammar_engine=engine.grammar.engine.name if engine.grammar is not None else "",
        chat_template=m.chat_template,
        bos_token=m.bos_token,
        eos_token=m.eos_token,
        add_bos_token=m.add_bos_token,
        default_temperature=m.sampling_defaults.temperature,
        default_top_p=m.sampling_defaults.top_p,
        default_top_k=m.sampling_defaults.top_k,
        default_min_p=m.sampling_defaults.min_p,
        instance_token=instance_token,
        replace=replace,
        tensor_parallel_size=tensor_parallel_size,
    )


class WorkerLoop:
    def __init__(self, engine: Engine, link: WorkerLink, hang_timeout_s: float = 0.0, instance_token: str = "",
                 replace: bool = False, tensor_parallel_size: int = 1, group_num_blocks: int | None = None,
                 step_trace: str = "") -> None:
        self.engine = engine
        self.link = link
        self.instance_token = instance_token
        self.replace = replace  # this worker's HELLO asks to take the place of the live one
        self.tensor_parallel_size = tensor_parallel_size
        self.group_num_blocks = group_num_blocks
        self.watchdog = StepWatchdog(hang_timeout_s)
        self.stop_requested = False
        self.steps = 0
        self.faults = parse_faults(os.environ.get(FAULTS_ENV, ""))
        self._refused_by_fault = False
        self.exit_status = 0  # set by REJECT (4, or 2 when final) and by BYE (0, or 5 when replaced)
        self._trace = open(step_trace, "a", buffering=1 << 20) if step_trace else None  # noqa: SIM115
        if self.faults:
            log.warning("fault injection on (%s=%s): for tests only", FAULTS_ENV, os.environ[FAULTS_ENV])

    def trace(self, event: str, step: int) -> None:
        """--step-trace: when this worker received, launched and answered each step (monotonic clock)."""
        if self._trace is not None:
            self._trace.write(f'{{"ev": "{event}", "t": {time.monotonic()!r}, "step": {step}}}\n')

    def hello(self, replace: bool | None = None) -> wire.Hello:
        return make_hello(self.engine, self.instance_token, self.replace if replace is None else replace,
                          self.tensor_parallel_size, self.group_num_blocks)

    def run(self) -> int:
        """Serves until the scheduler goes (returns 1) or a stop is requested (returns 0)."""
        self.link.send(self.hello().encode())
        waited = 0.0
        grammar = self.engine.grammar.engine if self.engine.grammar is not None else None
        while not self.stop_requested:
            frames = self.link.recv(COMPILE_POLL_MS if grammar is not None and grammar.pending else POLL_MS)
            if grammar is not None:
                for done in grammar.poll():
                    self.link.send(wire.compiled_message(done.key, done.ok, done.message, done.compile_ms))
            if frames is None and self.link.peer_lost:  # what came before the drop (a BYE) is handled first
                log.error("scheduler lost after %d steps; exiting", self.steps)
                return 1
            if frames is None:
                if not self.link.established:
                    waited += POLL_MS / 1000
                    if waited >= WAIT_LOG_S:
                        log.info("still waiting for the scheduler at %s", self.link.address)
                        waited = 0.0
                continue
            self.watchdog.busy(self.engine.last_step_id)
            try:
                self.handle(frames)
            finally:
                self.watchdog.idle()
        if self.exit_status == 0:
            log.info("stop requested; exiting after %d steps", self.steps)
        return self.exit_status

    def handle(self, frames: list) -> None:
        try:
            kind, header, arrays = wire.split(frames)
        except wire.WireError as exc:
            log.warning("dropping malformed message: %s", exc)
            return
        if kind == wire.KIND_FLUSH:
            self.send_pending(keep=0)
            return
        if kind == wire.KIND_REJECT:
            reason, final = wire.decode_reject(header)
            self.exit_status = REJECTED_FINAL_EXIT if final else REJECTED_EXIT
            log.error("the scheduler refused this worker: %s; exiting with status %d", reason, self.exit_status)
            self.stop_requested = True
            return
        if kind == wire.KIND_BYE:
            replaced, reason = wire.decode_bye(header)
            if replaced:
                self.exit_status = REPLACED_EXIT
                log.warning("replaced by another worker (%s); exiting with status %d after %d steps", reason,
                            REPLACED_EXIT, self.steps)
            else:
                log.info("the scheduler is shutting down; exiting after %d steps", self.steps)
            self.stop_requested = True
            return
        if kind in (wire.KIND_COMPILE, wire.KIND_RELEASE):
            try:
                self.on_grammar(kind, header)
            except wire.WireError as exc:
                log.warning("dropping malformed %r message: %s", kind, exc)
            return
        if kind == wire.KIND_RESET:
            log.warning("scheduler asked for a reset after %d steps: in-flight steps dropped, row slots "
                        "emptied; a new session starts", self.steps)
            self.engine.reset_session()
            if self.engine.grammar is not None:
                self.engine.grammar.engine.reset()
            self.link.send(self.hello(replace=False).encode())  # the same worker: nothing to replace
            return
        if kind != wire.KIND_PLAN:
            log.warning("dropping unexpected %r message", kind)
            return
        try:
            plan = wire.StepPlan.decode(header, arrays)
        except Exception as exc:  # protobuf DecodeError as well as WireError
            self.refuse(-1, f"undecodable plan: {exc}")
            return
        self.trace("plan_in", plan.step_id)
        if plan.step_id <= self.engine.last_step_id:
            self.refuse(plan.step_id, f"already at step {self.engine.last_step_id}")
            return
        try:
            if self.faults.get("refuse_step") == plan.step_id and not self._refused_by_fault:
                self._refused_by_fault = True  # once per process, so that the retry goes through
                raise wire.WireError("fault injection: refuse_step")
            self.on_plan(plan)
        except wire.WireError as exc:  # Engine.launch checks before touching any buffer
            self.refuse(plan.step_id, str(exc))

    def on_grammar(self, kind: bytes, header: bytes) -> None:
        g = self.engine.grammar
        if kind == wire.KIND_COMPILE:
            specs = wire.decode_compile(header)
            if g is None:  # the scheduler saw no engine in HELLO and should not ask: answer anyway
                for key, _kind, _spec in specs:
                    self.link.send(wire.compiled_message(key, False, "this worker has no grammar engine"))
                return
            for key, ckind, spec in specs:
                g.engine.submit(key, ckind, spec)
        elif g is not None:
            g.engine.release(wire.decode_release(header))

    def refuse(self, step_id: int, reason: str) -> None:
        """A plan not run: say so (the scheduler resets the session) instead of leaving it to time out."""
        log.error("refusing step %d: %s", step_id, reason)
        self.link.send(wire.refused_message(step_id, reason))

    def on_plan(self, plan: wire.StepPlan) -> None:
        if self.faults.get("hang_at_step") == plan.step_id:
            log.warning("fault injection: hanging at step %d", plan.step_id)
            while not self.stop_requested:
                time.sleep(0.1)
            return
        if self.faults.get("step_sleep_ms"):
            time.sleep(self.faults["step_sleep_ms"] / 1000)
        if not self.engine.is_async:
            self.send_pending(keep=0)
        self.engine.launch(plan)
        self.trace("launched", plan.step_id)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step %d launched: %d rows, %d tokens, carry from %d, flush %s", plan.step_id,
                      plan.num_rows, plan.num_tokens, plan.carry_from_step, plan.flush)
            # One line per request new to the worker: the id ties this process's log to the scheduler's.
            for slot, rid in zip(plan.new_slots.tolist(), plan.new_request_ids(), strict=True):
                rlog.debug("request started", request_id=rid, step=plan.step_id, slot=slot)
        self.steps += 1
        if self.engine.is_async:
            self.send_pending(keep=1)  # the step just launched keeps the device busy meanwhile
        if plan.flush:
            self.send_pending(keep=0)

    def send_pending(self, keep: int) -> None:
        """Collects and sends results, oldest first, until `keep` steps remain in flight."""
        while self.engine.num_in_flight > keep:
            result = self.engine.collect()
            if self.faults.get("nan_logits_at_step") == result.step_id and result.logprob is not None:
                result.logprob[self.faults.get("nan_row", 0)] = np.nan  # what the sampler reports for broken logits
            self.trace("collected", result.step_id)
            self.link.send(result.encode())
            self.trace("result_out", result.step_id)
