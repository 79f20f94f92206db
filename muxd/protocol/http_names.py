"""Names in an HTTP request, sans-I/O: the request target, Host, peer addresses.

Target: it is split by hand (origin-form or absolute-form; any other form is
refused), and an error body echoes a peer's name or id cut short, so no
crafted target reaches urlsplit, the file system or a log with something they
raise on or choke on.

Host: DNS rebinding makes a browser send a hostile page's requests to muxd
with the hostile name in Host, and with an Origin that matches it. So every
request's Host (or an absolute-form target's authority) must name the server:
``localhost``, ``127.0.0.1`` or ``[::1]``, the host of the ``listen`` address
(its literal, even a wildcard's), or the address the socket is really bound to,
each with the port; or one of the config's ``server_names`` (a bare name
matches any port: behind a proxy, Host carries the proxy's port). Names are
compared in one normal form: lower case, no final dot, an IP in its canonical
text. The HTTP front answers another Host with 421 Misdirected Request, on
every route, and a malformed or repeated one with 400.

Peers are counted and trusted by address: an IPv4-mapped IPv6 address (from a
dual-stack socket) is its IPv4 address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from typing import Protocol

# Names and ids echoed in an error body are cut to this: the answer to a
# 16 KiB path need not repeat it.
ECHO_LIMIT = 64
# Names a browser on this host may use for the server whatever it is bound
# to: the only ones that always reach it, and never a rebound DNS name.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# The port a Host without one means (plain HTTP).
DEFAULT_PORT = 80
# A reg-name as hosts are written (letters, digits, "-", ".", "_"), with the
# DNS length limit; anything else in Host is malformed.
_REG_NAME = re.compile(r"[a-z0-9._-]{1,253}")

KnownHosts = frozenset[tuple[str, int | None]]


class ServerAddress(Protocol):
    """What host_names() reads of an HTTP server's config (config.HttpServer):
    a protocol, so this sans-I/O module imports nothing above protocol/."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def server_names(self) -> Collection[str]: ...


def echo(text: str) -> str:
    """repr() of a peer's string for an error body, cut to ECHO_LIMIT."""
    return repr(text[:ECHO_LIMIT]) + ("..." if len(text) > ECHO_LIMIT else "")


def split_target(target: bytes) -> tuple[str | None, str, str] | None:
    """(authority, path, query) of an origin-form ("/p?q") or absolute-form
    ("http://host/p?q", whose authority is returned) target; None for any
    other form (asterisk, authority, garbage).

    Split by hand: urlsplit reads "//[" as a network location and raises."""
    text = target.decode("ascii", "replace").partition("#")[0]
    authority = None
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        cut = len(rest)
        for mark in "/?":
            i = rest.find(mark)
            if 0 <= i < cut:
                cut = i
        authority, text = rest[:cut], rest[cut:]
        if not text.startswith("/"):
            text = "/" + text
    if not text.startswith("/"):
        return None
    path, _, query = text.partition("?")
    return authority, path, query


def normal_host(host: str) -> str:
    """A host as Host names are compared: lower case, no final dot, an IP in
    its canonical text."""
    host = host.lower().removesuffix(".")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def parse_host(value: str) -> tuple[str, int | None] | None:
    """Host's ``uri-host [":" port]`` (RFC 9110 section 7.2) as (normal host,
    port or None), or None if malformed."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            return None
        if not sep:
            return None
        host = ip.compressed
    else:
        host, sep, rest = value.partition(":")
        rest = sep + rest
        if not _REG_NAME.fullmatch(host.lower()):
            return None
        host = normal_host(host)
    if not rest or rest == ":":
        return host, None
    digits = rest[1:]
    if rest[0] != ":" or not (len(digits) <= 5 and digits.isascii() and digits.isdigit()):
        return None
    return host, int(digits)


def host_names(cfg: ServerAddress, bound: tuple[str, int] | None) -> KnownHosts:
    """The (host, port) pairs a Host may name; port None: any port."""
    ports = {cfg.port} | ({bound[1]} if bound else set())
    hosts = {*LOCAL_NAMES, normal_host(cfg.host)} | ({normal_host(bound[0])} if bound else set())
    known: set[tuple[str, int | None]] = {(h, p) for h in hosts for p in ports}
    # A server name has no port (config.parse_server_name): behind a proxy,
    # Host carries the proxy's port, not ours, and the name alone is the proof.
    known |= {(normal_host(name), None) for name in cfg.server_names}
    return frozenset(known)


def names_server(host: str, port: int | None, known: KnownHosts) -> bool:
    """Whether a parsed Host (parse_host) is one of host_names()' pairs."""
    return (host, DEFAULT_PORT if port is None else port) in known or (host, None) in known


def peer_ip(host: str) -> str:
    """A peer's address as connections are counted: an IPv4-mapped IPv6
    address (from a dual-stack socket) is its IPv4 address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return ip.compressed


def is_loopback(host: str) -> bool:
    """Whether a peer's address is loopback, an IPv4-mapped one included."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback
