"""The compose stack: the file is valid for Docker Compose, and every command it runs (services,
healthchecks) is one our CLIs accept with exactly the flags it uses. No Docker engine is needed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
PROFILES = ("gpu", "cpu", "bench", "monitoring")


def _resolved(text: str) -> str:
    """${VAR:-default} -> default, as compose does with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", text)


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
    assert checked == 4  # scheduler, worker, worker-cpu, bench (prometheus is not ours)


def test_dockerfiles_copy_what_exists():
    for dockerfile in (ROOT / "docker").glob("Dockerfile.*"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}"
