"""ser2net connections -> muxd ports, as plain data in muxd's config schema.

ser2net opens the device once per connection (and only while a client is
connected); muxd owns each device once and fans it out. So the connections on
one device become ONE muxd port, named from the device (``/dev/ttyS0`` ->
``ttyS0``), with one listener per connection, named by the connection's
anchor. Connections that ask for different line settings on one device
cannot all have them: the first one's are taken, and a warning (and a
comment in the output) says so.

Each ser2net item is either translated exactly, translated loosely (a comment
says how, and the lab notices no difference that matters: ``chardelay`` only
batches bytes, ``kickolduser`` lets the new user in), or refused: an error
``FILE:LINE: ...`` where the lab's behaviour would change (an ``openstr``
sent to the device, authentication, a connect-back). Every error of the file
is collected in one pass, so one run names them all.

The result (``Conversion``) holds, per port, the dict the YAML file would
have (``{"name", "upstream", "listeners", "trace"}``) and the comments to
print beside it (muxd.ser2net.render); a connection's options are read by
muxd.ser2net.options. No I/O here: ``convert(parsed)``
takes what muxd.ser2net.reader read.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from muxd.config.values import NAME_RE
from muxd.ser2net.options import Accepter, Conn, Error, flag, read_options
from muxd.ser2net.reader import Connection, Default, Item, Ser2netFile, name_and_args, split_top

SER2NET_DEFAULT_SPEED = "9600n81"  # gensio's serialdev default (gensio(5))
_SPEC_RE = re.compile(r"(\d+)(?:([nNeEoOmMsS])([5-8])([12]))?")
_PARITY = {"n": "none", "e": "even", "o": "odd", "m": "mark", "s": "space"}

_SERIALDEV_ARGS_LOOSE = {
    "nouucplock": "muxd takes an flock on the device, not a uucp lock file",
    "drain_time": "muxd does not wait for output to drain on close",
    "char_drain_wait": "muxd does not wait for output to drain on close",
}
_LISTEN_ANY = ("0.0.0.0", "[::]")  # muxd's [::] is IPV6_V6ONLY: both, for ser2net's "all addresses"


@dataclass
class ConvertedPort:
    data: dict[str, Any]  # one entry of muxd's ports:, as the YAML file has it
    comments: list[str] = field(default_factory=list)
    listener_comments: list[list[str]] = field(default_factory=list)
    line: int = 0  # the first connection's line
    device: str = ""
    anchors: list[str] = field(default_factory=list)  # of the connections it serves
    settings_key: str = ""  # the first connection's line settings, to compare


@dataclass
class Conversion:
    source: str
    ports: list[ConvertedPort] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)  # for the file's head
    warnings: list[Error] = field(default_factory=list)
    errors: list[Error] = field(default_factory=list)

    @property
    def data(self) -> list[dict[str, Any]]:
        """The ports as muxd's config schema has them (what join_daemon takes)."""
        return [p.data for p in self.ports]


def device_port_name(device: str, taken: set[str]) -> str:
    """A muxd port name from a device path: its last part, with what NAME_RE
    refuses made "-" (by-path names have ":"), made unique."""
    parent, _, last = device.rstrip("/").rpartition("/")
    if last.isdigit():  # /dev/pts/3: "pts-3" says more than "3"
        last = f"{parent.rpartition('/')[2]}-{last}"
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", last)[:60] or "port"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def listener_name(anchor: str) -> str:
    return anchor if NAME_RE.fullmatch(anchor) else re.sub(r"[^A-Za-z0-9_.-]", "-", anchor)[:64]


# --------------------------------------------------------------------------
# accepter


