"""The configuration file: YAML in, frozen dataclasses out.

The file is parsed with PyYAML's safe loader into a node tree (``yaml.compose``)
rather than plain Python objects, because nodes keep their line numbers: every
error can then say ``muxd.yaml:14: ports[0].listeners[1].tcp: port must be
1..65535, got 70000``. Unknown keys are errors, never silently ignored, since a
misspelt ``overflow`` that falls back to a default is worse than no config.

The one-port command-line form builds the same structure as Python data and is
validated by the same code (its errors carry no line number).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from muxd.errors import ConfigError
from muxd.protocol.line_settings import BYTESIZES, FLOWS, STOPBITS, LineSettings

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_HOST = "127.0.0.1"  # safe by default: nothing is exposed beyond this machine unless asked

PARITY_NAMES = {"none": "N", "even": "E", "odd": "O", "mark": "M", "space": "S"}
LISTENER_KINDS = ("tcp", "unix", "pty", "rfc2217", "websocket")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# --------------------------------------------------------------------------
# The result


@dataclass(frozen=True)
class SerialUpstream:
    path: str
    settings: LineSettings = field(default_factory=LineSettings)
    backoff_min: float = 0.2
    backoff_max: float = 10.0

    def describe(self) -> str:
        return f"serial:{self.path}"


@dataclass(frozen=True)
class TcpUpstream:
    host: str
    port: int
    settings: LineSettings = field(default_factory=LineSettings)
    connect_timeout: float = 5.0
    # 5 s idle + 5 probes 2 s apart: a dead K2 is noticed within about 15 s.
    keepalive_idle: float = 5.0
    keepalive_interval: float = 2.0
    keepalive_count: int = 5
    idle_timeout: float = 0.0  # 0 = off: a quiet device is normal
    control: str = "none"  # none | rfc2217 | usr
    backoff_min: float = 0.2
    backoff_max: float = 10.0

    def describe(self) -> str:
        return f"tcp:{format_hostport(self.host, self.port)}"


@dataclass(frozen=True)
class SimUpstream:
    baudrate: int = 115200
    status_interval: float = 1.0
    boot: bool = True

    def describe(self) -> str:
        return f"sim:{self.baudrate}"


Upstream = SerialUpstream | TcpUpstream | SimUpstream


@dataclass(frozen=True)
class Listener:
    kind: str  # one of LISTENER_KINDS
    name: str
    host: str = ""  # tcp, rfc2217
    port: int = 0  # tcp, rfc2217
    path: str = ""  # unix socket path, pty symlink path
    mode: str = "ro"
    max_clients: int = 256
    # 256 KiB is 22 s of a 115200-baud stream: enough to ride out a reader's GC
    # pause or a slow network without loss, small enough for thousands of readers.
    buffer: int = 256 * KiB
    overflow: str = "drop-oldest"
    write: str = "chunks"
    notices: bool = False
    file_mode: int = 0o660  # unix socket / pty device permissions
    group: str | int | None = None

    @property
    def writable(self) -> bool:
        return self.mode == "rw"

    @property
    def address(self) -> str:
        if self.kind in ("tcp", "rfc2217"):
            return format_hostport(self.host, self.port)
        return self.path


@dataclass(frozen=True)
class Port:
    name: str
    upstream: Upstream
    listeners: tuple[Listener, ...] = ()
    # 64 KiB is over 5 s of commands at 115200 baud: room for a burst from every
    # writer, while a stuck device turns into backpressure on writers quickly.
    write_queue: int = 64 * KiB
    # 4 KiB holds any command line a console accepts; longer "lines" are data.
    max_line: int = 4 * KiB
    history: int = 64 * KiB
    line_control: str = "owner"

    @property
    def log_capacity(self) -> int:
        """The shared log must hold the largest backlog any reader may have."""
        return max([self.history, *(lst.buffer for lst in self.listeners)])


@dataclass(frozen=True)
class HttpServer:
    host: str
    port: int
    name: str
    origins: tuple[str, ...] = ()
    token: str | None = None


@dataclass(frozen=True)
class Config:
    ports: tuple[Port, ...]
    http: tuple[HttpServer, ...] = ()
    log_level: str = "info"
    source: str = field(default="<config>", compare=False)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------
# Schema: the keys each mapping accepts (also what the man page must document)

TOP_KEYS = {"ports", "http", "log_level"}
PORT_KEYS = {"name", "upstream", "listeners", "write_queue", "max_line", "history", "line_control"}
LINE_KEYS = {"baudrate", "bytesize", "parity", "stopbits", "flow"}
BACKOFF_KEYS = {"backoff_min", "backoff_max"}
SERIAL_KEYS = {"serial"} | LINE_KEYS | BACKOFF_KEYS
TCP_KEYS = (
    {"tcp", "connect_timeout", "keepalive_idle", "keepalive_interval", "keepalive_count", "idle_timeout"}
    | {"control"}
    | LINE_KEYS
    | BACKOFF_KEYS
)
SIM_KEYS = {"baudrate", "status_interval", "boot"}
LISTENER_COMMON = {"name", "mode", "max_clients", "buffer", "overflow", "write", "notices"}
LISTENER_EXTRA = {
    "tcp": set(),
    "rfc2217": set(),
    "websocket": set(),
    "unix": {"socket_mode", "group"},
    "pty": {"link_mode", "group"},
}
HTTP_KEYS = {"listen", "name", "origins", "token"}


def schema_keys() -> set[str]:
    """Every key name the config file accepts."""
    keys = TOP_KEYS | PORT_KEYS | SERIAL_KEYS | TCP_KEYS | {"sim"} | SIM_KEYS | LISTENER_COMMON | HTTP_KEYS
    keys |= set(LISTENER_KINDS)
    for extra in LISTENER_EXTRA.values():
        keys |= extra
    return keys


# --------------------------------------------------------------------------
# Node access with locations

T = TypeVar("T")
_constructor = yaml.constructor.SafeConstructor()


class _Node:
    """A YAML node with the key path that led to it, for located errors."""

    def __init__(self, node: yaml.Node | None, path: str, file: str, line: int | None) -> None:
        self.node = node
        self.path = path
        self.file = file
        self.line = line if node is None else node.start_mark.line + 1

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.path, self.line, self.file)

    def child(self, node: yaml.Node, suffix: str) -> _Node:
        sep = "" if suffix.startswith("[") or not self.path else "."
        return _Node(node, f"{self.path}{sep}{suffix}", self.file, None)

    def mapping(self, allowed: set[str], required: tuple[str, ...] = ()) -> dict[str, _Node]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {self.describe()}")
        out: dict[str, _Node] = {}
        for key_node, value_node in self.node.value:
            key = _constructor.construct_object(key_node)
            if not isinstance(key, str):
                raise self.child(key_node, str(key)).error("keys must be strings")
            child = self.child(value_node, key)
            child.line = key_node.start_mark.line + 1
            if key in out:
                raise child.error("duplicate key")
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                raise child.error(f"unknown key (expected one of: {hint})")
            out[key] = child
        for key in required:
            if key not in out:
                raise self.error(f"missing required key {key!r}")
        return out

    def sequence(self) -> Iterator[_Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got {self.describe()}")
        for i, item in enumerate(self.node.value):
            yield self.child(item, f"[{i}]")

    def value(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error(f"expected a single value, got {self.describe()}")
        return _constructor.construct_object(self.node)

    def describe(self) -> str:
        if isinstance(self.node, yaml.MappingNode):
            return "a mapping"
        if isinstance(self.node, yaml.SequenceNode):
            return "a list"
        return repr(self.value())

    # typed accessors

    def text(self) -> str:
        v = self.value()
        if not isinstance(v, str) or not v:
            raise self.error(f"expected a non-empty string, got {v!r}")
        return v

    def integer(self, lo: int, hi: int) -> int:
        v = self.value()
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise self.error(f"must be {lo}..{hi}, got {v}")
        return v

    def flag(self) -> bool:
        v = self.value()
        if not isinstance(v, bool):
            raise self.error(f"expected true or false, got {v!r}")
        return v

    def choice(self, options: tuple[str, ...] | list[str]) -> str:
        v = self.value()
        if v not in options:
            raise self.error(f"must be one of {', '.join(map(str, options))}; got {v!r}")
        return str(v)

    def size(self, lo: int, hi: int) -> int:
        v = self.value()
        n = parse_size(v)
        if n is None:
            raise self.error(f"expected a size such as 4096, 64KiB or 1MiB, got {v!r}")
        if not lo <= n <= hi:
            raise self.error(f"must be between {lo} and {hi} bytes, got {n}")
        return n

    def duration(self, lo: float, hi: float, off: bool = True) -> float:
        """A duration in seconds; 0 means off where `off` allows it."""
        v = self.value()
        s = parse_duration(v)
        if s is None:
            raise self.error(f"expected a duration such as 500ms, 5s or 1m, got {v!r}")
        if (s != 0 or not off) and not lo <= s <= hi:
            zero = "0 (off) or " if off else ""
            raise self.error(f"must be {zero}between {lo:g} and {hi:g} seconds, got {s:g}")
        return s

    def hostport(self) -> tuple[str, int]:
        v = self.value()
        try:
            return parse_hostport(v)
        except ValueError as exc:
            raise self.error(str(exc)) from None

    def file_mode(self) -> int:
        v = self.value()
        if isinstance(v, str):
            try:
                v = int(v, 8)
            except ValueError:
                raise self.error(f"expected an octal mode such as 0660, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
            raise self.error(f"expected an octal mode such as 0660, got {v!r}")
        return v


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_size(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if not isinstance(v, str):
        return None
    m = _SIZE_RE.match(v)
    if not m:
        return None
    unit = (m.group(2) or "B").upper()[0]
    return int(m.group(1)) * {"B": 1, "K": KiB, "M": MiB, "G": GiB}[unit]


def parse_duration(v: object) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v) if v >= 0 else None
    if not isinstance(v, str):
        return None
    m = _DURATION_RE.match(v)
    if not m:
        return None
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]


def parse_hostport(v: object, default_host: str = DEFAULT_HOST) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT', ':PORT' or 'PORT' (which binds the safe default host)."""
    if isinstance(v, int) and not isinstance(v, bool):
        host, port_s = default_host, str(v)
    elif isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"expected [IPV6]:PORT, got {v!r}")
            port_s = rest[1:]
        elif ":" in text:
            host, _, port_s = text.rpartition(":")
            if ":" in host:
                raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port_s}")
        else:
            host, port_s = "", text
        host = host or default_host
    else:
        raise ValueError(f"expected HOST:PORT, got {v!r}")
    if not port_s.isdigit():
        raise ValueError(f"expected HOST:PORT with a numeric port, got {v!r}")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.match(r"^[A-Za-z0-9.-]+$", host):
            raise ValueError(f"not a valid host: {host!r}") from None
    return host, port


