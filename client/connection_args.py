"""The command-line flags every client command shares: bearer key and TLS (the `tandem` CLI and
`tandem bench` both use them; a module of its own so neither CLI imports the other)."""

from __future__ import annotations

import argparse


def connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=None, help="bearer token (prefer the TANDEM_API_KEY environment variable)")
    p.add_argument("--tls-ca", default=None, help="use TLS, trusting this PEM CA bundle ('' = the system's roots)")
    p.add_argument("--tls-cert", default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")


def connection_kwargs(args: argparse.Namespace) -> dict[str, str | None]:
    return {"api_key": args.api_key, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
