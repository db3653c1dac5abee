"""Ids the scheduler hands out for the worker's resources: KV blocks and row slots.

Owns ids only (the worker owns the memory). An id leaves `used` in two stages: `free_after` tags it
with the last step sent that may still read or write it, and `release_through` returns it to the
free pool once that step's result has arrived. So a KV block, or a row slot, is never handed to
another request while an in-flight step still touches it. `DeferredPool` is that rule, with
reference counts; row slots use it as it is. `BlockManager` extends it for KV blocks with the block
geometry and the prefix cache (full blocks named by a chained key, kept after their last user and
reused by a request with the same prefix), so that an eviction too waits for the steps that may
read the block.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class DeferredPool:
    """Ids 0..n-1 with reference counts: free, used (ref > 0) or pending (ref 0, waiting for the last
    step that may touch the id to report). Row slots use it as it is; `BlockManager` adds the block
    geometry and the prefix cache."""

    def __init__(self, n: int, what: str = "id") -> None:
        assert n > 0
        self.size = n
        self.what = what
        self._ref = [0] * n
        # FIFO reuse: a freed id goes to the back, which keeps reuse of hot ids as late as possible.
        self._free: deque[int] = deque(range(n))
        self._pending: deque[tuple[int, list[int]]] = deque()  # (step_id, ids), step ids ascending
        self._pending_until: dict[int, int] = {}  # id -> the step its release waits for
        self._released_through = -1  # every step <= this has reported back
        self._num_used = 0

    @property
    def num_free(self) -> int:
        """Ids an allocation can take now."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_pending(self) -> int:
        return len(self._pending_until)

    def allocate(self, n: int) -> list[int]:
        assert 0 <= n <= self.num_free, f"allocate {n} {self.what}s with {self.num_free} free"
        out = [self._take_idle() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        self._num_used += n
        return out

    def _take_idle(self) -> int:
        return self._free.popleft()

    def free_after(self, step_id: int, ids: list[int]) -> None:
        """Drops one reference to each of `ids`; one that nobody holds any more becomes free once
        step `step_id` has reported (at once if it already has)."""
        idle = []
        for b in ids:
            assert self._ref[b] > 0, f"{self.what} {b} freed but not in use (double free?)"
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._num_used -= 1
                idle.append(b)
        if not idle:
            return
        if step_id <= self._released_through:
            for b in idle:
                self._to_idle(b)
            return
        for b in idle:
            self._pending_until[b] = step_id
        if self._pending and self._pending[-1][0] == step_id:
            self._pending[-1][1].extend(idle)
        else:
            assert not self._pending or self._pending[-1][0] < step_id, "frees must be tagged in step order"
            self._pending.append((step_id, idle))

    def release_through(self, step_id: int) -> int:
        """Step `step_id` (and every earlier one) has reported: its deferred frees become free."""
        assert step_id >= self._released_through, "results must arrive in step order"
        self._released_through = step_id
        released = 0
        while self._pending and self._pending[0][0] <= step_id:
            step, ids = self._pending.popleft()
            for b in ids:
                if self._pending_until.get(b) == step:  # not taken again meanwhile, nor re-freed later
                    del self._pending_until[b]
                    self._to_idle(b)
                    released += 1
        return released

    def _to_idle(self, b: int) -> None:
        self._free.append(b)

    def _idle_sets(self) -> list[set[int]]:
        return [set(self._free), set(self._pending_until)]

    def check_integrity(self, owners: Counter[int] | None = None) -> None:
        """Every id in one state; reference counts equal to the holders in `owners` when given."""
        idle = self._idle_sets()
        used = {b for b in range(self.size) if self._ref[b] > 0}
        assert len(idle[0]) == len(self._free), f"duplicate {self.what} in the free pool"
        every = [used, *idle]
        assert sum(map(len, every)) == len(set().union(*every)) == self.size, (
            f"{self.what}s: {' + '.join(str(len(x)) for x in every)} (used, free, pending...) != {self.size}")
        assert len(used) == self._num_used
        assert set(self._pending_until) <= {b for _, ids in self._pending for b in ids}
        if owners is not None:
            assert all(self._ref[b] == n for b, n in owners.items()) and sum(owners.values()) == sum(self._ref), (
                f"reference counts differ from the holders of the {self.what}s")


class BlockManager(DeferredPool):
    """The worker's paged KV cache as block ids, with reference counts and a prefix cache.

    A block is in exactly one state: free (holds nothing worth keeping), used (`ref` > 0: requests
    hold it; a full block of a prompt may be held by several), pending (ref 0, waiting for the last
    step that may touch it to report) or evictable (ref 0, released, its content named by a prefix
    key: matchable until the pool needs the block, least recently freed first). With caching, a
    full block whose tokens are written by a step already sent is registered under its key (`register`);
    a later request with the same prefix takes it (`match`) instead of recomputing it. A block found
    while pending is safe to share: its content is final, and it is handed to a different use only
    after release. Without caching (`caching=False`) nothing is registered and this is a plain pool.
    """

    def __init__(self, num_blocks: int, block_size: int, caching: bool = False) -> None:
        assert block_size > 0
        super().__init__(num_blocks, "block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._key_of: dict[int, PrefixKey] = {}  # registered blocks
        self._block_of: dict[int, int] = {}  # key hash -> block
        self._written_in: dict[int, int] = {}  # registered block -> the step that wrote its last token
        self.queries = 0  # prefix-cache lookups and hits, in tokens (vLLM's prefix_cache_queries / hits)
        self.hits = 0

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: free ones, then evictable ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (in use, pending or evictable)."""
        return len(self._key_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Share of blocks not available to allocate (used or awaiting release)."""
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _take_idle(self) -> int:
        if self._free:
            return self._free.popleft()
        b, _ = self._evictable.popitem(last=False)  # the least recently freed cached block, key and all
        self._unregister(b)
        return b

    def grow(self, block_ids: list[int], num_tokens: int) -> list[int] | None:
        """Appends blocks to `block_ids` until they hold `num_tokens`; returns the new ones, or None
        (nothing taken) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(block_ids)
        if need > self.num_free:
            return None
        new = self.allocate(need) if need > 0 else []
        block_ids.extend(new)
        return new

    def _to_idle(self, b: int) -> None:
        if b in self._key_of:
            self._evictable[b] = None
        else:
            self._free.append(b)

    def _idle_sets(self) -> list[set[int]]:
        return [*super()._idle_sets(), set(self._evictable)]

    # ---- the prefix cache ----------------------------------------------------------------------

    def register(self, block: int, key: PrefixKey, step_id: int) -> None:
        """`block` (in use) holds the tokens `key` names, the last of them written by step `step_id`
        (sent, or the plan being built)."""
        if not self.caching or block in self._key_of or key.hash in self._block_of:
            return  # already named, or the same content cached in another block: keep that one
        assert self._ref[block] > 0
        self._key_of[block] = key
        self._block_of[key.hash] = block
        self._written_in[block] = step_id

    def lookup(self, keys: list[PrefixKey]) -> list[int]:
        """The cached blocks of the longest prefix of `keys`, without taking them."""
        out: list[int] = []
        if not self.caching:
            return out
        for key in keys:
            b = self._block_of.get(key.hash)
            if b is None or self._key_of[b] != key:  # a hash collision never passes for a hit
                break
            out.append(b)
        return out

    def free_if_taken(self, blocks: list[int]) -> int:
        """`num_free` once `blocks` (found by `lookup`) are taken: evictable ones leave the free count."""
        return self.num_free - sum(1 for b in blocks if b in self._evictable)

    def take(self, blocks: list[int], step_id: int) -> None:
        """Takes a reference to each of `blocks` (found by `lookup`) for a request first scheduled in
        step `step_id`. The invariant that makes sharing safe at any pipeline depth: every step that
        wrote a block was sent before `step_id`, and steps run in order on the worker's one compute
        stream, so the reader's attention runs after the writer's KV store."""
        for b in blocks:
            assert self._written_in[b] < step_id, f"block {b} read by step {step_id}, written by a later one"
            if self._ref[b] == 0:
                self._num_used += 1
                self._evictable.pop(b, None)
                self._pending_until.pop(b, None)
            self._ref[b] += 1

    def _unregister(self, b: int) -> None:
        key = self._key_of.pop(b, None)
        if key is not None:
            del self._block_of[key.hash]
            del self._written_in[b]

    def check_integrity(self, owners: Counter[int] | None = None) -> None:
        super().check_integrity(owners)
        free, evict = set(self._free), set(self._evictable)
        assert all(b in self._key_of for b in evict) and not (free & set(self._key_of)), "cache state"
        assert {k.hash: b for b, k in self._key_of.items()} == self._block_of, "prefix map out of sync"
        assert self._written_in.keys() == self._key_of.keys()


@dataclass(frozen=True)
class PrefixKey:
    """Names the content of a full block: the chain of every block before it (`parent`), its tokens,
    and the extra keys that must also match (the request's cache salt; room for adapter ids)."""

    hash: int
    parent: int
    tokens: tuple[int, ...]
    extra: str = ""


ROOT_KEY = 0


def prefix_keys(token_ids: Callable[[int, int], list[int]], block_size: int, extra: str, have: list[PrefixKey],
                upto: int) -> None:
    """Extends `have` (the keys of the first len(have) full blocks of a sequence whose tokens
    [start, end) `token_ids` returns) to `upto` blocks."""
    while len(have) < upto:
        i = len(have)
        parent = have[-1].hash if have else hash((ROOT_KEY, extra))
        tokens = tuple(token_ids(i * block_size, (i + 1) * block_size))
        assert len(tokens) == block_size
        have.append(PrefixKey(hash((parent, tokens)), parent, tokens, extra))
