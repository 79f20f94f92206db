"""The configuration file: YAML in, frozen dataclasses out.

The file is parsed with PyYAML's safe loader into a node tree (``yaml.compose``)
rather than plain Python objects, because nodes keep their line numbers: every
error can then say ``muxd.yaml:14: ports[0].listeners[1].tcp: port must be
1..65535, got 70000``. Unknown keys are errors, never silently ignored, since a
misspelt ``overflow`` that falls back to a default is worse than no config.

The one-port command-line form builds the same structure as Python data and is
validated by the same code (its errors carry no line number).

The composer is the safe loader's, narrowed to the plain data a muxd config
needs: explicit tags (``!vault``, ``!!int``), anchors and aliases, and merge keys
(``<<``) are refused with their line, and nesting is bounded. Scalars are built
here, not by PyYAML's constructors, so no text can make them raise: only null,
booleans, bounded integers and floats, and strings come out (a timestamp-like
value such as ``2024-01-01`` stays a string). Whatever the text, ``loads``
returns a Config or raises ConfigError, and the CLI turns that into exit code 2.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import yaml

from muxd.access import SCOPES, Network, Scope, TokenSpec, parse_network
from muxd.errors import ConfigError
from muxd.protocol.line_settings import BYTESIZES, FLOWS, STOPBITS, LineSettings
from muxd.records import FORMATS, Format
from muxd.sequences import MAX_STEPS, Step, parse_step

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_HOST = "127.0.0.1"  # safe by default: nothing is exposed beyond this machine unless asked

PARITY_NAMES = {"none": "N", "even": "E", "odd": "O", "mark": "M", "space": "S"}
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # used with fullmatch: "$" alone lets a final newline in

# The closed vocabularies of the file, as Literal types so mypy checks every use;
# the tuples derived from them are what the loader accepts, so the two cannot drift.
ListenerKind = Literal["tcp", "unix", "pty", "rfc2217", "websocket"]
Mode = Literal["ro", "rw"]
Overflow = Literal["drop-oldest", "disconnect"]
WriteMode = Literal["chunks", "lines"]
LineControlPolicy = Literal["virtual", "ignore", "owner", "any"]
UpstreamControl = Literal["none", "rfc2217", "usr"]
LogLevel = Literal["debug", "info", "warning", "error"]

LISTENER_KINDS: tuple[ListenerKind, ...] = get_args(ListenerKind)
MODES: tuple[Mode, ...] = get_args(Mode)
OVERFLOWS: tuple[Overflow, ...] = get_args(Overflow)
WRITE_MODES: tuple[WriteMode, ...] = get_args(WriteMode)
LINE_CONTROL_POLICIES: tuple[LineControlPolicy, ...] = get_args(LineControlPolicy)
UPSTREAM_CONTROLS: tuple[UpstreamControl, ...] = get_args(UpstreamControl)
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)

# The deepest real config nests five collections: the file, ports, a port, listeners, a listener.
# 20 leaves room for that and stops a hostile file long before the recursive
# composer (about three frames per level) nears Python's recursion limit.
MAX_DEPTH = 20
# Every number muxd accepts fits in 11 digits; 64 characters allows underscores and
# floats in exponent form, and stays far below Python's 4,300-digit int() limit.
MAX_NUMBER_CHARS = 64
# What an error message quotes of a value: enough to recognise it, one line.
SHOW_CHARS = 60


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
    control: UpstreamControl = "none"
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
class TlsConfig:
    """TLS on a tcp, rfc2217 or http listener (muxd.tls). The files are read
    when the listener starts and again at every reload (SIGHUP)."""

    cert: str  # PEM: the certificate, then any intermediates
    key: str  # PEM: its private key
    client_ca: str | None = None  # PEM: CAs a client certificate must chain to (mutual TLS)
    # A LAN handshake takes milliseconds: 10 s covers a loaded host and slow
    # links, and bounds how long a silent client holds a socket (muxd.tls).
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class Listener:
    kind: ListenerKind
    name: str
    host: str = ""  # tcp, rfc2217
    port: int = 0  # tcp, rfc2217; 0 lets the kernel pick a free port
    path: str = ""  # unix socket path, pty symlink path
    mode: Mode = "ro"
    max_clients: int = 256
    # 256 KiB is 22 s of a 115200-baud stream: enough to ride out a reader's GC
    # pause or a slow network without loss, small enough for thousands of readers.
    buffer: int = 256 * KiB
    overflow: Overflow = "drop-oldest"
    write: WriteMode = "chunks"
    notices: bool = False
    file_mode: int = 0o660  # unix socket / pty device permissions
    group: str | int | None = None
    # What a new reader gets first: this many bytes, or lines, of the past
    # (the more of the two), within the port's history.
    history: int = 0
    history_lines: int = 0
    # raw bytes, or text/jsonl records (tcp, unix, websocket: muxd.records).
    format: Format = "raw"
    tls: TlsConfig | None = None  # tcp, rfc2217
    # Peers that may connect (tcp, rfc2217, websocket; muxd.access); empty: any.
    allow: tuple[Network, ...] = ()

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
    # A partial line (write: lines) idle this long goes out as it is: half a
    # second is longer than the pause inside one command sent by a script (so
    # its lines stay whole) and short enough that a lone key typed at a prompt
    # (y/n, a menu choice) is answered without Enter. 0: never.
    line_timeout: float = 0.5
    history: int = 64 * KiB
    # virtual: line-settings requests are acknowledged, never applied (muxd.linecontrol).
    line_control: LineControlPolicy = "virtual"
    trace: tuple[TraceFile, ...] = ()
    # Named control-line sequences (muxd.sequences), (name, steps) in config order.
    sequences: tuple[tuple[str, tuple[Step, ...]], ...] = ()
    mqtt: PortMqtt | None = None  # published on the broker of the top-level mqtt: section

    @property
    def history_bound(self) -> int:
        """The most history any reader of the port may replay."""
        return max([self.history, *(lst.history for lst in self.listeners)])

    @property
    def log_capacity(self) -> int:
        """The shared log must hold the largest backlog or history any reader may have."""
        bridge = [self.mqtt.buffer] if self.mqtt is not None else []
        return max([self.history_bound, *(lst.buffer for lst in self.listeners), *bridge])

    @property
    def formats(self) -> tuple[Format, ...]:
        """The record formats the port's listeners and traces use, kept from the start."""
        used = {lst.format for lst in self.listeners} | {t.format for t in self.trace}
        if self.mqtt is not None:
            used.add(self.mqtt.format)
        return tuple(sorted(f for f in used if f != "raw"))