# --------------------------------------------------------------------------
# Sections


def _line_settings(m: dict[str, _Node]) -> LineSettings:
    d = LineSettings()
    stopbits = d.stopbits
    if "stopbits" in m:
        stopbits = m["stopbits"].value()
        if isinstance(stopbits, bool) or stopbits not in STOPBITS:
            raise m["stopbits"].error(f"must be 1, 1.5 or 2; got {stopbits!r}")
    return LineSettings(
        baudrate=_get(m, "baudrate", lambda n: n.integer(50, 20_000_000), d.baudrate),
        bytesize=_get(m, "bytesize", lambda n: n.integer(min(BYTESIZES), max(BYTESIZES)), d.bytesize),
        parity=PARITY_NAMES[m["parity"].choice(tuple(PARITY_NAMES))] if "parity" in m else d.parity,
        stopbits=stopbits,
        flow=_get(m, "flow", lambda n: n.choice(FLOWS), d.flow),
    )


def _get(m: dict[str, _Node], key: str, read: Callable[[_Node], T], default: T) -> T:
    return read(m[key]) if key in m else default


def _backoff(m: dict[str, _Node]) -> tuple[float, float]:
    lo = _get(m, "backoff_min", lambda n: n.duration(0.01, 60), 0.2) or 0.2
    hi = _get(m, "backoff_max", lambda n: n.duration(0.01, 3600), 10.0) or 10.0
    if hi < lo:
        raise m["backoff_max"].error(f"must not be below backoff_min ({lo:g}s)")
    return lo, hi


