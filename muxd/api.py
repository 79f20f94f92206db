"""The JSON API (/api/v1), and `muxd status`, its client.

The views read the ports' plain counters when asked, like the metrics: nothing
on the data path knows the API exists. Their shapes are pinned in
docs/contracts.md; the web console and `muxd status` are their users.

A port is "writable" when it has a websocket listener in rw mode: the one
thing a browser tab needs to know to show its input line.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from typing import Any

from muxd.config import Config, Listener, format_hostport
from muxd.errors import ConfigError
from muxd.hub import Hub
from muxd.port import PortRuntime

# `muxd status` gives up on a daemon that does not answer within this: the
# API is served from memory, so anything slower is a stuck daemon.
STATUS_TIMEOUT = 5.0


def listener_address(listener: Listener, port: str) -> str:
    return f"/ws/{port}" if listener.kind == "websocket" else listener.address


def websocket_listener(hub: Hub) -> Listener | None:
    """The listener /ws/<port> readers attach to (the first websocket one)."""
    return next((lst for lst in hub.port.listeners if lst.kind == "websocket"), None)


def port_dropped(hub: Hub) -> int:
    live = sum(r.dropped for r in hub.readers.values())
    return live + sum(s.closed_dropped for s in hub.listener_stats.values())


def port_view(rt: PortRuntime) -> dict[str, Any]:
    hub, st = rt.hub, rt.upstream.status
    per_listener = Counter(r.listener.name for r in hub.readers.values())
    ws = websocket_listener(hub)
    return {
        "name": hub.name,
        "state": st.state,
        "reason": st.reason,
        "since": st.since,
        "upstream": hub.port.upstream.describe(),
        "writable": ws is not None and ws.writable,
        "bytes_in": hub.bytes_in,
        "bytes_out": hub.bytes_out,
        "clients": len(hub.readers),
        "max_lag": hub.max_lag(),
        "dropped": port_dropped(hub),
        "write_queue_bytes": hub.queue.bytes,
        "listeners": [
            {
                "name": lst.name,
                "kind": lst.kind,
                "address": listener_address(lst, hub.name),
                "mode": lst.mode,
                "clients": per_listener[lst.name],
            }
            for lst in hub.port.listeners
        ],
    }


def ports_view(ports: Iterable[PortRuntime]) -> dict[str, Any]:
    return {"ports": [port_view(rt) for rt in ports]}


def clients_view(hub: Hub) -> dict[str, Any]:
    return {
        "clients": [
            {
                "id": r.id,
                "peer": r.peer,
                "listener": r.listener.name,
                "mode": r.listener.mode,
                "since": r.since,
                "delivered": r.delivered,
                "dropped": r.dropped,
                "lag": hub.lag(r),
            }
            for r in hub.readers.values()
        ]
    }


def disconnect(hub: Hub, client_id: int) -> bool:
    """The admin action; False if there is no such client on this port."""
    reader = hub.readers.get(client_id)
    if reader is None:
        return False
    reader.owner.close("admin")
    return True


# -- `muxd status` ------------------------------------------------------------


def status_url(config: Config) -> str:
    """The base URL of the config's first http server, as reached from this host."""
    if not config.http:
        raise ConfigError("no http server to ask; `muxd status` needs one", "http", None, config.source)
    srv = config.http[0]
    # A wildcard bind is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(srv.host, srv.host)
    return f"http://{format_hostport(host, srv.port)}"


def _get(base: str, path: str) -> Any:
    with urllib.request.urlopen(base.rstrip("/") + path, timeout=STATUS_TIMEOUT) as resp:
        return json.load(resp)


def fetch_status(base: str) -> dict[str, Any]:
    """Ports, and each port's clients: {"ports": [...], "clients": {port: [...]}}.

    Raises OSError (urllib.error.URLError is one) when the daemon cannot be reached.
    """
    ports = _get(base, "/api/v1/ports")["ports"]
    clients = {
        p["name"]: _get(base, f"/api/v1/ports/{urllib.parse.quote(p['name'])}/clients")["clients"]
        for p in ports
    }
    return {"ports": ports, "clients": clients}


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


def _table(header: list[str], rows: list[list[str]], indent: str = "") -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    return [
        indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    ports = status["ports"]
    lines = _table(
        ["PORT", "STATE", "FOR", "UPSTREAM", "IN", "OUT", "CLIENTS", "MAX LAG", "DROPPED", "WQUEUE"],
        [
            [
                p["name"],
                p["state"] if p["state"] == "up" else f"{p['state']} ({p['reason']})",
                _age(p["since"], now),
                p["upstream"],
                _size(p["bytes_in"]),
                _size(p["bytes_out"]),
                str(p["clients"]),
                _size(p["max_lag"]),
                _size(p["dropped"]),
                _size(p["write_queue_bytes"]),
            ]
            for p in ports
        ],
    )
    for p in ports:
        clients = status["clients"].get(p["name"], [])
        lines += ["", f"{p['name']}: {len(clients)} client{'' if len(clients) == 1 else 's'}"]
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
