"""The core's ledger of constraints (structured output) for one worker session.

Owns which compiled constraints the connected worker holds and who uses them:
- a constrained request is admitted only once the worker has answered COMPILED for its key (ADMITTED
  waits: a new schema costs tens of milliseconds, once; the same key is a hit), so no plan ever names
  a key the worker does not hold;
- the requests waiting on a compile, in arrival order, with whether they were admitted already (held
  through a worker loss: they resume, rather than being admitted, once compiled on the new worker);
- a key's users (the requests in the scheduler that carry it); a key with none goes to an idle list,
  and past `max_idle` idle keys the oldest is RELEASEd on the worker. A RELEASE cannot overtake a plan
  that starts a slot with its key: plans and RELEASE travel in order on the one link, and a key with a
  user is never idle;
- the compiler's refusals, most recent `max_failed`, so that a bad schema sent again is refused
  without another round trip.
Plain bookkeeping: no I/O here, the engine (engine.py) sends what `take_compiles` and `take_releases`
return.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from scheduler_svc.core.request import Request

READY, WAIT, FAILED = "ready", "wait", "failed"


@dataclass
class Waiting:
    req: Request
    admitted: bool  # held through a worker loss: resumes once compiled, instead of being admitted


class GrammarBook:
    def __init__(self, max_idle: int = 64, max_failed: int = 256) -> None:
        self.max_idle, self.max_failed = max_idle, max_failed
        self.users: dict[str, set[int]] = {}  # compiled on the worker -> uids of the requests using it
        self.idle: OrderedDict[str, None] = OrderedDict()  # compiled, unused, oldest first
        self.compiling: dict[str, list[Waiting]] = {}
        self.failed: OrderedDict[str, str] = OrderedDict()  # key -> the compiler's message
        self._compiles: list[tuple[str, str, str]] = []
        self._releases: list[str] = []

    def admit(self, req: Request, admitted: bool = False) -> tuple[str, str]:
        """READY (the request may be scheduled now), WAIT (a COMPILED will decide) or FAILED with the
        compiler's message."""
        c = req.constraint
        assert c is not None
        key = c.key
        if key in self.failed:
            self.failed.move_to_end(key)
            return FAILED, self.failed[key]
        if key in self.users:
            self.users[key].add(req.uid)
            self.idle.pop(key, None)
            return READY, ""
        if key not in self.compiling:
            self.compiling[key] = []
            self._compiles.append((key, c.kind, c.spec))
        self.compiling[key].append(Waiting(req, admitted))
        return WAIT, ""

    def compiled(self, key: str, ok: bool, message: str) -> list[Waiting]:
        """The worker's answer for `key`: the requests that waited on it (each now a user when ok)."""
        waiting = self.compiling.pop(key, [])
        if ok:
            self.users.setdefault(key, set()).update(w.req.uid for w in waiting)
            if not self.users[key]:
                self._idle(key)
        else:
            self.failed[key] = message
            while len(self.failed) > self.max_failed:
                self.failed.popitem(last=False)
        return waiting

    def done(self, req: Request) -> None:
        """`req` left the scheduler (finished, aborted): idempotent."""
        if req.constraint is None:
            return
        key = req.constraint.key
        users = self.users.get(key)
        if users is not None and req.uid in users:
            users.discard(req.uid)
            if not users:
                self._idle(key)

    def _idle(self, key: str) -> None:
        self.idle[key] = None
        while len(self.idle) > self.max_idle:
            old, _ = self.idle.popitem(last=False)
            del self.users[old]
            self._releases.append(old)

    def forget(self, uid: int) -> Waiting | None:
        """A request aborted while its constraint compiles: dropped from the wait."""
        for waiting in self.compiling.values():
            for i, w in enumerate(waiting):
                if w.req.uid == uid:
                    return waiting.pop(i)
        return None

    def all_waiting(self) -> list[Waiting]:
        """Every request waiting on a compile, oldest key first (a session ending takes them out)."""
        return [w for waiting in self.compiling.values() for w in waiting]

    def take_compiles(self) -> list[tuple[str, str, str]]:
        out, self._compiles = self._compiles, []
        return out

    def take_releases(self) -> list[str]:
        out, self._releases = self._releases, []
        return out

    def check(self, uids_in_scheduler: set[int]) -> None:
        """Idle integrity check: every user is a request the scheduler holds, and idle keys have none."""
        for key, users in self.users.items():
            assert users <= uids_in_scheduler, f"grammar {key[:12]}: users {users - uids_in_scheduler} are gone"
            assert (not users) == (key in self.idle), f"grammar {key[:12]}: idle list disagrees"
