"""`muxd status` and `muxd ctl`: what they ask a running muxd's JSON API
(/api/v1), and how they print it.

`status` reads the same views the web console does (their shapes are pinned
in docs/contracts.md) and prints them for an operator or a script; `ctl`
POSTs the board-control admin actions (a sequence, or DTR/RTS/BREAK), which
the daemon allows from loopback, or with an admin token. Reaching the daemon
(its address, TLS, the token, and what each failure means) is
muxd/apiclient.py's; nothing here runs inside the daemon: the server side of
the API is muxd/api.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from muxd import apiclient
from muxd.apiclient import Endpoint, quote

# How often `muxd ctl --break` asks whether the BREAK is over, and how long
# past its length it waits for that: the daemon ends it on its own timers
# within milliseconds, so a second of slack is only ever used by a stuck one.
DONE_POLL = 0.02
DONE_SLACK = 1.0


def control(
    ep: Endpoint, port: str, sequence: str | None = None, signals: dict[str, Any] | None = None
) -> Any:
    """Run a port's sequence, or set signals ({"dtr": False, "break": 0.25}); the answer."""
    if sequence is not None:
        return apiclient.post(ep, f"/api/v1/ports/{quote(port)}/sequences/{quote(sequence)}")
    return apiclient.post(ep, f"/api/v1/ports/{quote(port)}/signals", signals)


def wait_done(
    ep: Endpoint,
    port: str,
    seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Wait until the port's running sequence (a BREAK) is over, as the
    daemon says: its ``line`` once nothing runs and no BREAK is on. Raises
    apiclient.Unreachable if it is not over ``seconds`` + DONE_SLACK from now."""
    deadline = clock() + seconds + DONE_SLACK
    while True:  # bounded by the deadline
        line = port_line(ep, port)
        if line.get("running") is None and not line.get("break"):
            return line
        if clock() >= deadline:
            raise apiclient.Unreachable(f"{port}: still running {line.get('running')} after {seconds:g}s")
        sleep(DONE_POLL)


def port_line(ep: Endpoint, port: str) -> dict[str, Any]:
    """The port's line state now (its view's ``line``)."""
    for p in _ports(ep):
        if p.get("name") == port and isinstance(p.get("line"), dict):
            line: dict[str, Any] = p["line"]
            return line
    raise apiclient.Unreachable(f"no port {port!r} with a line state in {ep.url}'s API")


def _ports(ep: Endpoint) -> list[dict[str, Any]]:
    try:
        ports = apiclient.get(ep, "/api/v1/ports")["ports"]
        if not isinstance(ports, list):
            raise TypeError("ports")
    except (KeyError, TypeError) as exc:  # JSON, but not the shape docs/contracts.md pins
        raise apiclient.Unreachable(f"{ep.url} is not muxd's API (no {exc} in its answer)") from None
    return ports


def format_line(line: dict[str, Any] | None) -> str:
    """``115200 8N1``, the LINE cell; ``-`` for a daemon whose view has no line."""
    if not isinstance(line, dict):
        return "-"
    return f"{line.get('baudrate')} {line.get('format')}"


def _level(value: object, high: str = "high", low: str = "low") -> str:
    return "?" if value is None else high if value else low


def describe_line(line: dict[str, Any], now: float) -> str:
    """The line state of a port in one line: settings, flow, lines (n/a where
    the upstream has none), owner, last change."""
    text = f"line {format_line(line)}, flow {line.get('flow')}"
    if line.get("control_lines") is False:  # a pty, say: nothing to show, nothing to set
        text += ", DTR/RTS n/a"
    else:
        text += f", DTR {_level(line.get('dtr'))}, RTS {_level(line.get('rts'))}"
    if line.get("break"):
        text += ", BREAK on"
    if line.get("running"):
        text += f", running {line['running']}"
    if line.get("owner"):
        text += f", owner {line['owner']}"
    if line.get("changed_by") and isinstance(line.get("changed_at"), (int, float)):
        text += f", changed by {line['changed_by']} {_age(line['changed_at'], now)} ago"
    return text


def describe_mqtt(m: dict[str, Any]) -> str:
    """The port's MQTT bridge in one line: state, broker, topic, what it published and lost."""
    state = m["state"] if m["state"] == "up" else f"{m['state']} ({m['reason']})"
    text = (
        f"mqtt {state} {m['broker']} {m['rx']} qos {m['qos']}: {m['published']} messages "
        f"({_size(m['published_bytes'])}) published, {_size(m['dropped'])} dropped, lag {_size(m['lag'])}"
    )
    if m.get("tx"):
        text += f", tx {m['tx_accepted']} written {m['tx_refused']} refused"
    return text + f", {m['reconnects']} reconnects"


