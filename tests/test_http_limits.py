"""The HTTP API's limits and transport, on real servers with one row per step (so a second request
waits): TLS from the same --tls-cert/--tls-key as gRPC, the --max-concurrent-rpcs cap (429 past it,
as gRPC answers RESOURCE_EXHAUSTED), a full waiting queue (429 queue_full with a retry hint)."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from pathlib import Path

import openai
import pytest

from client.local_server import TandemServer

MODEL = "random:tiny-llama"
ONE_ROW = ["--device", "cpu", "--max-num-tokens", "128", "--max-num-rows", "1", "--num-blocks", "256"]
LONG = {"model": MODEL, "prompt": [7] * 20, "max_tokens": 1500, "stream": True, "extra_body": {"ignore_eos": True}}


def _wait(server: TandemServer, running: int, waiting: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        st = server.stats()
        if (st.num_running, st.num_waiting) == (running, waiting):
            return
        assert time.monotonic() < deadline, st
        time.sleep(0.05)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl, as tests/test_security.py)."""
    d = tmp_path_factory.mktemp("http-certs")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=tandem-http-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server")
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "server.ext")
    return d


def test_tls_and_concurrency_cap(certs: Path):
    import grpc

    tls = ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with TandemServer(MODEL, http=True, worker_args=ONE_ROW, credentials=creds,
                      scheduler_args=[*tls, "--max-concurrent-rpcs", "2"]) as server:
        assert server.base_url.startswith("https://")
        trusting = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(certs / "ca.pem")))
        ok = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, http_client=trusting)
        assert ok.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2).usage.completion_tokens == 2
        for client in (openai.OpenAI(base_url=server.base_url.replace("https", "http"), api_key="none",
                                     max_retries=0, timeout=5),
                       openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=5)):
            with pytest.raises(openai.APIConnectionError):  # plaintext; a CA it does not trust
                client.models.list()

        first, second = ok.completions.create(**LONG), ok.completions.create(**LONG)
        _wait(server, 1, 1)  # two requests in flight: the cap
        with pytest.raises(openai.RateLimitError) as err:
            ok.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2)
        assert err.value.status_code == 429 and err.value.body["code"] == "too_many_requests"
        assert err.value.response.headers["retry-after"] == "1"
        first.close()
        second.close()
        assert server.wait_idle(5).num_running == 0
        assert ok.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2).usage.completion_tokens == 2


def test_full_queue_is_429():
    with TandemServer(MODEL, http=True, worker_args=ONE_ROW, scheduler_args=["--max-waiting", "1"]) as server:
        oa = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        first, second = oa.completions.create(**LONG), oa.completions.create(**LONG)
        _wait(server, 1, 1)
        with pytest.raises(openai.RateLimitError) as err:
            oa.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2)
        body = err.value.body
        assert (err.value.status_code, body["code"], body["type"]) == (429, "queue_full", "rate_limit_error")
        assert "queue full" in body["message"] and err.value.response.headers["retry-after"] == "1"
        first.close()
        second.close()
        st = server.wait_idle(5)
        assert st.kv_blocks_free == st.kv_blocks_total
        assert json.loads(oa.completions.with_raw_response.create(model=MODEL, prompt=[5], max_tokens=1).text)[
            "usage"]["completion_tokens"] == 1
