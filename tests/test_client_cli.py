"""Client library, `tandem` CLI and serve Supervisor, tested without a Tandem server.

The Supervisor runs in a real subprocess over real `python -c` children; the client talks to a small
real grpc.aio server (this file's `_FakeTandem`) that answers, streams and aborts with google.rpc
details the way the scheduler does.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_status import rpc_status
from tandem.v1 import api_pb2, api_pb2_grpc

from client import AsyncTandemClient, TandemClient, TandemError, _convert, cli
from client.serve import ChildSpec, Supervisor

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------
# Supervisor, in a subprocess, over real children
# ---------------------------------------------------------------------------------------------------

SUPERVISOR = """
import json, sys
from client.serve import ChildSpec, Supervisor
children = json.loads(sys.argv[1])
specs = [ChildSpec(c[0], c[1], **(c[2] if len(c) > 2 else {})) for c in children]
sys.exit(Supervisor(specs, grace_s=float(sys.argv[2]), poll_s=0.02).run())
"""

# argv: name, directory, exit_after_s (<0: never), exit_code, on_sigterm ("exit" | "ignore")
CHILD = """
import os, signal, sys, time
name, d, exit_after, code, on_term = sys.argv[1:6]
def term(*_):
    open(os.path.join(d, name + ".term"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, term if on_term == "exit" else signal.SIG_IGN)
with open(os.path.join(d, name + ".tmp"), "w") as f:
    f.write(str(os.getpid()))
os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name + ".pid"))
start = time.monotonic()
while float(exit_after) < 0 or time.monotonic() - start < float(exit_after):
    time.sleep(0.02)
sys.exit(int(code))
"""


def _child(name: str, d: Path, exit_after: float = -1, code: int = 0, on_term: str = "exit") -> list:
    return [name, [sys.executable, "-c", CHILD, name, str(d), str(exit_after), str(code), on_term]]


def _start_supervisor(children: list, grace: float = 5.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, json.dumps(children), str(grace)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(autouse=True)
def _reap_children(tmp_path: Path) -> Iterator[None]:
    # A failing test must not leave its sleeping children behind.
    yield
    for pid_file in tmp_path.glob("*.pid"):
        pid = int(pid_file.read_text())
        try:
            # Only our own child: its command line names this test's directory (pids get reused).
            if str(tmp_path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def _wait_pids(d: Path, names: list[str], timeout: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((d / f"{n}.pid").exists() for n in names):
            return {n: int((d / f"{n}.pid").read_text()) for n in names}
        time.sleep(0.02)
    raise AssertionError(f"children {names} did not start")


def _alive(pid: int) -> bool:
    # A zombie (exited, not yet reaped by whoever inherited it) counts as dead.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(("code", "expected"), [(3, 3), (0, 1)])
def test_supervisor_child_exit_stops_the_other(tmp_path: Path, code: int, expected: int) -> None:
    sup = _start_supervisor([_child("steady", tmp_path), _child("quitter", tmp_path, 0.5, code)])
    try:
        pids = _wait_pids(tmp_path, ["steady", "quitter"])
        assert sup.wait(timeout=20) == expected
    finally:
        sup.kill()
        sup.wait()
    assert not _alive(pids["steady"]) and not _alive(pids["quitter"])
    assert (tmp_path / "steady.term").exists(), "the surviving child should get SIGTERM first"
    assert "quitter exited" in sup.stderr.read()


def test_supervisor_does_not_restart_a_child_that_cannot_start(tmp_path: Path) -> None:
    """The worker exits 2 when its model cannot load: restarting cannot help, so `tandem serve` stops
    with that code at once (its message is the worker's own) instead of three crash-loop restarts."""
    worker = [*_child("worker", tmp_path, 0.3, 2), {"restart": True, "fatal_codes": [2]}]
    sup = _start_supervisor([_child("steady", tmp_path), worker])
    try:
        pids = _wait_pids(tmp_path, ["steady", "worker"])
        assert sup.wait(timeout=20) == 2
    finally:
        sup.kill()
        sup.wait()
    err = sup.stderr.read()
    assert "restarting cannot mend" in err and "restarting it" not in err, err
    assert not _alive(pids["steady"]) and (tmp_path / "steady.term").exists()


def test_supervisor_sigterm_stops_children_and_exits_0(tmp_path: Path) -> None:
    sup = _start_supervisor([_child("a", tmp_path), _child("b", tmp_path)])
    try:
        pids = _wait_pids(tmp_path, ["a", "b"])
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=20) == 0
    finally:
        sup.kill()
        sup.wait()
    assert (tmp_path / "a.term").exists() and (tmp_path / "b.term").exists()
    assert not _alive(pids["a"]) and not _alive(pids["b"])


