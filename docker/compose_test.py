"""`make compose-test`: the compose stack (profile cpu), run for real against built images.

Each step checks what it claims and, on failure, says which step failed (and shows the stack's logs):

  up-cold     `compose --profile cpu up -d` on fresh volumes; the scheduler's healthcheck reports
              healthy (the worker converted the embedded model into the empty model cache)
  generate    `tandem generate` from the host through the published port gets an answer
  worker-kill the worker's process is killed (SIGKILL from the host, as a crash); compose's restart
              policy brings the container back, and the same scheduler (same process) serves again
  bench       `compose --profile cpu --profile bench up bench` writes its results to the results volume
  stop-drain  `compose stop` while a stream is in flight: tokens keep coming after the scheduler got
              its SIGTERM (Docker's own record of the signal), the stream completes, the scheduler
              exits 0 and the worker exits by itself
  up-warm     `compose up -d` again: healthy from the warm model cache, with no conversion
  down        `compose down -v` leaves no container, volume or network of the project

Run with the project's virtual environment (the host side uses the Python client and the `tandem`
CLI): `.venv/bin/python docker/compose_test.py`. Environment: COMPOSE_TEST_PROJECT (project name),
COMPOSE_TEST_KEEP=1 (leave the stack up after a failure, to look at it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client import TandemClient  # noqa: E402
from client.types import TandemError  # noqa: E402

PROJECT = os.environ.get("COMPOSE_TEST_PROJECT", "tandem-compose-test")
HEALTHY_TIMEOUT_S = 600.0  # the healthcheck's start_period: a cold cache converts the model first
# A short bench: enough requests for a summary with percentiles, in well under a minute on 2 cores.
BENCH = {"TANDEM_BENCH_PROMPTS": "8", "TANDEM_BENCH_INPUT_LEN": "64", "TANDEM_BENCH_OUTPUT_LEN": "16"}
# A longer drain than the default 30 s: on a busy machine (another test suite beside this one) the CPU
# worker's decoding rate was seen to fall twentyfold within seconds, and the step checks the drain,
# not how fast the worker decodes on a shared machine.
DRAIN = {"TANDEM_DRAIN_TIMEOUT": "120", "TANDEM_STOP_GRACE_PERIOD": "135s"}
# The stream in flight at `compose stop` lasts this long at the decode rate measured just before:
# several times as long as compose takes to send SIGTERM (0.5 s, v1), and inside the drain timeout
# even when the rate then falls as it was seen to.
DRAIN_STREAM_S = 4.0


class StepFailed(Exception):
    pass


def compose_command() -> list[str]:
    """`docker compose` (v2) where the plugin exists, else Debian's `docker-compose` (v1)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise StepFailed("neither `docker compose` nor `docker-compose` is installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    def __init__(self) -> None:
        self.compose = compose_command()
        self.port = free_port()
        # Published on a free port, so a server already on 50051 does not collide with the test.
        self.env = {**os.environ, "TANDEM_PORT": str(self.port), **BENCH, **DRAIN}
        self.address = f"127.0.0.1:{self.port}"
        tandem = Path(sys.executable).with_name("tandem")
        self.tandem = str(tandem) if tandem.exists() else "tandem"

    def run(self, *args: str, profiles: tuple[str, ...] = ("cpu",), timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*self.compose, "-p", PROJECT, "-f", str(ROOT / "compose.yaml")]
        cmd += [a for p in profiles for a in ("--profile", p)] + list(args)
        out = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout)
        if check and out.returncode != 0:
            raise StepFailed(f"`{' '.join(cmd[len(self.compose):])}` exited {out.returncode}:\n{out.stderr[-3000:]}")
        return out

    def container(self, service: str) -> str:
        ids = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}",
                     "--filter", f"label=com.docker.compose.service={service}").split()
        if len(ids) != 1:
            raise StepFailed(f"expected one {service} container, found {len(ids)}")
        return ids[0]

    def state(self, service: str) -> dict[str, Any]:
        return json.loads(docker("inspect", "-f", "{{json .}}", self.container(service)))

    def logs(self, tail: int = 60) -> str:
        out = self.run("logs", "--no-color", "--tail", str(tail), profiles=("cpu", "bench"), check=False)
        return out.stdout + out.stderr

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={PROJECT}"
        found = []
        for kind, args in (("container", ["ps", "-aq"]), ("volume", ["volume", "ls", "-q"]),
                           ("network", ["network", "ls", "-q"])):
            found += [f"{kind} {name}" for name in docker(*args, "--filter", label).split()]
        return found

    def tandem_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.tandem, *args, "--address", self.address], capture_output=True, text=True,
                              timeout=timeout)

    def wait_healthy(self, start: float, timeout: float = HEALTHY_TIMEOUT_S) -> tuple[float, float]:
        """Seconds from `start` until the API first answers SERVING (asked from the host) and until the
        scheduler's healthcheck says healthy; fails at once if a container exits or the worker keeps
        restarting, with no need to wait out the timeout."""
        serving: float | None = None
        # Reconnect backoff capped as `tandem health --wait` does: the port opens while we poll.
        poller = TandemClient(self.address, options=[("grpc.initial_reconnect_backoff_ms", 200),
                                                     ("grpc.max_reconnect_backoff_ms", 1000)])
        while time.monotonic() - start < timeout:
            if serving is None and poller.health(timeout=1):
                serving = time.monotonic() - start
            sched, worker = self.state("scheduler"), self.state("worker-cpu")
            for name, st in (("scheduler", sched), ("worker-cpu", worker)):
                if st["State"]["Status"] in ("exited", "dead"):
                    raise StepFailed(f"{name} exited with {st['State']['ExitCode']} before the stack was healthy")
            if worker["RestartCount"] > 2:
                raise StepFailed(f"worker-cpu restarted {worker['RestartCount']} times before the stack was healthy")
            health = sched["State"].get("Health", {}).get("Status")
            if health == "healthy" and worker["State"]["Status"] == "running":
                healthy = time.monotonic() - start
                poller.close()
                return (serving if serving is not None else healthy), healthy
            probes = (sched["State"].get("Health") or {}).get("Log") or [{}]
            last = probes[-1].get("Output", "").strip()
            if health == "unhealthy":
                raise StepFailed(f"scheduler unhealthy: {last!r}")
            # `tandem health` prints one of these and nothing else; anything more (a traceback) is
            # the check itself broken, which the start period would otherwise hide for 10 minutes.
            if probes[-1].get("ExitCode", 0) != 0 and last not in ("SERVING", "NOT_SERVING", "UNREACHABLE"):
                raise StepFailed(f"the healthcheck command fails: {last[-1500:]}")
            time.sleep(0.5)
        raise StepFailed(f"not healthy after {timeout:.0f} s")