def parse_accepter(c: Conn, item: Item) -> Accepter | None:
    """``[telnet[(rfc2217[,mode=server])],][tcp,][ADDR,]PORT``."""
    parts = split_top(item.value)
    kind = "tcp"
    name, args = name_and_args(parts[0])
    if name == "telnet":
        if any(a.partition("=")[0] == "rfc2217" and a.partition("=")[2] in ("", "true") for a in args):
            kind = "rfc2217"
        else:
            kind = "rfc2217"
            c.loose("telnet", "a plain telnet accepter becomes muxd's RFC 2217 listener, a telnet server")
        odd = [a for a in args if a.partition("=")[0] not in ("rfc2217", "mode")]
        if odd:
            c.loose(f"telnet({','.join(odd)})", "muxd's telnet server takes no options")
        if any(a.startswith("mode=") and a != "mode=server" for a in args):
            c.error(item.line, f"accepter {item.value!r}: muxd's telnet is always the server side")
            return None
        parts = parts[1:]
    if parts and re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*(\(.*\))?", parts[0], re.DOTALL):
        layer, largs = name_and_args(parts[0])
        if layer == "tcp":
            if largs:
                c.loose(f"tcp({','.join(largs)})", "muxd's TCP listener takes no gensio options")
            parts = parts[1:]
        elif layer in ("ipv4", "ipv6") and len(parts) > 1:
            parts = parts[1:]
        elif layer != "localhost":
            c.error(
                item.line, f"accepter {item.value!r}: {layer} is not served by muxd (tcp and telnet only)"
            )
            return None
    if parts and parts[0] in ("ipv4", "ipv6"):
        parts = parts[1:]
    if not 1 <= len(parts) <= 2 or not parts[-1].isdigit() or not 0 < int(parts[-1]) <= 65535:
        c.error(item.line, f"accepter {item.value!r}: expected [telnet(rfc2217),][tcp,][ADDR,]PORT")
        return None
    port = int(parts[-1])
    if len(parts) == 1 or parts[0] in ("", "0.0.0.0", "::"):
        return Accepter(kind, _LISTEN_ANY, port)
    addr = parts[0]
    if addr == "localhost":
        return Accepter(kind, ("127.0.0.1",), port)
    try:
        ip = ipaddress.ip_address(addr.strip("[]"))
    except ValueError:
        c.error(
            item.line,
            f"accepter {item.value!r}: {addr!r} is not an IP address (muxd binds numeric addresses)",
        )
        return None
    return Accepter(kind, (f"[{ip}]" if ip.version == 6 else str(ip),), port)


# --------------------------------------------------------------------------
# connector


@dataclass
class Connector:
    device: str
    line: int
    upstream: dict[str, Any]
    local: bool = False


def _spec_text(upstream: dict[str, Any]) -> str:
    """The line settings of an upstream as ser2net writes them: ``115200n81[,rtscts]``."""
    text = f"{upstream['baudrate']}{upstream.get('parity', 'none')[0]}{upstream.get('bytesize', 8)}"
    text += str(upstream.get("stopbits", 1))
    return text + (f",{upstream['flow']}" if "flow" in upstream else "")


def _spec(text: str) -> dict[str, Any] | None:
    m = _SPEC_RE.fullmatch(text)
    if m is None:
        return None
    out: dict[str, Any] = {"baudrate": int(m.group(1))}
    if m.group(2):
        out.update(parity=_PARITY[m.group(2).lower()], bytesize=int(m.group(3)), stopbits=int(m.group(4)))
    return out


def parse_connector(c: Conn, item: Item, defaults: list[Default]) -> Connector | None:
    """``serialdev[(opts)],DEVICE[,SPEC][,local][,rtscts]...`` (old ``sdev`` too)."""
    parts = split_top(item.value)
    name, args = name_and_args(parts[0])
    if name not in ("serialdev", "sdev"):
        c.error(item.line, f"connector {parts[0]!r}: muxd serves serial devices (serialdev) only")
        return None
    for arg in args:
        key = arg.partition("=")[0]
        if key not in _SERIALDEV_ARGS_LOOSE:
            c.error(item.line, f"connector option {arg!r} of serialdev is not supported")
        elif not (key == "nouucplock" and flag(arg.partition("=")[2] or "true")):
            c.loose(f"serialdev({arg})", _SERIALDEV_ARGS_LOOSE[key])
    if len(parts) < 2 or not parts[1]:
        c.error(item.line, "connector: no device after serialdev,")
        return None
    device = parts[1]
    # Words after the device may be split by commas or, where YAML folded a
    # line, by spaces.
    words = [w for p in parts[2:] for w in p.split()]
    upstream: dict[str, Any] = {"serial": device}
    spec = next((d.value for d in defaults if d.name == "speed" and d.cls in ("", "serialdev")), None)
    local = any(d.name == "local" and d.cls in ("", "serialdev") and flag(d.value) for d in defaults)
    flow = next(
        (
            d.name
            for d in defaults
            if d.name in ("rtscts", "xonxoff") and d.cls in ("", "serialdev") and flag(d.value)
        ),
        None,
    )
    for word in words:
        key, _, value = word.partition("=")
        low = key.lower()
        on = flag(value) if value else True
        if _spec(word) is not None:
            spec = word
        elif low in ("local", "clocal"):
            local = bool(on)
        elif low in ("rtscts", "xonxoff"):
            flow = low if on else (None if flow == low else flow)
        elif low in ("-rtscts", "-xonxoff", "-local", "-clocal"):
            if low in {"-local", "-clocal"}:
                local = False
            elif flow == low[1:]:
                flow = None
        elif low in ("nobreak", "hangup-when-done", "hangup_when_done"):
            c.loose(word, "muxd neither sends a BREAK nor hangs up when the last client goes")
        elif low in ("dtr", "rts") and value.lower() in ("on", "off"):
            c.error(item.line, f"connector {word}: muxd opens the device with DTR and RTS asserted")
        else:
            c.error(item.line, f"connector: {word!r} is not a serialdev setting muxd knows")
    parsed = _spec(spec or SER2NET_DEFAULT_SPEED)
    if parsed is None:
        c.error(item.line, f"connector: {spec!r} is not a speed such as 115200n81")
        return None
    upstream.update(parsed)
    if flow is not None:
        upstream["flow"] = flow
    return Connector(device, item.line, upstream, local)