@dataclass(frozen=True)
class TraceFile:
    """A trace file of a port (muxd.trace)."""

    path: str
    format: Format = "text"
    rotate: int = 0  # bytes; 0: never rotate
    keep: int = 5  # rotated files kept: PATH.1 .. PATH.keep
    input: bool = False  # also record what clients wrote, and who
    file_mode: int = 0o640  # the log of a board may hold secrets typed at it
    group: str | int | None = None


@dataclass(frozen=True)
class MqttTls:
    """TLS to the MQTT broker (muxd.mqtt): the CA its certificate must chain
    to (the system's CAs without it), and a client certificate if it asks."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class MqttConfig:
    """The top-level ``mqtt:`` section: the daemon's one broker connection (muxd.mqtt)."""

    host: str  # a numeric IP: name lookups would block the loop
    port: int
    client_id: str = ""  # "": muxd-<hostname>
    prefix: str = "muxd"
    tls: MqttTls | None = None
    username: str | None = None
    password_file: str | None = None
    # 30 s: a dead link is noticed within 45 s (1.5 keepalives, MQTT's rule),
    # at the cost of one PINGREQ per half minute on a quiet link.
    keepalive: int = 30
    # TCP connect, TLS handshake and CONNACK together: a LAN broker answers in
    # milliseconds; 10 s covers a loaded one, and bounds a black hole.
    connect_timeout: float = 10.0
    backoff_min: float = 0.2  # as an upstream's: doubling up to 10 s
    backoff_max: float = 10.0

    @property
    def broker(self) -> str:
        return format_hostport(self.host, self.port)


@dataclass(frozen=True)
class PortMqtt:
    """A port's ``mqtt:`` section: publish it on the broker (muxd.mqtt)."""

    format: Format = "text"
    qos: int = 1
    write: bool = False  # subscribe <prefix>/<port>/tx and write it to the device
    # The feed's backlog: 90 s of a 115200-baud console, a broker restart or failover.
    buffer: int = 1 * MiB


@dataclass(frozen=True)
class HttpServer:
    host: str
    port: int  # 0 lets the kernel pick a free port
    name: str
    origins: tuple[str, ...] = ()
    # Scoped tokens, read from their files by the front (muxd.access), never here.
    tokens: tuple[TokenSpec, ...] = ()
    # Extra names (lower case) that Host headers may carry besides the listen
    # address and localhost: the DNS-rebinding check refuses any other.
    server_names: tuple[str, ...] = ()
    # Peers that may connect (muxd.access); empty: any.
    allow: tuple[Network, ...] = ()
    # /metrics needs a read token too (when tokens are configured).
    metrics_token: bool = False
    tls: TlsConfig | None = None  # HTTPS, WSS and the console over TLS


@dataclass(frozen=True)
class Config:
    ports: tuple[Port, ...]
    http: tuple[HttpServer, ...] = ()
    log_level: LogLevel = "info"
    mqtt: MqttConfig | None = None
    source: str = field(default="<config>", compare=False)
    # The line of each key path ("ports[0].listeners[1].group"), for checks
    # made after loading (muxd.checks) to say where the problem is written.
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------
# Schema: the keys each mapping accepts (also what the man page must document)

TOP_KEYS = {"ports", "http", "log_level", "mqtt"}
PORT_KEYS = {
    "name",
    "upstream",
    "listeners",
    "write_queue",
    "max_line",
    "line_timeout",
    "history",
    "line_control",
    "trace",
    "sequences",
    "mqtt",
}
# line_timeout, when not 0: under 10 ms a line a script sends in two TCP
# segments could be cut in two by scheduling noise alone; over a minute a
# partial line is no longer "being typed" and would only hide a missing newline.
LINE_TIMEOUT_MIN = 0.01
LINE_TIMEOUT_MAX = 60.0
TRACE_KEYS = {"path", "format", "rotate", "keep", "input", "mode", "group"}
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
LISTENER_COMMON |= {"history", "history_lines"}
LISTENER_EXTRA = {
    "tcp": {"format", "allow", "tls"},
    "rfc2217": {"allow", "tls"},
    "websocket": {"format", "allow"},
    "unix": {"socket_mode", "group", "format"},
    "pty": {"link_mode", "group"},
}
# "token" (inline) is refused with a pointer to "tokens": see _http.
HTTP_KEYS = {"listen", "name", "origins", "token", "tokens", "server_names", "allow", "metrics_token"}
TOKEN_KEYS = {"name", "file", "scope"}
TLS_KEYS = {"cert", "key", "client_ca", "handshake_timeout"}  # of a listener's or http server's tls:
HTTP_KEYS |= {"tls"}
UPSTREAM_KINDS = ("serial", "tcp", "sim")
MQTT_KEYS = {"broker", "client_id", "prefix", "tls", "username", "password_file", "keepalive"}
MQTT_KEYS |= {"connect_timeout"} | BACKOFF_KEYS
MQTT_TLS_KEYS = {"ca", "cert", "key"}
PORT_MQTT_KEYS = {"format", "qos", "write", "buffer"}


def schema_keys() -> set[str]:
    """Every key name the config file accepts."""
    keys = TOP_KEYS | PORT_KEYS | SERIAL_KEYS | TCP_KEYS | {"sim"} | SIM_KEYS | LISTENER_COMMON | HTTP_KEYS
    keys |= TRACE_KEYS | TOKEN_KEYS
    keys |= TLS_KEYS | {"tls"}
    keys |= MQTT_KEYS | MQTT_TLS_KEYS | PORT_MQTT_KEYS | {"mqtt"}
    keys |= set(LISTENER_KINDS)
    for extra in LISTENER_EXTRA.values():
        keys |= extra
    return keys