def describe_write_lock(lock: dict[str, Any], now: float) -> str:
    """``write lock: held by tcp:dut1 127.0.0.1:5321 (client 7) for 2m03s``."""
    holder = lock.get("holder")
    if not isinstance(holder, dict):
        return f"write lock free, {_size(lock.get('refused_bytes', 0))} refused"
    token = f" token {holder['token']}" if holder.get("token") else ""
    return (
        f"write lock held by {holder['listener']} {holder['peer']} (client {holder['client']}{token}) "
        f"for {_age(holder['since'], now)}, {_size(lock.get('refused_bytes', 0))} refused"
    )


def fetch_status(ep: Endpoint) -> dict[str, Any]:
    """Ports, and each port's clients: {"ports": [...], "clients": {port: [...]}}.

    Raises apiclient.Unreachable (also for an answer that is not muxd's API),
    Unauthorised or Refused.
    """
    ports = _ports(ep)
    try:
        clients = {
            p["name"]: apiclient.get(ep, f"/api/v1/ports/{quote(p['name'])}/clients")["clients"]
            for p in ports
        }
    except (KeyError, TypeError) as exc:
        raise apiclient.Unreachable(f"{ep.url} is not muxd's API (no {exc} in its answer)") from None
    return {"ports": ports, "clients": clients}


def ports_not_up(status: dict[str, Any]) -> list[str]:
    """The names of the ports whose device is not connected now."""
    return [p["name"] for p in status["ports"] if p["state"] != "up"]


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _age(since: float, now: float) -> str:
    s = max(0, int(now - since))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _state(port: dict[str, Any]) -> str:
    """The STATE cell: "up", or during an outage what the upstream is doing
    about it, e.g. "backing-off (device absent), 17 attempts, next in 1.6s"."""
    if port["state"] == "up":
        return "up"
    text = f"{port['state']} ({port['reason']})"
    # Older daemons' views have no retry detail: show what there is.
    attempts = port.get("attempts")
    if isinstance(attempts, int) and attempts > 0:
        text += f", {attempts} attempt{'' if attempts == 1 else 's'}"
    next_in = port.get("next_attempt_in")
    if isinstance(next_in, (int, float)):
        text += f", next in {max(0.0, next_in):.1f}s"
    return text


def _table(header: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    """The ports table, then each port's clients. FOR is the time since the
    port last went up or down: during an outage, how long the device has been gone."""
    now = time.time() if now is None else now
    ports = status["ports"]
    lines = _table(
        ["PORT", "STATE", "FOR", "UPSTREAM", "IN", "OUT", "CLIENTS", "MAX LAG", "DROPPED", "WQUEUE", "LINE"],
        [
            [
                p["name"],
                _state(p),
                _age(p["since"], now),
                p["upstream"],
                _size(p["bytes_in"]),
                _size(p["bytes_out"]),
                str(p["clients"]),
                _size(p["max_lag"]),
                _size(p["dropped"]),
                _size(p["write_queue_bytes"]),
                format_line(p.get("line")),
            ]
            for p in ports
        ],
    )
    for p in ports:
        clients = status["clients"].get(p["name"], [])
        lines += ["", f"{p['name']}: {len(clients)} client{'' if len(clients) == 1 else 's'}"]
        if isinstance(p.get("line"), dict):
            lines.append(f"  {describe_line(p['line'], now)}")
        if isinstance(p.get("mqtt"), dict):
            lines.append(f"  {describe_mqtt(p['mqtt'])}")
        lock = p.get("write_lock")
        if isinstance(lock, dict) and lock.get("policy") == "first":
            lines.append(f"  {describe_write_lock(lock, now)}")
        if clients:
            lines += _table(
                ["ID", "PEER", "LISTENER", "MODE", "FOR", "DELIVERED", "DROPPED", "LAG"],
                [
                    [
                        str(c["id"]),
                        c["peer"],
                        c["listener"],
                        c["mode"],
                        _age(c["since"], now),
                        _size(c["delivered"]),
                        _size(c["dropped"]),
                        _size(c["lag"]),
                    ]
                    for c in clients
                ],
                indent="  ",
            )
    return "\n".join(lines)
