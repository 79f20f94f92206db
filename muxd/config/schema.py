"""The config file's sections: YAML text in, a Config (muxd.config.model) out.

Each builder reads one section (a port, its upstream, a listener, an http
server, the broker...) from its located node (muxd.config.yaml_reader.Node),
with the keys of muxd.config.keys and the grammars of muxd.config.values.
Unknown keys are errors, never silently ignored, since a misspelt
``overflow`` that falls back to a default is worse than no config.

Every error of the file is found in one pass (muxd.config.report): a bad
value is reported and its default stands in, so the reading goes on; a port,
listener or http server with any error is left out of what is built; at the
end ``loads`` raises all of them, in line order. A check across keys
(``max_line`` against ``write_queue``, ``backoff_min`` against
``backoff_max``...) is skipped when one of its keys had an error of its own,
whose stand-in would only make a second, false one.

Two checks need the machine (a readable TLS or password file, paho-mqtt for
``mqtt:``); they are muxd.checks', called here so that a reload refuses a
config that could not run. The one-port command-line form builds the same
structure as Python data and is validated by the same code (its errors carry
no line number). Whatever the text, ``loads`` returns a Config or raises
ConfigError, and the CLI turns that into exit code 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from muxd.access import SCOPES, Network, TokenSpec, parse_network
from muxd.checks import file_problem, paho_problem
from muxd.config.keys import (
    BACKOFF_KEYS,
    HTTP_KEYS,
    LISTENER_COMMON,
    LISTENER_EXTRA,
    MQTT_KEYS,
    MQTT_TLS_KEYS,
    PORT_KEYS,
    PORT_MQTT_KEYS,
    SERIAL_KEYS,
    SIM_KEYS,
    TCP_KEYS,
    TLS_KEYS,
    TOKEN_KEYS,
    TOP_KEYS,
    TRACE_KEYS,
    UPSTREAM_KINDS,
)
from muxd.config.model import (
    LINE_CONTROL_POLICIES,
    LISTENER_KINDS,
    LOG_LEVELS,
    MODES,
    OVERFLOWS,
    UPSTREAM_CONTROLS,
    WRITE_MODES,
    Config,
    HttpServer,
    Listener,
    LogLevel,
    MqttConfig,
    MqttTls,
    Port,
    PortMqtt,
    SerialUpstream,
    SimUpstream,
    TcpUpstream,
    TlsConfig,
    TraceFile,
    Upstream,
)
from muxd.config.report import ConfigErrors, Report, each_error, line_order
from muxd.config.values import (
    CLIENT_ID_RE,
    DEFAULT_HOST,
    NAME_RE,
    PARITY_NAMES,
    PREFIX_RE,
    GiB,
    KiB,
    MiB,
    format_hostport,
    parse_server_name,
    show,
)
from muxd.config.yaml_reader import Node, Section, dump, read_document
from muxd.errors import ConfigError
from muxd.protocol.line_settings import BYTESIZES, FLOWS, STOPBITS, LineSettings
from muxd.records import FORMATS
from muxd.sequences import MAX_STEPS, Step, parse_step

T = TypeVar("T")

# line_timeout, when not 0: under 10 ms a line a script sends in two TCP
# segments could be cut in two by scheduling noise alone; over a minute a
# partial line is no longer "being typed" and would only hide a missing newline.
LINE_TIMEOUT_MIN = 0.01
LINE_TIMEOUT_MAX = 60.0
# Sequences per port: a reset, a bootloader entry, a few board-specific ones.
MAX_SEQUENCES = 32


# --------------------------------------------------------------------------
# Values shared by several sections


def _name(node: Node) -> str:
    """A port, listener or token name: it appears in paths, URLs and logs."""
    name = node.text("a name")
    if not NAME_RE.fullmatch(name):
        raise node.error(f"must match {NAME_RE.pattern}, got {show(name)}")
    return name


def _readable(node: Node) -> str:
    # Checked here, so that `muxd check` and a reload name the key and line,
    # rather than a start that fails on the first handshake's context.
    path = node.file_path(absolute=True)
    problem = file_problem(path)
    if problem is not None:
        raise node.error(problem)
    return path


def _list(read: Callable[[Node], T]) -> Callable[[Node], tuple[T, ...]]:
    """A reader of a list whose entries read() reads: an entry with an error is
    reported and left out, and the others read on."""
    return lambda node: tuple(node.report.collect(node.sequence(), read))


def _check_unique(items: list[tuple[str, Node]], what: str) -> None:
    seen: dict[str, Node] = {}
    for key, node in items:
        if key in seen:
            node.add_error(f"duplicate {what} {show(key)} (first at line {seen[key].line})")
        else:
            seen[key] = node


def _backoff(m: Section) -> tuple[float, float]:
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


# --------------------------------------------------------------------------
# Upstreams


def _stopbits(node: Node) -> float:
    v = node.value()
    if isinstance(v, bool) or v not in STOPBITS:
        raise node.error(f"must be 1, 1.5 or 2; got {show(v)}")
    return float(v)


def _line_settings(m: Section) -> LineSettings:
    d = LineSettings()
    return LineSettings(
        baudrate=m.read("baudrate", lambda n: n.integer(50, 20_000_000), d.baudrate),
        bytesize=m.read("bytesize", lambda n: n.integer(min(BYTESIZES), max(BYTESIZES)), d.bytesize),
        parity=m.read("parity", lambda n: PARITY_NAMES[n.choice(tuple(PARITY_NAMES))], d.parity),
        stopbits=m.read("stopbits", _stopbits, d.stopbits),
        flow=m.read("flow", lambda n: n.choice(FLOWS), d.flow),
    )


def _tcp_upstream(m: Section) -> TcpUpstream:
    host, port = m.read("tcp", Node.peer_address, ("", 0))
    lo, hi = _backoff(m)
    d = TcpUpstream(host, port)
    settings = _line_settings(m)
    control = m.read("control", lambda n: n.choice(UPSTREAM_CONTROLS), d.control)
    if control == "usr":
        # What the vendor's 8-byte packet cannot carry (muxd.protocol.usr).
        if settings.stopbits == 1.5:
            m["stopbits"].add_error("control: usr cannot set 1.5 stop bits (1 or 2)")
        if settings.baudrate >= 1 << 24:
            m["baudrate"].add_error(f"control: usr carries baud rates below {1 << 24}")
    return TcpUpstream(
        host,
        port,
        settings,
        # 0 is an error: no connect completes in 0 s, and "no timeout" would
        # leave a black-holed SYN to the kernel's retries (about two minutes).
        connect_timeout=m.read(
            "connect_timeout", lambda n: n.duration(0.1, 300, off=False), d.connect_timeout
        ),
        keepalive_idle=m.read("keepalive_idle", lambda n: n.duration(1, 7200, off=False), d.keepalive_idle),
        keepalive_interval=m.read(
            "keepalive_interval", lambda n: n.duration(1, 600, off=False), d.keepalive_interval
        ),
        keepalive_count=m.read("keepalive_count", lambda n: n.integer(1, 100), d.keepalive_count),
        # 0 is valid as written and means off: a device may stay silent for hours.
        idle_timeout=m.read("idle_timeout", lambda n: n.duration(0.1, 86400), d.idle_timeout),
        control=control,
        backoff_min=lo,
        backoff_max=hi,
    )


def _sim_upstream(sim: Node) -> SimUpstream:
    d = SimUpstream()
    if sim.is_scalar() and (sim.value() is None or sim.value() is True):
        return d
    s = sim.mapping(SIM_KEYS)
    return SimUpstream(
        baudrate=s.read("baudrate", lambda n: n.integer(300, 20_000_000), d.baudrate),
        # 0 is an error: the simulator has no "off", and a 0 s period would spin the loop.
        status_interval=s.read(
            "status_interval", lambda n: n.duration(0.01, 3600, off=False), d.status_interval
        ),
        boot=s.read("boot", Node.flag, d.boot),
    )


def _upstream(node: Node) -> Upstream:
    if not node.is_mapping():
        raise node.error("expected a mapping with one of: serial, tcp, sim")
    kinds = [k for k in node.written_keys() if k in UPSTREAM_KINDS]
    if len(kinds) != 1:
        raise node.error(f"needs exactly one of serial, tcp, sim (got {', '.join(kinds) or 'none'})")
    if kinds[0] == "serial":
        m = node.mapping(SERIAL_KEYS)
        lo, hi = _backoff(m)
        path = m.read("serial", lambda n: n.file_path(absolute=False), "")
        return SerialUpstream(path, _line_settings(m), lo, hi)
    if kinds[0] == "tcp":
        return _tcp_upstream(node.mapping(TCP_KEYS))
    return node.mapping({"sim"}).read("sim", _sim_upstream, SimUpstream())


# --------------------------------------------------------------------------
# Listeners, traces, sequences: the parts of a port


def _network(node: Node) -> Network:
    value = node.value()
    if not isinstance(value, str):
        raise node.error(f"expected a network such as 10.0.0.0/8, got {show(value)}")
    return node.parsed(parse_network)


def _allow(node: Node) -> tuple[Network, ...]:
    """An allow-list: networks in CIDR form (muxd.access). An empty list is an
    error rather than "nobody": a listener nobody may reach is a mistake, and
    "everybody" is what leaving the key out says."""
    entries = list(node.sequence())
    if not entries:
        raise node.error("an empty allow-list admits nobody: list networks, or remove the key")
    return tuple(node.report.collect(entries, _network))


def _listener(node: Node, port_name: str, index: int) -> Listener:
    if not node.is_mapping():
        raise node.error(f"expected a mapping with one of: {', '.join(LISTENER_KINDS)}")
    kinds = [k for k in LISTENER_KINDS for key in node.written_keys() if key == k]
    if len(kinds) != 1:
        raise node.error(
            f"needs exactly one of {', '.join(LISTENER_KINDS)} (got {', '.join(kinds) or 'none'})"
        )
    kind = kinds[0]
    m = node.mapping(LISTENER_COMMON | LISTENER_EXTRA[kind] | {kind})
    d = Listener(kind, "")
    host, port, path = "", 0, ""
    if kind in ("tcp", "rfc2217"):
        host, port = m.read(kind, Node.hostport, (DEFAULT_HOST, 0))
    elif kind in ("unix", "pty"):
        path = m.read(kind, lambda n: n.file_path(absolute=True), "")
    elif not m.read(kind, Node.flag, True):
        m[kind].add_error("set websocket: true to serve /ws/<port>, or remove this listener")
    if kind in ("tcp", "rfc2217") and port == 0:
        # Several listeners may share HOST:0, so the address names none of them:
        # the port name and the listener's place in its list do.
        default_name = f"{kind}:{port_name}/{index}"
    elif kind in ("tcp", "rfc2217"):
        default_name = f"{kind}:{format_hostport(host, port)}"
    else:
        default_name = f"{kind}:{path or port_name}"
    mode_key = "socket_mode" if kind == "unix" else "link_mode"
    return Listener(
        kind=kind,
        name=m.read("name", _name, default_name),
        host=host,
        port=port,
        path=path,
        mode=m.read("mode", lambda n: n.choice(MODES), d.mode),
        max_clients=m.read("max_clients", lambda n: n.integer(1, 100_000), d.max_clients),
        buffer=m.read("buffer", lambda n: n.size(4 * KiB, 1 * GiB), d.buffer),
        overflow=m.read("overflow", lambda n: n.choice(OVERFLOWS), d.overflow),
        write=m.read("write", lambda n: n.choice(WRITE_MODES), d.write),
        notices=m.read("notices", Node.flag, d.notices),
        file_mode=m.read(mode_key, Node.file_mode, d.file_mode),
        group=m.read("group", Node.group, None),
        history=m.read("history", lambda n: n.size(0, 64 * MiB), d.history),
        history_lines=m.read("history_lines", lambda n: n.integer(0, 100_000), d.history_lines),
        format=m.read("format", lambda n: n.choice(FORMATS), d.format),
        allow=m.read("allow", _allow, ()),
        tls=m.read("tls", _tls, None),
    )


def _rotate(node: Node) -> int:
    rotate = node.size(0, 64 * GiB)
    if 0 < rotate < 64 * KiB:
        raise node.error(f"must be 0 (never) or at least 64KiB, got {rotate}")
    return rotate


def _trace(node: Node) -> TraceFile:
    m = node.mapping(TRACE_KEYS, required=("path",))
    d = TraceFile("")
    return TraceFile(
        path=m.read("path", lambda n: n.file_path(absolute=True), d.path),
        format=m.read("format", lambda n: n.choice(FORMATS), d.format),
        rotate=m.read("rotate", _rotate, d.rotate),
        keep=m.read("keep", lambda n: n.integer(0, 1000), d.keep),
        input=m.read("input", Node.flag, d.input),
        file_mode=m.read("mode", Node.file_mode, d.file_mode),
        group=m.read("group", Node.group, None),
    )


def _sequence(entry: tuple[str, Node]) -> tuple[str, tuple[Step, ...]]:
    """One named sequence; each step parsed by muxd.sequences, its error located."""
    name, seq = entry
    if not NAME_RE.fullmatch(name):
        seq.add_error(f"a sequence name must match {NAME_RE.pattern}")
    nodes = list(seq.sequence())
    if not nodes:
        raise seq.error("a sequence needs at least one step")
    if len(nodes) > MAX_STEPS:
        raise seq.error(f"at most {MAX_STEPS} steps, got {len(nodes)}")
    return name, tuple(seq.report.collect(nodes, lambda step: step.parsed(parse_step)))


def _sequences(node: Node) -> tuple[tuple[str, tuple[Step, ...]], ...]:
    """``{name: [step, ...]}``."""
    if not node.is_mapping():
        raise node.error("expected a mapping of sequence names to lists of steps")
    m = node.mapping(set(node.written_keys()))
    if len(m) > MAX_SEQUENCES:
        raise node.error(f"at most {MAX_SEQUENCES} sequences, got {len(m)}")
    return tuple(node.report.collect(m.items(), _sequence))


def _port_mqtt(node: Node) -> PortMqtt:
    d = PortMqtt()
    if node.is_scalar() and node.value() is True:
        return d
    m = node.mapping(PORT_MQTT_KEYS)
    return PortMqtt(
        format=m.read("format", lambda n: n.choice(FORMATS), d.format),
        qos=m.read("qos", lambda n: n.integer(0, 1), d.qos),
        write=m.read("write", Node.flag, d.write),
        buffer=m.read("buffer", lambda n: n.size(4 * KiB, 64 * MiB), d.buffer),
    )


@dataclass(frozen=True)
class _PortRead:
    """A port as read, with what the checks across ports need to locate their errors."""

    port: Port
    keys: Section
    listeners: list[tuple[Listener, Node]]


def _port(node: Node, has_broker: bool) -> _PortRead:
    m = node.mapping(PORT_KEYS, required=("name", "upstream"))
    name = m.read("name", _name, "")
    indexed: list[tuple[int, Node]] = m.read("listeners", lambda n: list(enumerate(n.sequence())), [])
    listeners = [
        (lst, lnode) for (_, lnode), lst in node.report.each(indexed, lambda i: _listener(i[1], name, i[0]))
    ]
    d = Port(name, SimUpstream())
    port = Port(
        name=name,
        upstream=m.read("upstream", _upstream, d.upstream),
        listeners=tuple(lst for lst, _ in listeners),
        write_queue=m.read("write_queue", lambda n: n.size(1 * KiB, 64 * MiB), d.write_queue),
        max_line=m.read("max_line", lambda n: n.size(16, 1 * MiB), d.max_line),
        line_timeout=m.read(
            "line_timeout", lambda n: n.duration(LINE_TIMEOUT_MIN, LINE_TIMEOUT_MAX), d.line_timeout
        ),
        # 0 is valid as written: no history replayed to new readers.
        history=m.read("history", lambda n: n.size(0, 64 * MiB), d.history),
        line_control=m.read("line_control", lambda n: n.choice(LINE_CONTROL_POLICIES), d.line_control),
        trace=m.read("trace", _list(_trace), ()),
        sequences=m.read("sequences", _sequences, ()),
        mqtt=m.read("mqtt", _port_mqtt, None),
    )
    if port.max_line > port.write_queue and m.ok("max_line", "write_queue"):
        m.get("max_line", node).add_error(
            f"max_line ({port.max_line}) must not exceed write_queue ({port.write_queue})"
        )
    if "mqtt" in m and not has_broker:
        m["mqtt"].add_error("publishing a port needs the broker: add a top-level mqtt: section with broker:")
    return _PortRead(port, m, listeners)


# --------------------------------------------------------------------------
# The services: http servers, TLS, the MQTT broker


def _tls(node: Node) -> TlsConfig:
    m = node.mapping(TLS_KEYS, required=("cert", "key"))
    d = TlsConfig("", "")
    return TlsConfig(
        cert=m.read("cert", _readable, d.cert),
        key=m.read("key", _readable, d.key),
        client_ca=m.read("client_ca", _readable, None),
        handshake_timeout=m.read(
            "handshake_timeout", lambda n: n.duration(0.01, 600, off=False), d.handshake_timeout
        ),
    )


def _token(node: Node) -> tuple[TokenSpec, Node | None]:
    """A token spec, and the node of its name for the uniqueness check (None if bad)."""
    m = node.mapping(TOKEN_KEYS, required=("name", "file", "scope"))
    spec = TokenSpec(
        m.read("name", _name, ""),
        m.read("file", lambda n: n.file_path(absolute=True), ""),
        m.read("scope", lambda n: n.choice(SCOPES), "read"),
    )
    return spec, m["name"] if m.ok("name") else None


def _tokens(node: Node) -> tuple[TokenSpec, ...]:
    read = node.report.collect(node.sequence(), _token)
    _check_unique([(spec.name, name) for spec, name in read if name is not None], "token name")
    return tuple(spec for spec, _ in read)


def _server_names(node: Node) -> tuple[str, ...]:
    names: list[str] = []
    for n in node.sequence():
        try:
            name = n.parsed(parse_server_name)
        except ConfigError as exc:
            n.report.add(exc)
            continue
        if name in names:
            n.add_error(f"duplicate server name {name!r}")
        else:
            names.append(name)
    return tuple(names)


def _http(node: Node, index: int) -> HttpServer:
    m = node.mapping(HTTP_KEYS, required=("listen",))
    host, port = m.read("listen", Node.hostport, (DEFAULT_HOST, 0))
    # As for listeners, HOST:0 may be shared, so a port-0 server is named by its place.
    default_name = f"http:{format_hostport(host, port)}" if port else f"http:{index}"
    if "token" in m:
        # A secret written in the config ends up in backups, diffs and error
        # reports; it must live in a file of its own (muxd.access).
        m["token"].add_error(
            "inline tokens are no longer accepted: put the secret in a file (mode 0640) "
            "and list it under tokens: [{name: NAME, file: PATH, scope: admin}]"
        )
    return HttpServer(
        host,
        port,
        m.read("name", lambda n: n.text("a name"), default_name),
        m.read("origins", _list(Node.text), ()),
        tokens=m.read("tokens", _tokens, ()),
        server_names=m.read("server_names", _server_names, ()),
        allow=m.read("allow", _allow, ()),
        metrics_token=m.read("metrics_token", Node.flag, False),
        tls=m.read("tls", _tls, None),
    )


def _client_id(node: Node) -> str:
    client_id = node.text()
    if not CLIENT_ID_RE.fullmatch(client_id):
        raise node.error(
            f"must be 1 to 23 of A-Z a-z 0-9 _ . - (what every broker accepts), got {show(client_id)}"
        )
    return client_id


def _prefix(node: Node) -> str:
    prefix = node.text()
    if not PREFIX_RE.fullmatch(prefix):
        raise node.error(
            f"a topic prefix such as muxd or lab/muxd: no +, #, spaces, or empty levels; got {show(prefix)}"
        )
    return prefix


def _mqtt_tls(node: Node) -> MqttTls:
    t = node.mapping(MQTT_TLS_KEYS)
    if ("cert" in t) != ("key" in t):
        node.add_error("cert and key go together: give both, or neither")
    return MqttTls(
        ca=t.read("ca", _readable, None),
        cert=t.read("cert", _readable, None),
        key=t.read("key", _readable, None),
    )


def _mqtt(node: Node) -> MqttConfig:
    m = node.mapping(MQTT_KEYS, required=("broker",))
    problem = paho_problem()
    if problem is not None:
        node.add_error(problem)
    host, port = m.read("broker", Node.peer_address, ("", 0))
    d = MqttConfig("", 0)
    password_file = m.read("password_file", _readable, None)
    if "password_file" in m and "username" not in m:
        m["password_file"].add_error("a password needs a username: set username too")
    lo, hi = _backoff(m)
    return MqttConfig(
        host=host,
        port=port,
        client_id=m.read("client_id", _client_id, d.client_id),
        prefix=m.read("prefix", _prefix, d.prefix),
        tls=m.read("tls", _mqtt_tls, None),
        username=m.read("username", lambda n: n.text("a user name"), None),
        password_file=password_file,
        keepalive=m.read("keepalive", lambda n: n.integer(5, 3600), d.keepalive),
        connect_timeout=m.read(
            "connect_timeout", lambda n: n.duration(0.1, 300, off=False), d.connect_timeout
        ),
        backoff_min=lo,
        backoff_max=hi,
    )


# --------------------------------------------------------------------------
# The file


def _ports(node: Node) -> list[Node]:
    ports = list(node.sequence())
    if not ports:
        raise node.error("needs at least one port")
    return ports


def build(root: Node) -> Config:
    """The Config of what was read without an error; the errors are in root.report."""
    report = root.report
    m = root.mapping(TOP_KEYS, required=("ports",))
    has_broker = "mqtt" in m
    port_nodes: list[Node] = m.read("ports", _ports, [])
    ports = [read for _, read in report.each(port_nodes, lambda n: _port(n, has_broker))]
    # One http server may be written as a mapping, several as a list.
    http_nodes: list[Node] = m.read("http", lambda h: list(h.sequence()) if h.is_list() else [h], [])
    http = [(h, srv) for (_, h), srv in report.each(enumerate(http_nodes), lambda i: _http(i[1], i[0]))]
    _check_unique([(r.port.name, r.keys["name"]) for r in ports], "port name")
    names: list[tuple[str, Node]] = []
    binds: list[tuple[str, Node]] = []
    for r in ports:
        for lst, lnode in r.listeners:
            names.append((lst.name, lnode))
            # Port 0 binds a different free port each time: never a clash.
            if lst.kind != "websocket" and not (lst.kind in ("tcp", "rfc2217") and lst.port == 0):
                binds.append((lst.address, lnode))
    for hnode, srv in http:
        names.append((srv.name, hnode))
        if srv.port:
            binds.append((format_hostport(srv.host, srv.port), hnode))
    _check_unique(binds, "listening address")
    _check_unique(names, "listener name")
    default_level: LogLevel = "info"
    return Config(
        ports=tuple(r.port for r in ports),
        http=tuple(srv for _, srv in http),
        log_level=m.read("log_level", lambda n: n.choice(LOG_LEVELS), default_level),
        mqtt=m.read("mqtt", _mqtt, None),
        source=root.file,
        lines=root.lines,
    )


def _read(text: str, file: str, report: Report) -> Config | None:
    """The Config of what was read without an error (None when nothing could
    be: YAML errors, an empty file); every error is in `report`."""
    try:
        return build(read_document(text, file, report))
    except ConfigError as exc:
        report.add(exc)
        return None


def _text_of(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", "", None, path) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", "", None, path) from None


def loads(text: str, file: str = "<config>") -> Config:
    """The Config of `text`, or ConfigErrors with every error, in line order."""
    report = Report()
    cfg = _read(text, file, report)
    report.raise_any()
    assert cfg is not None  # no error, so it was read
    return cfg


def load(path: str) -> Config:
    return loads(_text_of(path), path)


def load_all(path: str) -> tuple[Config | None, list[ConfigError]]:
    """For `muxd check`: the config and every error found, in line order.

    A port, listener or http entry with an error is left out of the config
    returned, so that what could be read is checked against the machine
    (muxd.checks) without stand-in values. The config is None when nothing
    could be read (YAML syntax, an empty file, not a mapping)."""
    report = Report()
    try:
        cfg = _read(_text_of(path), path, report)
    except ConfigError as exc:
        report.add(exc)
        cfg = None
    return cfg, line_order(report.errors)


def from_data(data: dict[str, Any], source: str = "<command line>") -> Config:
    """Validate a config given as Python data (the one-port command-line form)."""
    try:
        return loads(dump(data), source)
    except ConfigError as exc:
        # Lines of a generated document would only confuse.
        raise ConfigErrors([ConfigError(e.message, e.path, None, source) for e in each_error(exc)]) from None
