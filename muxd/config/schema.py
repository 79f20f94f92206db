"""The config file's sections: YAML text in, a Config (muxd.config.model) out.

Each builder reads one section from its located node
(muxd.config.yaml_reader.Node), with the keys of muxd.config.keys and the
grammars of muxd.config.values: a port and its parts in muxd.config.ports,
the readers several sections share in muxd.config.fields, the file as a
whole, its http servers and its broker here.

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

from typing import Any

from muxd.access import SCOPES, TokenSpec
from muxd.checks import paho_problem
from muxd.config.fields import (
    allow_list,
    backoff,
    check_unique,
    list_of,
    read_name,
    readable_file,
    tls_section,
)
from muxd.config.keys import CONTROL_KEYS, HTTP_KEYS, MQTT_KEYS, MQTT_TLS_KEYS, TOKEN_KEYS, TOP_KEYS
from muxd.config.model import LOG_LEVELS, Config, ControlSocket, HttpServer, LogLevel, MqttConfig, MqttTls
from muxd.config.ports import read_port
from muxd.config.report import ConfigErrors, Report, each_error, line_order
from muxd.config.values import CLIENT_ID_RE, DEFAULT_HOST, PREFIX_RE, format_hostport, parse_server_name, show
from muxd.config.yaml_reader import Node, dump, read_document
from muxd.errors import ConfigError
from muxd.files import read_regular

# --------------------------------------------------------------------------
# The services: http servers, the MQTT broker


def _token(node: Node) -> tuple[TokenSpec, Node | None]:
    """A token spec, and the node of its name for the uniqueness check (None if bad)."""
    m = node.mapping(TOKEN_KEYS, required=("name", "file", "scope"))
    spec = TokenSpec(
        m.read("name", read_name, ""),
        m.read("file", lambda n: n.file_path(absolute=True), ""),
        m.read("scope", lambda n: n.choice(SCOPES), "read"),
    )
    return spec, m["name"] if m.ok("name") else None


def _tokens(node: Node) -> tuple[TokenSpec, ...]:
    read = node.report.collect(node.sequence(), _token)
    check_unique([(spec.name, name) for spec, name in read if name is not None], "token name")
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
        m.read("origins", list_of(Node.text), ()),
        tokens=m.read("tokens", _tokens, ()),
        server_names=m.read("server_names", _server_names, ()),
        allow=m.read("allow", allow_list, ()),
        metrics_token=m.read("metrics_token", Node.flag, False),
        tls=m.read("tls", tls_section, None),
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
        ca=t.read("ca", readable_file, None),
        cert=t.read("cert", readable_file, None),
        key=t.read("key", readable_file, None),
    )


def _mqtt(node: Node) -> MqttConfig:
    m = node.mapping(MQTT_KEYS, required=("broker",))
    problem = paho_problem()
    if problem is not None:
        node.add_error(problem)
    host, port = m.read("broker", Node.peer_address, ("", 0))
    d = MqttConfig("", 0)
    password_file = m.read("password_file", readable_file, None)
    if "password_file" in m and "username" not in m:
        m["password_file"].add_error("a password needs a username: set username too")
    lo, hi = backoff(m)
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


def _control(node: Node) -> ControlSocket:
    """``control: PATH``, or a mapping with path, socket_mode and group as a
    unix listener has them (muxd.control)."""
    if not node.is_mapping():
        return ControlSocket(node.file_path(absolute=True))
    m = node.mapping(CONTROL_KEYS, required=("path",))
    d = ControlSocket("")
    return ControlSocket(
        m.read("path", lambda n: n.file_path(absolute=True), ""),
        m.read("socket_mode", Node.file_mode, d.file_mode),
        m.read("group", Node.group, None),
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
    ports = [read for _, read in report.each(port_nodes, lambda n: read_port(n, has_broker))]
    # One http server may be written as a mapping, several as a list.
    http_nodes: list[Node] = m.read("http", lambda h: list(h.sequence()) if h.is_list() else [h], [])
    http = [(h, srv) for (_, h), srv in report.each(enumerate(http_nodes), lambda i: _http(i[1], i[0]))]
    check_unique([(r.port.name, r.keys["name"]) for r in ports], "port name")
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
    control: ControlSocket | None = m.read("control", _control, None)
    if control is not None:
        binds.append((control.path, m["control"]))
    check_unique(binds, "listening address")
    check_unique(names, "listener name")
    default_level: LogLevel = "info"
    return Config(
        ports=tuple(r.port for r in ports),
        http=tuple(srv for _, srv in http),
        log_level=m.read("log_level", lambda n: n.choice(LOG_LEVELS), default_level),
        mqtt=m.read("mqtt", _mqtt, None),
        control=control,
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


# A config of a thousand ports is about 1 MB; the loop reads it on SIGHUP.
MAX_CONFIG_BYTES = 16 * 1024 * 1024


def _text_of(path: str, in_loop: bool = False) -> str:
    """``in_loop`` (a reload): a regular file only (muxd.files), as a FIFO put
    there would block the loop; at start a pipe (``-c <(...)``) may be read."""
    try:
        if in_loop:
            return read_regular(path, MAX_CONFIG_BYTES).decode("utf-8")
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


def load(path: str, *, in_loop: bool = False) -> Config:
    return loads(_text_of(path, in_loop), path)


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
