"""A private local Tandem (scheduler + worker processes) for tests, benchmarks and notebooks.

Nothing here stands in for a component: `TandemServer` starts `python -m scheduler_svc` and
`python -m worker_svc` exactly as a user would, on a free port and a private ipc:// link in a 0700
directory, and waits for gRPC health SERVING. Depends only on grpc and the stubs, like all of client/.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tandem.v1 import api_pb2, api_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, for `python -m`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    return grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)


def health_status(address: str, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None) -> int | None:
    try:
        with _channel(address, credentials) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            return resp.status
    except grpc.RpcError:
        return None


@dataclass
class TandemServer:
    """A running scheduler + worker pair. `scheduler_args` / `worker_args` are extra CLI flags."""

    model: str = "random:tiny-llama"
    scheduler_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    start_worker: bool = True
    env: dict[str, str] = field(default_factory=dict)
    # How this launcher's own checks (health, stats) reach a server started with TLS / API keys.
    credentials: grpc.ChannelCredentials | None = None
    api_key: str = ""
    http: bool = False  # also serve the OpenAI-compatible HTTP API (on `http_port`, `base_url`)

    def __post_init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="tandem-test-")
        os.chmod(self._dir, 0o700)
        self.engine_address = f"ipc://{self._dir}/engine.sock"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.http_port = free_port() if self.http else 0
        self.scheduler: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self._logs: list = []

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(os.path.join(self._dir, f"{name}.log"), "w+")
        self._logs.append(log)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        return subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)

    def start(self, timeout: float = 180.0) -> TandemServer:
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()  # a worker left behind would wait for its scheduler forever
            raise

    def _start(self, timeout: float) -> TandemServer:
        self.scheduler = self._spawn("scheduler", [
            "scheduler_svc", "--address", self.address, "--engine-address", self.engine_address,
            *(["--http-port", str(self.http_port), "--http-host", "127.0.0.1"] if self.http else []),
            *self.scheduler_args,
        ])
        if self.start_worker:
            self.start_worker_process()
            self.wait_serving(timeout)
        else:
            deadline = time.monotonic() + timeout
            while health_status(self.address, credentials=self.credentials) is None:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"scheduler did not start:\n{self.logs()}")
                time.sleep(0.1)
        return self

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's base URL (`http=True`), as the openai SDK takes it."""
        scheme = "https" if "--tls-cert" in self.scheduler_args else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}/v1"

    def start_worker_process(self) -> None:
        self.worker = self._spawn("worker", [
            "worker_svc", "--model", self.model, "--engine-address", self.engine_address, *self.worker_args,
        ])

    def wait_serving(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while health_status(self.address, credentials=self.credentials) != health_pb2.HealthCheckResponse.SERVING:
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout}s:\n{self.logs()}")
            time.sleep(0.2)

    def _check_alive(self) -> None:
        for name, proc in (("scheduler", self.scheduler), ("worker", self.worker)):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")

    def log_text(self, name: str) -> str:
        """The whole log so far of one process: "scheduler" or "worker"."""
        with open(os.path.join(self._dir, f"{name}.log")) as f:
            return f.read()

    def logs(self) -> str:
        out = []
        for f in self._logs:
            f.flush()
            f.seek(0)
            out.append(f"--- {os.path.basename(f.name)} ---\n" + f.read()[-6000:])
        return "\n".join(out)

    def stats(self) -> api_pb2.ServerStats:
        meta = [("authorization", f"Bearer {self.api_key}")] if self.api_key else None
        with _channel(self.address, self.credentials) as ch:
            return api_pb2_grpc.TandemStub(ch).GetStats(api_pb2.GetStatsRequest(), timeout=10, metadata=meta)

    def wait_idle(self, timeout: float = 30.0) -> api_pb2.ServerStats:
        """Waits until nothing runs or waits and every KV block is back in the pool."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if st.num_running == 0 and st.num_waiting == 0 and st.kv_blocks_free == st.kv_blocks_total:
                return st
            if time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def stop(self) -> None:
        for proc in (self.worker, self.scheduler):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.worker, self.scheduler):
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for f in self._logs:
            f.close()

    def __enter__(self) -> TandemServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
