"""The JSON API (/api/v1): the views the HTTP front serves.

The views read the ports' plain counters when asked, like the metrics: nothing
on the data path knows the API exists. Their shapes are pinned in
docs/contracts.md; the web console and `muxd status` (muxd/client.py) are
their users.

A port is "writable" when it has a websocket listener in rw mode: the one
thing a browser tab needs to know to show its input line.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from muxd.config import Listener, Port
from muxd.port import PortRuntime


def bound_addresses(rt: PortRuntime) -> dict[str, str]:
    """The port's listeners that have a socket, by name: where each really listens."""
    out: dict[str, str] = {}
    for name, listener in rt.listeners.items():
        bound = getattr(listener, "bound_address", None)  # a pty has none
        if isinstance(bound, str):
            out[name] = bound
    return out


def listener_address(listener: Listener, port: str, bound: Mapping[str, str] | None = None) -> str:
    """Where a client reaches the listener: its bound address when it has one
    (a config's port 0 is chosen by the kernel), else the configured one."""
    if listener.kind == "websocket":
        return f"/ws/{port}"
    return (bound or {}).get(listener.name, listener.address)


def websocket_listener(port: Port) -> Listener | None:
    """The listener /ws/<port> readers attach to (the first websocket one)."""
    return next((lst for lst in port.listeners if lst.kind == "websocket"), None)


def port_dropped(rt: PortRuntime) -> int:
    live = sum(r.dropped for r in rt.clients())
    listeners = {lst.name for lst in rt.config.listeners}
    return live + sum(s.closed_dropped for name, s in rt.hub.listener_stats.items() if name in listeners)


def port_view(rt: PortRuntime) -> dict[str, Any]:
    hub, st = rt.hub, rt.upstream.status
    clients = rt.clients()
    per_listener = Counter(r.policy.listener for r in clients)
    ws = websocket_listener(rt.config)
    return {
        "name": hub.name,
        # The current attempt's state and reason; `since` is the outage's (or the
        # link's) start, which retries never move: "gone for how long?".
        "state": st.state.value,
        "reason": st.reason,
        "since": st.since,
        "attempts": st.attempts,
        "next_attempt_in": None if (left := st.next_attempt_in()) is None else round(left, 3),
        "upstream": rt.config.upstream.describe(),
        "writable": ws is not None and ws.writable,
        "bytes_in": hub.bytes_in,
        "bytes_out": hub.bytes_out,
        "clients": len(clients),
        "max_lag": max((hub.lag(r) for r in clients), default=0),
        "dropped": port_dropped(rt),
        "write_queue_bytes": hub.queue.bytes,
        "listeners": [
            {
                "name": lst.name,
                "kind": lst.kind,
                "address": listener_address(lst, hub.name, bound_addresses(rt)),
                "mode": lst.mode,
                "clients": per_listener[lst.name],
            }
            for lst in rt.config.listeners
        ],
        "traces": [
            {
                "path": t.spec.path,
                "format": t.spec.format,
                "written": t.written,
                "dropped_disk": t.dropped,  # trace bytes the disk refused
                "dropped_backlog": t.reader.dropped,  # device bytes it fell behind on
                "lag": hub.lag(t.reader),
                "rotations": t.rotations,
            }
            for t in rt.traces
        ],
    }


def ports_view(ports: Iterable[PortRuntime]) -> dict[str, Any]:
    return {"ports": [port_view(rt) for rt in ports]}


def clients_view(rt: PortRuntime) -> dict[str, Any]:
    hub = rt.hub
    return {
        "clients": [
            {
                "id": r.id,
                "peer": r.peer,
                "listener": r.policy.listener,
                "mode": "rw" if r.policy.writable else "ro",
                "since": r.since,
                "delivered": r.delivered,
                "dropped": r.dropped,
                "lag": hub.lag(r),
            }
            for r in rt.clients()
        ]
    }


def disconnect(rt: PortRuntime, client_id: int) -> bool:
    """The admin action; False if there is no such client on this port."""
    reader = next((r for r in rt.clients() if r.id == client_id), None)
    if reader is None:
        return False
    reader.owner.close("admin")
    return True
