"""The MQTT bridge's connection: paho-mqtt driven by the one reactor.

See muxd.mqtt for the topics, the loop and the bounds. This module holds the
connection: a non-blocking connect and handshake done on the reactor over a
muxd transport (muxd.mqtt.wire: plain, or TLS over memory BIOs), then the
transport handed to paho as its socket, which is then driven through its
external-loop API; reconnect with backoff; the round-robin hand-over of the
feeds' staged messages to paho, at most MAX_INFLIGHT at a time; the retained
state and availability topics.

State. The link's life is an upstream's (muxd.upstream.state): DOWN (not
started, stopped) -> CONNECTING -> UP -> DOWN -> BACKING_OFF -> CONNECTING,
an attempt that fails goes straight to BACKING_OFF, and the table there
refuses anything else. The wait before the next attempt is the upstream's
jittered exponential backoff, reset once a link has stayed up STABLE_UP (a
broker that accepts and then drops us, or two bridges with one client id
taking the session from each other, back off rather than spin).

Errors. paho reports failures as return codes (documented) and raises
ValueError only for a caller's mistake (a bad topic or QoS: a bug of ours,
which propagates). Every return code is checked (``_check``): a failure ends
the link with its cause as the reason, which the status logs once per outage
and ``failures`` counts by its label (muxd_mqtt_reconnects_total{reason}).
An exception from our own callbacks comes out of paho's loop calls to the
reactor, which logs and counts it, and the link is dropped and retried.

Inbound bound. The broker's packets are checked as they arrive
(muxd.mqtt.packet): one whose Remaining Length exceeds ``inbound_limit()``
is refused before its body is read: the link is closed, the refusal counted
(``refused_packets``, reason ``packet too large``) and logged, and the bridge
reconnects with backoff. MQTT 3.1.1, which the bridge speaks, has no way to
tell the broker that limit (5.0's Maximum Packet Size does), and with a clean
session the broker does not send the refused message again.

Why this module is long: one paho client's state is shared by every part of
it (the attempt, the transport it was handed, the in-flight messages, the
link's status), and paho calls back into each part from the same loop calls.
Split in two, each half would reach into the other's client; kept whole, one
class owns that client from connect to DISCONNECT. The pieces with a life of
their own are already apart: the wire (muxd.mqtt.wire), the inbound bound
(muxd.mqtt.packet) and the per-port feeds (muxd.mqtt.feed).
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from muxd.config import MqttConfig, MqttTls
from muxd.errors import RemoteProtocolError
from muxd.files import checked_paths, read_regular
from muxd.mqtt.feed import Feed
from muxd.mqtt.packet import InboundLimit, PacketTooLarge
from muxd.mqtt.wire import ClientTransport, PahoSocket, PlainTransport
from muxd.reactor import ERRMASK, IN, OUT, Reactor, Timer
from muxd.tls import MAX_PEM_BYTES, TlsTransport
from muxd.upstream.base import STABLE_UP
from muxd.upstream.state import (
    BACKING_OFF,
    CONNECTING,
    DOWN,
    STATES,
    UP,
    LinkMonitor,
    UpstreamState,
    backoff_delay,
)

if TYPE_CHECKING:
    from muxd.port import PortRuntime

log = logging.getLogger("muxd.mqtt")

# Messages handed to paho and not yet acknowledged (QoS 1) or written (QoS 0),
# all ports together: 64 keeps a LAN broker's round trips busy (64 lines per
# millisecond of RTT) while paho's own queue stays small and bounded.
MAX_INFLIGHT = 64
# A password file holds one line; the loop reads it, so the read is bounded.
MAX_PASSWORD_BYTES = 4096
# paho's loop_misc (keepalive pings, their timeout) runs this often.
MISC_INTERVAL = 1.0
# How often the state topic's facts are compared with what was published.
STATE_INTERVAL = 1.0
# The inbound bound beyond the largest tx message: a PUBLISH's topic (a prefix
# of at most 8 levels of 64 characters, the port's name, "/tx"), its packet id,
# and every other packet a broker sends (CONNACK, SUBACK, PUBACK, PINGRESP: a
# few bytes each).
HEADER_ROOM = 4 * 1024


class _Client(paho.Client):
    """paho's client with a connect that does not block: the socket it gets
    (a PahoSocket) is already connected, handshake done, by the bridge."""

    ready_sock: PahoSocket | None = None

    def _create_socket(self) -> Any:
        sock, self.ready_sock = self.ready_sock, None
        if sock is None:  # never: reconnect() is only called with a socket ready
            raise ConnectionError("no connected socket")
        return sock

    def drop(self) -> None:
        """Close the socket now (paho has no public way: disconnect() would
        queue a DISCONNECT packet behind whatever is stuck)."""
        self._sock_close()


class MqttBridge:
    """The daemon's one MQTT connection and the feeds of its published ports."""

    STATES = STATES

    def __init__(self, cfg: MqttConfig, reactor: Reactor, hostname: str | None = None) -> None:
        self.cfg = cfg
        self.reactor = reactor
        self.host = hostname or socket.gethostname()
        self.online_topic = f"{cfg.prefix}/{self.host}/online"
        self.feeds: dict[str, Feed] = {}
        self.status = LinkMonitor("", lambda *_a, **_k: None, subject=f"mqtt {cfg.broker}", logger=log)
        self.reconnects = 0  # attempts that failed, and links that were lost
        self.failures: dict[str, int] = {}  # the same, by the reason's label
        self.refused_packets = 0  # packets over inbound_limit(), refused unread
        self.finished = False  # a clean stop has disconnected (or had nothing to say)
        self._stopping = False
        self._live = False  # an attempt or a link is in progress (not yet failed)
        self._link = 0  # numbers the attempts: a deferred failure names the one it ends
        self._failing: str | None = None  # why, as a paho callback said, until _fail runs
        self._backoff_failures = 0  # failures since a link last stayed up STABLE_UP
        self._connecting: ClientTransport | None = None  # connecting, not yet paho's
        self._wire: PahoSocket | None = None  # paho's socket, the last one handed over
        self._fd = -1  # the fd registered with the reactor
        self._read_soon = False  # a read of the transport's buffered input is scheduled
        self._timer: Timer | None = None  # connect timeout, or the next attempt
        self._stable: Timer | None = None
        self._misc: Timer | None = None
        self._state_timer: Timer | None = None
        self._unacked: dict[int, tuple[Feed | None, int, int]] = {}  # mid -> (feed, bytes, qos)
        self._pumping = False
        self._offline_mid: int | None = None
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id or f"muxd-{self.host}",
            clean_session=True,
        )
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.max_queued_messages_set(0)  # bounded by MAX_INFLIGHT here, not refused by paho
        client.will_set(self.online_topic, b"offline", qos=1, retain=True)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, _read_password(cfg.password_file))
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_write_wanted
        client.on_socket_unregister_write = self._on_write_wanted
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive)  # stores; no I/O
        self.client = client

    @property
    def state(self) -> UpstreamState:
        return self.status.state

    @property
    def reason(self) -> str:
        return self.status.reason

    @property
    def connects(self) -> int:
        return self.status.connects

    def inbound_limit(self) -> int:
        """The largest packet body taken from the broker. A tx message longer
        than its port's device write queue could never be queued (muxd.writes
        refuses a unit whole), so reading one would only cost memory and time:
        the largest write queue of a port with ``write: true``, plus room for
        the packet's header. Computed at each connect."""
        queues = [f.hub.writes.queue.limit for f in self.feeds.values() if f.spec.write]
        return HEADER_ROOM + max(queues, default=0)

    # -- lifecycle ---------------------------------------------------------------------

    def add_port(self, rt: PortRuntime) -> None:
        spec = rt.config.mqtt
        if spec is None:
            return
        feed = Feed(self, rt, spec)
        self.feeds[rt.name] = feed
        rt.mqtt = feed

    def start(self) -> None:
        self._attempt()
        self._misc = self.reactor.call_later(MISC_INTERVAL, self._tick_misc)
        self._state_timer = self.reactor.call_later(STATE_INTERVAL, self._tick_state)

    def stop(self) -> None:
        """A clean stop: publish what is pending (the stop window allowing), the
        final states and ``offline``, then disconnect; ``finished`` says when."""
        if self._stopping:
            return
        self._stopping = True
        for timer in (self._misc, self._state_timer):
            if timer is not None:
                timer.cancel()
        if not self._usable:
            self._end()
            return
        for feed in self.feeds.values():
            feed._due()  # a held partial line goes too
        self._publish_states(force=True)  # the upstream stopped: "down", "stopped"
        self._drain_for_stop()

    def _drain_for_stop(self) -> None:
        """Publish what the feeds hold; once all is acknowledged, ``offline``."""
        self.pump()
        if (
            self._usable
            and self._offline_mid is None
            and not self._unacked
            and not any(f.has_pending() for f in self.feeds.values())
        ):
            info = self.client.publish(self.online_topic, b"offline", qos=1, retain=True)
            self._offline_mid = info.mid
            self._unacked[info.mid] = (None, 0, 1)
            self._check(info.rc, "publish")

    def close(self, clean: bool = False) -> None:
        """Now, whatever is pending: the daemon's stop window ran out (the
        broker then publishes the will), or with ``clean`` a reload replaces
        the bridge (a DISCONNECT first: the will is not published and the
        retained ``online`` stays true for the bridge that follows)."""
        self._stopping = True
        if clean and self._usable:
            self._send_disconnect()
        self._end()

    def _end(self) -> None:
        """Closed for good: no link, no timers, no feeds. Safe twice."""
        self._live = False
        self._cancel_timers()
        for timer in (self._misc, self._state_timer):
            if timer is not None:
                timer.cancel()
        self._drop_link()
        for feed in self.feeds.values():
            feed.detach()
            feed.rt.mqtt = None
        self.feeds.clear()
        self.status.set(DOWN, "stopped")
        self.finished = True

    # -- connecting: non-blocking, on the reactor ----------------------------------------

    def _transport(self, sock: socket.socket) -> ClientTransport:
        """The one place that knows about TLS: which transport carries the link."""
        if self.cfg.tls is None:
            return PlainTransport(sock)
        context = tls_context(self.cfg.tls)
        return TlsTransport(sock, context, server_side=False, server_hostname=self.cfg.host)

    def _attempt(self) -> None:
        self._timer = None
        if self._stopping:
            return
        self._link += 1
        self._live = True
        self._wire = None
        self.status.set(CONNECTING, "connecting")
        self._timer = self.reactor.call_later(self.cfg.connect_timeout, lambda: self._fail("connect timeout"))
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:  # EMFILE, ENOBUFS: the environment, retried like any failure
            self._fail(f"connect: {_cause(exc)}")
            return
        # A PUBACK, a PINGREQ or a line of console should not wait for Nagle.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            transport = self._transport(sock)
        except (OSError, ValueError) as exc:  # the TLS files (ssl.SSLError is an OSError)
            sock.close()
            self._fail(f"tls: {_cause(exc)}")
            return
        self._connecting = transport
        err = sock.connect_ex((self.cfg.host, self.cfg.port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(f"connect: {errno.errorcode.get(err, err)}")
            return
        self._fd = transport.fd
        self.reactor.add(self._fd, OUT, self._on_connected, self._on_internal_error)

    def _on_connected(self, _mask: int) -> None:
        transport = self._connecting
        assert transport is not None
        err = transport.pending_error()
        if err:
            self._fail(f"connect: {errno.errorcode.get(err, err)}")
            return
        self.reactor.remove(self._fd)
        self.reactor.add(self._fd, IN, self._on_handshake, self._on_internal_error)
        self._on_handshake(IN)

    def _on_handshake(self, mask: int) -> None:
        transport = self._connecting
        assert transport is not None
        try:
            if mask & OUT:
                transport.flush()
            done = transport.handshake()
        except OSError as exc:  # ssl.SSLError is one: a bad certificate, a TLS alert
            self._fail(f"handshake: {_cause(exc)}")
            return
        if not done:
            self.reactor.modify(self._fd, IN | (OUT if transport.unsent else 0))
            return
        # paho takes the transport as its socket and sends CONNECT.
        self.reactor.remove(self._fd)
        self._fd = -1
        self._connecting = None
        self._wire = PahoSocket(transport, InboundLimit(self.inbound_limit()))
        self.client.ready_sock = self._wire
        self._check(self.client.reconnect(), "connect")  # on_socket_open puts it back in the reactor

    def _drop_link(self) -> None:
        """Close whatever is open: the transport being connected, or paho's socket."""
        transport, self._connecting = self._connecting, None
        if transport is not None:
            self.reactor.remove(transport.fd)
            self._fd = -1
            transport.close()
        if self.client.socket() is not None:
            self.client.drop()  # on_socket_close forgets the fd; on_disconnect is not called

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._stable):
            if timer is not None:
                timer.cancel()
        self._timer = self._stable = None

    def _on_stable(self) -> None:
        self._stable = None
        self._backoff_failures = 0

    def _check(self, rc: int, what: str, soon: bool = False) -> bool:
        """paho's answer to a call: True for success; otherwise the link fails,
        with the best cause known (``soon``: from inside a paho callback)."""
        if rc == paho.MQTT_ERR_SUCCESS:
            return True
        reason = self._cause_of(what, rc)
        if soon:
            self._fail_soon(reason)
        else:
            self._fail(reason)
        return False

    def _cause_of(self, what: str, rc: int) -> str:
        """Why paho said rc: what the transport said, else what paho's callback said."""
        wire = self._wire
        if wire is not None and wire.error is not None:
            return f"{what}: {_cause(wire.error)}"
        if wire is not None and wire.eof:
            return "closed by the broker"
        return self._failing or f"{what}: {paho.error_string(rc)}"

    def _fail_soon(self, reason: str) -> None:
        """_fail from inside a paho callback: paho holds a plain Lock while it
        calls one, and closing the socket there would call on_socket_close
        under that Lock again (a deadlock). Nothing is published from now on
        (``_usable``); when paho's loop call returns, its caller may fail the
        link first with a better cause (what the transport said)."""
        if not self._live:
            return
        self._failing = self._failing or reason  # the first reason paho gave is the one
        link = self._link
        self.reactor.call_soon(lambda: self._fail(self._failing or reason) if self._link == link else None)

    @property
    def _usable(self) -> bool:
        """Up, and no paho callback has said otherwise."""
        return self.state == UP and self._failing is None

    def _fail(self, reason: str) -> None:
        """This attempt or this link is over: drop it, retry after the backoff."""
        if not self._live:
            return  # already failed (a deferred failure after a direct one), or stopped
        self._live = False
        self._failing = None
        self._cancel_timers()
        self._drop_link()
        self.reconnects += 1
        label = reason.split(":", 1)[0]
        self.failures[label] = self.failures.get(label, 0) + 1
        self._forget_unwritten()
        for feed in self.feeds.values():
            feed.block(feed.has_pending())
        if self.state == UP:
            self.status.set(DOWN, reason)
        if self._stopping:
            self._end()
            return
        # Scheduled first, reported second, as an upstream's retry.
        delay = backoff_delay(self._backoff_failures, self.cfg.backoff_min, self.cfg.backoff_max)
        self._backoff_failures += 1
        self._timer = self.reactor.call_later(delay, self._attempt)
        self.status.set(BACKING_OFF, reason, retry_in=delay)

    def _on_internal_error(self, _exc: BaseException) -> None:
        # The reactor has logged the traceback and counted it; end this link and retry.
        self._fail("internal error")

    def _forget_unwritten(self) -> None:
        """QoS 0 messages paho had not written are gone with the link: count them."""
        for mid, (feed, _n, qos) in list(self._unacked.items()):
            if qos == 0:
                del self._unacked[mid]
                if feed is not None:
                    feed.lost += 1

    # -- paho's socket callbacks ----------------------------------------------------------

    def _on_socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self._fd = sock.fileno()
        self.reactor.add(self._fd, IN, self._on_io, self._on_internal_error)

    def _on_socket_close(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self.reactor.remove(sock.fileno())
        self._fd = -1

    def _on_write_wanted(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        self._watch()

    def _watch(self) -> None:
        """EPOLLOUT while paho has packets to write or the transport holds bytes
        the socket has not taken (a TLS record)."""
        wire = self._wire
        if self._fd < 0 or wire is None:
            return
        out = self.client.want_write() or wire.transport.unsent
        self.reactor.modify(self._fd, IN | (OUT if out else 0))

    def _on_io(self, mask: int) -> None:
        wire = self._wire
        assert wire is not None
        if mask & OUT:
            try:
                wire.transport.flush()
            except OSError as exc:
                self._fail(f"write: {_cause(exc)}")
                return
        if mask & (IN | ERRMASK) and not self._read():
            return
        if (
            mask & OUT
            and self.client.socket() is not None
            and not self._check(self.client.loop_write(), "write")
        ):
            return
        self._watch()

    def _read(self) -> bool:
        """paho reads what the socket has; False if the link ended."""
        try:
            rc = self.client.loop_read()
        except PacketTooLarge as exc:
            self.refused_packets += 1
            self._fail(f"packet too large: {exc}")
            return False
        except RemoteProtocolError as exc:
            self._fail(f"protocol: {exc}")
            return False
        if not self._check(rc, "read"):
            return False
        wire = self._wire
        if wire is not None and wire.transport.buffered and not self._read_soon:
            # Input already off the socket (a TLS record) that epoll cannot see.
            self._read_soon = True
            self.reactor.call_soon(self._read_buffered)
        return True

    def _read_buffered(self) -> None:
        self._read_soon = False
        if self._live and self.client.socket() is not None and self._read():
            self._watch()

    def _tick_misc(self) -> None:
        self._misc = self.reactor.call_later(MISC_INTERVAL, self._tick_misc)
        if self.client.socket() is not None:
            self._check(self.client.loop_misc(), "keepalive")

    # -- paho's protocol callbacks ----------------------------------------------------------

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._fail_soon(f"refused: {reason}")
            return
        if self._timer is not None:  # the connect timeout
            self._timer.cancel()
            self._timer = None
        self.status.set(UP, "connected")
        self._stable = self.reactor.call_later(STABLE_UP, self._on_stable)
        # QoS 1 messages paho held are sent again by paho; forget none of them.
        info = client.publish(self.online_topic, b"online", qos=1, retain=True)
        if not self._check(info.rc, "publish", soon=True):
            return
        for feed in self.feeds.values():
            if feed.spec.write:
                rc, _mid = client.subscribe(feed.tx_topic, qos=feed.spec.qos)
                if not self._check(rc, "subscribe", soon=True):
                    return
        self._publish_states(force=True, soon=True)
        for feed in self.feeds.values():
            feed.block(False)
        self.reactor.call_soon(self.pump)

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._stopping and self._offline_mid is not None and self._offline_mid not in self._unacked:
            self.reactor.call_soon(self._end)
            return
        self._fail_soon(f"disconnected: {reason}")

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        entry = self._unacked.pop(mid, None)
        if entry is not None:
            feed, n, _qos = entry
            if feed is not None:
                feed.published += 1
                feed.published_bytes += n
        if self._stopping:
            if self._offline_mid is None:
                self.reactor.call_soon(self._drain_for_stop)
            elif self._offline_mid not in self._unacked:
                self.reactor.call_soon(self._disconnect)
            return
        if len(self._unacked) < MAX_INFLIGHT and not self._pumping:
            self.reactor.call_soon(self.pump)

    def _disconnect(self) -> None:
        """The clean stop's end: DISCONNECT (the broker then forgets the will), close."""
        self._send_disconnect()
        self._end()

    def _send_disconnect(self) -> None:
        if self.client.socket() is None or not self._check(self.client.disconnect(), "disconnect"):
            return
        rc = self.client.loop_write()  # the 2 bytes go now, before the close
        if self._wire is not None and self._wire.error is not None:
            # paho reports success for a write that failed while it is "disconnecting".
            rc = paho.MQTT_ERR_CONN_LOST
        self._check(rc, "disconnect")

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        for feed in self.feeds.values():
            if msg.topic == feed.tx_topic:
                feed.write(bytes(msg.payload))
                return

    # -- publishing --------------------------------------------------------------------

    def pump(self) -> None:
        """Hand paho what the feeds have, round robin, up to MAX_INFLIGHT."""
        if not self._usable:
            for feed in self.feeds.values():
                feed.block(feed.has_pending())  # a stuck reader: the hub bounds its backlog
            return
        if self._pumping or self._offline_mid is not None:
            return
        self._pumping = True
        try:
            feeds = list(self.feeds.values())
            active = [f for f in feeds if f.has_pending()]
            while active and len(self._unacked) < MAX_INFLIGHT:
                for feed in list(active):
                    if len(self._unacked) >= MAX_INFLIGHT:
                        break
                    message = feed.next_message()
                    if message is None:
                        active.remove(feed)
                        continue
                    info = self.client.publish(feed.rx_topic, message, qos=feed.spec.qos, retain=False)
                    self._unacked[info.mid] = (feed, len(message), feed.spec.qos)
                    if not self._check(info.rc, "publish"):
                        return
            for feed in feeds:
                feed.block(feed.has_pending())
        finally:
            self._pumping = False

    def _tick_state(self) -> None:
        self._state_timer = self.reactor.call_later(STATE_INTERVAL, self._tick_state)
        self._publish_states()

    def _publish_states(self, force: bool = False, soon: bool = False) -> None:
        if not self._usable:
            return
        for feed in self.feeds.values():
            key, payload = feed.state_payload()
            if force or key != feed._last_state:
                feed._last_state = key
                info = self.client.publish(feed.state_topic, payload, qos=1, retain=True)
                if not self._check(info.rc, "publish", soon=soon):
                    return


def tls_context(tls: MqttTls) -> ssl.SSLContext:
    """A client context: the broker's certificate checked against ``ca`` (the
    system's CAs without it) and its name or IP against the ``broker`` host;
    ``cert`` and ``key`` for a broker that asks for a client certificate."""
    # Opened and checked first (muxd.files): this runs in the loop, at each connect.
    paths = [p for p in (tls.ca, tls.cert, tls.key) if p is not None]
    with checked_paths(paths, MAX_PEM_BYTES) as checked:
        named = dict(zip(paths, checked, strict=True))
        ctx = ssl.create_default_context(cafile=named.get(tls.ca) if tls.ca is not None else None)
        if tls.cert is not None:
            ctx.load_cert_chain(named[tls.cert], named.get(tls.key) if tls.key is not None else None)
    return ctx


def _cause(exc: BaseException) -> str:
    """An error as one short phrase: a TLS error's reason, an OSError's strerror."""
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)


def _read_password(path: str | None) -> str | None:
    if path is None:
        return None
    # A regular file of one line (muxd.files): a FIFO there must not block the loop on reload.
    data = read_regular(path, MAX_PASSWORD_BYTES)
    return data.decode("utf-8").partition("\n")[0].rstrip("\r")