# --------------------------------------------------------------------------
# Loading: the safe loader, narrowed to plain data

T = TypeVar("T")
S = TypeVar("S", bound=str)
_constructor = yaml.constructor.SafeConstructor()
_TAG = "tag:yaml.org,2002:"


def _show(value: object) -> str:
    """A value for an error message: its repr, cut short, always one line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        # repr() of an int past 4,300 digits raises; no message needs the digits anyway.
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 3] + "..."


def _join(path: str, step: str | int) -> str:
    """`path` extended by a mapping key (str) or a list index (int)."""
    if isinstance(step, int):
        return f"{path}[{step}]"
    if not re.fullmatch(r"[A-Za-z0-9_<>-]{1,64}", step):
        # A key as written may be long, or hold dots, brackets or newlines: quote it,
        # cut short, so the path stays readable and the message one line.
        step = _show(step)
    return f"{path}.{step}" if path else step


class _Refused(Exception):
    """YAML that is valid but not plain data, found while composing."""

    def __init__(self, message: str, path: str, mark: object) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = mark.line + 1 if isinstance(mark, yaml.Mark) else None


class _PlainLoader(yaml.SafeLoader):
    """The safe loader's composer, refusing what a muxd config never needs.

    Tags, anchors and aliases are refused here because a node tree no longer says
    whether its tag was written or implied, and an alias can make one small file
    expand into billions of nodes ("billion laughs"). The key path is tracked so
    the refusal reads like every other error.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._paths = [""]

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # index is the key node for a mapping's value, the position in a list, or
        # None for a mapping's key (which is reported at its mapping's path).
        path = self._paths[-1]
        if isinstance(index, yaml.ScalarNode):
            path = _join(path, str(index.value))
        elif isinstance(index, yaml.Node):
            path = _join(path, "<key>")
        elif isinstance(index, int):
            path = _join(path, index)
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                f"aliases (*{event.anchor}) are not supported: write the value out", path, event.start_mark
            )
        if getattr(event, "anchor", None) is not None:
            raise _Refused(
                f"anchors (&{getattr(event, 'anchor', '')}) are not supported: write each value out",
                path,
                event.start_mark,
            )
        tag = getattr(event, "tag", None)
        if tag is not None:
            shown = "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag
            raise _Refused(
                f"YAML tags such as {_show(shown)} are not supported: write a plain value",
                path,
                event.start_mark,
            )
        if isinstance(event, yaml.CollectionStartEvent) and len(self._paths) > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", path, event.start_mark)
        self._paths.append(path)
        try:
            return super().compose_node(parent, index)
        finally:
            self._paths.pop()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _compose(text: str, file: str) -> yaml.Node | None:
    """The document's node tree, or a ConfigError located as well as YAML allows."""
    try:
        loader = _PlainLoader(text)
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except _Refused as exc:
        raise ConfigError(exc.message, exc.path, exc.line, file) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = _one_line(exc.problem or exc.context or "malformed")
        if exc.context and problem.startswith("but "):
            # "but found another document" reads only after its context.
            problem = f"{_one_line(exc.context)}, {problem}"
        raise ConfigError(f"YAML syntax error: {problem}", "", line, file) from None
    except yaml.reader.ReaderError as exc:
        # Not a MarkedYAMLError: it knows the offset only, and its str() is two lines.
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
        raise ConfigError(f"unacceptable character #x{char:04x}", "", line, file) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {_one_line(str(exc))}", "", None, file) from None


def _scalar(node: yaml.ScalarNode) -> object:
    """The plain value of a scalar whose tag the resolver implied from its text.

    Raises ValueError (with a message for the operator) for numbers that are too
    long, or that the YAML 1.1 patterns accept but Python cannot read ("0x_").
    """
    tag, text = node.tag, node.value
    if tag == _TAG + "null":
        return None
    if tag == _TAG + "bool":
        return _constructor.bool_values[text.lower()]
    if tag in (_TAG + "int", _TAG + "float"):
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(f"number too long ({len(text)} characters)")
        try:
            if tag == _TAG + "int":
                return _constructor.construct_yaml_int(node)
            return _constructor.construct_yaml_float(node)
        except ValueError:
            raise ValueError(f"not a valid number: {_show(text)}") from None
    # str, and the implied timestamp, merge ("<<") and value ("=") tags, which a
    # muxd config gives no meaning: their text, as written.
    return text


# --------------------------------------------------------------------------
# Node access with locations


