"""Shared fixtures: real Tandem servers (scheduler + worker processes), started once per session."""

from __future__ import annotations

import os
import shutil

# Without an NVIDIA driver the Triton kernels' tests (test_kernels.py) run in Triton's interpreter.
# Triton reads the switch once, on first use, and transformers may import triton early on, so it is
# set here, before any test module is imported.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from client.local_server import TandemServer  # noqa: E402

# Small enough that prompts of a few hundred tokens take several prefill chunks. CPU even where a GPU
# exists: these servers are compared token for token with float32 transformers on the CPU.
# TANDEM_TEST_DEVICE=cuda runs the process tests (links, recovery, supervision) against a CUDA worker;
# the tests that compare with CPU transformers then do not apply.
TINY_WORKER_ARGS = ["--device", os.environ.get("TANDEM_TEST_DEVICE", "cpu"), "--max-num-tokens", "128",
                    "--max-num-rows", "32", "--num-blocks", "512"]


def metric_value(port: int, name: str) -> float:
    """One unlabelled sample of a server's Prometheus endpoint (`--metrics-port`)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://localhost:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


class ServerPool:
    """Servers keyed by configuration, so tests that need the same one share it."""

    def __init__(self) -> None:
        self._servers: dict[tuple, TandemServer] = {}

    def get(self, model: str = "random:tiny-llama", *, depth: int = 2, worker_args: tuple[str, ...] = (),
            scheduler_args: tuple[str, ...] = ()) -> TandemServer:
        key = (model, depth, worker_args, scheduler_args)
        if key not in self._servers:
            # --debug-check-state: after every step the worker's row slots are checked against the
            # scheduler's; a mismatch fails the session's requests INTERNAL, so every test would see it.
            server = TandemServer(
                model=model,
                scheduler_args=["--pipeline-depth", str(depth), "--debug-check-state", *scheduler_args],
                worker_args=list(worker_args),
            )
            self._servers[key] = server.start()
        return self._servers[key]

    def close(self) -> None:
        for server in self._servers.values():
            server.stop()


@pytest.fixture(scope="session")
def servers():
    pool = ServerPool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def tiny(servers) -> TandemServer:
    return servers.get(worker_args=tuple(TINY_WORKER_ARGS))


@pytest.fixture(scope="session")
def tiny_sync(servers) -> TandemServer:
    return servers.get(depth=1, worker_args=tuple(TINY_WORKER_ARGS))


@pytest.fixture(scope="session")
def tiny_depth3(servers) -> TandemServer:
    return servers.get(depth=3, worker_args=tuple(TINY_WORKER_ARGS))


@pytest.fixture(scope="session")
def smol(servers) -> TandemServer:
    return servers.get("smollm2-135m-instruct", worker_args=("--max-num-tokens", "256"))


@pytest.fixture(scope="session")
def smol_sync(servers) -> TandemServer:
    return servers.get("smollm2-135m-instruct", depth=1, worker_args=("--max-num-tokens", "256"))


def _reference(spec: str):
    """The same weights the worker loads, with transformers' stock attention, as the oracle."""
    from worker_svc.models import load

    model = load(spec).model
    model.set_attn_implementation("sdpa")
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return _reference("random:tiny-llama")


@pytest.fixture(scope="session")
def smol_model():
    return _reference("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from worker_svc.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())
