"""Where a client connects: one server, several replicas, or a `dns:` name, as one gRPC channel target.

Owns the parsing of client addresses (`--address`, `TandemClient(address)`) into the target string and
channel options that grpc is given, and the listing of a target's replicas one by one (`tandem health`).
Load balancing itself is grpc's, not ours:

- one `host:port` (or any target with a scheme grpc knows, e.g. `unix:`): passed through unchanged;
  grpc's default policy (pick_first) and no client-side health checking, as before;
- several addresses (`"h1:50051,h2:50051"`, or a sequence of them): a static list. IP literals become
  grpc's multi-address target `ipv4:a:p,b:p` (`ipv6:[a]:p,...` when any is IPv6; IPv4 ones are then
  written IPv4-mapped, `[::ffff:a.b.c.d]`, since one target has one family). Hostnames are resolved
  once, here, when the client is made (grpc's `dns:` scheme takes one name only); a name whose
  addresses change is better given as `dns:///name:port`, which grpc re-resolves;
- `dns:///name:port` (or `dns://server/name:port`, `ipv4:`/`ipv6:` lists given as such): grpc
  resolves it (every A/AAAA record, e.g. a Kubernetes headless Service's pods).

A balanced target (the last two) gets the service config `round_robin` with client-side health
checking (`healthCheckConfig`, service ""): grpc opens a `grpc.health.v1.Health/Watch` stream to
every replica and only sends RPCs to those that report SERVING, so a replica whose worker is gone
(NOT_SERVING), one that is draining, or one that is unreachable is skipped; when none serves, an RPC
fails UNAVAILABLE at once. The Watch stream carries no call metadata, so replicas that require API
keys must exempt health checks (`--health-without-auth`), or the client must be made with
`health_check=False`.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Schemes of grpc's own resolvers that a target may start with, and those that may name several servers.
SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
_BALANCED_SCHEMES = ("dns:", "ipv4:", "ipv6:")


@dataclass(frozen=True)
class Target:
    """A parsed client address. `target` is what grpc's channel constructor gets; `replicas` the
    addresses of the replicas one by one (host:port, each usable as a target of its own) for a static
    list, empty for a `dns:` name (resolved with `resolve_replicas`); `tls_name` the name TLS checks
    the servers' certificates against when the target itself names none (resolved hostnames)."""

    target: str
    balanced: bool
    replicas: tuple[str, ...] = ()
    tls_name: str | None = None


def _split(address: str | Sequence[str]) -> list[str]:
    items = [address] if isinstance(address, str) else list(address)
    out: list[str] = []
    for item in items:
        if item.startswith(SCHEMES):
            out.append(item.strip())  # a grpc target: its commas are its own (ipv4:a,b)
        else:
            out.extend(part.strip() for part in item.split(",") if part.strip())
    if not out:
        raise ValueError("no server address given")
    return out


