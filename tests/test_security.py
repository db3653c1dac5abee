"""Security: bearer-token authentication, the non-loopback bind guard, the concurrent-RPC cap, TLS
and mutual TLS, all against real scheduler processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from client import AsyncTandemClient, TandemClient, TandemError
from client.local_server import ROOT, TandemServer, free_port
from scheduler_svc.frontend.auth import is_loopback, load_keys
from tests.conftest import TINY_WORKER_ARGS

KEY = "k-0123456789abcdef-tandem"


def test_loopback_addresses():
    for a in ("localhost:1", "127.0.0.1:1", "127.5.0.1:9", "[::1]:50051", "unix:/tmp/x.sock"):
        assert is_loopback(a), a
    for a in ("0.0.0.0:1", "[::]:1", "10.0.0.1:1", "example.com:1", ":50051"):
        assert not is_loopback(a), a


def test_keys_from_file_and_list(tmp_path: Path):
    f = tmp_path / "keys"
    f.write_text("# comment\n" + KEY + "\n\n")
    assert load_keys(str(f), "other-key-0123456789") == [KEY.encode(), b"other-key-0123456789"]
    with pytest.raises(ValueError):
        load_keys(None, "short")


def test_bearer_tokens_are_required():
    with TandemServer(worker_args=TINY_WORKER_ARGS, scheduler_args=["--health-without-auth"],
                      env={"TANDEM_API_KEYS": KEY}, api_key=KEY) as server:
        async def call(api_key: str | None) -> object:
            async with AsyncTandemClient(server.address, api_key=api_key) as c:
                return await c.generate(token_ids=[5, 6], max_new_tokens=3)

        for bad in (None, "wrong-key-0123456789", KEY + "x"):
            with pytest.raises(TandemError) as err:
                asyncio.run(call(bad))
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert len(asyncio.run(call(KEY)).token_ids) == 3
        with TandemClient(server.address) as c:
            assert c.health()  # exempt by --health-without-auth
            with pytest.raises(TandemError) as err:
                c.model_info()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        env = {**os.environ, "TANDEM_API_KEY": KEY}
        out = subprocess.run([sys.executable, "-m", "client.cli", "info", "--address", server.address],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr


def test_non_loopback_bind_needs_auth_or_insecure():
    port = free_port()
    cmd = [sys.executable, "-m", "scheduler_svc", "--address", f"0.0.0.0:{port}", "--engine-address",
           f"ipc:///tmp/tandem-bind-test-{port}.sock"]
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert refused.returncode == 2 and "without authentication" in refused.stderr
    proc = subprocess.Popen([*cmd, "--insecure"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        with TandemClient(f"127.0.0.1:{port}") as c:
            while True:
                try:
                    assert c.health_status(timeout=1) == "NOT_SERVING"  # up, no worker yet
                    break
                except TandemError:
                    assert time.monotonic() < deadline, "scheduler with --insecure did not start"
                    time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_concurrent_rpc_cap_answers_resource_exhausted():
    with TandemServer(worker_args=TINY_WORKER_ARGS, scheduler_args=["--max-concurrent-rpcs", "2"]) as server:
        async def run():
            async with AsyncTandemClient(server.address) as c:
                calls = [c.generate(token_ids=[5, 6], max_new_tokens=400, ignore_eos=True) for _ in range(6)]
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(run())
        refused = [r for r in results if isinstance(r, TandemError)]
        assert refused and all(r.code == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
        assert any(not isinstance(r, Exception) and len(r.token_ids) == 400 for r in results)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, signed by it."""
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=tandem-test-ca", cwd=d)
    exts = (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth"))
    for name, ext in exts:
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
                 f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def test_tls_and_mutual_tls(certs: Path):
    c = {n: str(certs / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    creds = grpc.ssl_channel_credentials(Path(c["ca.pem"]).read_bytes(), Path(c["client.key"]).read_bytes(),
                                         Path(c["client.pem"]).read_bytes())
    tls_args = ["--tls-cert", c["server.pem"], "--tls-key", c["server.key"], "--tls-client-ca", c["ca.pem"]]
    with TandemServer(worker_args=TINY_WORKER_ARGS, scheduler_args=tls_args, credentials=creds) as server:
        address = f"localhost:{server.port}"
        with TandemClient(address, tls_ca=c["ca.pem"], tls_cert=c["client.pem"], tls_key=c["client.key"]) as ok:
            assert len(ok.generate(token_ids=[5, 6], max_new_tokens=2).token_ids) == 2
        for kwargs in ({}, {"tls_ca": c["ca.pem"]}):  # plaintext; TLS without a client certificate
            with TandemClient(address, timeout=5, **kwargs) as bad, pytest.raises(TandemError) as err:
                bad.generate(token_ids=[5, 6], max_new_tokens=2)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_server_only_tls(certs: Path):
    """TLS without client certificates (no --tls-client-ca): a client that trusts the CA is served; a
    plaintext client, or one that does not trust the server's certificate, is not."""
    c = {n: str(certs / n) for n in ("ca.pem", "server.pem", "server.key", "client.pem")}
    creds = grpc.ssl_channel_credentials(Path(c["ca.pem"]).read_bytes())
    tls_args = ["--tls-cert", c["server.pem"], "--tls-key", c["server.key"]]
    with TandemServer(worker_args=TINY_WORKER_ARGS, scheduler_args=tls_args, credentials=creds) as server:
        address = f"localhost:{server.port}"
        with TandemClient(address, tls_ca=c["ca.pem"]) as ok:
            assert len(ok.generate(token_ids=[5, 6], max_new_tokens=2).token_ids) == 2
        # Plaintext; TLS trusting another root (the client certificate stands in for a wrong CA).
        for kwargs in ({}, {"tls_ca": c["client.pem"]}):
            with TandemClient(address, timeout=5, **kwargs) as bad, pytest.raises(TandemError) as err:
                bad.generate(token_ids=[5, 6], max_new_tokens=2)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
