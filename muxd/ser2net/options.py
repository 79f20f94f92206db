"""A ser2net connection's options, and the pieces the converter shares.

``read_options`` reads a connection's ``options:`` (after ser2net's
defaults) into the listener keys and trace files muxd has for them. Each
option is translated exactly (``max-connections`` -> ``max_clients``,
``remaddr`` -> ``allow``, ``banner``, ``trace-*``, ``no-acc-to-con`` -> ``mode:
ro``), loosely with a comment (``chardelay``, ``kickolduser``, buffer sizes:
timing and buffering only), or refused with an error at its line where the
lab would see a difference (``openstr``, authentication, a connect-back,
a hexdump trace). No I/O here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from muxd import banner
from muxd.ser2net.reader import Connection, Item, split_top

SER2NET_MAX_CONNECTIONS = 1  # ser2net.yaml(5): max-connections defaults to 1

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
# Options whose only effect is timing or buffering inside ser2net: a comment.
_LOOSE_OPTIONS = {
    "chardelay": "muxd forwards device bytes as they come; it does not wait to batch characters",
    "chardelay-scale": "muxd forwards device bytes as they come",
    "chardelay-min": "muxd forwards device bytes as they come",
    "chardelay-max": "muxd forwards device bytes as they come",
    "sendon": "muxd forwards device bytes as they come, without waiting for a string",
    "dev-to-net-bufsize": "muxd's buffers are its own (listener buffer:, port write_queue:)",
    "net-to-dev-bufsize": "muxd's buffers are its own (listener buffer:, port write_queue:)",
    "accepter-retry-time": "muxd binds at start and fails loudly if it cannot",
    "connector-retry-time": "muxd reopens a vanished device with its own backoff",
    "signature": "muxd answers an RFC 2217 signature request with its own",
    "trace-timestamp": "",  # read with the trace options
    "trace-read-timestamp": "",
    "trace-write-timestamp": "",
    "trace-both-timestamp": "",
}
# Options muxd cannot honour without changing what the lab sees: an error each.
_REFUSED_OPTIONS = {
    "openstr": "muxd never sends a string to the device on open",
    "closestr": "muxd never sends a string to the device on close",
    "closeon": "muxd does not close clients on a string from the device",
    "connback": "muxd makes no connect-back connections",
    "no-con-to-acc": "a listener that never receives device output has no muxd equivalent",
    "authdir": "ser2net's authentication has no muxd equivalent on a raw listener (use tls: or allow:)",
    "authdir-admin": "ser2net's admin interface has no muxd equivalent",
    "pamauth": "PAM authentication has no muxd equivalent (use tls: client_ca or allow:)",
    "pamauth-admin": "ser2net's admin interface has no muxd equivalent",
    "allowed-users": "ser2net's authentication has no muxd equivalent",
    "led-rx": "LEDs have no muxd equivalent",
    "led-tx": "LEDs have no muxd equivalent",
    "trace-hexdump": "muxd's trace files are raw, text or jsonl, never a hexdump",
    "trace-read-hexdump": "muxd's trace files are raw, text or jsonl, never a hexdump",
    "trace-write-hexdump": "muxd's trace files are raw, text or jsonl, never a hexdump",
    "trace-both-hexdump": "muxd's trace files are raw, text or jsonl, never a hexdump",
}
_MDNS = "muxd does not advertise over mDNS"


@dataclass(frozen=True)
class Error:
    line: int
    message: str


@dataclass
class Conn:
    """One connection while it is being converted."""

    conn: Connection
    errors: list[Error]
    comments: list[str] = field(default_factory=list)

    def error(self, line: int, message: str) -> None:
        self.errors.append(Error(line, f"connection &{self.conn.name}: {message}"))

    def loose(self, what: str, why: str) -> None:
        self.comments.append(f"{what}: translated loosely: {why}")


def flag(value: str) -> bool | None:
    v = value.strip().lower()
    return True if v in _TRUE or v == "" else False if v in _FALSE else None


@dataclass(frozen=True)
class Accepter:
    kind: str  # "tcp" or "rfc2217"
    hosts: tuple[str, ...]  # one host, or both "any" addresses
    port: int


# --------------------------------------------------------------------------
# options


def _int(c: Conn, item: Item, lo: int, hi: int) -> int | None:
    v = item.value.strip()
    if not v.isdigit() or not lo <= int(v) <= hi:
        c.error(item.line, f"{item.key}: expected a number {lo}..{hi}, got {item.value!r}")
        return None
    return int(v)


def _allow(c: Conn, item: Item) -> list[str]:
    """remaddr: ``[!]ADDR[,PORT][;...]``, ADDR possibly after ipv4,/ipv6,."""
    out = []
    for entry in (e.strip() for e in item.value.split(";")):
        if not entry:
            continue
        if entry.startswith("!"):
            c.error(item.line, f"remaddr {entry!r}: a connect-back address has no muxd equivalent")
            continue
        parts = [p for p in split_top(entry) if p not in ("ipv4", "ipv6", "tcp")]
        port = parts[-1] if len(parts) > 1 else "0"
        try:
            net = ipaddress.ip_network(parts[0].strip("[]"), strict=False)
        except ValueError:
            c.error(item.line, f"remaddr {entry!r}: {parts[0]!r} is not an IP address or network")
            continue
        if port != "0":
            c.error(item.line, f"remaddr {entry!r}: muxd allows hosts, not their source ports (write port 0)")
            continue
        out.append(str(net))
    return out


_TRACE_PATH_ESCAPES = re.compile(r"\\(.)")


def _trace_path(c: Conn, item: Item, device: str, port: int) -> str | None:
    """ser2net expands \\p \\d \\o in a trace file's name when it opens it; muxd
    opens one trace per port at start, so they are expanded here. The time
    escapes (\\Y \\m ... a file per open) cannot be."""
    bad: list[str] = []

    def one(m: re.Match[str]) -> str:
        esc = m.group(1)
        known = {"p": str(port), "d": device.rpartition("/")[2], "o": c.conn.name, "\\": "\\"}
        if esc not in known:
            bad.append(esc)
            return m.group(0)
        return known[esc]

    path = _TRACE_PATH_ESCAPES.sub(one, item.value.strip())
    if bad:
        c.error(
            item.line, f"{item.key}: \\{bad[0]} in a file name: muxd opens one trace file per port, at start"
        )
        return None
    if not path.startswith("/"):
        c.error(item.line, f"{item.key}: {path!r}: muxd wants an absolute path")
        return None
    return path


@dataclass
class _Options:
    listener: dict[str, Any] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)


def read_options(c: Conn, options: list[Item], acc: Accepter, device: str) -> _Options:
    out = _Options()
    values: dict[str, Item] = {}
    allow: list[str] = []
    for item in options:
        key = item.key
        if key == "remaddr":  # may be given more than once: each adds
            allow += _allow(c, item)
            continue
        values[key] = item
    stamp = False
    for key in ("trace-timestamp", "trace-read-timestamp", "trace-write-timestamp", "trace-both-timestamp"):
        if key in values and flag(values[key].value):
            stamp = True
    max_conn = SER2NET_MAX_CONNECTIONS
    for key, item in values.items():
        on = flag(item.value)
        if key == "max-connections":
            max_conn = _int(c, item, 1, 100_000) or max_conn
        elif key == "kickolduser":
            if on:
                c.loose(
                    "kickolduser",
                    "muxd does not kick the old user off; the new one joins it (max_clients is not held "
                    "to max-connections)",
                )
        elif key == "banner":
            problem = banner.check(item.value)
            if problem is not None:
                c.error(item.line, f"banner: {problem}")
            elif item.value:
                out.listener["banner"] = item.value
        elif key in ("trace-read", "trace-write", "trace-both"):
            path = _trace_path(c, item, device, acc.port)
            if path is not None:
                entry: dict[str, Any] = {"path": path, "format": "text" if stamp else "raw"}
                if key != "trace-read":
                    entry["input"] = True
                out.trace.append(entry)
                c.loose(key, "muxd writes the port's trace from start to stop, not only while a client is on")
                if key == "trace-write":
                    c.loose("trace-write", "the trace file records the device's output too, not only input")
        elif key == "telnet-brk-on-sync":
            if on and acc.kind == "rfc2217":
                c.error(
                    item.line,
                    "telnet-brk-on-sync: muxd sends no BREAK on a telnet SYNC (use RFC 2217 "
                    "SET-CONTROL BREAK or `muxd ctl PORT --break`)",
                )
            elif on:
                c.comments.append("telnet-brk-on-sync: no effect on a tcp accepter (no telnet, no SYNC)")
        elif key == "no-acc-to-con":
            if on:
                out.listener["mode"] = "ro"
        elif key in _LOOSE_OPTIONS:
            if _LOOSE_OPTIONS[key] and on is not False:
                c.loose(key, _LOOSE_OPTIONS[key])
        elif key in _REFUSED_OPTIONS:
            if item.value.strip() and on is not False:
                c.error(item.line, f"{key}: {_REFUSED_OPTIONS[key]}")
        elif key.startswith("mdns"):
            if key == "mdns" and on:
                c.error(item.line, f"mdns: {_MDNS}")
        else:
            c.error(item.line, f"option {key}: not a ser2net option muxd knows")
    kick = "kickolduser" in values and flag(values["kickolduser"].value)
    if not kick:
        out.listener["max_clients"] = max_conn
    elif "max-connections" in values:
        c.comments.append(f"max-connections: {max_conn} (not held to it: kickolduser)")
    if allow:
        out.listener["allow"] = allow
    return out
