"""The compose stack. Without a Docker engine: the file is valid for Docker Compose, every command it
runs (services, healthchecks) is one our CLIs accept with exactly the flags it uses, and its stop order
lets the scheduler drain. With one (a running engine, or a dockerd this user may start): `make
compose-test` builds the images and runs the stack for real (docker/compose_test.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
PROFILES = ("gpu", "cpu", "bench", "monitoring", "cpu-replica2", "gpu-replica2")


def _resolved(text: str) -> str:
    """${VAR:-default} -> default, as compose does with VAR unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def _parse(argv: list[str]) -> None:
    """Parses a container's command with the CLI it starts; argparse exits on an unknown flag."""
    if argv[:3] in (["python", "-m", "scheduler_svc"], ["python3", "-m", "scheduler_svc"]):
        from scheduler_svc.__main__ import parse_args

        parse_args(argv[3:])
    elif argv[:3] in (["python", "-m", "worker_svc"], ["python3", "-m", "worker_svc"]):
        from worker_svc.__main__ import build_parser

        build_parser().parse_args(argv[3:])
    elif argv[0] == "tandem":
        from client.cli import build_parser as tandem_parser

        tandem_parser().parse_args(argv[1:])
    else:
        pytest.fail(f"a command of ours that the test does not know: {argv}")


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_compose_file_is_valid():
    for profiles in ((), PROFILES):
        args = [a for p in profiles for a in ("--profile", p)]
        out = subprocess.run(["docker-compose", "-f", str(COMPOSE), *args, "config", "-q"], capture_output=True,
                             text=True, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr


def test_every_command_the_stack_runs_is_accepted_by_our_cli():
    spec = yaml.safe_load(_resolved(COMPOSE.read_text()))
    checked = 0
    for name, svc in spec["services"].items():
        if not str(svc.get("image", "")).startswith("tandem"):
            continue
        argv = list(svc.get("entrypoint") or ["tandem"]) + list(svc.get("command") or [])
        _parse(argv)
        checked += 1
        test = (svc.get("healthcheck") or {}).get("test")
        if test:
            assert test[0] == "CMD", f"{name}: healthcheck without a shell, please"
            _parse(test[1:])
    # scheduler, worker, worker-cpu, the second replica's three, bench (prometheus is not ours)
    assert checked == 7


def test_dockerfiles_copy_what_exists():
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for dockerfile in (ROOT / "docker").glob("Dockerfile.*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:  # --from: a build stage, not the context
                for src in line.split()[1:-1]:
                    if src.startswith("${"):
                        continue  # a build argument (the wheelhouse, which `make images` downloads)
                    assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}"
                    # .dockerignore lets in only what is named: a source it does not name is not in the context.
                    assert f"!{src}" in ignored, f"{dockerfile.name}: COPY {src}, which .dockerignore leaves out"


def test_stop_order_lets_the_scheduler_drain():
    """`compose stop` stops dependents first, so a worker that depends on the scheduler would stop (and
    fail every request in flight) before the scheduler drains: see "Stopping" in compose.yaml."""
    spec = yaml.safe_load(_resolved(COMPOSE.read_text()))
    services = spec["services"]
    drain = float(services["scheduler"]["command"][services["scheduler"]["command"].index("--drain-timeout") + 1])
    for name in ("worker", "worker-cpu", "worker-2", "worker-cpu-2"):
        svc = services[name]
        assert "depends_on" not in svc, f"{name} must not depend on the scheduler (it would be stopped first)"
        # A signal Python leaves at its default, which is to ignore it: the worker's SIGTERM handler
        # would end it at once. It exits by itself when its scheduler goes.
        assert svc["stop_signal"] == "SIGWINCH", name
        assert float(svc["stop_grace_period"].removesuffix("s")) > drain + 5, f"{name}: grace shorter than the drain"
        assert svc["restart"] == "unless-stopped", name
    assert float(services["scheduler"]["stop_grace_period"].removesuffix("s")) > drain


def test_a_second_replica_is_a_scheduler_and_worker_pair_of_its_own():
    """Each worker needs its own scheduler: replica 2's pair shares a link volume that replica 1's does
    not, publishes another port, and is off unless its profile is asked for."""
    services = yaml.safe_load(_resolved(COMPOSE.read_text()))["services"]

    def link(name: str) -> str:
        return next(v.split(":")[0] for v in services[name]["volumes"] if v.endswith(":/run/tandem"))

    assert link("scheduler") == link("worker") == link("worker-cpu") == "engine-link"
    assert link("scheduler-2") == link("worker-2") == link("worker-cpu-2") == "engine-link-2"
    assert services["scheduler-2"]["ports"] != services["scheduler"]["ports"]
    assert services["scheduler-2"]["command"] == services["scheduler"]["command"]
    assert "profiles" not in services["scheduler"]
    for name in ("scheduler-2", "worker-2", "worker-cpu-2"):
        assert set(services[name]["profiles"]) <= {"cpu-replica2", "gpu-replica2"}, name


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


# The whole run: wheel download and image build (a few minutes cold, seconds when cached), then the
# stack's steps (about a minute on 2 cores). Bounded here, and well inside CI's time.
COMPOSE_TEST_TIMEOUT_S = 1200


@pytest.mark.slow
@pytest.mark.timeout(COMPOSE_TEST_TIMEOUT_S + 120)
@pytest.mark.skipif(shutil.which("docker-compose") is None and shutil.which("docker") is None,
                    reason="no Docker client (docker / docker-compose) installed")
def test_compose_stack_for_real(tmp_path):
    if not _docker_answers():
        if shutil.which("dockerd") is None:
            pytest.skip("no Docker engine running and dockerd is not installed")
        if os.geteuid() != 0:
            pytest.skip("no Docker engine running and dockerd needs root")
    log = tmp_path / "compose-test.log"
    with log.open("w") as out:
        # Its own session, so that a timeout stops make, the scripts and any dockerd they started.
        proc = subprocess.Popen(["make", "--no-print-directory", "compose-test"], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=COMPOSE_TEST_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # with_dockerd.sh stops its dockerd on the way out
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    text = log.read_text()
    no_engine = re.search(r"with_dockerd: no Docker engine: (.*)", text)
    if no_engine:
        pytest.skip(f"dockerd cannot be started here: {no_engine.group(1)}")
    # The lines that name a failed step (docker/compose_test.py, docker/images.sh), then the output's end.
    verdicts = [line for line in text.splitlines() if ": FAILED" in line]
    tail = "\n".join(verdicts + ["--- end of the output ---"] + text.splitlines()[-60:])
    assert rc is not None, f"make compose-test ran past {COMPOSE_TEST_TIMEOUT_S} s:\n{tail}"
    assert rc == 0, f"make compose-test failed (exit {rc}):\n{tail}"
    assert "compose-test: passed" in text, tail
