"""`python -m worker_svc` as a real subprocess against a ROUTER bound by the test (the scheduler's role)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq
from tandem import wire
from tokenizers import Tokenizer

from tests.test_worker_runner import Planner, Req, greedy_reference
from worker_svc import models

ROOT = Path(__file__).resolve().parents[1]
NUM_BLOCKS = 64
STARTUP_S = 120  # first run on a fresh machine converts the embedded tokenizer's model (~30 s)


class Scheduler:
    """The test's end of the link: a ROUTER, like scheduler_svc's, talking to one worker."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(address)
        self.peer = b""

    def recv(self, timeout_s: float) -> tuple[bytes, bytes, list]:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"nothing from the worker in {timeout_s} s")
        peer, *frames = self.sock.recv_multipart()
        self.peer = peer
        return wire.split(frames)

    def recv_result(self, timeout_s: float = 30) -> wire.StepResult:
        kind, header, arrays = self.recv(timeout_s)
        assert kind == wire.KIND_RESULT
        return wire.StepResult.decode(header, arrays)

    def send(self, frames: list) -> None:
        self.sock.send_multipart([self.peer, *frames])

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def start_worker(address: str) -> subprocess.Popen:
    models.embedded_model_dir()  # convert once here, so the worker's own start stays short
    cmd = [sys.executable, "-m", "worker_svc", "--model", "random:tiny-llama", "--engine-address", address,
           "--num-blocks", str(NUM_BLOCKS), "--max-num-tokens", "128", "--max-num-rows", "8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture
def link(tmp_path: Path) -> Iterator[tuple[Scheduler, subprocess.Popen]]:
    address = f"ipc://{tmp_path}/e.sock"
    sched = Scheduler(address)
    proc = start_worker(address)
    try:
        yield sched, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate(timeout=10)[0].decode(errors="replace")
        print(out[-4000:])  # shown by pytest on failure
        sched.close()


def test_hello_plans_flush_garbage_and_scheduler_loss(link) -> None:
    sched, proc = link
    kind, header, _ = sched.recv(STARTUP_S)
    assert kind == wire.KIND_HELLO
    hello = wire.Hello.from_header(header)
    assert (hello.model_name, hello.vocab_size, hello.num_blocks, hello.block_size) == \
        ("random:tiny-llama", 49152, NUM_BLOCKS, 16)
    assert (hello.max_num_tokens, hello.max_num_rows, hello.max_context) == (128, 8, 2048)
    assert hello.max_blocks_per_row == 2048 // 16 and hello.pid == proc.pid
    assert hello.protocol_version == wire.PROTOCOL_VERSION and hello.device == "cpu"
    tok = Tokenizer.from_str(hello.tokenizer_json.decode())
    assert hello.eos_token_ids == [tok.token_to_id(hello.eos_token)]

    planner = Planner(NUM_BLOCKS)
    reqs = [Req([5, 17, 300, 4000, 12]), Req(list(range(1000, 1040)))]
    # Depth 2: step 1 carries step 0's tokens over before anyone knows them.
    sched.send(planner.plan([(r, len(r.prompt), True) for r in reqs]).encode())
    sched.send(planner.plan([(r, 1, True) for r in reqs], carry={0: 0, 1: 1}).encode())
    first = sched.recv_result()  # step 1's arrival released step 0's result
    assert first.step_id == 0 and first.compute_ms > 0
    for r, t in zip(reqs, first.sampled, strict=True):
        r.out.append(int(t))

    # Garbage of every kind in between: the worker logs it and keeps serving. A plan it cannot run is
    # answered REFUSED (so the scheduler resets the session at once); what is not even a message is not.
    sched.send([b"NOPE", b""])
    sched.send([b"PLAN"])
    sched.send([wire.KIND_PLAN, b"\xff\xfe not a protobuf"])
    bad = planner.plan([(Req([1, 2, 3]), 3, True)])
    planner.step_id -= 1
    sched.send([wire.KIND_PLAN, *bad.encode()[1:-1]])  # one array frame short
    for _ in range(2):
        kind, header, _ = sched.recv(10)
        assert kind == wire.KIND_REFUSED
        step_id, why = wire.decode_refused(header)
        assert step_id == -1 and why.startswith("undecodable plan"), why

    sched.send(wire.flush_message())
    second = sched.recv_result()
    assert second.step_id == 1
    for r, t in zip(reqs, second.sampled, strict=True):
        r.out.append(int(t))

    plan = planner.plan([(r, 1, True) for r in reqs])
    plan.flush = True
    sched.send(plan.encode())
    third = sched.recv_result()
    assert third.step_id == 2 and third.idle_gap_ms > 0
    for r, t in zip(reqs, third.sampled, strict=True):
        r.out.append(int(t))
    with pytest.raises(TimeoutError):
        sched.recv(0.3)  # nothing more was pending

    ref = models.load("random:tiny-llama", "cpu", torch.float32, seed=0).model
    for r in reqs:
        assert r.out == greedy_reference(ref, r.prompt, 3)

    started = time.monotonic()
    sched.close()
    rc = proc.wait(timeout=15)
    assert rc != 0, "worker must fail when the scheduler goes away"
    assert time.monotonic() - started < 8


def test_sigterm_exits_cleanly(link) -> None:
    sched, proc = link
    kind, _, _ = sched.recv(STARTUP_S)
    assert kind == wire.KIND_HELLO
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_pickle_weights_are_refused_unless_allowed(tmp_path: Path) -> None:
    """A model directory with only .bin (pickle) weights: refused with what it holds and what to do;
    loaded with allow_pickle_weights (`--allow-pickle-weights`), with the same weights."""
    src = models.load("random:tiny-llama", "cpu", torch.float32, seed=0).model
    src.config.save_pretrained(tmp_path)
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")  # the old format: a pickle
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models.embedded_model_dir() / name, tmp_path / name)
    with pytest.raises(ValueError, match=r"pickle weights \(pytorch_model\.bin\).*--allow-pickle-weights"):
        models.load(str(tmp_path), "cpu", torch.float32)
    loaded = models.load(str(tmp_path), "cpu", torch.float32, allow_pickle_weights=True).model
    for (name, a), (_, b) in zip(src.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_model_directory_without_tokenizer_files_is_refused_saying_so(tmp_path: Path) -> None:
    src = models.load("random:tiny-llama", "cpu", torch.float32, seed=0).model
    src.save_pretrained(tmp_path)  # config and safetensors weights, no tokenizer
    with pytest.raises(ValueError, match="has no tokenizer files"):
        models.load(str(tmp_path), "cpu", torch.float32)
