"""One port at run time: its hub, its upstream, its line control and its listeners.

The daemon builds one PortRuntime per configured port; the HTTP front, the
API and the metrics read them (the hub's fan-out counters, the upstream's
state, the line control's settings) without owning any of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from muxd.config import Listener, Port, SerialUpstream, SimUpstream, TcpUpstream
from muxd.hub import Hub, PortBounds, Reader
from muxd.linecontrol import LineControl
from muxd.reactor import Reactor
from muxd.sharing import PortActions
from muxd.trace import Trace
from muxd.upstream.base import Upstream
from muxd.upstream.sim import SimDevice
from muxd.upstream.tcp import TcpPort

if TYPE_CHECKING:
    from muxd.mqtt.feed import Feed


class ListenerClient(Protocol):
    """A listener's connected client as the daemon handles it at shutdown and
    reload (a muxd.connection.Connection is one)."""

    def close(self, reason: str) -> None: ...
    def finish(self) -> None: ...


class ListenerRuntime(Protocol):
    cfg: Listener

    @property
    def clients(self) -> set[ListenerClient]: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


def bounds_for(port: Port) -> PortBounds:
    # Formats kept from the start, with their history: those of listeners and
    # the MQTT bridge. A format only traces use is made when its trace starts
    # and holds only what the trace has yet to write (the file is its history).
    listened = {lst.format for lst in port.listeners} | ({port.mqtt.format} if port.mqtt else set())
    return PortBounds(
        log_capacity=port.log_capacity,
        write_queue=port.write_queue,
        max_line=port.max_line,
        history=port.history_bound,
        formats=tuple(f for f in port.formats if f in listened),
        line_timeout=port.line_timeout,
    )


def make_upstream(port: Port, hub: Hub, reactor: Reactor) -> Upstream:
    cfg = port.upstream
    if isinstance(cfg, SerialUpstream):
        # pyserial (0.7 MiB) only where a port has a serial device (docs/benchmarks.md).
        from muxd.upstream.serial import SerialPort

        return SerialPort(cfg, hub, reactor)
    if isinstance(cfg, SimUpstream):
        return SimDevice(cfg, hub, reactor)
    if isinstance(cfg, TcpUpstream):
        return TcpPort(cfg, hub, reactor)
    raise NotImplementedError(f"upstream {cfg.describe()} is not supported yet")


@dataclass
class PortRuntime:
    config: Port
    hub: Hub
    upstream: Upstream
    line_control: LineControl  # shared by the port's rfc2217 and pty listeners
    listeners: dict[str, ListenerRuntime] = field(default_factory=dict)
    traces: list[Trace] = field(default_factory=list)
    mqtt: Feed | None = None  # the port's MQTT bridge feed (muxd.mqtt), when published

    @property
    def name(self) -> str:
        return self.config.name

    def clients(self) -> list[Reader]:
        """The hub's readers that are clients: all but the trace files and the MQTT feed."""
        traces = {trace.reader.id for trace in self.traces}
        if self.mqtt is not None:
            traces.add(self.mqtt.reader.id)
        return [r for r in self.hub.readers.values() if r.id not in traces]

    @classmethod
    def build(cls, port: Port, reactor: Reactor) -> PortRuntime:
        """The hub, upstream and line control of a port; nothing started yet."""
        hub = Hub(port.name, bounds_for(port), reactor)
        hub.writes.tell = hub.tell  # the write lock's in-band answers
        hub.writes.lock.reload(port.write_lock, port.lock_idle)
        upstream = make_upstream(port, hub, reactor)
        rt = cls(port, hub, upstream, LineControl(port, upstream, hub))
        hub.writes.commands = PortActions(rt, reactor)  # the escape letters of tcp, unix and pty clients
        return rt