class _Node:
    """A YAML node with the key path that led to it, for located errors."""

    def __init__(
        self,
        node: yaml.Node | None,
        path: str,
        file: str,
        line: int | None,
        lines: dict[str, int] | None = None,
    ) -> None:
        self.node = node
        self.path = path
        self.file = file
        self.line = line if node is None else node.start_mark.line + 1
        # Shared by every node of one document: key path -> line (Config.lines).
        self.lines: dict[str, int] = {} if lines is None else lines

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.path, self.line, self.file)

    def child(self, node: yaml.Node, step: str | int) -> _Node:
        child = _Node(node, _join(self.path, step), self.file, None, self.lines)
        if child.line is not None:
            self.lines.setdefault(child.path, child.line)
        return child

    def mapping(self, allowed: set[str], required: tuple[str, ...] = ()) -> dict[str, _Node]:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {self.describe()}")
        out: dict[str, _Node] = {}
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.child(key_node, "<key>").error("keys must be strings")
            if key_node.tag == _TAG + "merge":
                raise self.child(key_node, "<<").error(
                    "merge keys (<<) are not supported: write the keys out"
                )
            key = self.child(key_node, "<key>").value()
            if not isinstance(key, str):
                raise self.child(key_node, str(key)).error("keys must be strings")
            child = self.child(value_node, key)
            child.line = self.lines[child.path] = key_node.start_mark.line + 1
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
            yield self.child(item, i)

    def value(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error(f"expected a single value, got {self.describe()}")
        try:
            return _scalar(self.node)
        except ValueError as exc:
            raise self.error(str(exc)) from None

    def describe(self) -> str:
        if isinstance(self.node, yaml.MappingNode):
            return "a mapping"
        if isinstance(self.node, yaml.SequenceNode):
            return "a list"
        return _show(self.value())

    # typed accessors

    def text(self) -> str:
        v = self.value()
        if not isinstance(v, str) or not v:
            raise self.error(f"expected a non-empty string, got {_show(v)}")
        return v

    def file_path(self, absolute: bool) -> str:
        v = self.text()
        if "\x00" in v:
            # os.open() and bind() raise ValueError on it: refuse it here, not at start.
            raise self.error(f"a path cannot hold a NUL character, got {_show(v)}")
        if absolute and not v.startswith("/"):
            raise self.error(f"must be an absolute path, got {_show(v)}")
        return v

    def integer(self, lo: int, hi: int) -> int:
        v = self.value()
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"expected an integer, got {_show(v)}")
        if not lo <= v <= hi:
            raise self.error(f"must be {lo}..{hi}, got {v}")
        return v

    def flag(self) -> bool:
        v = self.value()
        if not isinstance(v, bool):
            raise self.error(f"expected true or false, got {_show(v)}")
        return v

    def choice(self, options: tuple[S, ...]) -> S:
        """One of `options`, typed as their (Literal) type."""
        v = self.value()
        for option in options:
            if isinstance(v, str) and v == option:
                return option
        raise self.error(f"must be one of {', '.join(options)}; got {_show(v)}")

    def size(self, lo: int, hi: int) -> int:
        v = self.value()
        n = parse_size(v)
        if n is None:
            raise self.error(f"expected a size such as 4096, 64KiB or 1MiB, got {_show(v)}")
        if not lo <= n <= hi:
            raise self.error(f"must be between {lo} and {hi} bytes, got {_show(n)}")
        return n

    def duration(self, lo: float, hi: float, off: bool = True) -> float:
        """A duration in seconds; 0 means off where `off` allows it."""
        v = self.value()
        s = parse_duration(v)
        if s is None:
            raise self.error(f"expected a duration such as 500ms, 5s or 1m, got {_show(v)}")
        if (s != 0 or not off) and not lo <= s <= hi:
            zero = "0 (off) or " if off else ""
            raise self.error(f"must be {zero}between {lo:g} and {hi:g} seconds, got {s:g}")
        return s

    def hostport(self, allow_any_port: bool = True) -> tuple[str, int]:
        v = self.value()
        try:
            return parse_hostport(v, allow_any_port=allow_any_port)
        except ValueError as exc:
            raise self.error(str(exc)) from None

    def peer_address(self) -> tuple[str, int]:
        """A HOST:PORT muxd connects to (the K2, the MQTT broker): a real port,
        and a numeric IP, since the stdlib resolver blocks and a dead DNS server
        would freeze every reader."""
        host, port = self.hostport(allow_any_port=False)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise self.error(
                f"give a numeric IP address, not {_show(host)} (name lookups would block)"
            ) from None
        return host, port

    def file_mode(self) -> int:
        v = self.value()
        shown = _show(v)
        if isinstance(v, str):
            try:
                # Bounded: a mode has at most 4 digits, and int() of a long text is slow.
                v = int(v, 8) if len(v) <= 16 else None
            except ValueError:
                v = None
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
            raise self.error(f"expected an octal mode such as 0660, got {shown}")
        return v


# ASCII digits only: \d would take other scripts' digits, and a bounded count keeps
# int() below its 4,300-digit limit (anything longer is out of range anyway).
_SIZE_RE = re.compile(r"\s*([0-9]{1,30})\s*([KMG]i?B?|B)?\s*", re.IGNORECASE)
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*")
_HOSTNAME_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


def parse_size(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if not isinstance(v, str):
        return None
    m = _SIZE_RE.fullmatch(v)
    if not m:
        return None
    unit = (m.group(2) or "B").upper()[0]
    return int(m.group(1)) * {"B": 1, "K": KiB, "M": MiB, "G": GiB}[unit]


def parse_duration(v: object) -> float | None:
    """Seconds, or None when `v` is not a duration (negative, NaN, or no number).

    A value too large for a float becomes inf, which every range check refuses.
    """
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return float(v) if v >= 0 and v.bit_length() <= 1023 else (math.inf if v >= 0 else None)
    if isinstance(v, float):
        return v if v >= 0 else None  # NaN fails the comparison too
    if not isinstance(v, str):
        return None
    m = _DURATION_RE.fullmatch(v)
    if not m:
        return None
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(2) or "s"]


