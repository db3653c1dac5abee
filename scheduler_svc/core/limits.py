"""What a worker admits: the scheduler's limits (from the worker's Hello and the flags), the two
admission refusals, and the check that a request can ever run on such a worker. Pure Python, shared
by the scheduler and the engine loop (re-exported by scheduler.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_svc.core.block_manager import cdiv
from scheduler_svc.core.request import Request


class QueueFull(Exception):
    """The waiting queue is at its limit; the client may retry later."""


class NeverFits(ValueError):
    """The request cannot run even alone on an empty worker."""


@dataclass(frozen=True)
class SchedulerLimits:
    num_blocks: int
    block_size: int
    max_num_tokens: int  # token budget of one step
    max_num_rows: int
    max_blocks_per_row: int
    max_context: int
    max_waiting: int
    pipeline_depth: int = 1
    placeholder: int = 0  # input id of a carry-over row; wire.PLACEHOLDER_SENTINEL in debug mode
    num_slots: int = 0  # the worker's row slots (Hello.max_num_rows); 0 = max_num_rows
    check_state: bool = False  # debug: every plan asks the worker for its row-slot digest
    prefix_caching: bool = False  # full blocks are kept and shared by requests with the same prefix

    def __post_init__(self) -> None:
        assert self.pipeline_depth in (1, 2, 3), "pipeline depth is 1 (sync), 2 or 3 (async)"
        assert min(self.num_blocks, self.block_size, self.max_num_tokens, self.max_num_rows,
                   self.max_blocks_per_row, self.max_context) > 0
        assert self.num_slots == 0 or self.num_slots >= self.max_num_rows

    @property
    def slots(self) -> int:
        return self.num_slots or self.max_num_rows


def check_fits(L: SchedulerLimits, req: Request) -> None:
    """Raises NeverFits if `req` can never run on a worker with limits `L`."""
    total = req.num_prompt_tokens + req.max_new_tokens
    if total > L.max_context:
        raise NeverFits(f"{req.num_prompt_tokens} prompt + {req.max_new_tokens} new tokens exceed the "
                        f"{L.max_context}-token context")
    # The last sampled token is never written to the KV cache.
    blocks = cdiv(total - 1, L.block_size)
    if blocks > min(L.max_blocks_per_row, L.num_blocks):
        raise NeverFits(f"{req.num_prompt_tokens} prompt + {req.max_new_tokens} new tokens need {blocks} "
                        f"KV blocks of {L.block_size}; the worker allows {L.max_blocks_per_row} per "
                        f"request and has {L.num_blocks}")
