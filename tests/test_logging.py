"""Structured logs: JSON lines off a terminal, one canonical line per finished request, the client's
request id (x-request-id) on the lines of both processes, nothing per token."""

from __future__ import annotations

import asyncio
import json

import pytest

from client import AsyncTandemClient, TandemError
from client.local_server import TandemServer
from tests.conftest import TINY_WORKER_ARGS


def _json_lines(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    return parsed


def test_request_id_and_canonical_line_in_both_processes():
    with TandemServer(worker_args=[*TINY_WORKER_ARGS, "--log-level", "DEBUG"]) as server:
        async def run():
            async with AsyncTandemClient(server.address, metadata=[("x-request-id", "trace-abc-123")]) as c:
                await c.generate(token_ids=[11, 12, 13, 14], max_new_tokens=5, ignore_eos=True)
                with pytest.raises(TandemError):
                    await c.generate(token_ids=[11], max_new_tokens=0, request_id="bad-req-7")

        asyncio.run(run())
        server.wait_idle()
        scheduler = _json_lines(server.log_text("scheduler"))
        worker = _json_lines(server.log_text("worker"))
    assert all(x["process"] == "scheduler" and "timestamp" in x and "level" in x for x in scheduler)
    assert all(x["process"] == "worker" for x in worker)
    assert any(x.get("logger") == "tandem.server" for x in scheduler), "stdlib loggers go through the same renderer"
    mine = [x for x in scheduler if x.get("request_id") == "trace-abc-123"]
    assert [x["event"] for x in mine] == ["request finished"], "one line per request, none per token"
    line = mine[0]
    assert (line["prompt_tokens"], line["output_tokens"], line["finish_reason"]) == (4, 5, "length")
    assert 0 < line["ttft_s"] <= line["total_s"]
    refused = [x for x in scheduler if x.get("request_id") == "bad-req-7"]
    assert len(refused) == 1 and refused[0]["code"] == "INVALID_ARGUMENT"
    started = [x for x in worker if x.get("request_id") == "trace-abc-123"]
    assert len(started) == 1 and started[0]["event"] == "request started"