def split_host_port(address: str) -> tuple[str, int]:
    """("host", port) of `host:port` or `[v6]:port`; ValueError without a port."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r}: expected host:port (or [ipv6]:port)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, [{host}]:{port}")
    return host, int(port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"cannot resolve {host!r}: {e.strerror}") from None
    out: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if ip not in out:
            out.append(ip)
    return out


def _multi_address_target(endpoints: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]) -> str:
    if all(isinstance(ip, ipaddress.IPv4Address) for ip, _ in endpoints):
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in endpoints)
    parts = [f"[::ffff:{ip}]:{port}" if isinstance(ip, ipaddress.IPv4Address) else f"[{ip}]:{port}"
             for ip, port in endpoints]
    return "ipv6:" + ",".join(parts)


def parse_target(address: str | Sequence[str]) -> Target:
    """The grpc target of `address`: one server, a comma-separated list or a sequence of replicas, or
    a target with a grpc scheme (`dns:///name:port`, `ipv4:a:p,b:p`); see the module docstring."""
    items = _split(address)
    if len(items) == 1:
        item = items[0]
        if item.startswith(_BALANCED_SCHEMES):
            replicas: tuple[str, ...] = ()
            if item.startswith(("ipv4:", "ipv6:")):
                replicas = tuple(a.strip() for a in item.split(":", 1)[1].split(",") if a.strip())
            return Target(item, balanced=True, replicas=replicas)
        return Target(item, balanced=False, replicas=(item,))
    if any(item.startswith(SCHEMES) for item in items):
        raise ValueError("a grpc target with a scheme (dns:, ipv4:, ...) cannot be combined with other addresses; "
                         "list them all as host:port")
    endpoints: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
    names: set[str] = set()
    for item in items:
        host, port = split_host_port(item)
        ip = _ip(host)
        if ip is None:
            names.add(host)
            ips = _resolve(host, port)
        else:
            ips = [ip]
        for resolved in ips:
            if (resolved, port) not in endpoints:
                endpoints.append((resolved, port))
    # TLS checks a certificate against one name per channel: that of the hosts when they share one
    # (check_tls_names refuses a list of several names under TLS).
    tls_name = next(iter(names)) if len(names) == 1 else None
    return Target(_multi_address_target(endpoints), balanced=True, replicas=tuple(items), tls_name=tls_name)


def _names_conflict(address: str | Sequence[str]) -> bool:
    hosts = {split_host_port(i)[0] for i in _split(address) if not i.startswith(SCHEMES)}
    return len({h for h in hosts if _ip(h) is None}) > 1


def service_config(health_check: bool = True) -> str:
    """grpc's service config for a balanced target: round_robin, and client-side health checking of
    the whole server (service name "") unless `health_check` is False."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_check:
        config["healthCheckConfig"] = {"serviceName": ""}
    return json.dumps(config)


def channel_options(target: Target, options: Sequence[tuple[str, Any]] | None, *, tls: bool,
                    health_check: bool = True) -> list[tuple[str, Any]]:
    """The caller's channel options, plus, for a balanced target, the service config above (unless the
    caller set one) and the TLS name of resolved hostnames (unless the caller set one)."""
    opts = list(options or [])
    names = {name for name, _ in opts}
    if target.balanced and "grpc.service_config" not in names:
        # Ours, not one a DNS TXT record might supply.
        opts += [("grpc.service_config", service_config(health_check)), ("grpc.service_config_disable_resolution", 1)]
    if tls and target.tls_name and "grpc.ssl_target_name_override" not in names:
        opts += [("grpc.ssl_target_name_override", target.tls_name), ("grpc.default_authority", target.tls_name)]
    return opts


def check_tls_names(address: str | Sequence[str]) -> None:
    """ValueError for a static list of differently named hosts under TLS: one channel checks every
    server's certificate against one name (use `dns:///name:port`, or IP addresses in the certificates)."""
    if _names_conflict(address):
        raise ValueError("TLS to a list of differently named hosts: one channel checks every certificate against one "
                         "name; give one name (dns:///name:port) or the hosts' IP addresses")


def replica_targets(target: Target) -> list[Target]:
    """Every replica of `target` as a target of its own (one server each): a static list's addresses
    as given; a `dns:` name's A/AAAA records now (what grpc's resolver sees, give or take a TTL), each
    with the name for TLS to check."""
    if not target.balanced:
        return [target]
    if target.replicas:
        return [Target(r, balanced=False, replicas=(r,), tls_name=target.tls_name) for r in target.replicas]
    rest = target.target[len("dns:"):]
    if rest.startswith("//"):  # dns://[dns-server]/name:port: the resolver's server is not a replica
        rest = rest[2:].partition("/")[2]
    try:
        host, port = split_host_port(rest)
    except ValueError:
        host, port = rest, 443  # grpc's default port of a dns: target
    out = []
    for ip in _resolve(host, port):
        address = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        out.append(Target(address, balanced=False, replicas=(address,), tls_name=None if _ip(host) else host))
    return out


def channel_args(address: str | Sequence[str], options: Sequence[tuple[str, Any]] | None, *, tls: bool,
                 health_check: bool = True) -> tuple[Target, list[tuple[str, Any]]]:
    """(the parsed target, the options for grpc's channel constructor): what both clients open."""
    target = parse_target(address)
    if tls:
        check_tls_names(address)
    return target, channel_options(target, options, tls=tls, health_check=health_check)


def display(address: str | Sequence[str]) -> str:
    """`address` as one string, for messages: a sequence joined by commas."""
    return address if isinstance(address, str) else ",".join(address)
