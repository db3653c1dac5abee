"""When each request of a load test is sent: the arrival schedule.

Owns the send offsets (seconds from the start) of N requests:
- `--request-rate inf` (the default): everything at once (the throughput test);
- Poisson (`--burstiness 1`) or gamma arrivals: inter-arrival gaps drawn from a gamma distribution
  of shape `burstiness` and mean 1 / rate (shape 1 is exponential, i.e. Poisson; below 1 burstier,
  above 1 more regular), as `vllm bench serve` draws them, then rescaled so the last request is sent
  at exactly N / rate: the run's offered load is the rate asked for, whatever the draw;
- a linear ramp (`--ramp-up-start-rate` / `--ramp-up-end-rate`): the instantaneous rate goes from
  the start rate to the end rate over the run, request i sent when the integral of the rate reaches
  i (the inverse of a quadratic);
- fixed concurrency (`--max-concurrency`) is not a schedule but a cap the runner applies on top of
  any of these (with rate inf: a closed loop of that many clients).
A seed fixes the draw.
"""

from __future__ import annotations

import math
import random


def offsets(num: int, rate: float, burstiness: float = 1.0, seed: int = 0,
            ramp: tuple[float, float] | None = None) -> list[float]:
    """Send times, seconds from the start, non-decreasing, for `num` requests."""
    if num <= 0:
        return []
    if ramp is not None:
        return ramp_offsets(num, *ramp)
    if math.isinf(rate):
        return [0.0] * num
    if not rate > 0 or not burstiness > 0:
        raise ValueError("request rate and burstiness must be positive")
    rng = random.Random(seed)
    gaps = [rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) for _ in range(num)]
    # The first request goes at 0; the N-1 gaps after it are rescaled so the last is sent at N / rate.
    times = [0.0]
    for g in gaps[1:]:
        times.append(times[-1] + g)
    if num > 1 and times[-1] > 0:
        scale = (num / rate) / times[-1]
        times = [t * scale for t in times]
    return times


def ramp_offsets(num: int, start_rate: float, end_rate: float) -> list[float]:
    """Request i at the time t where the ramp's cumulative count reaches i.

    Over a duration D the rate is r(t) = a + (b - a) t / D and sends N requests, so the mean rate
    (a + b) / 2 fixes D = 2N / (a + b); request i solves a t + (b - a) t^2 / (2D) = i.
    """
    a, b = float(start_rate), float(end_rate)
    if a < 0 or b < 0 or a + b <= 0:
        raise ValueError("ramp rates must be >= 0 and not both 0")
    duration = 2 * num / (a + b)
    k = (b - a) / (2 * duration)
    out = []
    for i in range(num):
        if abs(k) < 1e-12:
            out.append(i / a)
        else:
            out.append((-a + math.sqrt(a * a + 4 * k * i)) / (2 * k))
    return out
