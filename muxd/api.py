"""The JSON API (/api/v1): the views the HTTP front serves.

The views read the ports' plain counters when asked, like the metrics: nothing
on the data path knows the API exists. Their shapes are pinned in
docs/contracts.md; the web console and `muxd status` (muxd/client.py) are
their users.

A port is "writable" when it has a websocket listener in rw mode: the one
thing a browser tab needs to know to show its input line.

``line`` is the line state as the upstream has it in force (the one source
of truth: muxd.linecontrol reads it there too): settings, DTR/RTS (null where
muxd does not know them), the modem inputs where the upstream can read them,
the owner under ``line_control: owner``, and the last change. Board control
(``set_signals``, ``run_sequence``) is an admin action of the HTTP front;
both answer (status, JSON) and never raise for a client's mistake.

Ports at run time (``POST /api/v1/ports``, ``DELETE /api/v1/ports/NAME``,
admin actions): the body is one entry of the config file's ``ports:`` as
JSON, validated by the config's own code (muxd.config.from_data), so its
errors are the file's, with key paths (``ports[0].listeners[1].tcp``) and no
line: 400 with every error. The PortManager (the daemon) starts or stops it;
a clash with what runs is a Conflict, 409, and changes nothing.

Listeners at run time (``POST /api/v1/ports/NAME/listeners``, ``DELETE
/api/v1/ports/NAME/listeners/LISTENER``): the body is one entry of a port's
``listeners:`` or a list of them, validated the same way (key paths
``listeners[1].tcp``). ``GET /api/v1/ports?device=PATH`` finds the port that
owns a device (``device_key``: a serial device by its real path, a K2 by
host:port), which is how the ser2net mode joins a port the daemon already has.

Why this module is long: every answer of /api/v1 is here, each a small
function over the same views, whose shapes docs/contracts.md pins together.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from muxd import config as configmod
from muxd import sequences
from muxd.config import Listener, Port, SerialUpstream, TcpUpstream, Upstream
from muxd.errors import ConfigError, MuxdError, SettingsRefused
from muxd.hub import Reader
from muxd.port import PortRuntime
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor
from muxd.sequences import MAX_BREAK, Step
from muxd.upstream.base import ControlLines


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


def port_dropped(rt: PortRuntime, clients: list[Reader]) -> int:
    live = sum(r.dropped for r in clients)
    listeners = {lst.name for lst in rt.config.listeners}
    return live + sum(s.closed_dropped for name, s in rt.hub.listener_stats.items() if name in listeners)


def line_format(settings: LineSettings) -> str:
    """``8N1``: data bits, parity, stop bits, as a terminal program says them."""
    return str(settings).partition(" ")[2]


def line_view(rt: PortRuntime) -> dict[str, Any]:
    """The line state in force: settings, control lines, modem inputs, owner, last change."""
    lc = rt.line_control
    s = lc.settings
    lines = lc.control or ControlLines()
    modem = lc.modem_state()
    owner = lc.owner
    return {
        "baudrate": s.baudrate,
        "bytesize": s.bytesize,
        "parity": s.parity,
        "stopbits": s.stopbits,
        "flow": s.flow,
        "format": line_format(s),
        # False where the upstream has no DTR/RTS (a pty, a K2 without control:
        # rfc2217); dtr and rts are then null, never a level nobody can set.
        "control_lines": lc.control_lines,
        "dtr": lines.dtr if lc.control_lines else None,
        "rts": lines.rts if lc.control_lines else None,
        "break": lines.brk,
        "modem": None if modem is None else dataclasses.asdict(modem),
        "owner": None if owner is None else f"{owner.policy.listener} {owner.peer}",
        "changed_by": lc.changed_by,
        "changed_at": lc.changed_at,
        "policy": lc.policy,
        "sequences": [name for name, _steps in rt.config.sequences],
        "running": lc.busy,
    }


def write_lock_view(rt: PortRuntime) -> dict[str, Any]:
    """The port's write lock (muxd.writelock): its policy, and who holds it."""
    lock = rt.hub.writes.lock
    holder = lock.holder
    held = None
    if holder is not None:
        r = holder.reader
        held = {
            "client": r.id,
            "peer": r.peer,
            "listener": r.policy.listener,
            "token": r.token,  # the token's name (never its secret), where known
            "since": holder.since,
        }
    return {"policy": lock.policy, "idle": lock.idle, "holder": held, "refused_bytes": lock.refused_bytes}


