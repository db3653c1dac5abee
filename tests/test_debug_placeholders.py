"""The placeholder debug mode: carry-over placeholders are a sentinel that must never reach the model."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
import torch
from tandem.wire import PLACEHOLDER_SENTINEL, WireError

from client import AsyncTandemClient
from scheduler_svc.core.request import Request, SamplingParams
from scheduler_svc.core.scheduler import Scheduler, SchedulerLimits
from tests.conftest import TINY_WORKER_ARGS
from worker_svc.runner import apply_carry_over


def test_carry_over_replaces_placeholders_and_asserts_on_survivors():
    ids = torch.tensor([PLACEHOLDER_SENTINEL, 5, PLACEHOLDER_SENTINEL, 9], dtype=torch.int32)
    first = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    prev = torch.tensor([100, 200, 300], dtype=torch.int32)
    apply_carry_over(ids, first, torch.tensor([2, -1, 0, -1], dtype=torch.int32), prev, check=True)
    assert ids.tolist() == [300, 5, 100, 9]

    stale = torch.tensor([PLACEHOLDER_SENTINEL, 5], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="placeholder survived"):
        apply_carry_over(stale, torch.tensor([0, 1], dtype=torch.int32), torch.tensor([-1, -1], dtype=torch.int32),
                         prev, check=True)


def _pipelined_plans(placeholder: int):
    sched = Scheduler(SchedulerLimits(num_blocks=64, block_size=16, max_num_tokens=64, max_num_rows=8,
                                      max_blocks_per_row=16, max_context=256, max_waiting=8, pipeline_depth=2,
                                      placeholder=placeholder))
    sched.add(Request(req_id="a", prompt_ids=[4, 5, 6], max_new_tokens=5, sampling=SamplingParams(seed=1),
                      stop_token_ids=frozenset(), eos_token_ids=frozenset(), ignore_eos=True,
                      arrival_time=time.monotonic()))
    first, _ = sched.build_plan()
    second, _ = sched.build_plan()  # built before `first` reports: its decode row carries over
    return first, second


def test_scheduler_sends_the_sentinel_only_where_carry_over_fills_in():
    _, second = _pipelined_plans(PLACEHOLDER_SENTINEL)
    assert second.carry_index.tolist() == [0]
    assert second.input_ids.tolist() == [PLACEHOLDER_SENTINEL]
    second.validate(64, 8, 49152)  # accepted: the sentinel sits where carry-over writes
    second.carry_index[:] = -1
    with pytest.raises(WireError, match="placeholder sentinel"):
        second.validate(64, 8, 49152)


def test_debug_mode_end_to_end_gives_the_same_tokens(servers, tiny):
    debug = servers.get(worker_args=(*TINY_WORKER_ARGS, "--debug-placeholders"),
                        scheduler_args=("--debug-placeholders",))
    rng = random.Random(4)
    cases = [([rng.randrange(3, 49152) for _ in range(rng.randint(1, 150))], rng.randint(2, 30)) for _ in range(12)]

    async def run(address):
        async with AsyncTandemClient(address) as c:
            return await asyncio.gather(*(c.generate(token_ids=p, max_new_tokens=m, temperature=0.7, seed=i,
                                                     ignore_eos=True) for i, (p, m) in enumerate(cases)))

    assert [r.token_ids for r in asyncio.run(run(debug.address))] == [
        r.token_ids for r in asyncio.run(run(tiny.address))]
    assert np.all([len(r.token_ids) for r in asyncio.run(run(debug.address))] == np.array([m for _, m in cases]))