def _with_defaults(conn: Connection, defaults: list[Default]) -> list[Item]:
    """The connection's options, after ser2net's defaults (class ser2net or
    none) for the options it does not set."""
    have = {o.key for o in conn.options}
    extra: dict[str, Item] = {}
    for d in defaults:
        if (
            d.cls in ("", "ser2net")
            and d.name not in have
            and d.name not in ("speed", "local", "rtscts", "xonxoff")
        ):
            extra[d.name] = Item(d.name, d.value, d.line)
    return list(extra.values()) + conn.options


def _default_problems(parsed: Ser2netFile, errors: list[Error]) -> None:
    for _, d in parsed.defaults:
        if d.cls not in ("", "ser2net", "serialdev"):
            errors.append(Error(d.line, f"default {d.name} of class {d.cls}: muxd serves serialdev only"))


# --------------------------------------------------------------------------
# the whole file


def convert(parsed: Ser2netFile) -> Conversion:
    result = Conversion(parsed.source)
    result.errors += [Error(p.line, p.message) for p in parsed.problems]
    _default_problems(parsed, result.errors)
    by_device: dict[str, ConvertedPort] = {}
    taken: set[str] = set()
    for index, conn in enumerate(parsed.connections):
        c = Conn(conn, result.errors)
        enable = conn.items.get("enable")
        if enable is not None and flag(enable.value) is False:
            result.comments.append(f"connection &{conn.name} (line {conn.line}): enable: off, not converted")
            continue
        timeout = conn.items.get("timeout")
        if timeout is not None and timeout.value.strip() not in ("", "0"):
            c.error(timeout.line, "timeout: muxd never closes an idle client")
        if enable is not None and flag(enable.value) is None:
            c.error(enable.line, f"enable: expected on or off, got {enable.value!r}")
        if "accepter" not in conn.items or "connector" not in conn.items:
            c.error(conn.line, "needs both accepter: and connector:")
            continue
        defaults = parsed.defaults_for(index)
        acc = parse_accepter(c, conn.items["accepter"])
        dev = parse_connector(c, conn.items["connector"], defaults)
        # The options are read even when the accepter or connector is refused:
        # one run names every problem of the connection.
        opts = read_options(
            c, _with_defaults(conn, defaults), acc or Accepter("tcp", (), 0), dev.device if dev else ""
        )
        if acc is None or dev is None:
            continue
        if dev.local:
            c.comments.append("local: muxd ignores the modem lines always (CLOCAL is set on open)")
        port = by_device.get(dev.device)
        settings = _spec_text(dev.upstream)
        if port is None:
            port = ConvertedPort(
                {"name": device_port_name(dev.device, taken), "upstream": dev.upstream, "listeners": []},
                line=conn.line,
                device=dev.device,
                settings_key=settings,
            )
            by_device[dev.device] = port
            result.ports.append(port)
        elif settings != port.settings_key:
            said = f"connection &{conn.name} asks for {settings} on {dev.device}"
            msg = f"{said}; muxd opens the device once: the first connection's {port.settings_key} is kept"
            result.warnings.append(Error(conn.line, msg))
            port.comments.append(f"warning: {msg}")
        port.anchors.append(conn.name)
        if opts.trace:
            port.data.setdefault("trace", []).extend(opts.trace)
        for i, host in enumerate(acc.hosts):
            lst: dict[str, Any] = {acc.kind: f"{host}:{acc.port}"}
            lst["name"] = listener_name(conn.name) + ("" if i == 0 else "-v6")
            lst["mode"] = "rw"  # a ser2net connection reads and writes
            lst.update(opts.listener)
            port.data["listeners"].append(lst)
            port.listener_comments.append(
                [f"&{conn.name} (line {conn.line}): accepter {conn.items['accepter'].value}", *c.comments]
                if i == 0
                else ["the same accepter on IPv6 (muxd's [::] is IPv6 only)"]
            )
    for port in result.ports:
        conns = ", ".join("&" + a for a in port.anchors)
        port.comments.insert(
            0, f"{port.device}: ser2net connection{'s' if len(port.anchors) > 1 else ''} {conns}"
        )
    if not result.ports and not result.errors:
        result.errors.append(Error(1, "no enabled connection: nothing to serve"))
    result.errors.sort(key=lambda e: e.line)
    return result
