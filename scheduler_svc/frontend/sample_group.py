"""A request's n samples: one validated request becomes n requests that share its prompt.

Owns the expansion (sample i gets the seed `tandem.samples.derive_seed(seed, i)` and waits, in the
core, for sample 0 to compute the prompt so that it reads the prompt's full blocks from the prefix
cache: core/scheduler.py `_leader_ready`) and the interleaving of their outputs for a stream. The gRPC
servicer uses both; any other front end can.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from tandem.samples import derive_seed

from scheduler_svc.core.request import Request
from scheduler_svc.frontend.detokenizer import OutputText
from scheduler_svc.frontend.handle import Delta, RequestHandle
from scheduler_svc.frontend.tokenizer import TandemTokenizer


def expand(req: Request) -> list[Request]:
    """The request's samples, sample 0 first (req itself when n = 1). Their `leader` is sample 0."""
    if req.num_samples <= 1:
        return [req]
    out = [req]
    for i in range(1, req.num_samples):
        child = dataclasses.replace(
            req, req_id=f"{req.req_id}.{i}", sampling=dataclasses.replace(req.sampling,
                                                                          seed=derive_seed(req.sampling.seed, i)),
            output_ids=[], block_ids=[], prefix_keys=[], sample_index=i, leader=req,
        )
        out.append(child)
    return out


def handles(reqs: list[Request], client_id: str, tokenizer: TandemTokenizer | None,
            stops: list[str], stream_interval: int = 1, streamed: bool = True) -> list[RequestHandle]:
    """One handle per sample; with n > 1 they share one `changed` event, so a stream wakes once for
    whichever sample has something new."""
    changed = asyncio.Event()
    out = []
    for r in reqs:
        r.client_id = client_id
        h = RequestHandle(r, client_id, OutputText(tokenizer, stops), stream_interval=stream_interval,
                          streamed=streamed)
        if len(reqs) > 1:
            h.changed = changed
        out.append(h)
    return out


async def interleave(group: list[RequestHandle]) -> AsyncIterator[tuple[int, Delta]]:
    """(sample index, delta) as the samples progress, each sample's last with its completion or
    error; ends when every sample has ended."""
    pending = list(range(len(group)))
    changed = group[0].changed  # shared by the group

    def ready(h: RequestHandle) -> bool:
        return bool(h._token_ids or h._text or h.done)

    while pending:
        # take() of one sample clears the shared event, so the check is on the handles themselves,
        # with no await between it and the wait: a wake-up is never lost.
        if not any(ready(group[i]) for i in pending):
            changed.clear()
            await changed.wait()
        for i in list(pending):
            h = group[i]
            if not ready(h):
                continue
            delta = h.take()
            if delta.completion is not None or delta.error is not None:
                pending.remove(i)
            yield i, delta
