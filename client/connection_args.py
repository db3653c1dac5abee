"""The command-line flags every client command shares: the server address(es), bearer key and TLS
(the `tandem` CLI and `tandem bench` both use them; a module of its own so neither CLI imports the other)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .targets import SCHEMES

ADDRESS_HELP = ("server host:port; several replicas as a comma-separated list or by repeating the flag "
                "(round-robin over those SERVING), or a grpc target such as dns:///name:port")


class AddressAction(argparse.Action):
    """`--address`, repeatable: the first one given replaces the default (or TANDEM_ADDRESS), later
    ones add replicas. Stored as one comma-separated string, which the clients split (client.targets)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        value = str(values)
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            setattr(namespace, self.dest, value)
            return
        if value.startswith(SCHEMES) or str(current).startswith(SCHEMES):
            parser.error(f"{option_string}: a grpc target with a scheme (dns:, ipv4:, ...) is given alone")
        setattr(namespace, self.dest, f"{current},{value}")


def address_arg(p: argparse.ArgumentParser, default: str, help: str = ADDRESS_HELP) -> None:
    p.add_argument("--address", default=default, action=AddressAction, help=f"{help} (default {default})")


def connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", default=None, help="bearer token (prefer the TANDEM_API_KEY environment variable)")
    p.add_argument("--tls-ca", default=None, help="use TLS, trusting this PEM CA bundle ('' = the system's roots)")
    p.add_argument("--tls-cert", default=None, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert")


def connection_kwargs(args: argparse.Namespace) -> dict[str, str | None]:
    return {"api_key": args.api_key, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
