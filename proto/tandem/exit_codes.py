"""The worker's exit statuses: what each one tells a supervisor (`tandem serve`, a container runtime).

One table shared by the worker, which exits with them, and the supervisors, which decide from them
whether a restart can help.
"""

from __future__ import annotations

ORDERLY = 0  # SIGTERM/SIGINT, or the scheduler's orderly BYE
SCHEDULER_LOST = 1  # the scheduler went away: restart, and connect to the next one
LOAD_ERROR = 2  # a bad flag, a model that cannot load, or another instance's scheduler: do not restart
HUNG = 3  # one step kept the worker busy past --hang-timeout: restart
REJECTED = 4  # the scheduler serves a live worker: a restart helps only once that one's connection drops
REPLACED = 5  # another worker took this one's place deliberately (--replace): leave it stopped
