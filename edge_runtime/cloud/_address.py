"""Bridge addresses in gRPC's forms: ``host:port``, ``[v6]:port``, ``unix:path``; a client also takes
``dns:[//dns-server/]host:port`` and ``ipv4:``/``ipv6:`` lists of literal addresses (``ipv4:10.0.0.1:1,10.0.0.2:1``).

gRPC takes a port above 65535 modulo 2**16 (``127.0.0.1:99999`` binds or dials
34463) and a missing port as 443, so a typo reaches another service instead of
failing: :func:`check_address` makes it a ConfigError naming the field.
"""

from __future__ import annotations

import ipaddress

from ..errors import ConfigError

__all__ = ["check_address", "is_loopback_address"]

_SOCKET_SCHEMES = ("unix:", "unix-abstract:", "vsock:")  # no host and port to check
_LIST_SCHEMES = ("ipv4:", "ipv6:")  # gRPC's lists of literal addresses, comma-separated
_MAX_PORT = 65535


def _host(address: str) -> str:
    if address.startswith("["):  # [::1]:50051
        return address[1 : address.index("]")] if "]" in address else address
    host, sep, _port = address.rpartition(":")
    return host if sep else address


def _dns_target(address: str) -> tuple[str, bool]:
    """The ``host:port`` of ``dns:[//authority/]host:port`` (or of a bare ``host:port``), and whether an authority
    (a DNS server to ask) is named. ``dns://host:port`` without the slash after the authority gives ""."""
    if not address.startswith("dns:"):
        return address, False
    rest = address.removeprefix("dns:")
    if not rest.startswith("//"):  # dns:host:port
        return rest, False
    authority, sep, endpoint = rest[2:].partition("/")
    return (endpoint if sep else ""), bool(authority)


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_address(address: str) -> bool:
    """True for 127.0.0.0/8, ::1, localhost and Unix sockets: places only this machine can reach.

    A list (``ipv4:a:1,b:2``) is loopback only if every address in it is: gRPC may pick any of them.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    if address.startswith(_LIST_SCHEMES):
        return all(_is_loopback_ip(_host(target)) for target in _targets(address))
    target, asks_a_dns_server = _dns_target(address)
    host = _host(target)
    if host == "localhost":
        # the DNS server named in the address answers for "localhost", not this machine's hosts file,
        # and its answer could send the (plaintext) token anywhere
        return not asks_a_dns_server
    return _is_loopback_ip(host)


def _split(target: str) -> tuple[str, str] | None:
    """(host, port) of ``host:port`` or ``[v6]:port``; None for anything else."""
    if target.startswith("["):
        host, sep, port = target[1:].partition("]:")
    else:
        host, sep, port = target.rpartition(":")
        if ":" in host:  # an IPv6 address without brackets: gRPC would read it all as the host
            return None
    if not sep or not host or any(c.isspace() for c in host):
        return None
    return host, port


def _targets(address: str) -> list[str]:
    for scheme in _LIST_SCHEMES:
        if address.startswith(scheme):
            return address[len(scheme) :].split(",")
    return [_dns_target(address)[0]]


def check_address(address: str, *, field: str, min_port: int = 1) -> None:
    """Raise ConfigError naming ``field`` unless ``address`` has a host and a port in ``min_port``..65535.

    A server passes ``min_port=0`` (port 0 picks a free port). Unix sockets are not checked.
    """
    if address.startswith(_SOCKET_SCHEMES):
        # its path or name is not checked, but an empty one (``unix:``) made every call an outage
        scheme, _, rest = address.partition(":")
        if not rest.lstrip("/"):
            raise ConfigError(f"{scheme}: needs a socket's path or name after it, got {address!r}", field=field)
        return
    for target in _targets(address):
        parts = _split(target)
        if parts is None:
            raise ConfigError(
                f"expected host:port (an IPv6 address in brackets: [::1]:50051), got {address!r}", field=field
            )
        port = parts[1]
        if not (port.isascii() and port.isdigit()) or not min_port <= int(port) <= _MAX_PORT:
            raise ConfigError(f"the port must be a number in {min_port}..{_MAX_PORT}, got {port!r}", field=field)
