"""The configuration as muxd uses it: frozen dataclasses and the closed vocabularies.

This is what every other module imports: the listeners, the upstreams, the
API, the HTTP names. It imports no YAML and reads no file, so importing a
dataclass costs only the dataclasses; turning a file into these objects is
muxd.config.schema's job, done when a config is loaded.

The defaults written here are the config file's defaults: a key left out of
the file takes the value of the field it sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

# muxd.sequences as a module, not `from ... import Step`: it imports the
# duration grammar of this package (muxd.config.values) and may be imported
# first, while this module is still incomplete. Step is only named in
# annotations, which are resolved later (typing.get_type_hints).
from muxd import sequences as seqs
from muxd.access import Network, TokenSpec
from muxd.config.values import KiB, MiB, format_hostport
from muxd.protocol.line_settings import LineSettings
from muxd.records import Format

# The closed vocabularies of the file, as Literal types so mypy checks every use;
# the tuples derived from them are what the loader accepts, so the two cannot drift.
ListenerKind = Literal["tcp", "unix", "pty", "rfc2217", "websocket"]
Mode = Literal["ro", "rw"]
Overflow = Literal["drop-oldest", "disconnect", "block"]
WriteMode = Literal["chunks", "lines"]
LineControlPolicy = Literal["virtual", "ignore", "owner", "any"]
WriteLockPolicy = Literal["none", "first"]
UpstreamControl = Literal["none", "rfc2217", "usr"]
LogLevel = Literal["debug", "info", "warning", "error"]

LISTENER_KINDS: tuple[ListenerKind, ...] = get_args(ListenerKind)
MODES: tuple[Mode, ...] = get_args(Mode)
OVERFLOWS: tuple[Overflow, ...] = get_args(Overflow)
WRITE_MODES: tuple[WriteMode, ...] = get_args(WriteMode)
LINE_CONTROL_POLICIES: tuple[LineControlPolicy, ...] = get_args(LineControlPolicy)
WRITE_LOCK_POLICIES: tuple[WriteLockPolicy, ...] = get_args(WriteLockPolicy)
UPSTREAM_CONTROLS: tuple[UpstreamControl, ...] = get_args(UpstreamControl)
LOG_LEVELS: tuple[LogLevel, ...] = get_args(LogLevel)


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
    # overflow: block: how long one reader may hold the device (muxd.hub) before
    # it falls back to drop-oldest. 10 s rides out a reader's GC pause or a
    # busy host; beyond that the reader is stuck and the port must go on.
    block_timeout: float = 10.0
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
    # Sent to each client first (tcp, unix, rfc2217): a template with ser2net's
    # escapes, expanded at connect time (muxd.banner). "": none.
    banner: str = ""
    # tcp, unix, pty: the escape byte (``^]`` is 0x1d) before a command letter
    # (muxd.protocol.escape); None: off, since raw listeners carry binary.
    escape: int | None = None

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
    # first: one rw writer at a time, port-wide (muxd.writelock); none: everyone.
    write_lock: WriteLockPolicy = "none"
    # The holder of the write lock loses it after this long without input:
    # 5 minutes outlasts reading a page of output, not a coffee break. 0: never.
    lock_idle: float = 300.0
    # line_control: owner: ownership ends after this long without a settings or
    # control change or a write by the owner (muxd.linecontrol). 10 minutes is
    # longer than any flashing or test session's pause, short enough that a
    # forgotten client does not keep the port for a day. 0: only a disconnect ends it.
    owner_idle: float = 600.0
    trace: tuple[TraceFile, ...] = ()
    # Named control-line sequences (muxd.sequences), (name, steps) in config order.
    sequences: tuple[tuple[str, tuple[seqs.Step, ...]], ...] = ()
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
    events: bool = False  # also record attach/detach, the write lock, BREAKs and sequences
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
class ControlSocket:
    """``control:``: the HTTP API on a Unix socket (muxd.control), where being
    able to connect is the admin right, so its mode and group are the guard."""

    path: str
    file_mode: int = 0o600  # owner only unless the file says who else may act
    group: str | int | None = None


@dataclass(frozen=True)
class Config:
    ports: tuple[Port, ...]
    http: tuple[HttpServer, ...] = ()
    log_level: LogLevel = "info"
    mqtt: MqttConfig | None = None
    control: ControlSocket | None = None  # off unless the file names a socket
    source: str = field(default="<config>", compare=False)
    # The line of each key path ("ports[0].listeners[1].group"), for checks
    # made after loading (muxd.checks) to say where the problem is written.
    lines: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