def parse_hostport(
    v: object, default_host: str = DEFAULT_HOST, allow_any_port: bool = True
) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT', ':PORT' or 'PORT' (which binds the safe default host).

    Port 0 is accepted unless `allow_any_port` is False: on an address muxd
    listens on, it lets the kernel pick a free port. A port to connect to (the
    tcp upstream) must be 1..65535, so that caller says False.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        if v.bit_length() > 64:
            raise ValueError(f"port must be 1..65535, got {_show(v)}")
        host, port_s = default_host, str(v)
    elif isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"expected [IPV6]:PORT, got {_show(v)}")
            port_s = rest[1:]
        elif ":" in text:
            host, _, port_s = text.rpartition(":")
            if ":" in host:
                raise ValueError(f"IPv6 addresses need brackets: {_show(f'[{host}]:{port_s}')}")
        else:
            host, port_s = "", text
        host = host or default_host
    else:
        raise ValueError(f"expected HOST:PORT, got {_show(v)}")
    if not re.fullmatch(r"[0-9]{1,11}", port_s):
        raise ValueError(f"expected HOST:PORT with a numeric port, got {_show(v)}")
    port = int(port_s)
    if not (0 if allow_any_port else 1) <= port <= 65535:
        # 0 stays out of the message: it is a wildcard, not a port number.
        raise ValueError(f"port must be 1..65535, got {port}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise ValueError(f"not a valid host: {_show(host)}") from None
    return host, port


def parse_server_name(v: object) -> str:
    """A name for Host headers: a DNS host name or an IP address (IPv6 without
    brackets), no port. Returned in lower case, as Host is compared without case."""
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a host name or IP address, got {_show(v)}")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        pass
    name = v.lower()
    if len(name) > 253 or not _HOSTNAME_RE.fullmatch(name):
        raise ValueError(f"not a valid host name (no port, no brackets, no wildcards): {_show(v)}")
    return name


# --------------------------------------------------------------------------
# Sections


def _line_settings(m: dict[str, _Node]) -> LineSettings:
    d = LineSettings()
    stopbits = d.stopbits
    if "stopbits" in m:
        stopbits = m["stopbits"].value()
        if isinstance(stopbits, bool) or stopbits not in STOPBITS:
            raise m["stopbits"].error(f"must be 1, 1.5 or 2; got {_show(stopbits)}")
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
    # A 0 backoff is an error, not "off": it would reconnect in a tight loop against
    # a device that is away (the reconnect storm), and doubling 0 never grows.
    d = SerialUpstream("")
    lo = _get(m, "backoff_min", lambda n: n.duration(0.01, 60, off=False), d.backoff_min)
    hi = _get(m, "backoff_max", lambda n: n.duration(0.01, 3600, off=False), d.backoff_max)
    if hi < lo:
        if "backoff_max" in m:
            raise m["backoff_max"].error(f"must not be below backoff_min ({lo:g}s)")
        # Raising the default maximum instead would be a silent guess; say it.
        raise m["backoff_min"].error(f"must not exceed backoff_max (default {hi:g}s): set backoff_max too")
    return lo, hi


def _upstream(node: _Node) -> Upstream:
    if not isinstance(node.node, yaml.MappingNode):
        raise node.error("expected a mapping with one of: serial, tcp, sim")
    kinds = [
        k.value for k, _ in node.node.value if isinstance(k, yaml.ScalarNode) and k.value in UPSTREAM_KINDS
    ]
    if len(kinds) != 1:
        raise node.error(f"needs exactly one of serial, tcp, sim (got {', '.join(kinds) or 'none'})")
    kind = kinds[0]
    if kind == "serial":
        m = node.mapping(SERIAL_KEYS)
        lo, hi = _backoff(m)
        return SerialUpstream(m["serial"].file_path(absolute=False), _line_settings(m), lo, hi)
    if kind == "tcp":
        m = node.mapping(TCP_KEYS)
        host, port = m["tcp"].peer_address()
        lo, hi = _backoff(m)
        d = TcpUpstream(host, port)
        settings = _line_settings(m)
        control = _get(m, "control", lambda n: n.choice(UPSTREAM_CONTROLS), d.control)
        if control == "usr":
            # What the vendor's 8-byte packet cannot carry (muxd.protocol.usr).
            if settings.stopbits == 1.5:
                raise m["stopbits"].error("control: usr cannot set 1.5 stop bits (1 or 2)")
            if settings.baudrate >= 1 << 24:
                raise m["baudrate"].error(f"control: usr carries baud rates below {1 << 24}")
        return TcpUpstream(
            host,
            port,
            settings,
            # 0 is an error: no connect completes in 0 s, and "no timeout" would
            # leave a black-holed SYN to the kernel's retries (about two minutes).
            connect_timeout=_get(
                m, "connect_timeout", lambda n: n.duration(0.1, 300, off=False), d.connect_timeout
            ),
            keepalive_idle=_get(
                m, "keepalive_idle", lambda n: n.duration(1, 7200, off=False), d.keepalive_idle
            ),
            keepalive_interval=_get(
                m, "keepalive_interval", lambda n: n.duration(1, 600, off=False), d.keepalive_interval
            ),
            keepalive_count=_get(m, "keepalive_count", lambda n: n.integer(1, 100), d.keepalive_count),
            # 0 is valid as written and means off: a device may stay silent for hours.
            idle_timeout=_get(m, "idle_timeout", lambda n: n.duration(0.1, 86400), d.idle_timeout),
            control=control,
            backoff_min=lo,
            backoff_max=hi,
        )
    m = node.mapping({"sim"})
    sim = m["sim"]
    if isinstance(sim.node, yaml.ScalarNode) and (sim.value() is None or sim.value() is True):
        return SimUpstream()
    s = sim.mapping(SIM_KEYS)
    d2 = SimUpstream()
    return SimUpstream(
        baudrate=_get(s, "baudrate", lambda n: n.integer(300, 20_000_000), d2.baudrate),
        # 0 is an error: the simulator has no "off", and a 0 s period would spin the loop.
        status_interval=_get(
            s, "status_interval", lambda n: n.duration(0.01, 3600, off=False), d2.status_interval
        ),
        boot=_get(s, "boot", _Node.flag, d2.boot),
    )


def _listener(node: _Node, port_name: str, index: int) -> Listener:
    if not isinstance(node.node, yaml.MappingNode):
        raise node.error(f"expected a mapping with one of: {', '.join(LISTENER_KINDS)}")
    kinds = [k for k in LISTENER_KINDS for key, _ in node.node.value if key.value == k]
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
        path = m[kind].file_path(absolute=True)
    elif not m[kind].flag():
        raise m[kind].error("set websocket: true to serve /ws/<port>, or remove this listener")
    if kind in ("tcp", "rfc2217") and port == 0:
        # Several listeners may share HOST:0, so the address names none of them:
        # the port name and the listener's place in its list do.
        default_name = f"{kind}:{port_name}/{index}"
    elif kind in ("tcp", "rfc2217"):
        default_name = f"{kind}:{format_hostport(host, port)}"
    else:
        default_name = f"{kind}:{path or port_name}"
    name = _get(m, "name", _Node.text, default_name)
    if "name" in m and not NAME_RE.fullmatch(name):
        raise m["name"].error(f"must match {NAME_RE.pattern}, got {_show(name)}")
    mode_key = "socket_mode" if kind == "unix" else "link_mode"
    group = _group(m["group"]) if "group" in m else None
    return Listener(
        kind=kind,
        name=name,
        host=host,
        port=port,
        path=path,
        mode=_get(m, "mode", lambda n: n.choice(MODES), d.mode),
        max_clients=_get(m, "max_clients", lambda n: n.integer(1, 100_000), d.max_clients),
        buffer=_get(m, "buffer", lambda n: n.size(4 * KiB, 1 * GiB), d.buffer),
        overflow=_get(m, "overflow", lambda n: n.choice(OVERFLOWS), d.overflow),
        write=_get(m, "write", lambda n: n.choice(WRITE_MODES), d.write),
        notices=_get(m, "notices", _Node.flag, d.notices),
        file_mode=_get(m, mode_key, _Node.file_mode, d.file_mode),
        group=group,
        history=_get(m, "history", lambda n: n.size(0, 64 * MiB), d.history),
        history_lines=_get(m, "history_lines", lambda n: n.integer(0, 100_000), d.history_lines),
        format=_get(m, "format", lambda n: n.choice(FORMATS), d.format),
        allow=_allow(m["allow"]) if "allow" in m else (),
        tls=_tls(m["tls"]) if "tls" in m else None,
    )


def _allow(node: _Node) -> tuple[Network, ...]:
    """An allow-list: networks in CIDR form (muxd.access). An empty list is an
    error rather than "nobody": a listener nobody may reach is a mistake, and
    "everybody" is what leaving the key out says."""
    nets: list[Network] = []
    for n in node.sequence():
        value = n.value()
        if not isinstance(value, str):
            raise n.error(f"expected a network such as 10.0.0.0/8, got {_show(value)}")
        try:
            nets.append(parse_network(value))
        except ValueError as exc:
            raise n.error(str(exc)) from None
    if not nets:
        raise node.error("an empty allow-list admits nobody: list networks, or remove the key")
    return tuple(nets)


def _tokens(node: _Node) -> tuple[TokenSpec, ...]:
    specs: list[TokenSpec] = []
    names: list[tuple[str, _Node]] = []
    for n in node.sequence():
        m = n.mapping(TOKEN_KEYS, required=("name", "file", "scope"))
        name = m["name"].text()
        if not NAME_RE.fullmatch(name):
            raise m["name"].error(f"must match {NAME_RE.pattern}, got {_show(name)}")
        names.append((name, m["name"]))
        scope: Scope = m["scope"].choice(SCOPES)
        specs.append(TokenSpec(name, m["file"].file_path(absolute=True), scope))
    _check_unique(names, "token name")
    return tuple(specs)


def _group(node: _Node) -> str | int:
    # An empty or null group is an error rather than "the default group": a
    # template that expanded to nothing should not quietly open the file wider.
    value = node.value()
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise node.error(f"expected a group name or gid, got {_show(value)}")
    if isinstance(value, int) and not 0 <= value < 2**32 - 1:
        # -1 would tell chown() to leave the group unchanged: another silent default.
        raise node.error(f"a gid must be 0..{2**32 - 2}, got {_show(value)}")
    return value


def _trace(node: _Node) -> TraceFile:
    m = node.mapping(TRACE_KEYS, required=("path",))
    d = TraceFile("")
    rotate = _get(m, "rotate", lambda n: n.size(0, 64 * GiB), d.rotate)
    if 0 < rotate < 64 * KiB:
        raise m["rotate"].error(f"must be 0 (never) or at least 64KiB, got {rotate}")
    return TraceFile(
        path=m["path"].file_path(absolute=True),
        format=_get(m, "format", lambda n: n.choice(FORMATS), d.format),
        rotate=rotate,
        keep=_get(m, "keep", lambda n: n.integer(0, 1000), d.keep),
        input=_get(m, "input", _Node.flag, d.input),
        file_mode=_get(m, "mode", _Node.file_mode, d.file_mode),
        group=_group(m["group"]) if "group" in m else None,
    )


# Sequences per port: a reset, a bootloader entry, a few board-specific ones.
MAX_SEQUENCES = 32


def _sequences(node: _Node) -> tuple[tuple[str, tuple[Step, ...]], ...]:
    """``{name: [step, ...]}``; each step parsed by muxd.sequences, its error located."""
    if not isinstance(node.node, yaml.MappingNode):
        raise node.error("expected a mapping of sequence names to lists of steps")
    names = [k.value for k, _ in node.node.value if isinstance(k, yaml.ScalarNode)]
    m = node.mapping(set(names))
    if len(m) > MAX_SEQUENCES:
        raise node.error(f"at most {MAX_SEQUENCES} sequences, got {len(m)}")
    out: list[tuple[str, tuple[Step, ...]]] = []
    for name, seq in m.items():
        if not NAME_RE.fullmatch(name):
            raise seq.error(f"a sequence name must match {NAME_RE.pattern}")
        steps: list[Step] = []
        for step in seq.sequence():
            try:
                steps.append(parse_step(step.value()))
            except ValueError as exc:
                raise step.error(str(exc)) from None
        if not steps:
            raise seq.error("a sequence needs at least one step")
        if len(steps) > MAX_STEPS:
            raise seq.error(f"at most {MAX_STEPS} steps, got {len(steps)}")
        out.append((name, tuple(steps)))
    return tuple(out)


def _port(node: _Node) -> Port:
    m = node.mapping(PORT_KEYS, required=("name", "upstream"))
    name = m["name"].text()
    if not NAME_RE.fullmatch(name):
        raise m["name"].error(f"must match {NAME_RE.pattern}, got {_show(name)}")
    listeners = (
        tuple(_each(enumerate(m["listeners"].sequence()), lambda item: _listener(item[1], name, item[0])))
        if "listeners" in m
        else ()
    )
    d = Port(name, SimUpstream())
    port = Port(
        name=name,
        upstream=_upstream(m["upstream"]),
        listeners=listeners,
        write_queue=_get(m, "write_queue", lambda n: n.size(1 * KiB, 64 * MiB), d.write_queue),
        max_line=_get(m, "max_line", lambda n: n.size(16, 1 * MiB), d.max_line),
        line_timeout=_get(
            m, "line_timeout", lambda n: n.duration(LINE_TIMEOUT_MIN, LINE_TIMEOUT_MAX), d.line_timeout
        ),
        # 0 is valid as written: no history replayed to new readers.
        history=_get(m, "history", lambda n: n.size(0, 64 * MiB), d.history),
        line_control=_get(m, "line_control", lambda n: n.choice(LINE_CONTROL_POLICIES), d.line_control),
        trace=tuple(_trace(n) for n in m["trace"].sequence()) if "trace" in m else (),
        sequences=_sequences(m["sequences"]) if "sequences" in m else (),
        mqtt=_port_mqtt(m["mqtt"]) if "mqtt" in m else None,
    )
    if port.max_line > port.write_queue:
        raise m.get("max_line", node).error(
            f"max_line ({port.max_line}) must not exceed write_queue ({port.write_queue})"
        )
    return port


def _http(node: _Node, index: int) -> HttpServer:
    m = node.mapping(HTTP_KEYS, required=("listen",))
    host, port = m["listen"].hostport()
    # As for listeners, HOST:0 may be shared, so a port-0 server is named by its place.
    default_name = f"http:{format_hostport(host, port)}" if port else f"http:{index}"
    name = _get(m, "name", _Node.text, default_name)
    origins: tuple[str, ...] = ()
    if "origins" in m:
        origins = tuple(n.text() for n in m["origins"].sequence())
    if "token" in m:
        # A secret written in the config ends up in backups, diffs and error
        # reports; it must live in a file of its own (muxd.access).
        raise m["token"].error(
            "inline tokens are no longer accepted: put the secret in a file (mode 0640) "
            "and list it under tokens: [{name: NAME, file: PATH, scope: admin}]"
        )
    tokens = _tokens(m["tokens"]) if "tokens" in m else ()
    server_names: list[str] = []
    if "server_names" in m:
        for n in m["server_names"].sequence():
            try:
                server_name = parse_server_name(n.value())
            except ValueError as exc:
                raise n.error(str(exc)) from None
            if server_name in server_names:
                raise n.error(f"duplicate server name {server_name!r}")
            server_names.append(server_name)
    return HttpServer(
        host,
        port,
        name,
        origins,
        tokens=tokens,
        server_names=tuple(server_names),
        allow=_allow(m["allow"]) if "allow" in m else (),
        metrics_token=_get(m, "metrics_token", _Node.flag, False),
        tls=_tls(m["tls"]) if "tls" in m else None,
    )


def _tls(node: _Node) -> TlsConfig:
    m = node.mapping(TLS_KEYS, required=("cert", "key"))
    d = TlsConfig("", "")

    def readable(key: str) -> str:
        # Checked here, so that `muxd check` and a reload name the key and line,
        # rather than a start that fails on the first handshake's context.
        path = m[key].file_path(absolute=True)
        if not os.path.isfile(path):
            raise m[key].error(f"no such file: {path}")
        if not os.access(path, os.R_OK):
            raise m[key].error(f"cannot read {path}: permission denied")
        return path

    return TlsConfig(
        cert=readable("cert"),
        key=readable("key"),
        client_ca=readable("client_ca") if "client_ca" in m else None,
        handshake_timeout=_get(
            m, "handshake_timeout", lambda n: n.duration(0.01, 600, off=False), d.handshake_timeout
        ),
    )


def _readable(node: _Node) -> str:
    # Checked here, so that `muxd check` and a reload name the key and line.
    path = node.file_path(absolute=True)
    if not os.path.isfile(path):
        raise node.error(f"no such file: {path}")
    if not os.access(path, os.R_OK):
        raise node.error(f"cannot read {path}: permission denied")
    return path


# An MQTT client id: 23 characters is what every broker must accept (MQTT
# 3.1.1, 3.1.3.1); longer ones are refused, not cut, since a cut id could clash.
_CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,23}")
# A topic prefix: levels of printable characters, no wildcards, no empty level.
_PREFIX_RE = re.compile(r"[^/#+\s\x00]{1,64}(/[^/#+\s\x00]{1,64}){0,7}")


