"""Ids the scheduler hands out for the worker's resources: KV blocks and row slots.

Owns ids only (the worker owns the memory). An id leaves `used` in two stages: `free_after` tags it
with the last step sent that may still read or write it, and `release_through` returns it to the
free pool once that step's result has arrived. So a KV block, or a row slot, is never handed to
another request while an in-flight step still touches it. `DeferredPool` is that rule;
`BlockManager` adds the block geometry.
"""

from __future__ import annotations

from collections import deque


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class DeferredPool:
    """Ids 0..n-1: free, used, or pending (freed, waiting for a step's result)."""

    def __init__(self, n: int, what: str = "id") -> None:
        assert n > 0
        self.size = n
        self.what = what
        # FIFO reuse: a freed id goes to the back, which keeps reuse of hot ids as late as possible.
        self._free: deque[int] = deque(range(n))
        self._used: set[int] = set()
        self._pending: deque[tuple[int, list[int]]] = deque()  # (step_id, ids), step ids ascending
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

    def allocate(self, n: int) -> list[int]:
        assert 0 <= n <= len(self._free), f"allocate {n} {self.what}s with {len(self._free)} free"
        out = [self._free.popleft() for _ in range(n)]
        self._used.update(out)
        return out

    def free_after(self, step_id: int, ids: list[int]) -> None:
        """Gives `ids` back once step `step_id` has reported (at once if it already has)."""
        for b in ids:
            assert b in self._used, f"{self.what} {b} freed but not in use (double free?)"
            self._used.remove(b)
        if not ids:
            return
        if step_id <= self._released_through:
            self._free.extend(ids)
            return
        if self._pending and self._pending[-1][0] == step_id:
            self._pending[-1][1].extend(ids)
        else:
            assert not self._pending or self._pending[-1][0] < step_id, "frees must be tagged in step order"
            self._pending.append((step_id, list(ids)))
        self._num_pending += len(ids)

    def release_through(self, step_id: int) -> int:
        """Step `step_id` (and every earlier one) has reported: its deferred frees become free."""
        assert step_id >= self._released_through, "results must arrive in step order"
        self._released_through = step_id
        released = 0
        while self._pending and self._pending[0][0] <= step_id:
            _, ids = self._pending.popleft()
            self._free.extend(ids)
            released += len(ids)
        self._num_pending -= released
        return released

    def check_integrity(self) -> None:
        pending = [b for _, ids in self._pending for b in ids]
        free = set(self._free)
        assert len(free) == len(self._free), f"duplicate {self.what} in the free pool"
        assert len(pending) == len(set(pending)) == self._num_pending, f"duplicate pending {self.what}"
        assert not (free & self._used) and not (free & set(pending)) and not (self._used & set(pending))
        assert len(free) + len(self._used) + len(pending) == self.size, (
            f"{len(free)} free + {len(self._used)} used + {len(pending)} pending {self.what}s != {self.size}"
        )
        assert all(0 <= b < self.size for b in free | self._used)


class BlockManager(DeferredPool):
    """The worker's paged KV cache as block ids."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert block_size > 0
        super().__init__(num_blocks, "block")
        self.num_blocks = num_blocks
        self.block_size = block_size

    @property
    def usage(self) -> float:
        """Share of blocks not available to allocate (used or awaiting release)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def grow(self, block_ids: list[int], num_tokens: int) -> list[int] | None:
        """Appends blocks to `block_ids` until they hold `num_tokens`; returns the new ones, or None
        (nothing taken) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(block_ids)
        if need > self.num_free:
            return None
        new = self.allocate(need) if need > 0 else []
        block_ids.extend(new)
        return new
