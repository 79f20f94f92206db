"""Wires a Config into running parts, changes them on reload, and takes them down.

For each port: one Hub, one upstream and its listeners, all on one Reactor.
Signals arrive through the reactor: SIGTERM/SIGINT start a graceful stop
(stop accepting, send every reader what it is owed within a short deadline,
then FIN), SIGHUP a reload.

A reload re-reads the file and applies the difference to what is running. A
file that fails validation changes nothing. Listeners are matched by name:
one whose address changed is rebound (its clients are flushed and closed),
one whose options changed (buffer, mode, overflow, write, max_clients,
notices) is updated in place and its clients stay connected, and so do the
clients of every listener the change does not touch. TLS certificates are
re-read at every reload: new handshakes use them, connected clients keep
their sessions. A changed upstream is reopened; the port's log and its
readers' cursors carry on.

A start validates everything it can first (the sockets systemd passed, each
matched to its listener, directories, groups, token files), then binds every
listening socket, then creates pty links, trace files and upstreams; a start
that fails undoes what it did, so it leaves no socket, link or file behind.

Ports at run time (POST /api/v1/ports, muxd.api): a port added through the
API goes through the same phases, for itself alone: it is checked against
what runs (its name, its device, its listeners' names and addresses: a
clash is api.Conflict, 409, and nothing is touched), then its sockets are
bound, then its pty links, traces and upstream made; a failure undoes what
was done. Such a port is not the file's: a reload leaves it alone, and only
DELETE (or the end of the connection that holds it, ?hold=1) removes it; a
file port cannot be removed through the API. The control socket (``control:``,
muxd.control) serves the same API to whoever may open it.

Listeners at run time (POST /api/v1/ports/NAME/listeners): checked against
what runs as a port's are, bound, then made; all or none. They are the
API's, as run-time ports are: a reload keeps them (a file listener of the
same name is not started, and says so), DELETE or the end of the holding
connection removes one, and a listener of the file cannot be removed so.

systemd hears READY=1 once every listener is bound and every upstream tried,
a STATUS= line kept current, WATCHDOG=1 from the loop itself (a hung loop
stops the pings), RELOADING=1 around a reload and STOPPING=1 on the way out.

Why this module is long: start, reload, run-time ports and stop are one
life cycle over the same tables (ports, listeners, servers); each phase
undoes the others' work on failure, which is clearest read side by side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import signal
import socket
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from muxd import config as configmod
from muxd import systemd as sd
from muxd.access import Tokens
from muxd.api import Conflict, device_key
from muxd.api import bound_addresses as api_bound
from muxd.config import (
    Config,
    ControlSocket,
    HttpServer,
    Listener,
    Port,
)
from muxd.connection import policy_for
from muxd.control import ControlFront
from muxd.errors import ConfigError, MuxdError
from muxd.listeners.acceptor import sock_address
from muxd.listeners.http import HttpFront
from muxd.listeners.websocket import reauthorize
from muxd.port import ListenerClient, PortRuntime, bounds_for, make_upstream
from muxd.reactor import Reactor
from muxd.startup import (
    LISTENER_FACTORIES,
    SOCKET_KINDS,
    StartError,
    check_group,
    check_path,
    check_pty_link,
    check_start,
    http_address,
    http_what,
    listener_what,
    start_cause,
)
from muxd.trace import Trace

if TYPE_CHECKING:
    from muxd.mqtt.bridge import MqttBridge

log = logging.getLogger("muxd")

# How long a graceful stop may spend sending readers what they are owed:
# long enough for a LAN client's backlog, short enough for systemd's stop timeout.
SHUTDOWN_FLUSH = 2.0
# How often the STATUS= line is recomputed; it is sent only when it changed.
STATUS_INTERVAL = 1.0


def _bridge(cfg: configmod.MqttConfig, reactor: Reactor) -> MqttBridge:
    # Imported here: paho-mqtt is needed only where a broker is configured
    # (config.py has checked that it is installed), so a Debian install
    # without python3-paho-mqtt runs every other part of muxd.
    from muxd.mqtt.bridge import MqttBridge

    return MqttBridge(cfg, reactor)


def _rebind_needed(old: Listener, new: Listener) -> bool:
    return (old.kind, old.host, old.port, old.path, old.file_mode, old.group) != (
        new.kind,
        new.host,
        new.port,
        new.path,
        new.file_mode,
        new.group,
    )


class Daemon:
    def __init__(
        self,
        config: Config,
        reactor: Reactor | None = None,
        activated: dict[str, list[socket.socket]] | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor or Reactor()
        self.ports: dict[str, PortRuntime] = {}
        self.http: dict[str, HttpFront] = {}  # by the http server's name
        self._activated = dict(activated or {})
        self._stopping = False
        self.exit_code = 0
        self.log_level_override: str | None = None  # --log-level outlives reloads
        self.mqtt: MqttBridge | None = None  # the broker connection (muxd.mqtt), with mqtt:
        self.control: ControlFront | None = None  # the control socket, with control:
        self.runtime_ports: set[str] = set()  # names of the ports added through the API
        # Listeners added through the API, by port, then by name: a reload keeps them.
        self.runtime_listeners: dict[str, dict[str, Listener]] = {}

    # -- start ---------------------------------------------------------------

    def start(self) -> None:
        """Start in three phases, so that a start that fails leaves nothing behind
        (no bound port, no Unix socket file, no pty link, no trace file):

        1. validate: what the config asks of this machine (groups, the
           directories of sockets, pty links and traces, token files) and the
           sockets systemd passed, each matched to a listener by name. Nothing
           is touched; every problem is a StartError.
        2. bind: every listening socket (or adopt the passed one), then TLS.
        3. create: pty links, trace files, the upstreams and the MQTT bridge.

        A failure in phase 2 or 3 undoes what was done before it is raised.
        """
        self._validate()
        fed: list[PortRuntime] = []  # the ports whose upstream was started
        try:
            self._bind()
            self._create(fed)
        except BaseException:
            self._undo(fed)
            raise
        r = self.reactor
        r.add_signal(signal.SIGTERM, lambda _s: self.shutdown())
        r.add_signal(signal.SIGINT, lambda _s: self.shutdown())
        r.add_signal(signal.SIGHUP, lambda _s: self.reload())
        self._status = ""
        sd.notify("READY=1", f"STATUS={self.status_line()}")
        self._tick_status()
        interval = sd.watchdog_interval()
        if interval is not None:
            self._watchdog(interval)

    def _validate(self) -> None:
        """Phase 1: raise StartError for the first thing that would fail."""
        self._check_activated()
        for port in self.config.ports:
            self._validate_port(port)
        for srv in self.config.http:
            check_start(http_what(srv), partial(Tokens.load, srv.tokens))  # read again by the server
        if self.config.control is not None:
            ctl = self.config.control
            check_start(f"control socket {ctl.path}", partial(check_path, ctl.path, ctl.group))

    @staticmethod
    def _validate_port(port: Port) -> None:
        for cfg in port.listeners:
            if cfg.kind in ("unix", "pty"):
                check_start(listener_what(port.name, cfg), partial(check_path, cfg.path, cfg.group))
            if cfg.kind == "pty":
                check_start(listener_what(port.name, cfg), partial(check_pty_link, cfg.path))
        for spec in port.trace:
            check_start(f"port {port.name}, trace {spec.path}", partial(check_path, spec.path, spec.group))

    def _check_activated(self) -> None:
        """Every socket systemd passed must belong to a listener with a socket
        of its own, or to an HTTP server, named by its FileDescriptorName=."""
        targets = {srv.name: http_address(srv) for srv in self.config.http}
        kinds = {srv.name: "http" for srv in self.config.http}
        for port in self.config.ports:
            for cfg in port.listeners:
                if cfg.kind != "websocket":
                    targets[cfg.name], kinds[cfg.name] = cfg.address, cfg.kind
        unmatched = []
        for name, socks in self._activated.items():
            passed = ", ".join(sock_address(s) for s in socks)
            if name not in targets or kinds[name] == "pty":
                holder = next((n for n, a in targets.items() if a in passed.split(", ")), None)
                hint = f"; {holder} listens on {targets[holder]}" if holder else ""
                unmatched.append(f"{name} on {passed}{hint}")
            elif len(socks) > 1:
                raise StartError(
                    f"socket activation passed {len(socks)} sockets named {name!r} ({passed}); expected one"
                )
            elif (socks[0].family == socket.AF_UNIX) != (kinds[name] == "unix"):
                raise StartError(f"socket activation passed {name} on {passed}, not a {kinds[name]} socket")
            elif passed != targets[name]:
                log.warning(
                    "%s: serving on %s, the socket systemd passed (the config says %s)",
                    name,
                    passed,
                    targets[name],
                )
        if unmatched:
            raise StartError(
                "socket activation passed sockets with no matching listener: "
                + "; ".join(unmatched)
                + " (FileDescriptorName= must equal the `name:` of a tcp, unix or rfc2217 listener"
                " or of an http server)"
            )

    def _bind(self) -> None:
        """Phase 2: every port's runtime (nothing started) and listening sockets,
        then the HTTP servers'."""
        if self.config.mqtt is not None:
            self.mqtt = _bridge(self.config.mqtt, self.reactor)
        for port in self.config.ports:
            rt = self.ports[port.name] = PortRuntime.build(port, self.reactor)
            for cfg in port.listeners:
                if cfg.kind in SOCKET_KINDS:
                    self._start_listener(rt, cfg)
        for srv in self.config.http:
            self._start_http(srv)
        if self.config.control is not None:
            self._start_control(self.config.control)

    def _create(self, fed: list[PortRuntime]) -> None:
        """Phase 3: the pty links (which may still fail), then the trace files and
        the upstreams (which do not: an error there is logged and retried)."""
        for rt in self.ports.values():
            for cfg in rt.config.listeners:
                if cfg.kind not in SOCKET_KINDS and cfg.kind in LISTENER_FACTORIES:
                    self._start_listener(rt, cfg)
        for rt in self.ports.values():
            self._start_feeds(rt)
            fed.append(rt)
        if self.mqtt is not None:
            self.mqtt.start()  # connects on the reactor: never waits here

    def _undo(self, fed: list[PortRuntime]) -> None:
        """Take down what a failed start made: sockets closed, files removed. An
        upstream never started is left alone (its stop would log "down")."""
        for rt in self.ports.values():
            for name in list(rt.listeners):
                self._stop_listener(rt, name)
        for rt in fed:
            rt.upstream.stop()
        for rt in self.ports.values():
            self._stop_traces(rt)
        self.ports.clear()
        for front in self.http.values():
            front.stop()
        self.http.clear()
        if self.control is not None:
            self.control.stop()
            self.control = None
        if self.mqtt is not None:
            self.mqtt.close()
            self.mqtt = None
        for socks in self._activated.values():
            for sock in socks:
                sock.close()
        self._activated.clear()

    def status_line(self) -> str:
        """One line for systemctl status, e.g. `dut1 up 12 clients; dut2 connecting`."""
        parts = []
        for name, rt in self.ports.items():
            n = len(rt.clients())
            parts.append(f"{name} {rt.upstream.status.state} {n} client{'s' if n != 1 else ''}")
        return "; ".join(parts)

    def _tick_status(self) -> None:
        line = self.status_line()
        if line != self._status:
            self._status = line
            sd.notify(f"STATUS={line}")
        self.reactor.call_later(STATUS_INTERVAL, self._tick_status)

    def _watchdog(self, interval: float) -> None:
        sd.notify("WATCHDOG=1")
        self.reactor.call_later(interval, lambda: self._watchdog(interval))

    def _start_port(self, port: Port) -> PortRuntime:
        """A port added by a reload or the API: the phases of start() for one
        port (its sockets, then its pty links, traces and upstream); a failure
        undoes what was done, so the port is started whole or not at all."""
        self._validate_port(port)
        rt = PortRuntime.build(port, self.reactor)
        self.ports[port.name] = rt
        try:
            for cfg in port.listeners:
                if cfg.kind in SOCKET_KINDS:
                    self._start_listener(rt, cfg)
            for cfg in port.listeners:
                if cfg.kind not in SOCKET_KINDS and cfg.kind in LISTENER_FACTORIES:
                    self._start_listener(rt, cfg)
            self._start_feeds(rt)
        except BaseException:
            del self.ports[port.name]
            for name in list(rt.listeners):
                self._stop_listener(rt, name)
            self._stop_traces(rt)
            raise
        return rt

    def _start_feeds(self, rt: PortRuntime) -> None:
        """The port's readers that must see the device's first byte (its trace
        files, its MQTT feed), then the upstream."""
        self._start_traces(rt, rt.config)
        if self.mqtt is not None:
            self.mqtt.add_port(rt)
        rt.upstream.start()

    def _start_traces(self, rt: PortRuntime, port: Port) -> None:
        # Before the upstream starts: the record begins with the device's first byte.
        for spec in port.trace:
            trace = Trace(spec, rt.hub, self.reactor)
            trace.start()
            rt.traces.append(trace)

    @staticmethod
    def _stop_traces(rt: PortRuntime) -> None:
        for trace in rt.traces:
            trace.stop()
        rt.traces.clear()

    def _start_listener(self, rt: PortRuntime, cfg: Listener) -> None:
        factory = LISTENER_FACTORIES.get(cfg.kind)
        if factory is None:
            return
        sock = self._take_activated(cfg.name)
        try:
            # Checked before anything is bound (on a reload; start() validated it
            # already): a unix socket would otherwise be left behind, and a pty
            # would only log it and carry on.
            check_group(cfg.group)
            listener = factory(cfg, rt, self.reactor, sock)
            listener.start()
        except (OSError, MuxdError) as exc:
            raise StartError(f"{listener_what(rt.name, cfg)}: {start_cause(exc, cfg.path)}") from exc
        rt.listeners[cfg.name] = listener

    def _start_http(self, srv: HttpServer) -> None:
        try:
            front = HttpFront(
                srv,
                lambda: self.ports,
                self.reactor,
                self._take_activated(srv.name),
                fronts=self.http.values,
                manager=self,
            )
            front.start()
        except (OSError, MuxdError) as exc:
            raise StartError(f"{http_what(srv)}: {start_cause(exc)}") from exc
        self.http[srv.name] = front

    def _start_control(self, cfg: ControlSocket) -> None:
        front = ControlFront(cfg, lambda: self.ports, self.reactor, self)
        try:
            front.start()
        except (OSError, MuxdError) as exc:
            raise StartError(f"control socket {cfg.path}: {start_cause(exc, cfg.path)}") from exc
        self.control = front

    def _fronts(self) -> list[HttpFront]:
        """The HTTP servers and the control socket: every server of the API and /ws."""
        return [*self.http.values(), *([self.control] if self.control is not None else [])]

    def _connections(self) -> list[ListenerClient]:
        """Every connected reader: the listeners' and the HTTP servers' WebSockets."""
        conns: list[ListenerClient] = [c for front in self._fronts() for c in front.clients]
        for rt in self.ports.values():
            for listener in rt.listeners.values():
                conns += listener.clients
        return conns

    def _take_activated(self, name: str) -> socket.socket | None:
        socks = self._activated.pop(name, None)
        return socks[0] if socks else None  # one at most: _check_activated

    # -- run and stop ------------------------------------------------------------

    def run(self) -> int:
        self.reactor.run()
        return self.exit_code

    def shutdown(self) -> None:
        """Stop accepting, flush every reader within SHUTDOWN_FLUSH, then exit."""
        if self._stopping:
            return
        self._stopping = True
        sd.notify("STOPPING=1")
        log.info("stopping: flushing %d clients", self.client_count())
        for rt in self.ports.values():
            for listener in rt.listeners.values():
                listener.stop()
            rt.upstream.stop()  # its last bytes reach the traces before they close
            self._stop_traces(rt)
        if self.mqtt is not None:
            self.mqtt.stop()  # pending lines, the final states and "offline", then DISCONNECT
        for front in self._fronts():
            front.stop()  # held connections end too: _stopping keeps their ports (see release)
        for client in self._connections():
            client.finish()
        self.reactor.call_later(SHUTDOWN_FLUSH, self._force_stop)
        self._stop_when_flushed()

    def _stop_when_flushed(self) -> None:
        if self.client_count() == 0 and (self.mqtt is None or self.mqtt.finished):
            self.reactor.stop()
        else:
            self.reactor.call_later(0.02, self._stop_when_flushed)

    def _force_stop(self) -> None:
        left = self.client_count()
        if left:
            log.warning("stopping: %d clients still owed data after %.1fs; closing", left, SHUTDOWN_FLUSH)
        for client in self._connections():
            client.close("shutdown")
        if self.mqtt is not None and not self.mqtt.finished:
            log.warning("stopping: the mqtt bridge had not flushed after %.1fs; closing", SHUTDOWN_FLUSH)
            self.mqtt.close()
        self.reactor.stop()

    # -- reload --------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the config file and apply the difference; a bad file changes nothing."""
        if self.config.source.startswith("<"):
            log.warning("reload ignored: %s has no file to re-read (start with -c FILE)", self.config.source)
            return
        sd.notify("RELOADING=1")
        try:
            new = configmod.load(self.config.source, in_loop=True)
        except ConfigError as exc:
            for error in configmod.each_error(exc):  # every error of the file, in line order
                log.error("reload rejected, the running config stays: %s", error)
        else:
            sd.setup_logging(self.log_level_override or new.log_level)
            self._apply(new)
            self.config = new
            log.info("reloaded %s", new.source)
        sd.notify("READY=1", f"STATUS={self.status_line()}")

    def _apply(self, new: Config) -> None:
        # The file's ports only: a port added at run time is the API's to remove.
        wanted = {p.name for p in new.ports}
        for name in [n for n in self.ports if n not in wanted and n not in self.runtime_ports]:
            self.runtime_listeners.pop(name, None)
            self._stop_port(self.ports.pop(name))
        for port in new.ports:
            rt = self.ports.get(port.name)
            port = self._with_runtime_listeners(port)  # noqa: PLW2901
            if port.name in self.runtime_ports:
                log.error(
                    "reload: port %s was added at run time; the file's port of that name is not started",
                    port.name,
                )
            elif rt is None:
                self._guarded(f"port {port.name}", partial(self._start_file_port, port))
            else:
                self._update_port(rt, port)
        self._apply_http(new.http)
        self._apply_control(new.control)
        self._apply_mqtt(new)

    def _apply_control(self, cfg: ControlSocket | None) -> None:
        """A changed ``control:`` is a new socket: the old one's connections
        close, and the ports they held go with them (muxd.yaml(5))."""
        if self.control is not None and self.control.control == cfg:
            return
        if self.control is not None:
            self.control.stop()
            for client in list(self.control.clients):
                client.finish()
            self.control = None
        if cfg is not None:
            self._guarded(f"control socket {cfg.path}", partial(self._start_control, cfg))

    def _apply_mqtt(self, new: Config) -> None:
        """A changed broker section, or a port's mqtt: changed, added or removed:
        the bridge is made anew (its feeds start at the head; the old link ends
        with a DISCONNECT, so no will is published and ``online`` stays true).
        Ports that are not published may come and go without touching it."""
        old_specs = {p.name: p.mqtt for p in self.config.ports if p.mqtt is not None}
        new_specs = {p.name: p.mqtt for p in new.ports if p.mqtt is not None}
        if new.mqtt == self.config.mqtt and old_specs == new_specs:
            return
        if self.mqtt is not None:
            self.mqtt.close(clean=True)
            self.mqtt = None
        if new.mqtt is not None:
            self.mqtt = _bridge(new.mqtt, self.reactor)
            for rt in self.ports.values():
                self.mqtt.add_port(rt)
            self.mqtt.start()

    def _apply_http(self, servers: tuple[HttpServer, ...]) -> None:
        wanted = {srv.name: srv for srv in servers}
        for name, front in list(self.http.items()):
            srv = wanted.get(name)
            if srv is None or (srv.host, srv.port) != (front.cfg.host, front.cfg.port):
                del self.http[name]
                front.stop()
                for client in list(front.clients):
                    client.finish()
            else:
                try:
                    # Origins, names, allow and tokens (re-read) apply from the next request.
                    front.reconfigure(srv)
                except MuxdError as exc:
                    log.error("reload: http server %s: %s; its previous settings stay", name, exc)
                front.set_tls(srv)  # certificates re-read: new handshakes use them, nobody is dropped
                front.finish_orphans()  # WebSockets of a port or listener now gone
                reauthorize(front.clients, front.tokens)  # a revoked token ends its WebSockets
        for srv in servers:
            if srv.name not in self.http:
                self._guarded(f"http server {srv.name}", partial(self._start_http, srv))

    def _update_port(self, rt: PortRuntime, port: Port) -> None:
        reopen = rt.config.upstream != port.upstream
        if reopen:
            rt.upstream.stop()
        if rt.config.trace != port.trace:
            self._stop_traces(rt)
            self._guarded(f"traces of {port.name}", partial(self._start_traces, rt, port))
        else:
            for trace in rt.traces:
                trace.reopen("reload")  # SIGHUP after logrotate
        wanted = {lst.name: lst for lst in port.listeners}
        for name, listener in list(rt.listeners.items()):
            cfg = wanted.get(name)
            if cfg is None or _rebind_needed(listener.cfg, cfg):
                self._stop_listener(rt, name)
        rt.hub.resize(bounds_for(port))  # before retargeting: the log must hold every new backlog bound
        for reader in list(rt.hub.readers.values()):
            cfg = wanted.get(reader.policy.listener)
            if cfg is not None and policy_for(cfg) != reader.policy:
                rt.hub.retarget(reader, policy_for(cfg))
        for cfg in port.listeners:
            if cfg.name in rt.listeners:
                running = rt.listeners[cfg.name]
                running.cfg = cfg
                set_tls = getattr(running, "set_tls", None)  # the socket listeners (not a pty)
                if set_tls is not None:
                    set_tls(cfg)  # certificates re-read: new handshakes use them, nobody is dropped
            elif cfg.kind in LISTENER_FACTORIES:
                self._guarded(f"listener {cfg.name}", partial(self._start_listener, rt, cfg))
        rt.config = port
        if reopen:
            rt.upstream = make_upstream(port, rt.hub, self.reactor)
            rt.upstream.start()
        rt.line_control.reload(port, rt.upstream if reopen else None)
        rt.hub.writes.lock.reload(port.write_lock, port.lock_idle)

    def _with_runtime_listeners(self, port: Port) -> Port:
        """A reloaded file port with the listeners the API added to it; a file
        listener named as one of those is not started (logged)."""
        added = self.runtime_listeners.get(port.name)
        if not added:
            return port
        for cfg in port.listeners:
            if cfg.name in added:
                log.error(
                    "reload: listener %s of port %s was added at run time; the file's is not started",
                    cfg.name,
                    port.name,
                )
        kept = tuple(cfg for cfg in port.listeners if cfg.name not in added)
        return dataclasses.replace(port, listeners=kept + tuple(added.values()))

    def _guarded(self, what: str, start: Callable[[], object]) -> None:
        # A reload that adds a listener on a busy address must not take down the rest.
        try:
            start()
        except (OSError, MuxdError) as exc:
            log.error("reload: cannot start %s: %s", what, exc)

    def _stop_listener(self, rt: PortRuntime, name: str) -> None:
        listener = rt.listeners.pop(name)
        listener.stop()
        for client in list(listener.clients):
            client.finish()

    def _stop_port(self, rt: PortRuntime) -> None:
        for name in list(rt.listeners):
            self._stop_listener(rt, name)
        rt.upstream.stop()
        self._stop_traces(rt)

    # -- ports at run time (muxd.api.PortManager) ----------------------------------------

    def add_port(self, port: Port, by: str) -> PortRuntime:
        """Start a port given through the API: api.Conflict (409) when it clashes
        with what runs, StartError when it cannot start (a busy address is a
        Conflict); either way nothing is left behind."""
        self._check_conflicts(port)
        try:
            rt = self._start_port(port)
        except StartError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                raise Conflict(str(exc)) from exc
            raise
        self.runtime_ports.add(port.name)
        log.info("port %s added by %s (%s)", port.name, by, port.upstream.describe())
        return rt

    def _check_conflicts(self, port: Port, runtime_only: bool = False) -> None:
        """api.Conflict for a name, device, listener name or address, or trace
        file in use; ``runtime_only``: in use by a port added at run time (a
        reload's new port, checked against what the file does not manage)."""
        others = [rt for name, rt in self.ports.items() if not runtime_only or name in self.runtime_ports]
        for rt in others:
            if rt.name == port.name:
                where = "added at run time" if rt.name in self.runtime_ports else "in the config file"
                raise Conflict(f"port {port.name!r} exists ({where})")
        device = device_key(port.upstream)  # as GET /api/v1/ports?device= asks
        for rt in others:
            if device is not None and device_key(rt.config.upstream) == device:
                raise Conflict(f"{port.upstream.describe()} is the device of port {rt.name!r}")
        names, holders = self._in_use(others, runtime_only)
        self._check_listeners(port.listeners, names, holders)
        for spec in port.trace:
            if spec.path in holders:
                raise Conflict(f"trace {spec.path} is in use by {holders[spec.path]}")

    def _in_use(self, others: list[PortRuntime], runtime_only: bool) -> tuple[set[str], dict[str, str]]:
        """The listener names, and the addresses and paths (with who holds
        each), that ``others`` (and, but for ``runtime_only``, the HTTP
        servers and the control socket) have taken."""
        holders: dict[str, str] = {}  # address or path -> who holds it
        names: set[str] = set()
        if not runtime_only:
            names |= set(self.http)
            holders.update((address, name) for name, address in self.bound_addresses().items())
            if self.control is not None:
                holders[self.control.control.path] = "the control socket"
        for rt in others:
            names |= {lst.name for lst in rt.config.listeners}
            holders.update((bound, name) for name, bound in api_bound(rt).items())
            # As configured too, but for "HOST:0", which binds anew each time.
            holders.update(
                (lst.address, lst.name) for lst in rt.config.listeners if not lst.address.endswith(":0")
            )
            holders.update((t.path, f"a trace of port {rt.name}") for t in rt.config.trace)
        if runtime_only:  # what the API added to the file's ports is not the file's either
            for name, added in self.runtime_listeners.items():
                bound = api_bound(self.ports[name])
                names |= set(added)
                holders.update((bound.get(cfg.name, cfg.address), cfg.name) for cfg in added.values())
        return names, holders

    @staticmethod
    def _check_listeners(listeners: tuple[Listener, ...], names: set[str], holders: dict[str, str]) -> None:
        for cfg in listeners:
            if cfg.name in names:
                raise Conflict(f"listener name {cfg.name!r} is taken")
            if cfg.kind != "websocket" and cfg.address in holders:
                raise Conflict(f"listener {cfg.name}: {cfg.address} is in use by {holders[cfg.address]}")

    def _start_file_port(self, port: Port) -> None:
        """A reload's new port: refused (logged) where a run-time port holds
        its device, an address or a name; the file's own ports were checked
        against each other by the schema."""
        self._check_conflicts(port, runtime_only=True)
        self._start_port(port)

    def remove_port(self, name: str, by: str, rt: PortRuntime | None = None) -> None:
        """Remove a port added at run time (``rt``: only if it is still that
        one): its readers get an in-band notice, what they are owed, then FIN;
        its traces close. KeyError for no such port, api.Conflict for a file port."""
        current = self.ports.get(name)
        if current is None or (rt is not None and current is not rt):
            raise KeyError(name)
        if name not in self.runtime_ports:
            raise Conflict(f"port {name!r} is in the config file: remove it there and reload")
        self.runtime_ports.discard(name)
        self.runtime_listeners.pop(name, None)
        del self.ports[name]
        current.hub.notice(f"{name} port removed ({by})", event="port", state="removed", reason=by)
        self._stop_port(current)
        for front in self._fronts():
            front.finish_orphans()  # its WebSockets
        log.info("port %s removed by %s", name, by)

    def release(self, name: str, rt: PortRuntime) -> None:
        """The connection holding a port ended: remove it, unless it is gone
        already, or the daemon is stopping (everything goes then)."""
        if self._stopping:
            return
        with contextlib.suppress(KeyError):  # removed by DELETE before its holder went
            self.remove_port(name, "the end of its holding connection", rt)

    # -- listeners at run time (muxd.api.PortManager) ------------------------------------

    def add_listeners(self, name: str, listeners: list[Listener], by: str) -> PortRuntime:
        """Start ``listeners`` on the running port ``name``, as a start would
        (checked against what runs, then sockets bound, then pty links made):
        all or none. KeyError for no such port, api.Conflict for a name or
        address in use (a busy address included), StartError otherwise."""
        rt = self.ports[name]
        names, holders = self._in_use(list(self.ports.values()), runtime_only=False)
        self._check_listeners(tuple(listeners), names, holders)
        old = rt.config
        new = dataclasses.replace(old, listeners=old.listeners + tuple(listeners))
        self._validate_port(dataclasses.replace(new, listeners=tuple(listeners), trace=()))
        # The log first: it must hold the new listeners' buffer and history.
        rt.hub.resize(bounds_for(new))
        rt.config = new
        started: list[str] = []
        try:
            for cfg in sorted(listeners, key=lambda c: c.kind not in SOCKET_KINDS):  # sockets first
                self._start_listener(rt, cfg)
                started.append(cfg.name)
        except StartError as exc:
            for done in started:
                if done in rt.listeners:
                    self._stop_listener(rt, done)
            rt.config = old
            rt.hub.resize(bounds_for(old))
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                raise Conflict(str(exc)) from exc
            raise
        self.runtime_listeners.setdefault(name, {}).update((cfg.name, cfg) for cfg in listeners)
        log.info("port %s: listeners %s added by %s", name, ", ".join(c.name for c in listeners), by)
        return rt

    def remove_listener(self, port: str, name: str, by: str, cfg: Listener | None = None) -> None:
        """Remove a listener added at run time (``cfg``: only if it is still
        that one): its clients get an in-band notice, what they are owed, then
        FIN; the port and its other clients are untouched. KeyError for no
        such listener, api.Conflict for one the API did not add."""
        rt = self.ports[port]
        current = next((lst for lst in rt.config.listeners if lst.name == name), None)
        if current is None or (cfg is not None and current is not cfg):
            raise KeyError(name)
        added = self.runtime_listeners.get(port, {})
        if name not in added:
            where = "port's own (remove the port)" if port in self.runtime_ports else "config file's"
            raise Conflict(f"listener {name!r} is the {where}: only listeners added to a port can be removed")
        del added[name]
        for reader in list(rt.hub.readers.values()):
            if reader.policy.listener == name:
                rt.hub.notice_to(
                    reader,
                    f"{port} listener {name} removed ({by})",
                    event="listener",
                    state="removed",
                    reason=by,
                )
        # The log keeps its size until the next reload: shrinking it now would
        # only cut the other readers' history short.
        rt.config = dataclasses.replace(
            rt.config, listeners=tuple(lst for lst in rt.config.listeners if lst is not current)
        )
        if name in rt.listeners:
            self._stop_listener(rt, name)
        for front in self._fronts():
            front.finish_orphans()  # a websocket listener's clients
        log.info("port %s: listener %s removed by %s", port, name, by)

    def release_listeners(self, port: str, listeners: list[Listener]) -> None:
        """The connection holding these listeners ended: remove those still there."""
        if self._stopping:
            return
        for cfg in listeners:
            with contextlib.suppress(KeyError):  # removed already, or its port gone
                self.remove_listener(port, cfg.name, "the end of its holding connection", cfg)

    def client_count(self) -> int:
        """Connected clients: the hubs' readers but for trace files."""
        return sum(len(rt.clients()) for rt in self.ports.values())

    def close(self) -> None:
        self.reactor.close()

    def bound_addresses(self) -> dict[str, str]:
        """Where each listener and HTTP server listens, by name ("127.0.0.1:41234",
        "[::1]:5000", a Unix socket's or pty link's path).

        A config may give port 0, so the bound address, not the configured one,
        is what a client needs; the ready file and the API report it.
        """
        out: dict[str, str] = {}
        for rt in self.ports.values():
            for name, listener in rt.listeners.items():
                # A pty has no socket: its link path is where programs open it.
                bound = getattr(listener, "bound_address", None)
                out[name] = bound if isinstance(bound, str) else listener.cfg.address
        for name, front in self.http.items():
            out[name] = front.bound_address or configmod.format_hostport(front.cfg.host, front.cfg.port)
        return out