# The MQTT bridge drives paho through the callback API of version 2.
PAHO_MIN = (2, 1)


def _paho_version() -> tuple[int, ...] | None:
    """paho-mqtt's version, or None when it is not installed."""
    try:
        import paho.mqtt  # only a config with mqtt: needs it
    except ImportError:
        return None
    return tuple(int(x) for x in re.findall(r"[0-9]+", paho.mqtt.__version__)[:2])


def _mqtt(node: _Node) -> MqttConfig:
    m = node.mapping(MQTT_KEYS, required=("broker",))
    version = _paho_version()
    if version is None or version < PAHO_MIN:
        found = "it is not installed" if version is None else f"found {'.'.join(map(str, version))}"
        raise node.error(
            f"the MQTT bridge needs paho-mqtt {'.'.join(map(str, PAHO_MIN))} or later ({found}): "
            "pip install 'paho-mqtt>=2.1', or Debian's python3-paho-mqtt from trixie on"
        )
    host, port = m["broker"].peer_address()
    d = MqttConfig("", 0)
    client_id = _get(m, "client_id", _Node.text, d.client_id)
    if "client_id" in m and not _CLIENT_ID_RE.fullmatch(client_id):
        raise m["client_id"].error(
            f"must be 1 to 23 of A-Z a-z 0-9 _ . - (what every broker accepts), got {_show(client_id)}"
        )
    prefix = _get(m, "prefix", _Node.text, d.prefix)
    if not _PREFIX_RE.fullmatch(prefix):
        raise m["prefix"].error(
            f"a topic prefix such as muxd or lab/muxd: no +, #, spaces, or empty levels; got {_show(prefix)}"
        )
    tls = None
    if "tls" in m:
        t = m["tls"].mapping(MQTT_TLS_KEYS)
        tls = MqttTls(
            ca=_readable(t["ca"]) if "ca" in t else None,
            cert=_readable(t["cert"]) if "cert" in t else None,
            key=_readable(t["key"]) if "key" in t else None,
        )
        if (tls.cert is None) != (tls.key is None):
            raise m["tls"].error("cert and key go together: give both, or neither")
    username = _get(m, "username", _Node.text, None)
    password_file = _readable(m["password_file"]) if "password_file" in m else None
    if password_file is not None and username is None:
        raise m["password_file"].error("a password needs a username: set username too")
    lo, hi = _backoff(m)
    return MqttConfig(
        host=host,
        port=port,
        client_id=client_id,
        prefix=prefix,
        tls=tls,
        username=username,
        password_file=password_file,
        keepalive=_get(m, "keepalive", lambda n: n.integer(5, 3600), d.keepalive),
        connect_timeout=_get(
            m, "connect_timeout", lambda n: n.duration(0.1, 300, off=False), d.connect_timeout
        ),
        backoff_min=lo,
        backoff_max=hi,
    )


