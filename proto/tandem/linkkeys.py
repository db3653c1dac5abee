"""CURVE keys for the engine link when it crosses hosts (tcp://): encryption and mutual authentication.

Owns the key files and which socket option each end sets:
- `create(directory)`: a keypair for the scheduler and one for a worker, in ZeroMQ's certificate
  format (`NAME.key` public, `NAME.key_secret` secret, written 0600);
- the scheduler is the CURVE server (its secret key) and admits only workers whose public key file
  sits in its `--link-curve-clients` directory (ZAP, checked by pyzmq's authenticator);
- a worker is a CURVE client: its own secret key and the scheduler's public key.
Over ipc:// (the default) the link is a socket file in a 0700 directory and needs none of this.
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth


def create(directory: str | Path) -> dict[str, Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("scheduler", "worker"):
        public, secret = zmq.auth.create_certificates(str(d), name)
        os.chmod(secret, 0o600)
        out[f"{name}.key"], out[f"{name}.key_secret"] = Path(public), Path(secret)
    return out


def load(path: str | Path) -> tuple[bytes, bytes | None]:
    """(public, secret) of a certificate file; secret is None for a public-only `.key` file."""
    public, secret = zmq.auth.load_certificate(str(path))
    return public, secret


def make_server(sock: zmq.Socket, secret_file: str) -> None:
    public, secret = load(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file}: not a secret key file (want NAME.key_secret)")
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True


def make_client(sock: zmq.Socket, secret_file: str, server_public_file: str) -> None:
    public, secret = load(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file}: not a secret key file (want NAME.key_secret)")
    sock.curve_secretkey, sock.curve_publickey = secret, public
    sock.curve_serverkey = load(server_public_file)[0]


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tandem.linkkeys DIRECTORY", file=sys.stderr)
        return 2
    for path in create(args[0]).values():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
