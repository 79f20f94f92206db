"""A port's sections of the config file: its upstream, listeners, traces, sequences.

``read_port`` reads one entry of ``ports:`` into a Port (muxd.config.model),
with the grammars of muxd.config.values. A listener with an error is left
out of its port (muxd.config.report), and the reading goes on; the port
keeps the nodes that the checks across ports (muxd.config.schema: unique
names and addresses) locate their errors at.
"""

from __future__ import annotations

from dataclasses import dataclass

from muxd import banner
from muxd.config.fields import allow_list, backoff, list_of, read_name, tls_section
from muxd.config.keys import (
    LISTENER_COMMON,
    LISTENER_EXTRA,
    PORT_KEYS,
    PORT_MQTT_KEYS,
    SERIAL_KEYS,
    SIM_KEYS,
    TCP_KEYS,
    TRACE_KEYS,
    UPSTREAM_KINDS,
)
from muxd.config.model import (
    LINE_CONTROL_POLICIES,
    LISTENER_KINDS,
    MODES,
    OVERFLOWS,
    UPSTREAM_CONTROLS,
    WRITE_LOCK_POLICIES,
    WRITE_MODES,
    Listener,
    Port,
    PortMqtt,
    SerialUpstream,
    SimUpstream,
    TcpUpstream,
    TraceFile,
    Upstream,
)
from muxd.config.values import DEFAULT_HOST, NAME_RE, PARITY_NAMES, GiB, KiB, MiB, format_hostport, show
from muxd.config.yaml_reader import Node, Section
from muxd.protocol.escape import parse_escape
from muxd.protocol.line_settings import BYTESIZES, FLOWS, STOPBITS, LineSettings
from muxd.records import FORMATS
from muxd.sequences import MAX_STEPS, Step, parse_step

# line_timeout, when not 0: under 10 ms a line a script sends in two TCP
# segments could be cut in two by scheduling noise alone; over a minute a
# partial line is no longer "being typed" and would only hide a missing newline.
LINE_TIMEOUT_MIN = 0.01
LINE_TIMEOUT_MAX = 60.0
# lock_idle, when not 0: under a second a holder would lose the lock between
# two keystrokes; over a day it is no longer "idle" but "gone".
LOCK_IDLE_MIN = 1.0
LOCK_IDLE_MAX = 86400.0
# overflow: block needs room for the hub's hold slack (muxd.hub.HOLD_SLACK,
# 128 KiB: what may still arrive after reading stops) twice over, so that a
# lossless reader holds the device at half its buffer at the latest.
BLOCK_MIN_BUFFER = 256 * KiB
# block_timeout: from 100 ms (tests, a reader that must never stall a port
# long) to 10 minutes (a lab capture that would rather hold the board).
BLOCK_TIMEOUT_MIN, BLOCK_TIMEOUT_MAX = 0.1, 600.0
# owner_idle: 100 ms for tests up to a day.
OWNER_IDLE_MIN, OWNER_IDLE_MAX = 0.1, 86400.0
# Sequences per port: a reset, a bootloader entry, a few board-specific ones.
MAX_SEQUENCES = 32


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
    lo, hi = backoff(m)
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
        lo, hi = backoff(m)
        path = m.read("serial", lambda n: n.file_path(absolute=False), "")
        return SerialUpstream(path, _line_settings(m), lo, hi)
    if kinds[0] == "tcp":
        return _tcp_upstream(node.mapping(TCP_KEYS))
    return node.mapping({"sim"}).read("sim", _sim_upstream, SimUpstream())


# --------------------------------------------------------------------------
# Listeners, traces, sequences: the parts of a port


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
    lst = Listener(
        kind=kind,
        name=m.read("name", read_name, default_name),
        host=host,
        port=port,
        path=path,
        mode=m.read("mode", lambda n: n.choice(MODES), d.mode),
        max_clients=m.read("max_clients", lambda n: n.integer(1, 100_000), d.max_clients),
        buffer=m.read("buffer", lambda n: n.size(4 * KiB, 1 * GiB), d.buffer),
        overflow=m.read("overflow", lambda n: n.choice(OVERFLOWS), d.overflow),
        block_timeout=m.read("block_timeout", _block_timeout, d.block_timeout),
        write=m.read("write", lambda n: n.choice(WRITE_MODES), d.write),
        notices=m.read("notices", Node.flag, d.notices),
        file_mode=m.read(mode_key, Node.file_mode, d.file_mode),
        group=m.read("group", Node.group, None),
        history=m.read("history", lambda n: n.size(0, 64 * MiB), d.history),
        history_lines=m.read("history_lines", lambda n: n.integer(0, 100_000), d.history_lines),
        format=m.read("format", lambda n: n.choice(FORMATS), d.format),
        allow=m.read("allow", allow_list, ()),
        tls=m.read("tls", tls_section, None),
        banner=m.read("banner", _banner, d.banner),
        escape=m.read("escape", lambda n: n.parsed(parse_escape), None),
    )
    _check_block(lst, m)
    return lst


def _block_timeout(node: Node) -> float:
    return node.duration(BLOCK_TIMEOUT_MIN, BLOCK_TIMEOUT_MAX, off=False)


def _check_block(lst: Listener, m: Section) -> None:
    """overflow: block's own bounds (see BLOCK_MIN_BUFFER); each error at its key."""
    if lst.overflow != "block":
        if "block_timeout" in m and m.ok("block_timeout", "overflow"):
            m["block_timeout"].add_error("block_timeout applies to overflow: block only")
        return
    if lst.buffer < BLOCK_MIN_BUFFER and m.ok("buffer", "overflow"):
        m.get("buffer", m["overflow"]).add_error(
            f"overflow: block needs a buffer of at least {BLOCK_MIN_BUFFER // KiB}KiB, got {lst.buffer}"
        )
    if lst.format != "raw" and m.ok("format", "overflow"):
        m.get("format", m["overflow"]).add_error(
            f"overflow: block keeps raw streams only, not format: {lst.format}"
        )


def _banner(node: Node) -> str:
    text = node.value()
    if not isinstance(text, str):
        raise node.error(f"expected text, got {show(text)}")
    problem = banner.check(text)
    if problem is not None:
        raise node.error(problem)
    return text


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
        events=m.read("events", Node.flag, d.events),
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
class PortRead:
    """A port as read, with what the checks across ports need to locate their errors."""

    port: Port
    keys: Section
    listeners: list[tuple[Listener, Node]]


def read_port(node: Node, has_broker: bool) -> PortRead:
    m = node.mapping(PORT_KEYS, required=("name", "upstream"))
    name = m.read("name", read_name, "")
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
        write_lock=m.read("write_lock", lambda n: n.choice(WRITE_LOCK_POLICIES), d.write_lock),
        lock_idle=m.read("lock_idle", lambda n: n.duration(LOCK_IDLE_MIN, LOCK_IDLE_MAX), d.lock_idle),
        owner_idle=m.read("owner_idle", lambda n: n.duration(OWNER_IDLE_MIN, OWNER_IDLE_MAX), d.owner_idle),
        trace=m.read("trace", list_of(_trace), ()),
        sequences=m.read("sequences", _sequences, ()),
        mqtt=m.read("mqtt", _port_mqtt, None),
    )
    if port.max_line > port.write_queue and m.ok("max_line", "write_queue"):
        m.get("max_line", node).add_error(
            f"max_line ({port.max_line}) must not exceed write_queue ({port.write_queue})"
        )
    if "mqtt" in m and not has_broker:
        m["mqtt"].add_error("publishing a port needs the broker: add a top-level mqtt: section with broker:")
    return PortRead(port, m, listeners)