def port_view(rt: PortRuntime) -> dict[str, Any]:
    hub, st = rt.hub, rt.upstream.status
    clients = rt.clients()
    per_listener = Counter(r.policy.listener for r in clients)
    bound = bound_addresses(rt)
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
        "history": rt.config.history,
        "writable": ws is not None and ws.writable,
        "bytes_in": hub.bytes_in,
        "bytes_out": hub.writes.bytes_out,
        "clients": len(clients),
        "max_lag": max((hub.lag(r) for r in clients), default=0),
        "dropped": port_dropped(rt, clients),
        "write_queue_bytes": hub.writes.queue.bytes,
        "line": line_view(rt),
        "write_lock": write_lock_view(rt),
        "listeners": [
            {
                "name": lst.name,
                "kind": lst.kind,
                "address": listener_address(lst, hub.name, bound),
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
        # The port's MQTT bridge feed (muxd.mqtt), null when the port is not published.
        "mqtt": rt.mqtt.view() if rt.mqtt is not None else None,
    }


def ports_view(ports: Iterable[PortRuntime], device: str | None = None) -> dict[str, Any]:
    """Every port, or with ``device`` (``?device=``) the one that owns it, if any."""
    if device is not None:
        wanted = device_query(device)
        ports = [rt for rt in ports if wanted is not None and device_key(rt.config.upstream) == wanted]
    return {"ports": [port_view(rt) for rt in ports]}


def device_key(upstream: Upstream) -> tuple[str, ...] | None:
    """What a port owns: a serial device (by its real path: two links to one
    tty are one device) or a K2's address; None for a simulated device."""
    if isinstance(upstream, SerialUpstream):
        return ("serial", os.path.realpath(upstream.path))
    if isinstance(upstream, TcpUpstream):
        return ("tcp", upstream.host.lower(), str(upstream.port))
    return None


def device_query(text: str) -> tuple[str, ...] | None:
    """``?device=``: an absolute path is a serial device, HOST:PORT a K2 (None: neither)."""
    if text.startswith("/"):
        return ("serial", os.path.realpath(text))
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return ("tcp", host.strip("[]").lower(), str(int(port)))


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


# -- board control: admin actions ------------------------------------------------------------


def _lines_arg(body: dict[str, Any], key: str) -> bool | None:
    """A level from the JSON body: true/false or 1/0; None when absent."""
    if key not in body:
        return None
    value = body[key]
    if value in (0, 1) and not isinstance(value, float):
        return bool(value)
    raise ValueError(f"{key} must be true or false (or 1 or 0), got {json.dumps(value)[:40]}")


def _absent(rt: PortRuntime) -> tuple[int, dict[str, Any]] | None:
    """503 while the device is not up: an operator's action is done now or
    refused, never answered "ok" and left for a later open."""
    why = rt.line_control.unavailable()
    if why is None:
        return None
    return 503, {"error": f"{why}: nothing was sent", "state": rt.upstream.status.state.value}


def set_signals(rt: PortRuntime, reactor: Reactor, body: bytes, by: str) -> tuple[int, dict[str, Any]]:
    """``{"dtr": false, "rts": true, "break": 0.25}``: set DTR/RTS now, and send
    a BREAK of that many seconds (run as a one-step sequence, on the reactor's
    timers; the answer comes as it starts, with its ``seconds``). A level
    already in force is not sent again: it is listed in ``unchanged``. 400
    for a bad body, 409 while a sequence runs, 503 while the device is not
    up (nothing is sent), 502 when the upstream refuses (the message says why)."""
    try:
        parsed = json.loads(body or b"{}")
        if not isinstance(parsed, dict) or not parsed or set(parsed) - {"dtr", "rts", "break"}:
            raise ValueError('give an object with one or more of "dtr", "rts", "break"')
        dtr, rts = _lines_arg(parsed, "dtr"), _lines_arg(parsed, "rts")
        brk = parsed.get("break")
        if brk is not None and (
            isinstance(brk, bool) or not isinstance(brk, (int, float)) or not 0.001 <= brk <= MAX_BREAK
        ):
            raise ValueError(f'"break" is its duration in seconds, 0.001 to {MAX_BREAK:g}')
    except ValueError as exc:  # json.JSONDecodeError is one
        return 400, {"error": str(exc)}
    lc = rt.line_control
    if lc.busy is not None:
        return 409, {"error": f"sequence {lc.busy} is running"}
    if (absent := _absent(rt)) is not None:
        return absent
    # As for RFC 2217 clients: a level in force (where muxd knows it) is not sent again.
    current = lc.control or ControlLines()
    unchanged = [k for k, v in (("dtr", dtr), ("rts", rts)) if v is not None and getattr(current, k) is v]
    dtr = None if "dtr" in unchanged else dtr
    rts = None if "rts" in unchanged else rts
    if brk is None:
        try:
            if dtr is not None or rts is not None:
                lc.apply_control(by, dtr=dtr, rts=rts)
        except SettingsRefused as exc:
            return 502, {"error": str(exc)}
        return 200, {"ok": True, "unchanged": unchanged, "line": line_view(rt)}
    steps = [Step("dtr", level=dtr)] if dtr is not None else []
    steps += [Step("rts", level=rts)] if rts is not None else []
    status, answer = _started(
        rt, sequences.run(lc, reactor, "signals", [*steps, Step("break", seconds=float(brk))], by=by)
    )
    return status, {**answer, "unchanged": unchanged} if status == 200 else answer


def run_sequence(rt: PortRuntime, reactor: Reactor, name: str, by: str) -> tuple[int, dict[str, Any]]:
    """Start the port's sequence ``name``: 404 if it has none, 409 while one
    runs (never queued: a second reset pressed meanwhile is a mistake, not a
    wish to reset twice), 503 while the device is not up (nothing is sent:
    a reset pressed during an outage is not kept for the next open), 502
    when the first steps are refused."""
    steps = dict(rt.config.sequences).get(name)
    if steps is None:
        return 404, {"error": f"no sequence {name!r} on port {rt.name!r}"}
    if rt.line_control.busy is None and (absent := _absent(rt)) is not None:
        return absent
    try:
        started = sequences.run(rt.line_control, reactor, name, steps, by=by)
    except sequences.Busy as exc:
        return 409, {"error": str(exc)}
    return _started(rt, started)


def _started(rt: PortRuntime, run: sequences.Run) -> tuple[int, dict[str, Any]]:
    if run.error is not None:
        return 502, {"error": f"sequence {run.name} stopped: {run.error}"}
    # A control event of the port, with who did it (traces with events: true).
    if run.name == "signals" and any(step.kind == "break" for step in run.steps):
        rt.hub.writes.event("break", f"BREAK by {run.by}", by=run.by)
    else:
        rt.hub.writes.event("sequence", f"sequence {run.name} by {run.by}", by=run.by, sequence=run.name)
    return 200, {
        "ok": True,
        "sequence": run.name,
        "seconds": sequences.duration(run.steps),
        "line": line_view(rt),
    }


# -- ports at run time: admin actions ----------------------------------------------------------


class Conflict(MuxdError):
    """A run-time port that clashes with what runs (its name, its device, a
    listener's name or address), or a file port asked to go: 409."""


class PortManager(Protocol):
    """What adds and removes ports at run time: the daemon (muxd.daemon)."""

    def add_port(self, port: Port, by: str) -> PortRuntime:
        """Start it; Conflict, or MuxdError (StartError) when it cannot start."""

    def remove_port(self, name: str, by: str, rt: PortRuntime | None = None) -> None:
        """Stop it; KeyError for no such port, Conflict for a file port."""

    def release(self, name: str, rt: PortRuntime) -> None:
        """The connection holding it ended."""

    def add_listeners(self, name: str, listeners: list[Listener], by: str) -> PortRuntime:
        """Start them on port ``name``: KeyError, Conflict, or StartError; all or none."""

    def remove_listener(self, port: str, name: str, by: str, cfg: Listener | None = None) -> None:
        """Stop one added at run time; KeyError for none (or not ``cfg``), Conflict for another."""

    def release_listeners(self, port: str, listeners: list[Listener]) -> None:
        """The connection holding them ended."""


# Where an API body's errors say they come from (never a file of the machine).
API_SOURCE = "<api>"


def config_errors(exc: ConfigError) -> dict[str, Any]:
    """A 400's answer: every error, as the config file would report it, without a line."""
    errors = configmod.each_error(exc)
    return {
        "error": "; ".join(f"{e.path}: {e.message}" if e.path else e.message for e in errors),
        "errors": [{"path": e.path, "message": e.message} for e in errors],
    }


def parse_port(body: bytes) -> tuple[Port | None, dict[str, Any]]:
    """(the port, {}) or (None, a 400's answer) for a POST /api/v1/ports body."""
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        return None, {"error": f"the body is not JSON: {exc}"}
    if not isinstance(data, dict):
        return None, {"error": "give one port as a JSON object: an entry of the config file's ports:"}
    if "mqtt" in data:
        # The bridge is made for the file's ports (daemon._apply_mqtt); a port
        # that comes and goes through the API is not published.
        err = ConfigError("a port added at run time is not published: publish it from the config file")
        return None, config_errors(ConfigError(err.message, "ports[0].mqtt", None, API_SOURCE))
    try:
        cfg = configmod.from_data({"ports": [data]}, API_SOURCE)
    except ConfigError as exc:
        return None, config_errors(exc)
    return cfg.ports[0], {}


def add_port(manager: PortManager, body: bytes, by: str) -> tuple[int, dict[str, Any], PortRuntime | None]:
    """POST /api/v1/ports: 201 and the port's view (its bound addresses
    included), 400 for a body the config file would refuse or a port that
    cannot start (a missing directory), 409 for a clash with what runs."""
    port, refused = parse_port(body)
    if port is None:
        return 400, refused, None
    try:
        rt = manager.add_port(port, by)
    except Conflict as exc:
        return 409, {"error": str(exc)}, None
    except MuxdError as exc:  # StartError: what the machine refuses
        return 400, {"error": str(exc)}, None
    return 201, {"ok": True, "port": port_view(rt)}, rt


def remove_port(manager: PortManager, name: str, by: str) -> tuple[int, dict[str, Any]]:
    """DELETE /api/v1/ports/NAME: 200, 404 for no such port, 409 for a file port."""
    try:
        manager.remove_port(name, by)
    except KeyError:
        return 404, {"error": f"no port {name!r}"}
    except Conflict as exc:
        return 409, {"error": str(exc)}
    return 200, {"ok": True, "removed": name}


# -- listeners at run time: admin actions ------------------------------------------------------

# What a 400 of a listener body says it is about: the body itself, not ports[0].
_LISTENERS_PATH = "ports[0].listeners"


def parse_listeners(port: str, body: bytes) -> tuple[list[Listener] | None, dict[str, Any]]:
    """(the listeners, {}) or (None, a 400's answer) for a POST
    /api/v1/ports/NAME/listeners body: one listener, or a list of them."""
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:  # json.JSONDecodeError, UnicodeDecodeError
        return None, {"error": f"the body is not JSON: {exc}"}
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(item, dict) for item in items):
        return None, {
            "error": "give one listener as a JSON object, or a list of them: entries of a port's listeners:"
        }
    try:
        # A port of the config's own schema around them: the file's checks and
        # texts (duplicates among them included); the upstream is never opened.
        cfg = configmod.from_data(
            {"ports": [{"name": port, "upstream": {"sim": True}, "listeners": items}]}, API_SOURCE
        )
    except ConfigError as exc:
        answer = config_errors(exc)
        for error in answer["errors"]:
            error["path"] = (error["path"] or "").replace(_LISTENERS_PATH, "listeners", 1)
        answer["error"] = "; ".join(f"{e['path']}: {e['message']}" for e in answer["errors"])
        return None, answer
    return list(cfg.ports[0].listeners), {}


