"""`muxd status` and `muxd ctl`: clients of a running muxd's JSON API (/api/v1).

`status` reads the same views the web console does (their shapes are pinned
in docs/contracts.md) and prints them for an operator or a script; `ctl`
POSTs the board-control admin actions (a sequence, or DTR/RTS/BREAK), which
the daemon allows from loopback, or with an admin token (``--token`` or
MUXD_TOKEN). Nothing here runs inside the daemon: the server side of the API
is muxd/api.py.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from muxd.config import Config, format_hostport
from muxd.errors import ConfigError

# `muxd status` gives up on a daemon that does not answer within this: the
# API is served from memory, so anything slower is a stuck daemon.
STATUS_TIMEOUT = 5.0


def normalize_url(text: str) -> str:
    """`--url` as an operator types it: a full http(s) URL, HOST:PORT,
    [V6]:PORT, or a bare PORT (on 127.0.0.1, as a bare listener port binds).

    Raises ValueError for anything else, naming what was given.
    """
    url = text.strip()
    if "://" not in url:
        # urlsplit would read "host:8020" as a scheme and a path.
        url = f"http://127.0.0.1:{url}" if url.isdigit() else f"http://{url}"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # a port that is not a number raises here
    except ValueError as exc:
        raise ValueError(f"not a URL or HOST:PORT: {text!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http URL or HOST:PORT: {text!r}")
    if port is None and "://" not in text:
        raise ValueError(f"{text!r} has no port: give HOST:PORT, e.g. 127.0.0.1:8020")
    return url


def status_url(config: Config) -> str:
    """The base URL of the config's first http server, as reached from this host."""
    if not config.http:
        raise ConfigError("no http server to ask; `muxd status` needs one", "http", None, config.source)
    srv = config.http[0]
    # A wildcard bind is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(srv.host, srv.host)
    return f"http://{format_hostport(host, srv.port)}"


def env_token() -> str | None:
    """$MUXD_TOKEN: the token `status` and `tail` present to a daemon whose
    http server has tokens (read scope is enough); never a command-line
    argument, which other users could read in the process list."""
    return os.environ.get("MUXD_TOKEN") or None


def _get(base: str, path: str) -> Any:
    request = urllib.request.Request(base.rstrip("/") + path)
    token = env_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=STATUS_TIMEOUT) as resp:
        return json.load(resp)


class ApiRefused(Exception):
    """The daemon answered an action with an error: ``status`` and its ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def post(base: str, path: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
    """POST JSON to the API; the answer's JSON. Raises ApiRefused for an HTTP
    error with muxd's {"error": ...}, OSError when unreachable."""
    data = json.dumps(body or {}).encode()
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base.rstrip("/") + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=STATUS_TIMEOUT) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            message = str(json.load(exc).get("error", exc.reason))
        except (ValueError, AttributeError):  # not JSON, or not an object: not muxd's answer
            message = str(exc.reason)
        raise ApiRefused(exc.code, message) from None


def control(
    base: str,
    port: str,
    sequence: str | None = None,
    signals: dict[str, Any] | None = None,
    token: str | None = None,
) -> Any:
    """Run a port's sequence, or set signals ({"dtr": False, "break": 0.25}); the answer."""
    name = urllib.parse.quote(port, safe="")
    if sequence is not None:
        return post(
            base, f"/api/v1/ports/{name}/sequences/{urllib.parse.quote(sequence, safe='')}", None, token
        )
    return post(base, f"/api/v1/ports/{name}/signals", signals, token)


def format_line(line: dict[str, Any] | None) -> str:
    """``115200 8N1``, the LINE cell; ``-`` for a daemon whose view has no line."""
    if not isinstance(line, dict):
        return "-"
    return f"{line.get('baudrate')} {line.get('format')}"


def _level(value: object, high: str = "high", low: str = "low") -> str:
    return "?" if value is None else high if value else low


def describe_line(line: dict[str, Any], now: float) -> str:
    """The line state of a port in one line: settings, flow, lines, owner, last change."""
    text = f"line {format_line(line)}, flow {line.get('flow')}"
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


def fetch_status(base: str) -> dict[str, Any]:
    """Ports, and each port's clients: {"ports": [...], "clients": {port: [...]}}.

    Raises OSError (urllib.error.URLError is one) when the daemon cannot be
    reached, ValueError when what answers is not muxd's API.
    """
    try:
        ports = _get(base, "/api/v1/ports")["ports"]
        clients = {
            p["name"]: _get(base, f"/api/v1/ports/{urllib.parse.quote(p['name'])}/clients")["clients"]
            for p in ports
        }
    except (KeyError, TypeError) as exc:  # JSON, but not the shape docs/contracts.md pins
        raise ValueError(f"not muxd's API (no {exc} in its answer)") from None
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
