"""Wires a Config into running parts, and takes them down again.

For each port: one Hub, one upstream and its listeners, all on one Reactor.
Signals arrive through the reactor: SIGTERM/SIGINT start a graceful stop
(stop accepting, send every reader what it is owed within a short deadline,
then FIN), SIGHUP a reload.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from muxd.config import Config, Listener, Port, SerialUpstream, SimUpstream
from muxd.errors import MuxdError
from muxd.hub import Hub
from muxd.listeners.stream import StreamListener
from muxd.reactor import Reactor
from muxd.upstream.serial import SerialPort
from muxd.upstream.sim import SimDevice

log = logging.getLogger("muxd")

# How long a graceful stop may spend sending readers what they are owed:
# long enough for a LAN client's backlog, short enough for systemd's stop timeout.
SHUTDOWN_FLUSH = 2.0


class Upstream(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def describe(self) -> str: ...


class Connection(Protocol):
    def close(self, reason: str) -> None: ...
    def finish(self) -> None: ...


class ListenerRuntime(Protocol):
    cfg: Listener

    @property
    def clients(self) -> set[Connection]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


ListenerFactory = Callable[[Listener, Hub, Reactor, "socket.socket | None"], ListenerRuntime]


def _stream(cfg: Listener, hub: Hub, reactor: Reactor, sock: socket.socket | None) -> ListenerRuntime:
    return StreamListener(cfg, hub, reactor, sock)  # type: ignore[return-value]


# Listener kinds with their own sockets. `websocket` has none: it is served by
# the HTTP servers at /ws/<port>.
LISTENER_FACTORIES: dict[str, ListenerFactory] = {"tcp": _stream, "unix": _stream}


def make_upstream(port: Port, hub: Hub, reactor: Reactor) -> Upstream:
    cfg = port.upstream
    if isinstance(cfg, SerialUpstream):
        return SerialPort(cfg, hub, reactor)
    if isinstance(cfg, SimUpstream):
        return SimDevice(cfg, hub, reactor)
    raise NotImplementedError(f"upstream {cfg.describe()} is not supported yet")


@dataclass
class PortRuntime:
    config: Port
    hub: Hub
    upstream: Upstream
    listeners: dict[str, ListenerRuntime] = field(default_factory=dict)


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
        self._activated = dict(activated or {})
        self._stopping = False
        self.exit_code = 0

    # -- start ---------------------------------------------------------------

    def start(self) -> None:
        for port in self.config.ports:
            self._start_port(port)
        if self._activated:
            names = ", ".join(sorted(self._activated))
            raise MuxdError(
                f"socket activation passed sockets with no matching listener: {names} "
                "(FileDescriptorName= must equal a listener's `name:`)"
            )
        r = self.reactor
        r.add_signal(signal.SIGTERM, lambda _s: self.shutdown())
        r.add_signal(signal.SIGINT, lambda _s: self.shutdown())

    def _start_port(self, port: Port) -> PortRuntime:
        hub = Hub(port, self.reactor)
        rt = PortRuntime(port, hub, make_upstream(port, hub, self.reactor))
        self.ports[port.name] = rt
        for cfg in port.listeners:
            self._start_listener(rt, cfg)
        rt.upstream.start()
        return rt

    def _start_listener(self, rt: PortRuntime, cfg: Listener) -> None:
        factory = LISTENER_FACTORIES.get(cfg.kind)
        if factory is None:
            return
        sock = self._take_activated(cfg.name)
        listener = factory(cfg, rt.hub, self.reactor, sock)
        listener.start()
        rt.listeners[cfg.name] = listener

    def _take_activated(self, name: str) -> socket.socket | None:
        socks = self._activated.pop(name, None)
        if not socks:
            return None
        if len(socks) > 1:
            raise ValueError(f"socket activation passed {len(socks)} sockets named {name!r}; expected one")
        return socks[0]

    # -- run and stop ------------------------------------------------------------

    def run(self) -> int:
        self.reactor.run()
        return self.exit_code

    def shutdown(self) -> None:
        """Stop accepting, flush every reader within SHUTDOWN_FLUSH, then exit."""
        if self._stopping:
            return
        self._stopping = True
        log.info("stopping: flushing %d clients", self.client_count())
        for rt in self.ports.values():
            for listener in rt.listeners.values():
                listener.stop()
            rt.upstream.stop()
        for rt in self.ports.values():
            for listener in rt.listeners.values():
                for client in list(listener.clients):
                    client.finish()
        self.reactor.call_later(SHUTDOWN_FLUSH, self._force_stop)
        self._stop_when_flushed()

    def _stop_when_flushed(self) -> None:
        if self.client_count() == 0:
            self.reactor.stop()
        else:
            self.reactor.call_later(0.02, self._stop_when_flushed)

    def _force_stop(self) -> None:
        left = self.client_count()
        if left:
            log.warning("stopping: %d clients still owed data after %.1fs; closing", left, SHUTDOWN_FLUSH)
        for rt in self.ports.values():
            for listener in rt.listeners.values():
                for client in list(listener.clients):
                    client.close("shutdown")
        self.reactor.stop()

    def client_count(self) -> int:
        return sum(len(rt.hub.readers) for rt in self.ports.values())

    def close(self) -> None:
        self.reactor.close()
