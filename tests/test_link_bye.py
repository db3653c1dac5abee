"""A message the scheduler sent just before closing its socket (the BYE of an orderly shutdown) still
reaches the worker's loop, even when the drop is noticed in the same poll: the worker then exits 0
and logs the shutdown, not "scheduler lost" with status 1."""

from __future__ import annotations

import time

import zmq
from tandem import wire

from worker_svc.link import WorkerLink


def test_a_bye_sent_before_the_close_is_read_after_the_drop(tmp_path):
    address = f"ipc://{tmp_path}/engine.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(address)
    link = WorkerLink(address)
    try:
        link.send([b"HELLO", b""])
        peer, *_ = router.recv_multipart()  # connected both ways
        assert link.recv(50) is None and link.established
        router.send_multipart([peer, *wire.bye_message()])
        router.close(linger=1000)
        time.sleep(0.3)  # both the BYE and the disconnect are waiting when the worker next polls
        frames = link.recv(100)
        assert link.peer_lost, "the drop must have been seen in this poll for the test to mean anything"
        assert frames is not None and wire.split(frames)[0] == wire.KIND_BYE
        assert link.recv(10) is None  # nothing more: the loop then knows the scheduler is gone
    finally:
        link.close()
        ctx.term()
