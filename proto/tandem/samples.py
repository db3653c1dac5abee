"""The seeds of a request's n samples: one pure function both sides of the API can compute.

Sample 0 keeps the request's seed; sample i > 0 takes a splitmix64 mix of (seed, i), so that the
samples' counter-based noise streams are unrelated, and sample i equals a single request sent with
`derive_seed(seed, i)` (the worker keys its RNG by (seed, position) only). Torch-free: the scheduler,
the client and the tests import it.
"""

from __future__ import annotations

MAX_SAMPLES = 16
_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def derive_seed(seed: int, index: int) -> int:
    """The uint64 seed of sample `index` of a request seeded `seed` (index 0: `seed` itself)."""
    if not 0 <= seed <= _M64:
        raise ValueError(f"seed {seed} is not a uint64")
    if index < 0:
        raise ValueError(f"sample index {index} < 0")
    if index == 0:
        return seed
    # Two rounds: the first spreads the seed, the second the index, so (s, i) and (s', i') with
    # s + i == s' + i' do not collide as a plain sum would.
    return _splitmix64(_splitmix64(seed) ^ ((index * _GOLDEN) & _M64))