def docker(*args: str, timeout: float = 120) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise StepFailed(f"`docker {' '.join(args)}` exited {out.returncode}: {out.stderr.strip()[-2000:]}")
    return out.stdout.strip()


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.5) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise StepFailed(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - start


def worker_log_since(stack: Stack, since: float) -> str:
    out = subprocess.run(["docker", "logs", "--since", f"{since:.3f}", stack.container("worker-cpu")],
                         capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


# The steps. Each returns a line for the summary.

def step_up_cold(stack: Stack) -> str:
    since, start = time.time(), time.monotonic()
    stack.run("up", "-d", timeout=600)
    serving, healthy = stack.wait_healthy(start)
    if "converting" not in worker_log_since(stack, since):
        raise StepFailed("healthy, but the worker's log shows no conversion: the model cache was not cold")
    return f"cold model cache: up -> SERVING {serving:.1f} s, -> healthy {healthy:.1f} s"


def generate_once(stack: Stack) -> str:
    out = stack.tandem_cli("generate", "What is the capital of France?", "--chat", "--max-new-tokens", "16",
                           "--temperature", "0", "--json", "--timeout", "120")
    if out.returncode != 0:
        raise StepFailed(f"tandem generate exited {out.returncode}: {out.stderr.strip()}")
    result = json.loads(out.stdout)
    if not result["text"].strip() or result["usage"]["completion_tokens"] < 1:
        raise StepFailed(f"tandem generate answered nothing: {result}")
    return result["text"].strip()


def step_generate(stack: Stack) -> str:
    return f"answer through {stack.address}: {generate_once(stack)!r}"


def step_worker_kill(stack: Stack) -> str:
    sched_before, worker_before = stack.state("scheduler"), stack.state("worker-cpu")
    # A crash, as the restart policy sees one: SIGKILL to the worker's process from outside Docker.
    # `docker kill` would not do: the daemon counts it as a stop by hand, which no restart policy
    # (unless-stopped, always) undoes (seen with Docker 20.10: the container stayed exited).
    try:
        os.kill(int(worker_before["State"]["Pid"]), signal.SIGKILL)
    except PermissionError:
        raise StepFailed("killing the worker's process takes root (it runs as the container's uid 1000)") from None

    def restarted() -> bool:
        st = stack.state("worker-cpu")
        return st["RestartCount"] > worker_before["RestartCount"] and st["State"]["Status"] == "running"

    back = wait_for("the killed worker restarted by compose's restart policy", restarted, 60)
    serving = wait_for("the scheduler serving again with the new worker",
                       lambda: stack.tandem_cli("health", "--timeout", "2").returncode == 0, 300)
    answer = generate_once(stack)
    sched_after = stack.state("scheduler")
    for key in ("StartedAt", "Pid"):
        if sched_after["State"][key] != sched_before["State"][key]:
            raise StepFailed(f"the scheduler container was restarted ({key} changed)")
    if sched_after["RestartCount"] != sched_before["RestartCount"]:
        raise StepFailed("the scheduler container was restarted (RestartCount changed)")
    return f"worker back after {back:.1f} s, serving {serving:.1f} s later, same scheduler: {answer!r}"


def results_volume() -> str:
    names = docker("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                   "--filter", "label=com.docker.compose.volume=results").split()
    if len(names) != 1:
        raise StepFailed(f"expected one results volume, found {names}")
    return names[0]


def read_results(volume: str, *cmd: str) -> str:
    return docker("run", "--rm", "--network", "none", "-v", f"{volume}:/results:ro", "--entrypoint", cmd[0],
                  "tandem-cpu", *cmd[1:])


def step_bench(stack: Stack) -> str:
    start = time.monotonic()
    stack.run("up", "--no-color", "bench", profiles=("cpu", "bench"), timeout=600)
    took = time.monotonic() - start
    st = stack.state("bench")
    if st["State"]["Status"] != "exited" or st["State"]["ExitCode"] != 0:
        raise StepFailed(f"bench: {st['State']['Status']}, exit code {st['State']['ExitCode']}\n"
                         + stack.run("logs", "--no-color", "bench", profiles=("cpu", "bench")).stdout[-3000:])
    volume = results_volume()
    files = read_results(volume, "ls", "/results").split()
    summaries = [f for f in files if f.endswith(".json")]
    needed = {"results.csv"} | {s.removesuffix(".json") + ".requests.jsonl" for s in summaries}
    if not summaries or not needed <= set(files):
        raise StepFailed(f"the results volume holds {files}: no summary, requests and results.csv")
    summary = json.loads(read_results(volume, "cat", f"/results/{summaries[0]}"))
    prompts = int(BENCH["TANDEM_BENCH_PROMPTS"])
    if summary.get("completed") != prompts or summary.get("failed") != 0:
        raise StepFailed(f"bench completed {summary.get('completed')} of {prompts} requests: {summary}")
    return f"{prompts} requests in {took:.1f} s, results volume {volume}: {', '.join(sorted(files))}"


def step_stop_drain(stack: Stack) -> str:
    client = TandemClient(stack.address, timeout=120)
    probe = client.generate("Once upon a time", max_new_tokens=16, ignore_eos=True, temperature=0)
    rate = (probe.usage.completion_tokens - 1) / max(probe.timings.total_s - probe.timings.ttft_s, 1e-3)
    tokens = max(24, min(256, int(rate * DRAIN_STREAM_S)))
    started = threading.Event()
    got: dict[str, Any] = {"tokens": 0, "completion": None, "error": None}
    arrivals: list[tuple[int, int]] = []  # (wall clock ns, tokens) of each chunk

    def stream() -> None:
        try:
            for chunk in client.generate_stream("Once upon a time", max_new_tokens=tokens, ignore_eos=True,
                                                temperature=0):
                got["tokens"] += len(chunk.token_ids)
                arrivals.append((time.time_ns(), len(chunk.token_ids)))
                started.set()
                if chunk.completion is not None:
                    got["completion"] = chunk.completion
        except TandemError as e:
            got["error"] = e
        finally:
            started.set()

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    if not started.wait(60) or got["error"] is not None:
        raise StepFailed(f"the stream to drain did not start: {got['error']}")
    stop_wall, stop_at = time.time(), time.monotonic()
    stack.run("stop", timeout=300)
    stopped = time.monotonic() - stop_at
    reader.join(30)
    client.close()
    if got["error"] is not None:
        raise StepFailed(f"the request in flight failed during `compose stop`: {got['error']}")
    done = got["completion"]
    if done is None or done.finish_reason != "length" or done.usage.completion_tokens != tokens:
        raise StepFailed(f"the request in flight did not complete: {done}, {got['tokens']} tokens")
    # When the scheduler got its stop signal, by the daemon's clock (the same host's as ours).
    kills = docker("events", "--since", f"{stop_wall - 1:.3f}", "--until", f"{time.time():.3f}",
                   "--filter", f"container={stack.container('scheduler')}", "--filter", "event=kill",
                   "--format", "{{.TimeNano}}").split()
    if not kills:
        raise StepFailed("Docker recorded no stop signal sent to the scheduler")
    signalled = int(kills[0]) / 1e9 - stop_wall  # compose's own start-up is most of it (v1: Python)
    after = sum(n for t, n in arrivals if t > int(kills[0]))
    if after == 0:
        raise StepFailed("the stream had ended before the scheduler got its SIGTERM: nothing was drained")
    for service in ("scheduler", "worker-cpu"):
        st = stack.state(service)["State"]
        if st["Status"] != "exited":
            raise StepFailed(f"{service} is {st['Status']} after `compose stop`")
    code = stack.state("scheduler")["State"]["ExitCode"]
    if code != 0:
        raise StepFailed(f"the scheduler exited {code} after draining, not 0")
    # 137 would be Docker's SIGKILL at the end of the grace period: the worker must have exited by
    # itself once its scheduler was gone (status 1), or on a signal (0).
    code = stack.state("worker-cpu")["State"]["ExitCode"]
    if code not in (0, 1):
        raise StepFailed(f"the worker exited {code} on `compose stop`, not by itself after the scheduler")
    return (f"stream of {tokens} tokens ({rate:.1f} tokens/s) completed, {after} of them after the "
            f"scheduler's SIGTERM ({signalled:.1f} s after `stop`); stack stopped in {stopped:.1f} s")


def step_up_warm(stack: Stack) -> str:
    since, start = time.time(), time.monotonic()
    stack.run("up", "-d", timeout=600)
    serving, healthy = stack.wait_healthy(start)
    log = worker_log_since(stack, since)
    if "ready; connecting" not in log:
        raise StepFailed(f"healthy, but no new worker start in the worker's log since `up`: {log[-1500:]}")
    if "converting" in log:
        raise StepFailed("the worker converted the model again: the model cache volume was not kept")
    generate_once(stack)
    return f"warm model cache: up -> SERVING {serving:.1f} s, -> healthy {healthy:.1f} s"


def step_down(stack: Stack) -> str:
    stack.run("down", "-v", "--remove-orphans", profiles=("cpu", "bench"), timeout=180)
    left = stack.leftovers()
    if left:
        raise StepFailed(f"`down -v` left: {left}")
    return "nothing left"


STEPS: list[tuple[str, Callable[[Stack], str]]] = [
    ("up-cold", step_up_cold), ("generate", step_generate), ("worker-kill", step_worker_kill),
    ("bench", step_bench), ("stop-drain", step_stop_drain), ("up-warm", step_up_warm), ("down", step_down),
]


@contextmanager
def timed(name: str) -> Iterator[None]:
    start = time.monotonic()
    print(f"compose-test: {name} ...", flush=True)
    yield
    print(f"compose-test: {name} ok ({time.monotonic() - start:.1f} s)", flush=True)


def main() -> int:
    start = time.monotonic()
    try:
        stack = Stack()
        docker("image", "inspect", "tandem-cpu")
    except StepFailed as e:
        print(f"compose-test: FAILED at setup: {e}", file=sys.stderr)
        return 1
    print(f"compose-test: {' '.join(stack.compose)}, project {PROJECT}, API on {stack.address}", flush=True)
    # Leftovers of an earlier run would make the cache warm and the names ambiguous.
    stack.run("down", "-v", "--remove-orphans", profiles=("cpu", "bench"), check=False)
    lines = []
    for name, step in STEPS:
        try:
            with timed(name):
                lines.append(f"{name}: {step(stack)}")
                print(f"compose-test:   {lines[-1]}", flush=True)
        except Exception as e:  # whatever it is, it is this step's failure
            # The logs first, the verdict last: the last line of the output names the failed step.
            print(f"--- stack logs (last lines of each service) ---\n{stack.logs()}", file=sys.stderr)
            why = str(e) if isinstance(e, StepFailed) else f"{type(e).__name__}: {e}"
            print(f"compose-test: FAILED at step {name}: {why}", file=sys.stderr)
            if os.environ.get("COMPOSE_TEST_KEEP") != "1":
                stack.run("down", "-v", "--remove-orphans", profiles=("cpu", "bench"), check=False)
            return 1
    print(f"compose-test: passed in {time.monotonic() - start:.0f} s", flush=True)
    for line in lines:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
