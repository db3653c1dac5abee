"""The scheduler's view of the worker's paged KV cache: which blocks are free, used, or pending.

Owns block ids only (the worker owns the memory). A block leaves `used` in two stages: `free_after`
tags it with the last step sent that may still write or read it, and `release_through` returns it to
the free pool once that step's result has arrived. So a block is never handed to another request
while an in-flight step still touches it.
"""

from __future__ import annotations

from collections import deque


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        # FIFO reuse: a freed block goes to the back, which keeps reuse of hot blocks as late as possible.
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()
        self._pending: deque[tuple[int, list[int]]] = deque()  # (step_id, blocks), step ids ascending
        self._num_pending = 0
        self._released_through = -1  # every step <= this has reported back

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def num_pending(self) -> int:
        return self._num_pending

    @property
    def usage(self) -> float:
        """Share of blocks not available to allocate (used or awaiting release)."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def allocate(self, n: int) -> list[int]:
        assert 0 <= n <= len(self._free), f"allocate {n} with {len(self._free)} free"
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Appends blocks to `block_ids` until they hold `num_tokens`; False (nothing taken) if short."""
        need = self.blocks_for(num_tokens) - len(block_ids)
        if need > len(self._free):
            return False
        if need > 0:
            block_ids.extend(self.allocate(need))
        return True

    def free_after(self, step_id: int, blocks: list[int]) -> None:
        """Gives `blocks` back once step `step_id` has reported (at once if it already has)."""
        for b in blocks:
            assert b in self._used, f"block {b} freed but not in use (double free?)"
            self._used.remove(b)
        if not blocks:
            return
        if step_id <= self._released_through:
            self._free.extend(blocks)
            return
        if self._pending and self._pending[-1][0] == step_id:
            self._pending[-1][1].extend(blocks)
        else:
            assert not self._pending or self._pending[-1][0] < step_id, "frees must be tagged in step order"
            self._pending.append((step_id, list(blocks)))
        self._num_pending += len(blocks)

    def release_through(self, step_id: int) -> int:
        """Step `step_id` (and every earlier one) has reported: its deferred frees become free."""
        assert step_id >= self._released_through, "results must arrive in step order"
        self._released_through = step_id
        released = 0
        while self._pending and self._pending[0][0] <= step_id:
            _, blocks = self._pending.popleft()
            self._free.extend(blocks)
            released += len(blocks)
        self._num_pending -= released
        return released

    def check_integrity(self) -> None:
        pending = [b for _, blocks in self._pending for b in blocks]
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate block in the free pool"
        assert len(pending) == len(set(pending)) == self._num_pending, "duplicate pending block"
        assert not (free & self._used) and not (free & set(pending)) and not (self._used & set(pending))
        assert len(free) + len(self._used) + len(pending) == self.num_blocks, (
            f"{len(free)} free + {len(self._used)} used + {len(pending)} pending != {self.num_blocks}"
        )
        assert all(0 <= b < self.num_blocks for b in free | self._used)