def _port_mqtt(node: _Node) -> PortMqtt:
    d = PortMqtt()
    if isinstance(node.node, yaml.ScalarNode) and node.value() is True:
        return d
    m = node.mapping(PORT_MQTT_KEYS)
    qos = _get(m, "qos", lambda n: n.integer(0, 1), d.qos)
    return PortMqtt(
        format=_get(m, "format", lambda n: n.choice(FORMATS), d.format),
        qos=qos,
        write=_get(m, "write", _Node.flag, d.write),
        buffer=_get(m, "buffer", lambda n: n.size(4 * KiB, 64 * MiB), d.buffer),
    )


def _check_unique(items: list[tuple[str, _Node]], what: str) -> None:
    seen: dict[str, _Node] = {}
    for key, node in items:
        if key in seen:
            raise node.error(f"duplicate {what} {_show(key)} (first at line {seen[key].line})")
        seen[key] = node


# Where errors go while the whole file is checked (load_all): None, the usual
# case, means the first error is raised; a list means each port, listener and
# http entry with an error is reported there and left out, and the rest of
# the file is read on.
_COLLECT: ContextVar[list[ConfigError] | None] = ContextVar("muxd_config_collect", default=None)
Item = TypeVar("Item")


def _each(items: Iterable[Item], read: Callable[[Item], T]) -> list[T]:
    """read() of each item; while collecting, an item whose read fails is
    reported and left out, so that one bad listener hides no other error."""
    out: list[T] = []
    sink = _COLLECT.get()
    for item in items:
        try:
            out.append(read(item))
        except ConfigError as exc:
            if sink is None:
                raise
            sink.append(exc)
    return out