def listener_views(rt: PortRuntime, names: Iterable[str]) -> list[dict[str, Any]]:
    """The listeners called ``names`` as a port's view lists them (bound addresses)."""
    wanted = set(names)
    return [lst for lst in port_view(rt)["listeners"] if lst["name"] in wanted]


def add_listeners(
    manager: PortManager, port: str, body: bytes, by: str
) -> tuple[int, dict[str, Any], list[Listener]]:
    """POST /api/v1/ports/NAME/listeners: 201 with their views, 400 for a
    body the config file would refuse or a listener that cannot start, 404
    for no such port, 409 for a clash with what runs; nothing started then."""
    listeners, refused = parse_listeners(port, body)
    if listeners is None:
        return 400, refused, []
    try:
        rt = manager.add_listeners(port, listeners, by)
    except KeyError:
        return 404, {"error": f"no port {port!r}"}, []
    except Conflict as exc:
        return 409, {"error": str(exc)}, []
    except MuxdError as exc:  # StartError
        return 400, {"error": str(exc)}, []
    answer = {"ok": True, "port": port, "listeners": listener_views(rt, (lst.name for lst in listeners))}
    return 201, answer, listeners


def remove_listener(manager: PortManager, port: str, name: str, by: str) -> tuple[int, dict[str, Any]]:
    """DELETE /api/v1/ports/NAME/listeners/LISTENER: 200, 404 for none, 409
    for a listener the API did not add (the config file's, or a port's own)."""
    try:
        manager.remove_listener(port, name, by)
    except KeyError:
        return 404, {"error": f"no listener {name!r} on port {port!r}"}
    except Conflict as exc:
        return 409, {"error": str(exc)}
    return 200, {"ok": True, "removed": name}