def _upstream(node: _Node) -> Upstream:
    if not isinstance(node.node, yaml.MappingNode):
        raise node.error("expected a mapping with one of: serial, tcp, sim")
    kinds = [k.value for k, _ in node.node.value if k.value in ("serial", "tcp", "sim")]
    if len(kinds) != 1:
        raise node.error(f"needs exactly one of serial, tcp, sim (got {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    if kind == "serial":
        m = node.mapping(SERIAL_KEYS)
        lo, hi = _backoff(m)
        return SerialUpstream(m["serial"].text(), _line_settings(m), lo, hi)
    if kind == "tcp":
        m = node.mapping(TCP_KEYS)
        host, port = m["tcp"].hostport()
        try:
            ipaddress.ip_address(host)
        except ValueError:
            # The stdlib resolver blocks: a dead DNS server would freeze every reader.
            raise m["tcp"].error(
                f"give a numeric IP address, not {host!r} (name lookups would block)"
            ) from None
        lo, hi = _backoff(m)
        d = TcpUpstream(host, port)
        settings = _line_settings(m)
        if "control" in m and m["control"].value() == "usr":
            # What the vendor's 8-byte packet cannot carry (muxd.protocol.usr).
            if settings.stopbits == 1.5:
                raise m["stopbits"].error("control: usr cannot set 1.5 stop bits (1 or 2)")
            if settings.baudrate >= 1 << 24:
                raise m["baudrate"].error(f"control: usr carries baud rates below {1 << 24}")
        return TcpUpstream(
            host,
            port,
            settings,
            connect_timeout=_get(m, "connect_timeout", lambda n: n.duration(0.1, 300), d.connect_timeout)
            or d.connect_timeout,
            keepalive_idle=_get(
                m, "keepalive_idle", lambda n: n.duration(1, 7200, off=False), d.keepalive_idle
            ),
            keepalive_interval=_get(
                m, "keepalive_interval", lambda n: n.duration(1, 600, off=False), d.keepalive_interval
            ),
            keepalive_count=_get(m, "keepalive_count", lambda n: n.integer(1, 100), d.keepalive_count),
            idle_timeout=_get(m, "idle_timeout", lambda n: n.duration(0.1, 86400), d.idle_timeout),
            control=_get(m, "control", lambda n: n.choice(("none", "rfc2217", "usr")), d.control),
            backoff_min=lo,
            backoff_max=hi,
        )
    m = node.mapping({"sim"})
    sim = m["sim"]
    if sim.node is not None and isinstance(sim.node, yaml.ScalarNode) and sim.value() in (None, True):
        return SimUpstream()
    s = sim.mapping(SIM_KEYS)
    d2 = SimUpstream()
    return SimUpstream(
        baudrate=_get(s, "baudrate", lambda n: n.integer(300, 20_000_000), d2.baudrate),
        status_interval=_get(s, "status_interval", lambda n: n.duration(0.01, 3600), d2.status_interval)
        or d2.status_interval,
        boot=_get(s, "boot", _Node.flag, d2.boot),
    )


def _listener(node: _Node, port_name: str) -> Listener:
    if not isinstance(node.node, yaml.MappingNode):
        raise node.error(f"expected a mapping with one of: {', '.join(LISTENER_KINDS)}")
    kinds = [k.value for k, _ in node.node.value if k.value in LISTENER_KINDS]
    if len(kinds) != 1:
        raise node.error(
            f"needs exactly one of {', '.join(LISTENER_KINDS)} (got {', '.join(kinds) or 'none'})"
        )
    kind = kinds[0]
    m = node.mapping(LISTENER_COMMON | LISTENER_EXTRA[kind] | {kind})
    d = Listener(kind, "")
    host, port, path = "", 0, ""
    if kind in ("tcp", "rfc2217"):
        host, port = m[kind].hostport()
    elif kind in ("unix", "pty"):
        path = m[kind].text()
        if not path.startswith("/"):
            raise m[kind].error(f"must be an absolute path, got {path!r}")
    elif not m[kind].flag():
        raise m[kind].error("set websocket: true to serve /ws/<port>, or remove this listener")
    address = format_hostport(host, port) if port else path
    name = _get(m, "name", _Node.text, f"{kind}:{address or port_name}")
    if "name" in m and not NAME_RE.match(name):
        raise m["name"].error(f"must match {NAME_RE.pattern}, got {name!r}")
    mode_key = "socket_mode" if kind == "unix" else "link_mode"
    group = m["group"].value() if "group" in m else None
    if group is not None and (isinstance(group, bool) or not isinstance(group, str | int)):
        raise m["group"].error(f"expected a group name or gid, got {group!r}")
    return Listener(
        kind=kind,
        name=name,
        host=host,
        port=port,
        path=path,
        mode=_get(m, "mode", lambda n: n.choice(("ro", "rw")), d.mode),
        max_clients=_get(m, "max_clients", lambda n: n.integer(1, 100_000), d.max_clients),
        buffer=_get(m, "buffer", lambda n: n.size(4 * KiB, 1 * GiB), d.buffer),
        overflow=_get(m, "overflow", lambda n: n.choice(("drop-oldest", "disconnect")), d.overflow),
        write=_get(m, "write", lambda n: n.choice(("chunks", "lines")), d.write),
        notices=_get(m, "notices", _Node.flag, d.notices),
        file_mode=_get(m, mode_key, _Node.file_mode, d.file_mode),
        group=group,
    )


def _port(node: _Node) -> Port:
    m = node.mapping(PORT_KEYS, required=("name", "upstream"))
    name = m["name"].text()
    if not NAME_RE.match(name):
        raise m["name"].error(f"must match {NAME_RE.pattern}, got {name!r}")
    listeners = tuple(_listener(n, name) for n in m["listeners"].sequence()) if "listeners" in m else ()
    d = Port(name, SimUpstream())
    port = Port(
        name=name,
        upstream=_upstream(m["upstream"]),
        listeners=listeners,
        write_queue=_get(m, "write_queue", lambda n: n.size(1 * KiB, 64 * MiB), d.write_queue),
        max_line=_get(m, "max_line", lambda n: n.size(16, 1 * MiB), d.max_line),
        history=_get(m, "history", lambda n: n.size(0, 64 * MiB), d.history),
        line_control=_get(m, "line_control", lambda n: n.choice(("ignore", "owner", "any")), d.line_control),
    )
    if port.max_line > port.write_queue:
        raise m.get("max_line", node).error(
            f"max_line ({port.max_line}) must not exceed write_queue ({port.write_queue})"
        )
    return port


def _http(node: _Node) -> HttpServer:
    m = node.mapping(HTTP_KEYS, required=("listen",))
    host, port = m["listen"].hostport()
    name = _get(m, "name", _Node.text, f"http:{format_hostport(host, port)}")
    origins: tuple[str, ...] = ()
    if "origins" in m:
        origins = tuple(n.text() for n in m["origins"].sequence())
    token = m["token"].value() if "token" in m else None
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        raise m["token"].error("must be a string of at least 16 characters")
    return HttpServer(host, port, name, origins, token)


def _check_unique(items: list[tuple[str, _Node]], what: str) -> None:
    seen: dict[str, _Node] = {}
    for key, node in items:
        if key in seen:
            raise node.error(f"duplicate {what} {key!r} (first at line {seen[key].line})")
        seen[key] = node


def build(root: _Node) -> Config:
    m = root.mapping(TOP_KEYS, required=("ports",))
    port_nodes = list(m["ports"].sequence())
    if not port_nodes:
        raise m["ports"].error("needs at least one port")
    ports = tuple(_port(n) for n in port_nodes)
    http_nodes: list[_Node] = []
    if "http" in m:
        h = m["http"]
        http_nodes = list(h.sequence()) if isinstance(h.node, yaml.SequenceNode) else [h]
    http = tuple(_http(n) for n in http_nodes)
    _check_unique(
        [(p.name, n.mapping(PORT_KEYS)["name"]) for p, n in zip(ports, port_nodes, strict=True)], "port name"
    )
    names: list[tuple[str, _Node]] = []
    binds: list[tuple[str, _Node]] = []
    for port, pnode in zip(ports, port_nodes, strict=True):
        lnodes = list(pnode.mapping(PORT_KEYS)["listeners"].sequence()) if port.listeners else []
        for lst, lnode in zip(port.listeners, lnodes, strict=True):
            names.append((lst.name, lnode))
            if lst.kind != "websocket":
                binds.append((lst.address, lnode))
    for srv, hnode in zip(http, http_nodes, strict=True):
        names.append((srv.name, hnode))
        binds.append((format_hostport(srv.host, srv.port), hnode))
    _check_unique(binds, "listening address")
    _check_unique(names, "listener name")
    level = _get(m, "log_level", lambda n: n.choice(("debug", "info", "warning", "error")), "info")
    return Config(ports=ports, http=http, log_level=level, source=root.file)


def loads(text: str, file: str = "<config>") -> Config:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"YAML syntax error: {exc.problem}", "", line, file) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", "", None, file) from None
    if node is None:
        raise ConfigError("the file is empty", "", None, file)
    return build(_Node(node, "", file, None))


def load(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", "", None, path) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", "", None, path) from None
    return loads(text, path)


def from_data(data: dict[str, Any], source: str = "<command line>") -> Config:
    """Validate a config given as Python data (the one-port command-line form)."""
    node = yaml.compose(yaml.safe_dump(data), Loader=yaml.SafeLoader)
    root = _Node(node, "", source, None)
    try:
        return build(root)
    except ConfigError as exc:
        exc.line = None  # lines of a generated document would only confuse
        raise ConfigError(exc.message, exc.path, None, source) from None
