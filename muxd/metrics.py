"""Prometheus metrics, computed at scrape time.

The hubs, upstreams, listeners and reactor keep plain integer counters; this collector
reads them when /metrics is fetched, so the data path never calls
prometheus_client (no per-chunk lock or label lookup). Labels are only ever
port, listener, state and reason names: all bounded by the config or by the
code. Per-client detail (an unbounded set) lives in the JSON API instead.

Byte totals per listener are those of its live readers plus what its closed
readers had (hub.ListenerStats), so they only ever go up, as counters must.

Each HTTP server has its own private CollectorRegistry, so nothing depends on
prometheus_client's global one; process metrics come from its ProcessCollector.

prometheus_client is imported at the first scrape, not at start: with what it
pulls in (http.server, urllib.request, email, compression modules) it is about
12 MB of RSS, more than a quiet port of muxd, and a daemon nobody scrapes
never needs it. make_registry() returns a LazyRegistry, which builds the real
registry when first collected.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from muxd import __version__
from muxd.hub import ListenerStats
from muxd.linecontrol import SettingsCounts
from muxd.port import PortRuntime
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor
from muxd.tls import TLS_STATS
from muxd.upstream.state import STATES

# generate_latest() writes the classic text format; say so whatever the
# library's own default content type is in this version.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Listener kinds whose clients can ask for line settings (RFC 2217 commands, a
# pty's termios): only they get muxd_line_settings_requests_total series, the
# others would export zeros that can never move.
ASKING_KINDS = frozenset({"rfc2217", "pty"})


def reason_label(reason: str) -> str:
    """A disconnect reason as a label value: without detail after a colon
    (an exception's text), so the label set stays bounded."""
    return reason.split(":", 1)[0]


class MuxdCollector:
    def __init__(
        self,
        ports: Callable[[], Iterable[PortRuntime]],
        reactor: Reactor,
        servers: Callable[[], Iterable[tuple[str, int]]] = tuple,
    ) -> None:
        self._ports = ports
        self._reactor = reactor
        # (http server name, connections its allow-list refused), per scrape.
        self._servers = servers

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        p, pl = ["port"], ["port", "listener"]
        up = GaugeMetricFamily("muxd_upstream_up", "1 if the port's device is connected, else 0.", labels=p)
        state = GaugeMetricFamily(
            "muxd_upstream_state",
            "The upstream's state: 1 for the current one, 0 for the others.",
            labels=[*p, "state"],
        )
        connects = CounterMetricFamily(
            "muxd_upstream_connects", "Times the device was opened or connected.", labels=p
        )
        disconnects = CounterMetricFamily(
            "muxd_upstream_disconnects",
            "Times a connected device was lost, by reason.",
            labels=[*p, "reason"],
        )
        down = CounterMetricFamily(
            "muxd_upstream_down_seconds", "Time the device was not connected.", labels=p
        )
        last_change = GaugeMetricFamily(
            "muxd_upstream_last_change_timestamp_seconds",
            "Unix time the device last went up or down (retries within an outage do not move it).",
            labels=p,
        )
        read = CounterMetricFamily("muxd_device_read_bytes", "Bytes read from the device.", labels=p)
        written = CounterMetricFamily("muxd_device_written_bytes", "Bytes written to the device.", labels=p)
        queue = GaugeMetricFamily(
            "muxd_write_queue_bytes", "Bytes waiting in the device write queue.", labels=p
        )
        discarded = CounterMetricFamily(
            "muxd_input_discarded_bytes", "Bytes sent by clients of read-only listeners, discarded.", labels=p
        )
        max_lag = GaugeMetricFamily(
            "muxd_client_max_lag_bytes", "The largest backlog of any client of the port.", labels=p
        )
        clients = GaugeMetricFamily("muxd_clients", "Clients connected now.", labels=pl)
        conns = CounterMetricFamily("muxd_client_connections", "Clients accepted.", labels=pl)
        rejected = CounterMetricFamily(
            "muxd_client_rejected",
            "Clients refused, by reason: max_clients reached, or an address outside allow: "
            "(an http server's own refusals have no port label).",
            labels=[*pl, "reason"],
        )
        client_disc = CounterMetricFamily(
            "muxd_client_disconnects", "Clients disconnected, by reason.", labels=[*pl, "reason"]
        )
        delivered = CounterMetricFamily(
            "muxd_client_delivered_bytes", "Device bytes sent to clients.", labels=pl
        )
        dropped = CounterMetricFamily(
            "muxd_client_dropped_bytes", "Device bytes clients lost to the overflow policy.", labels=pl
        )
        fallbacks = CounterMetricFamily(
            "muxd_client_block_fallbacks",
            "Lossless readers (overflow: block) that held the device past block_timeout "
            "and fell back to drop-oldest.",
            labels=pl,
        )
        held = GaugeMetricFamily(
            "muxd_port_held", "1 while muxd does not read the device, held for a lossless reader.", labels=p
        )
        holds = CounterMetricFamily(
            "muxd_port_holds", "Times the device was held (not read) for a lossless reader.", labels=p
        )
        held_seconds = CounterMetricFamily(
            "muxd_port_held_seconds",
            "Time the device was held for a lossless reader: every reader of the port waited with it.",
            labels=p,
        )
        unacked = CounterMetricFamily(
            "muxd_device_unacked_bytes",
            "Bytes written to a TCP upstream that it had not acknowledged when the link died.",
            labels=p,
        )
        settings = CounterMetricFamily(
            "muxd_line_settings_requests",
            "Line-settings changes asked by clients, by outcome (applied, refused, failed; "
            "acknowledged: answered as asked and not applied, under line_control: virtual).",
            labels=[*pl, "outcome"],
        )
        line_info = GaugeMetricFamily(
            "muxd_port_line_info",
            "The line settings in force (baud rate, and format such as 8N1); always 1.",
            labels=[*p, "baudrate", "format"],
        )
        control_changes = CounterMetricFamily(
            "muxd_control_changes",
            "Control-line changes applied to the device (DTR, RTS, BREAK), by signal.",
            labels=[*p, "signal"],
        )
        control_requests = CounterMetricFamily(
            "muxd_control_requests_not_applied",
            "Clients' control-line requests not applied, by outcome (refused by the policy, "
            "failed at the device, acknowledged under line_control: ignore or virtual).",
            labels=[*p, "outcome"],
        )
        trace_written = CounterMetricFamily(
            "muxd_trace_written_bytes", "Bytes written to a trace file.", labels=[*p, "trace"]
        )
        trace_dropped = CounterMetricFamily(
            "muxd_trace_dropped_bytes",
            "Bytes a trace lost: reason disk, trace bytes the disk refused (full, I/O error); "
            "reason backlog, device bytes it fell too far behind on.",
            labels=[*p, "trace", "reason"],
        )
        lock_refused = CounterMetricFamily(
            "muxd_write_lock_refused_bytes",
            "Input bytes refused because another client holds the port's write lock (write_lock: first).",
            labels=p,
        )
        lock_holder = GaugeMetricFamily(
            "muxd_port_write_lock_holder_info",
            "The listener (and its kind) of the client holding the port's write lock; 1 while held, "
            "absent while free. The client itself is in the API, not in a label.",
            labels=[*p, "listener", "kind"],
        )
        mqtt = list(_mqtt_metrics(self._ports()))
        for rt in self._ports():
            hub, port, st = rt.hub, rt.name, rt.upstream.status
            for trace in rt.traces:
                trace_written.add_metric([port, trace.spec.path], trace.written)
                trace_dropped.add_metric([port, trace.spec.path, "disk"], trace.dropped)
                trace_dropped.add_metric([port, trace.spec.path, "backlog"], trace.reader.dropped)
            up.add_metric([port], 1.0 if st.state == "up" else 0.0)
            for name in STATES:
                state.add_metric([port, name], 1.0 if st.state == name else 0.0)
            connects.add_metric([port], st.connects)
            for reason, n in _merged(st.disconnects).items():
                disconnects.add_metric([port, reason], n)
            down.add_metric([port], st.seconds_down())
            last_change.add_metric([port], st.since)
            read.add_metric([port], hub.bytes_in)
            written.add_metric([port], hub.writes.bytes_out)
            queue.add_metric([port], hub.writes.queue.bytes)
            discarded.add_metric([port], hub.writes.discarded)
            max_lag.add_metric([port], max((hub.lag(r) for r in rt.clients()), default=0))
            unacked.add_metric([port], rt.upstream.bytes_unacked_lost)
            lock = hub.writes.lock
            lock_refused.add_metric([port], lock.refused_bytes)
            if lock.holder is not None:
                by = lock.holder.reader.policy.listener
                kind = next((lst.kind for lst in rt.config.listeners if lst.name == by), "mqtt")
                lock_holder.add_metric([port, by, kind], 1.0)
            held.add_metric([port], 1.0 if hub.holding else 0.0)
            holds.add_metric([port], hub.holds)
            held_seconds.add_metric([port], hub.held_total())
            lc = rt.line_control
            line_info.add_metric([port, str(lc.settings.baudrate), line_format(lc.settings)], 1.0)
            for signal, n in lc.control_changes.items():
                control_changes.add_metric([port, signal], n)
            for outcome, n in lc.control_requests.items():
                control_requests.add_metric([port, outcome], n)
            for lst in rt.config.listeners:
                labels = [port, lst.name]
                stats = hub.listener_stats.get(lst.name, ListenerStats())
                live = [r for r in hub.readers.values() if r.policy.listener == lst.name]
                clients.add_metric(labels, len(live))
                conns.add_metric(labels, stats.connections)
                rejected.add_metric([*labels, "max_clients"], stats.rejected)
                if lst.allow:
                    rejected.add_metric([*labels, "address"], stats.rejected_address)
                for reason, n in _merged(stats.disconnects).items():
                    client_disc.add_metric([*labels, reason], n)
                delivered.add_metric(labels, stats.closed_delivered + sum(r.delivered for r in live))
                dropped.add_metric(labels, stats.closed_dropped + sum(r.dropped for r in live))
                if lst.overflow == "block":
                    fallbacks.add_metric(labels, stats.block_fallbacks)
                if lst.kind in ASKING_KINDS:
                    asked = rt.line_control.counts.get(lst.name, SettingsCounts())
                    settings.add_metric([*labels, "applied"], asked.applied)
                    settings.add_metric([*labels, "refused"], asked.refused)
                    settings.add_metric([*labels, "failed"], asked.failed)
                    settings.add_metric([*labels, "acknowledged"], asked.acknowledged)
        for server, refused in self._servers():
            # An http server is no port's: its refusals carry an empty port
            # label, which Prometheus reads as no label at all.
            rejected.add_metric(["", server, "address"], refused)
        yield from (up, state, connects, disconnects, down, last_change)
        yield from (read, written, queue, discarded, max_lag)
        yield from (clients, conns, rejected, client_disc, delivered, dropped, unacked, settings)
        yield from (trace_written, trace_dropped, fallbacks, held, holds, held_seconds)
        yield from mqtt
        yield from (line_info, control_changes, control_requests, lock_refused, lock_holder)
        yield from tls_metrics()
        yield CounterMetricFamily(
            "muxd_event_loop_busy_seconds",
            "Time the event loop spent handling events rather than waiting.",
            value=self._reactor.busy_seconds,
        )
        yield CounterMetricFamily(
            "muxd_internal_errors",
            "Bugs caught by the event loop (each closed one connection).",
            value=self._reactor.internal_errors,
        )
        yield build_info()


def _mqtt_metrics(ports: Iterable[PortRuntime]) -> Iterator[Metric]:
    """The MQTT bridge (muxd.mqtt): its connection, once, and each published port's feed."""
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

    p = ["port"]
    up = GaugeMetricFamily("muxd_mqtt_up", "1 if the MQTT bridge is connected to its broker, else 0.")
    state = GaugeMetricFamily(
        "muxd_mqtt_state", "The bridge's state: 1 for the current one, 0 for the others.", labels=["state"]
    )
    connects = CounterMetricFamily("muxd_mqtt_connects", "Times the bridge connected to its broker.")
    failures = CounterMetricFamily(
        "muxd_mqtt_reconnects",
        "Connection attempts that failed and links that were lost, each followed by a reconnect, by reason.",
        labels=["reason"],
    )
    messages = CounterMetricFamily(
        "muxd_mqtt_published_messages",
        "rx messages the broker acknowledged (QoS 1) or that were written to it (QoS 0).",
        labels=p,
    )
    nbytes = CounterMetricFamily("muxd_mqtt_published_bytes", "Payload bytes of those messages.", labels=p)
    dropped = CounterMetricFamily(
        "muxd_mqtt_dropped_bytes",
        "Device bytes the bridge lost: its backlog overflowed while the broker was slow or gone.",
        labels=p,
    )
    lost = CounterMetricFamily(
        "muxd_mqtt_lost_messages",
        "QoS 0 messages not yet written when the link to the broker went.",
        labels=p,
    )
    lag = GaugeMetricFamily("muxd_mqtt_lag_bytes", "Device bytes the bridge has yet to publish.", labels=p)
    tx = CounterMetricFamily(
        "muxd_mqtt_tx_messages",
        "Messages on the tx topic, by outcome: written (queued to the device) or refused (no room).",
        labels=[*p, "outcome"],
    )
    bridge = None
    for rt in ports:
        feed = rt.mqtt
        if feed is None:
            continue
        bridge = feed.bridge
        port = rt.name
        messages.add_metric([port], feed.published)
        nbytes.add_metric([port], feed.published_bytes)
        dropped.add_metric([port], feed.reader.dropped)
        lost.add_metric([port], feed.lost)
        lag.add_metric([port], rt.hub.lag(feed.reader))
        if feed.spec.write:
            tx.add_metric([port, "written"], feed.tx_accepted)
            tx.add_metric([port, "refused"], feed.tx_refused)
    if bridge is None:
        return
    up.add_metric([], 1.0 if bridge.state == "up" else 0.0)
    for name in bridge.STATES:
        state.add_metric([name], 1.0 if bridge.state == name else 0.0)
    connects.add_metric([], bridge.connects)
    for reason, n in sorted(bridge.failures.items()):
        failures.add_metric([reason], n)
    yield from (up, state, connects, failures, messages, nbytes, dropped, lost, lag, tx)


def tls_metrics() -> Iterator[Metric]:
    """TLS handshakes of every TLS listener and http server, by listener name
    (muxd.tls.TLS_STATS; the reasons are a fixed set: timeout, error, closed, silent, evicted, busy)."""
    from prometheus_client.metrics_core import CounterMetricFamily

    done = CounterMetricFamily("muxd_tls_handshakes", "TLS handshakes completed.", labels=["listener"])
    failed = CounterMetricFamily(
        "muxd_tls_handshake_failures",
        "TLS handshakes that failed, by reason: timeout, error (TLS or certificate), "
        "closed (the peer left), silent (nothing sent within 3 s), "
        "evicted (made room for another), busy (too many in flight).",
        labels=["listener", "reason"],
    )
    for name, stats in sorted(TLS_STATS.items()):
        done.add_metric([name], stats.handshakes)
        for reason, n in sorted(stats.failures.items()):
            failed.add_metric([name, reason], n)
    yield done
    yield failed


def line_format(settings: LineSettings) -> str:
    """``8N1``, the format label of muxd_port_line_info (as muxd.api shows it)."""
    return str(settings).partition(" ")[2]


def build_info() -> GaugeMetricFamily:
    """The `_info` idiom: label-only facts as a gauge of 1, so a query can join
    them onto any series (`* on(instance) group_left(version) muxd_build_info`)."""
    from prometheus_client.metrics_core import GaugeMetricFamily

    info = GaugeMetricFamily(
        "muxd_build_info", "muxd's version and the Python running it; always 1.", labels=["version", "python"]
    )
    info.add_metric([__version__, platform.python_version()], 1.0)
    return info


def _merged(counts: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for reason, n in counts.items():
        label = reason_label(reason)
        out[label] = out.get(label, 0) + n
    return out


class LazyRegistry:
    """A registry that imports prometheus_client and builds itself when first
    collected (generate_latest() only calls collect())."""

    def __init__(
        self,
        ports: Callable[[], Iterable[PortRuntime]],
        reactor: Reactor,
        servers: Callable[[], Iterable[tuple[str, int]]],
    ) -> None:
        self._collector = MuxdCollector(ports, reactor, servers)
        self._registry: CollectorRegistry | None = None

    @property
    def registry(self) -> CollectorRegistry:
        if self._registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self._collector)
            ProcessCollector(registry=self._registry)
        return self._registry

    def collect(self) -> Iterable[Metric]:
        return self.registry.collect()


def make_registry(
    ports: Callable[[], Iterable[PortRuntime]],
    reactor: Reactor,
    servers: Callable[[], Iterable[tuple[str, int]]] = tuple,
) -> LazyRegistry:
    return LazyRegistry(ports, reactor, servers)


def render(registry: LazyRegistry) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry.registry)
