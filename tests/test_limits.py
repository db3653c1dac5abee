"""Request-size limits at the gRPC edge: a message past the scheduler's receive limit is refused
RESOURCE_EXHAUSTED before any handler runs, and the server goes on serving."""

from __future__ import annotations

import grpc
import pytest

from client import TandemClient, TandemError
from scheduler_svc.frontend.server import MAX_RECEIVE_MESSAGE_BYTES


def test_oversized_request_is_refused_and_the_server_serves_on(tiny):
    options = [("grpc.max_send_message_length", 2 * MAX_RECEIVE_MESSAGE_BYTES)]
    with TandemClient(tiny.address, timeout=60, options=options) as c:
        with pytest.raises(TandemError) as err:
            c.generate("x" * (MAX_RECEIVE_MESSAGE_BYTES + 1024), max_new_tokens=1)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(c.generate(token_ids=[5, 6], max_new_tokens=2, ignore_eos=True).token_ids) == 2