def test_supervisor_sigint_kills_a_child_that_ignores_sigterm_after_grace(tmp_path: Path) -> None:
    sup = _start_supervisor([_child("polite", tmp_path), _child("stubborn", tmp_path, on_term="ignore")], 0.5)
    try:
        pids = _wait_pids(tmp_path, ["polite", "stubborn"])
        t0 = time.monotonic()
        sup.send_signal(signal.SIGINT)
        assert sup.wait(timeout=20) == 0
        assert time.monotonic() - t0 >= 0.4  # it waited for the grace period before SIGKILL
    finally:
        sup.kill()
        sup.wait()
    assert not _alive(pids["polite"]) and not _alive(pids["stubborn"])
    assert "killing" in sup.stderr.read()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_supervisor_killed_leaves_no_orphans(tmp_path: Path) -> None:
    sup = _start_supervisor([_child("a", tmp_path), _child("b", tmp_path, on_term="ignore")])
    try:
        pids = _wait_pids(tmp_path, ["a", "b"])
    finally:
        sup.kill()  # SIGKILL: the supervisor gets no chance to clean up
        sup.wait()
    assert _wait_dead(pids["a"]) and _wait_dead(pids["b"])


# ---------------------------------------------------------------------------------------------------
# Request building
# ---------------------------------------------------------------------------------------------------

OPTIONAL_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "logprobs")


def test_request_builder_leaves_unset_optionals_unset() -> None:
    req = _convert.build_generate_request("hello")
    assert req.WhichOneof("prompt") == "text" and req.text == "hello"
    for name in OPTIONAL_FIELDS:
        assert not req.HasField(name), name
    assert list(req.stop) == [] and list(req.stop_token_ids) == []
    assert req.ignore_eos is False and req.request_id == ""


def test_request_builder_sets_zero_values() -> None:
    req = _convert.build_generate_request("x", **{name: 0 for name in OPTIONAL_FIELDS})
    for name in OPTIONAL_FIELDS:
        assert req.HasField(name), name
        assert getattr(req, name) == 0


def test_request_builder_maps_every_argument() -> None:
    req = _convert.build_generate_request(
        token_ids=[5, 6, 7],
        max_new_tokens=12,
        temperature=0.5,
        top_p=0.75,
        top_k=40,
        min_p=0.125,
        seed=2**63,
        stop=["\n\n", "END"],
        stop_token_ids=[2, 3],
        ignore_eos=True,
        logprobs=4,
        request_id="rid-1",
    )
    assert req.WhichOneof("prompt") == "token_ids" and list(req.token_ids.ids) == [5, 6, 7]
    assert (req.max_new_tokens, req.temperature, req.top_p, req.top_k, req.min_p) == (
        12,
        0.5,
        0.75,
        40,
        0.125,
    )
    assert req.seed == 2**63 and req.logprobs == 4 and req.ignore_eos is True
    assert list(req.stop) == ["\n\n", "END"] and list(req.stop_token_ids) == [2, 3]
    assert req.request_id == "rid-1"
    # A bare string is one stop string.
    assert list(_convert.build_generate_request("x", stop="ab").stop) == ["ab"]


def test_request_builder_messages_and_prompt_forms() -> None:
    req = _convert.build_generate_request(messages=[{"role": "system", "content": "S"}, ("user", "U")])
    assert req.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "S"), ("user", "U")]
    with pytest.raises(ValueError):
        _convert.build_generate_request()
    with pytest.raises(ValueError):
        _convert.build_generate_request("x", token_ids=[1])
    with pytest.raises(ValueError):
        _convert.build_generate_request(messages=[("user",)])
    with pytest.raises(ValueError, match="max_new_tokens"):
        _convert.build_generate_request("x", max_new_tokens=-1)
    tok = _convert.build_tokenize_request(messages=[("user", "U")])
    assert tok.WhichOneof("prompt") == "chat"
    with pytest.raises(ValueError):
        _convert.build_tokenize_request("x", messages=[("user", "U")])


# ---------------------------------------------------------------------------------------------------
# A small real grpc.aio server standing in for the scheduler
# ---------------------------------------------------------------------------------------------------


