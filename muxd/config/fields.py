"""Readers shared by several sections of the config file.

A name, a readable file, a list whose entries are read one by one, a
backoff pair, an allow-list, a ``tls:`` section: each reads a located node
(muxd.config.yaml_reader.Node) and raises a ConfigError located there, or
reports the errors of its parts and reads on (muxd.config.report).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from muxd.access import Network, parse_network
from muxd.checks import file_problem
from muxd.config.keys import BACKOFF_KEYS, TLS_KEYS
from muxd.config.model import SerialUpstream, TlsConfig
from muxd.config.values import NAME_RE, show
from muxd.config.yaml_reader import Node, Section

T = TypeVar("T")


def read_name(node: Node) -> str:
    """A port, listener or token name: it appears in paths, URLs and logs."""
    name = node.text("a name")
    if not NAME_RE.fullmatch(name):
        raise node.error(f"must match {NAME_RE.pattern}, got {show(name)}")
    return name


def readable_file(node: Node) -> str:
    # Checked here, so that `muxd check` and a reload name the key and line,
    # rather than a start that fails on the first handshake's context.
    path = node.file_path(absolute=True)
    problem = file_problem(path)
    if problem is not None:
        raise node.error(problem)
    return path


def list_of(read: Callable[[Node], T]) -> Callable[[Node], tuple[T, ...]]:
    """A reader of a list whose entries read() reads: an entry with an error is
    reported and left out, and the others read on."""
    return lambda node: tuple(node.report.collect(node.sequence(), read))


def check_unique(items: list[tuple[str, Node]], what: str) -> None:
    seen: dict[str, Node] = {}
    for key, node in items:
        if key in seen:
            node.add_error(f"duplicate {what} {show(key)} (first at line {seen[key].line})")
        else:
            seen[key] = node


def backoff(m: Section) -> tuple[float, float]:
    # A 0 backoff is an error, not "off": it would reconnect in a tight loop against
    # a device that is away (the reconnect storm), and doubling 0 never grows.
    d = SerialUpstream("")
    lo = m.read("backoff_min", lambda n: n.duration(0.01, 60, off=False), d.backoff_min)
    hi = m.read("backoff_max", lambda n: n.duration(0.01, 3600, off=False), d.backoff_max)
    if hi < lo and m.ok(*BACKOFF_KEYS):
        if "backoff_max" in m:
            m["backoff_max"].add_error(f"must not be below backoff_min ({lo:g}s)")
        else:
            # Raising the default maximum instead would be a silent guess; say it.
            m["backoff_min"].add_error(f"must not exceed backoff_max (default {hi:g}s): set backoff_max too")
    return lo, hi


def _network(node: Node) -> Network:
    value = node.value()
    if not isinstance(value, str):
        raise node.error(f"expected a network such as 10.0.0.0/8, got {show(value)}")
    return node.parsed(parse_network)


def allow_list(node: Node) -> tuple[Network, ...]:
    """An allow-list: networks in CIDR form (muxd.access). An empty list is an
    error rather than "nobody": a listener nobody may reach is a mistake, and
    "everybody" is what leaving the key out says."""
    entries = list(node.sequence())
    if not entries:
        raise node.error("an empty allow-list admits nobody: list networks, or remove the key")
    return tuple(node.report.collect(entries, _network))


def tls_section(node: Node) -> TlsConfig:
    m = node.mapping(TLS_KEYS, required=("cert", "key"))
    d = TlsConfig("", "")
    return TlsConfig(
        cert=m.read("cert", readable_file, d.cert),
        key=m.read("key", readable_file, d.key),
        client_ca=m.read("client_ca", readable_file, None),
        handshake_timeout=m.read(
            "handshake_timeout", lambda n: n.duration(0.01, 600, off=False), d.handshake_timeout
        ),
    )