def build(root: _Node) -> Config:
    m = root.mapping(TOP_KEYS, required=("ports",))
    port_nodes = list(m["ports"].sequence())
    if not port_nodes:
        raise m["ports"].error("needs at least one port")
    port_pairs = _each(port_nodes, lambda n: (_port(n), n))
    ports = tuple(p for p, _ in port_pairs)
    http_nodes: list[_Node] = []
    if "http" in m:
        h = m["http"]
        http_nodes = list(h.sequence()) if isinstance(h.node, yaml.SequenceNode) else [h]
    http_pairs = _each(enumerate(http_nodes), lambda item: (_http(item[1], item[0]), item[1]))
    http = tuple(srv for srv, _ in http_pairs)
    _check_unique([(p.name, n.mapping(PORT_KEYS)["name"]) for p, n in port_pairs], "port name")
    names: list[tuple[str, _Node]] = []
    binds: list[tuple[str, _Node]] = []
    for port, pnode in port_pairs:
        lnodes = list(pnode.mapping(PORT_KEYS)["listeners"].sequence()) if port.listeners else []
        if len(lnodes) != len(port.listeners):
            continue  # a listener had an error (already reported): the pairs would not line up
        for lst, lnode in zip(port.listeners, lnodes, strict=True):
            names.append((lst.name, lnode))
            # Port 0 binds a different free port each time: never a clash.
            if lst.kind != "websocket" and not (lst.kind in ("tcp", "rfc2217") and lst.port == 0):
                binds.append((lst.address, lnode))
    for srv, hnode in http_pairs:
        names.append((srv.name, hnode))
        if srv.port:
            binds.append((format_hostport(srv.host, srv.port), hnode))
    _check_unique(binds, "listening address")
    _check_unique(names, "listener name")
    default_level: LogLevel = "info"
    level = _get(m, "log_level", lambda n: n.choice(LOG_LEVELS), default_level)
    mqtt = _mqtt(m["mqtt"]) if "mqtt" in m else None
    if mqtt is None:
        for port, pnode in port_pairs:
            if port.mqtt is not None:
                raise pnode.mapping(PORT_KEYS)["mqtt"].error(
                    "publishing a port needs the broker: add a top-level mqtt: section with broker:"
                )
    return Config(ports=ports, http=http, log_level=level, source=root.file, lines=root.lines, mqtt=mqtt)


def loads(text: str, file: str = "<config>") -> Config:
    node = _compose(text, file)
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


def load_all(path: str) -> tuple[Config | None, list[ConfigError]]:
    """For `muxd check`: the config and every error found, in line order.

    Each port, listener and http entry is read on its own, so an error in
    one does not hide those of the others (the erroneous entries are left
    out of the config returned); an error in the file's structure (YAML
    syntax, a top-level key) still stops the reading. The config is None
    when nothing could be read."""
    errors: list[ConfigError] = []
    token = _COLLECT.set(errors)
    cfg: Config | None = None
    try:
        cfg = load(path)
    except ConfigError as exc:
        errors.append(exc)
    finally:
        _COLLECT.reset(token)
    errors.sort(key=lambda e: (e.line is None, e.line or 0))
    return cfg, errors


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a repeated list or dict out again: the loader refuses aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def from_data(data: dict[str, Any], source: str = "<command line>") -> Config:
    """Validate a config given as Python data (the one-port command-line form)."""
    text = yaml.dump(data, Dumper=_NoAliasDumper)
    try:
        node = _compose(text, source)
        if node is None:
            raise ConfigError("the file is empty", "", None, source)
        return build(_Node(node, "", source, None))
    except ConfigError as exc:
        # Lines of a generated document would only confuse.
        raise ConfigError(exc.message, exc.path, None, source) from None