def _bad_request(field: str, description: str) -> grpc.Status:
    bad = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=description)]
    )
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"invalid {field}")
    status.details.add().Pack(bad)
    return rpc_status.to_status(status)


def _busy() -> grpc.Status:
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="queue full")
    status.details.add().Pack(
        error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=5 * 10**8))
    )
    return rpc_status.to_status(status)


def _completion() -> api_pb2.Completion:
    return api_pb2.Completion(
        finish_reason=api_pb2.FINISH_REASON_STOP_STRING,
        stop_string="\n",
        usage=api_pb2.Usage(prompt_tokens=4, completion_tokens=3),
        timings=api_pb2.Timings(queue_s=0.25, ttft_s=0.5, total_s=1.0),
    )


class _FakeTandem(api_pb2_grpc.TandemServicer):
    def __init__(self) -> None:
        self.requests: list[api_pb2.GenerateRequest] = []
        self._lock = threading.Lock()
        self._cancelled: dict[str, threading.Event] = {}

    def cancelled(self, request_id: str) -> threading.Event:
        with self._lock:
            return self._cancelled.setdefault(request_id, threading.Event())

    async def _check(self, request: api_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        self.requests.append(request)
        if request.text == "bad":
            await context.abort_with_status(_bad_request("temperature", "must be >= 0"))
        if request.text == "busy":
            await context.abort_with_status(_busy())

    async def Generate(self, request, context):
        await self._check(request, context)
        return api_pb2.GenerateResponse(
            request_id=request.request_id or "gen-1",
            text="Paris.",
            token_ids=[10, 11, 12],
            logprobs=[
                api_pb2.TokenLogprob(
                    token_id=10, logprob=-0.5, top=[api_pb2.TopLogprob(token_id=9, logprob=-1)]
                )
            ],
            completion=_completion(),
        )

    async def GenerateStream(self, request, context):
        await self._check(request, context)
        rid = request.request_id or "gen-1"
        if request.text != "forever":
            for i, piece in enumerate(["Pa", "ri", "s."]):
                yield api_pb2.GenerateResponse(request_id=rid, text=piece, token_ids=[10 + i])
            yield api_pb2.GenerateResponse(request_id=rid, completion=_completion())
            return
        finished = False
        try:
            for i in range(2000):  # bounded: a client that never cancels fails its test, not the run
                yield api_pb2.GenerateResponse(request_id=rid, text=f"{i} ", token_ids=[i])
                await asyncio.sleep(0.01)
            finished = True
            yield api_pb2.GenerateResponse(request_id=rid, completion=_completion())
        finally:
            if not finished:
                self.cancelled(rid).set()

    async def Tokenize(self, request, context):
        text = request.text if request.WhichOneof("prompt") == "text" else request.chat.messages[-1].content
        return api_pb2.TokenizeResponse(token_ids=[ord(c) for c in text], tokens=list(text))

    async def GetModelInfo(self, request, context):
        return api_pb2.ModelInfo(
            model="fake-model",
            vocab_size=100,
            max_context=64,
            eos_token_ids=[0, 1],
            pipeline_depth=2,
            worker_connected=True,
        )


class _ServerThread:
    """Runs the aio server on its own event loop thread so sync clients and async tests can both use it."""

    def __init__(self) -> None:
        self.servicer = _FakeTandem()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        self.address = f"127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.server = grpc.aio.server()
        api_pb2_grpc.add_TandemServicer_to_server(self.servicer, self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return port

    def set_health(self, status: int) -> None:
        asyncio.run_coroutine_threadsafe(self.health.set("", status), self.loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[_ServerThread]:
    s = _ServerThread()
    yield s
    s.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------
# Client library against the fake server
# ---------------------------------------------------------------------------------------------------


def test_sync_generate_result(server: _ServerThread) -> None:
    with TandemClient(server.address, timeout=10) as c:
        r = c.generate("hi", temperature=0, request_id="r1")
    assert (r.text, r.token_ids, r.request_id) == ("Paris.", [10, 11, 12], "r1")
    assert (r.finish_reason, r.matched_stop) == ("stop_string", "\n")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 3)
    assert (r.timings.queue_s, r.timings.ttft_s, r.timings.total_s) == (0.25, 0.5, 1.0)
    assert r.logprobs[0].token_id == 10 and r.logprobs[0].top[0].token_id == 9
    assert server.servicer.requests[-1].HasField("temperature")


def test_sync_bad_request_becomes_tandem_error(server: _ServerThread) -> None:
    with TandemClient(server.address, timeout=10) as c:
        with pytest.raises(TandemError) as info:
            c.generate("bad")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.message == "invalid temperature"
        assert info.value.field_violations == [("temperature", "must be >= 0")]
        assert info.value.retry_delay is None
        with pytest.raises(TandemError) as busy:
            c.generate("busy")
        assert busy.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and busy.value.retry_delay == 1.5
        with pytest.raises(TandemError) as in_stream:
            list(c.generate_stream("bad"))
        assert in_stream.value.field_violations == [("temperature", "must be >= 0")]


async def test_async_bad_request_becomes_tandem_error(server: _ServerThread) -> None:
    async with AsyncTandemClient(server.address, timeout=10) as c:
        with pytest.raises(TandemError) as info:
            await c.generate("bad")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.field_violations == [("temperature", "must be >= 0")]
        with pytest.raises(TandemError) as in_stream:
            async for _ in c.generate_stream("bad"):
                pass
        assert in_stream.value.field_violations == [("temperature", "must be >= 0")]
        with pytest.raises(TandemError) as busy:
            await c.generate("busy")
        assert busy.value.retry_delay == 1.5


def test_sync_stream_last_chunk_carries_completion(server: _ServerThread) -> None:
    with TandemClient(server.address, timeout=10) as c:
        chunks = list(c.generate_stream("hi"))
        assert "".join(ch.text for ch in chunks) == "Paris."
        assert [ch.completion is not None for ch in chunks] == [False, False, False, True]
        assert chunks[-1].completion.finish_reason == "stop_string"
        assert c.tokenize("ab").token_ids == [97, 98]
        assert list(c.tokenize(messages=[("user", "c")])) == [99]
        info = c.model_info()
        assert (info.model, info.eos_token_ids, info.worker_connected) == ("fake-model", [0, 1], True)
        assert c.health() is True and c.health_status() == "SERVING"
    with TandemClient(f"127.0.0.1:{_closed_port()}", timeout=2) as c:
        assert c.health() is False
        with pytest.raises(TandemError) as err:
            c.health_status()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_sync_break_out_of_stream_cancels_rpc(server: _ServerThread) -> None:
    with TandemClient(server.address, timeout=30) as c:
        for i, _chunk in enumerate(c.generate_stream("forever", request_id="sync-break")):
            if i == 2:
                break
        assert server.servicer.cancelled("sync-break").wait(10)
        stream = c.generate_stream("forever", request_id="sync-close")
        next(stream)
        stream.close()
        assert server.servicer.cancelled("sync-close").wait(10)
        assert list(stream) == []


async def test_async_stream_and_cancel(server: _ServerThread) -> None:
    async with AsyncTandemClient(server.address, timeout=30) as c:
        chunks = [ch async for ch in c.generate_stream(messages=[{"role": "user", "content": "hi"}])]
        assert "".join(ch.text for ch in chunks) == "Paris." and chunks[-1].completion is not None
        n = 0
        async for _chunk in c.generate_stream("forever", request_id="async-break"):
            n += 1
            if n == 3:
                break
        assert await asyncio.to_thread(server.servicer.cancelled("async-break").wait, 10)
        async with c.generate_stream("forever", request_id="async-with") as stream:
            await stream.__anext__()
        assert await asyncio.to_thread(server.servicer.cancelled("async-with").wait, 10)
        assert (await c.tokenize("ab")).token_ids == [97, 98]
        assert (await c.model_info()).model == "fake-model"
        assert await c.health() is True and await c.health_status() == "SERVING"
        server.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            assert await c.health() is False and await c.health_status() == "NOT_SERVING"
        finally:
            server.set_health(health_pb2.HealthCheckResponse.SERVING)


async def test_async_task_cancel_cancels_rpc(server: _ServerThread) -> None:
    async with AsyncTandemClient(server.address) as c:

        async def consume() -> None:
            async for _ in c.generate_stream("forever", request_id="async-task"):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(server.servicer.cancelled("async-task").wait, 10)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _tandem(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_cli_health_unreachable() -> None:
    p = _tandem("health", "--address", f"127.0.0.1:{_closed_port()}", "--timeout", "1")
    assert p.returncode != 0
    assert p.stdout.strip() == "UNREACHABLE"


def test_cli_health_wait_gives_up(capsys: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    rc = cli.main(["health", "--address", f"127.0.0.1:{_closed_port()}", "--timeout", "0.5", "--wait", "1"])
    assert rc == 1 and capsys.readouterr().out.strip() == "UNREACHABLE"
    assert 0.9 <= time.monotonic() - t0 < 10


def test_cli_health_serving_and_not_serving(
    server: _ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["health", "--address", server.address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    server.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert cli.main(["health", "--address", server.address, "--timeout", "2"]) == 1
        assert capsys.readouterr().out.strip() == "NOT_SERVING"
    finally:
        server.set_health(health_pb2.HealthCheckResponse.SERVING)


def test_cli_generate_without_prompt_is_usage_error() -> None:
    p = _tandem("generate", "--address", f"127.0.0.1:{_closed_port()}")
    assert p.returncode == 2
    assert "usage:" in p.stderr and "PROMPT" in p.stderr


def test_cli_help() -> None:
    script = Path(sys.executable).with_name("tandem")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "client.cli"]
    for sub in ("serve", "generate"):
        p = subprocess.run([*base, sub, "--help"], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert f"usage: tandem {sub}" in p.stdout
    serve_help = subprocess.run([*base, "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in (
        "--pipeline-depth",
        "--sync",
        "--model",
        "--kv-cache-memory-gb",
        "--max-num-rows",
        "--engine-address",
    ):
        assert flag in serve_help


def test_cli_generate_chat_maps_flags(server: _ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(
        [
            "generate",
            "hi",
            "--chat",
            "--system",
            "be brief",
            "--temperature",
            "0",
            "--stop",
            "a",
            "--stop",
            "b",
            "--address",
            server.address,
        ]
    )
    out = capsys.readouterr()
    assert rc == 0 and out.out == "Paris.\n"
    assert "stop_string" in out.err and "4 prompt" in out.err
    req = server.servicer.requests[-1]
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "be brief"), ("user", "hi")]
    assert req.HasField("temperature") and req.temperature == 0
    assert not req.HasField("max_new_tokens") and not req.HasField("seed")
    assert list(req.stop) == ["a", "b"]


def test_cli_generate_stream_and_json(server: _ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "hi", "--stream", "--address", server.address]) == 0
    assert capsys.readouterr().out == "Paris.\n"
    assert cli.main(["generate", "hi", "--json", "--seed", "7", "--address", server.address]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["text"] == "Paris." and result["finish_reason"] == "stop_string"
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "cached_tokens": 0}
    assert server.servicer.requests[-1].seed == 7


def test_cli_generate_error(server: _ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "bad", "--address", server.address]) == 1
    err = capsys.readouterr().err
    assert "error: INVALID_ARGUMENT: invalid temperature" in err
    assert "temperature: must be >= 0" in err


def test_cli_info_and_tokenize(server: _ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--address", server.address]) == 0
    out = capsys.readouterr().out
    assert "model: fake-model" in out and "eos_token_ids: 0, 1" in out
    assert cli.main(["tokenize", "ab", "--chat", "--json", "--address", server.address]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == [97, 98]


def test_serve_forwards_only_set_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("TANDEM_")]:
        monkeypatch.delenv(var)
    args = cli.build_parser().parse_args(
        ["serve", "--sync", "--model", "m", "--engine-address", "tcp://127.0.0.1:5555", "--num-blocks", "64"]
    )
    scheduler, worker = cli.serve_commands(args)
    assert scheduler == [
        sys.executable,
        "-m",
        "scheduler_svc",
        "--engine-address",
        "tcp://127.0.0.1:5555",
        "--pipeline-depth",
        "1",
    ]
    assert worker == [
        sys.executable,
        "-m",
        "worker_svc",
        "--model",
        "m",
        "--engine-address",
        "tcp://127.0.0.1:5555",
        "--num-blocks",
        "64",
    ]
    switched = cli.serve_commands(cli.build_parser().parse_args(["serve", "--no-prefix-caching"]))[0]
    assert switched[3:] == ["--no-prefix-caching"]  # a switch goes alone, without a value


def test_serve_announces_once_serving(server: _ServerThread) -> None:
    out = io.StringIO()
    sup = Supervisor([ChildSpec("unused", ["true"])])  # only its `stopping` event is used here
    cli._announce_when_serving(sup, server.address, out)
    assert out.getvalue() == (
        f"Tandem is serving on {server.address} — try: "
        f'{cli._tandem_command()} generate "What is the capital of France?" --chat --address {server.address}\n'
    )


def test_serve_names_a_tandem_the_user_can_run() -> None:
    """After `make run` the venv is not on PATH: the hint must name a command that exists."""
    command = cli._tandem_command()
    assert command == "tandem" or os.path.exists(command)
