"""A supervisor of named child commands (what `tandem serve` runs the scheduler and the worker with).

Owns the children's lifetime: each runs in its own process group (so a terminal Ctrl-C reaches only
the supervisor, which then shuts the children down in order of its choosing); SIGINT/SIGTERM to the
supervisor become SIGTERM to each child group in turn (the order given: the scheduler drains before
its worker goes), then SIGKILL after a grace period; a child exiting on
its own takes the others down and makes the supervisor exit non-zero, unless it is marked to be
restarted (the worker), which is then started again. On Linux every child also gets
PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed supervisor leaves no orphans.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

_PR_SET_PDEATHSIG = 1


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: Mapping[str, str] | None = None  # None: inherit the supervisor's environment
    # Restarted when it exits on its own (the worker: the scheduler takes a new one back), unless it
    # keeps dying young (CRASH_LOOP_STARTS in a row within CRASH_LOOP_S of starting): then all stop.
    restart: bool = False
    # Exit codes that mean "starting again cannot help" (the worker's 2: a model that cannot load, a
    # bad flag): the supervisor stops everything at once with that code instead of restarting.
    fatal_codes: tuple[int, ...] = ()
    # Exit codes after which the child is left stopped while the others run on (the worker's 5: another
    # worker took its place deliberately, and a restarted one would only be refused).
    stay_down_codes: tuple[int, ...] = ()
    # Children of one group live and die together (the ranks of a tensor-parallel worker): when one
    # exits to be restarted, the others are stopped and the whole group starts again.
    group: str = ""


CRASH_LOOP_S = 30.0
CRASH_LOOP_STARTS = 3


@dataclass
class _Running:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    exited_at: float | None = field(default=None)
    started_at: float = field(default_factory=time.monotonic)
    quick_deaths: int = 0
    stayed_down: bool = False  # exited with one of its stay_down_codes: not watched any more


def _pdeathsig_preexec() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Resolved before fork: the child only makes the syscall. If the supervisor already died between
        # fork and prctl, the death signal will never come, so the child must not start at all.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class Supervisor:
    """Runs `children` until one exits on its own (exit code: its code, or 1 if that was 0 or a signal)
    or until SIGINT/SIGTERM (exit code 0 once all children are down). Call `run()` from the main thread:
    signal handlers can only be installed there, and PR_SET_PDEATHSIG fires when the forking thread dies.
    """

    def __init__(
        self,
        children: Sequence[ChildSpec],
        *,
        grace_s: float = 10.0,
        poll_s: float = 0.05,
        log: TextIO | None = None,
        name: str = "supervisor",
    ) -> None:
        if not children:
            raise ValueError("nothing to supervise")
        names = [c.name for c in children]
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self.children = list(children)
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.name = name
        self._log = log if log is not None else sys.stderr
        self._running: list[_Running] = []
        self._signals: list[int] = []
        # Set as soon as shutdown begins, for helper threads (e.g. a readiness probe) to give up.
        self.stopping = threading.Event()

    def log(self, message: str) -> None:
        print(f"{self.name}: {message}", file=self._log, flush=True)

    @property
    def pids(self) -> dict[str, int]:
        return {r.spec.name: r.proc.pid for r in self._running}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signals.append(signum)

    def _spawn(self, spec: ChildSpec) -> subprocess.Popen[bytes]:
        env = None if spec.env is None else dict(spec.env)
        proc = subprocess.Popen(spec.argv, env=env, process_group=0, preexec_fn=_pdeathsig_preexec())
        self.log(f"started {spec.name} (pid {proc.pid}): {' '.join(spec.argv)}")
        return proc

    def start(self) -> None:
        for spec in self.children:
            self._running.append(_Running(spec, self._spawn(spec)))

    def _restart(self, r: _Running) -> bool:
        """Starts a restartable child again; False when it is crash-looping."""
        young = time.monotonic() - r.started_at < CRASH_LOOP_S
        r.quick_deaths = r.quick_deaths + 1 if young else 0
        if r.quick_deaths >= CRASH_LOOP_STARTS:
            self.log(f"{r.spec.name} died {r.quick_deaths} times within {CRASH_LOOP_S:g} s of starting: giving up")
            return False
        time.sleep(min(5.0, 0.5 * 2**r.quick_deaths))  # a short backoff, longer while it keeps dying young
        r.proc, r.started_at = self._spawn(r.spec), time.monotonic()
        return True

    def _stop_members(self, members: list[_Running], grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`, to some children (a group about to restart)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for o in members:
                if o.proc.poll() is None:
                    try:
                        os.killpg(o.proc.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + grace_s
            while any(o.proc.poll() is None for o in members) and time.monotonic() < deadline:
                time.sleep(self.poll_s)
        for o in members:
            o.proc.wait()

    def _signal_groups(self, sig: int, only_alive: bool = True) -> None:
        for r in self._running:
            if only_alive and r.proc.poll() is not None:
                continue
            try:
                os.killpg(r.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self) -> None:
        """SIGTERM to each child's group in the order given, each waited for before the next (the
        scheduler drains its requests while the worker still computes them), all within one grace
        period; SIGKILL to whatever still runs after it (or at once on a further SIGINT/SIGTERM)."""
        self.stopping.set()
        seen = len(self._signals)
        deadline = time.monotonic() + self.grace_s
        for r in self._running:
            if r.proc.poll() is None:
                try:
                    os.killpg(r.proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
            while r.proc.poll() is None and len(self._signals) == seen and time.monotonic() < deadline:
                time.sleep(self.poll_s)
            if len(self._signals) > seen:
                self.log("second signal: killing children now")
                break
            if time.monotonic() >= deadline:
                self.log(f"children still running after {self.grace_s:g} s: killing them")
                break
        self._signal_groups(signal.SIGKILL)
        for r in self._running:
            r.proc.wait()

    def run(self, on_started: Callable[[Supervisor], None] | None = None) -> int:
        handled = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, self._on_signal) for s in handled}
        try:
            try:
                self.start()
            except OSError as e:
                self.log(f"cannot start child: {e}")
                self.stop()
                return 1
            if on_started is not None:
                on_started(self)
            while True:
                if self._signals:
                    self.log(f"got {signal.Signals(self._signals[0]).name}: stopping children")
                    self.stop()
                    return 0
                for r in self._running:
                    rc = r.proc.poll()
                    if rc is None or r.stayed_down:
                        continue
                    how = f"with code {rc}" if rc >= 0 else f"by signal {signal.Signals(-rc).name}"
                    if rc in r.spec.stay_down_codes:
                        self.log(f"{r.spec.name} exited {how}: left stopped (its message is above)")
                        r.stayed_down = True
                        continue
                    if rc in r.spec.fatal_codes:
                        self.log(f"{r.spec.name} exited {how}, which restarting cannot mend (its message is "
                                 f"above); stopping")
                        self.stop()
                        return rc
                    if r.spec.restart and not self._signals:
                        peers = [o for o in self._running if o is not r and r.spec.group
                                 and o.spec.group == r.spec.group and not o.stayed_down]
                        if peers:
                            self.log(f"{r.spec.name} exited {how}; restarting its group "
                                     f"{r.spec.group} ({len(peers) + 1} processes)")
                            self._stop_members(peers)
                        else:
                            self.log(f"{r.spec.name} exited {how}; restarting it")
                        if self._restart(r):
                            for o in peers:
                                o.proc, o.started_at = self._spawn(o.spec), time.monotonic()
                            continue
                        rc = rc if rc > 0 else 1
                    others = [o.spec.name for o in self._running if o is not r]
                    self.log(f"{r.spec.name} exited {how}; stopping {', '.join(others) or 'nothing'}")
                    self.stop()
                    return rc if rc > 0 else 1
                time.sleep(self.poll_s)
        finally:
            if any(r.proc.poll() is None for r in self._running):
                self.stop()  # an exception escaped the loop: still leave nothing behind
            for s, handler in previous.items():
                signal.signal(s, handler)
