"""The MQTT bridge's connection: paho-mqtt driven by the one reactor.

See muxd.mqtt for the topics, the loop and the bounds. This module holds the
connection: a non-blocking connect and TLS handshake done on the reactor,
then the connected socket handed to paho, which is then driven through its
external-loop API; reconnect with backoff; the round-robin hand-over of the
feeds' staged messages to paho, at most MAX_INFLIGHT at a time; the retained
state and availability topics.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from muxd.config import MqttConfig, MqttTls
from muxd.files import checked_paths, read_regular
from muxd.mqtt.feed import Feed
from muxd.reactor import ERRMASK, IN, OUT, Reactor, Timer
from muxd.tls import MAX_PEM_BYTES

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

STATES = ("connecting", "up", "backing-off", "stopped")


class _Client(paho.Client):
    """paho's client with a connect that does not block: the socket it gets is
    already connected (and TLS-wrapped) by the bridge on the reactor."""

    ready_sock: socket.socket | None = None

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
        self.state = "stopped"
        self.reason = "not started"
        self.connects = 0
        self.reconnects = 0  # attempts that failed, and links that were lost
        self.failures: dict[str, int] = {}
        self.finished = False  # a clean stop has disconnected (or had nothing to say)
        self._stopping = False
        self._backoff = cfg.backoff_min
        self._sock: socket.socket | None = None  # connecting, not yet paho's
        self._fd = -1  # the fd registered with the reactor
        self._timer: Timer | None = None  # connect timeout, or the next attempt
        self._misc: Timer | None = None
        self._state_timer: Timer | None = None
        self._unacked: dict[int, tuple[Feed | None, int, int]] = {}  # mid -> (feed, bytes, qos)
        self._pumping = False
        self._offline_mid: int | None = None
        self._failing: str | None = None  # why, as a paho callback said, until _fail runs
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
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.connect_async(cfg.host, cfg.port, keepalive=cfg.keepalive)  # stores; no I/O
        self.client = client

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
        if self.state != "up":
            self.close()
            return
        for feed in self.feeds.values():
            feed._due()  # a held partial line goes too
        self._publish_states(force=True)  # the upstream stopped: "down", "stopped"
        self._drain_for_stop()

    def _drain_for_stop(self) -> None:
        """Publish what the feeds hold; once all is acknowledged, ``offline``."""
        self.pump()
        if (
            self._offline_mid is None
            and not self._unacked
            and not any(f.has_pending() for f in self.feeds.values())
        ):
            info = self.client.publish(self.online_topic, b"offline", qos=1, retain=True)
            self._offline_mid = info.mid
            self._unacked[info.mid] = (None, 0, 1)

    def close(self, clean: bool = False) -> None:
        """Now, whatever is pending: the daemon's stop window ran out (the
        broker then publishes the will), or with ``clean`` a reload replaces
        the bridge (a DISCONNECT first: the will is not published and the
        retained ``online`` stays true for the bridge that follows)."""
        self._stopping = True
        if clean and self.state == "up" and self.client.socket() is not None:
            with contextlib.suppress(Exception):
                self.client.disconnect()
                self.client.loop_write()
        self._cancel_timer()
        for timer in (self._misc, self._state_timer):
            if timer is not None:
                timer.cancel()
        self._drop_connecting()
        with contextlib.suppress(Exception):
            self.client.drop()
        for feed in self.feeds.values():
            feed.detach()
            feed.rt.mqtt = None
        self.feeds.clear()
        self.state, self.reason = "stopped", "stopped"
        self.finished = True

    # -- connecting: non-blocking, on the reactor ----------------------------------------

    def _attempt(self) -> None:
        self._timer = None
        if self._stopping:
            return
        self.state, self.reason = "connecting", "connecting"
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._timer = self.reactor.call_later(self.cfg.connect_timeout, lambda: self._fail("connect timeout"))
        err = sock.connect_ex((self.cfg.host, self.cfg.port))
        if err not in (0, errno.EINPROGRESS):
            self._fail(f"connect: {errno.errorcode.get(err, err)}")
            return
        self._fd = sock.fileno()
        self.reactor.add(self._fd, OUT, self._on_connecting, lambda _exc: self._fail("internal error"))

    def _on_connecting(self, _mask: int) -> None:
        sock = self._sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(f"connect: {errno.errorcode.get(err, err)}")
            return
        if self.cfg.tls is None:
            self._hand_over(sock)
            return
        self.reactor.remove(self._fd)
        try:
            tls = tls_context(self.cfg.tls).wrap_socket(
                sock, server_hostname=self.cfg.host, do_handshake_on_connect=False
            )
        except (OSError, ValueError) as exc:
            self._fail(f"tls: {exc}")
            return
        self._sock = tls
        self.reactor.add(self._fd, IN | OUT, self._on_handshake, lambda _exc: self._fail("internal error"))
        self._on_handshake(OUT)

    def _on_handshake(self, _mask: int) -> None:
        sock = self._sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.reactor.modify(self._fd, IN)
            return
        except ssl.SSLWantWriteError:
            self.reactor.modify(self._fd, OUT)
            return
        except (OSError, ValueError) as exc:
            self._fail(f"tls: {getattr(exc, 'reason', None) or exc}")
            return
        self._hand_over(sock)

    def _hand_over(self, sock: socket.socket) -> None:
        """Connected (and TLS done): paho takes the socket and sends CONNECT."""
        self.reactor.remove(self._fd)
        self._fd = -1
        self._sock = None
        self.client.ready_sock = sock
        self.client.reconnect()  # on_socket_open puts it back in the reactor

    def _drop_connecting(self) -> None:
        if self._sock is not None:
            self.reactor.remove(self._fd)
            self._fd = -1
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail_soon(self, reason: str) -> None:
        """_fail from inside a paho callback: paho holds a plain Lock while it
        calls one, and closing the socket there would call on_socket_close
        under that Lock again (a deadlock). Not up from now on."""
        was_up = self.state == "up"
        self.state = "connecting"
        self._failing = self._failing or reason  # the first reason paho gave is the one
        self.reactor.call_soon(lambda: self._fail(reason, was_up))

    def _fail(self, reason: str, was_up: bool | None = None) -> None:
        """This attempt or this link is over: drop it, retry after the backoff."""
        if self.state in ("backing-off", "stopped"):
            return  # already failed (a deferred failure after a direct one)
        reason, self._failing = self._failing or reason, None
        self._cancel_timer()
        self._drop_connecting()
        if self.client.socket() is not None:
            self.client.drop()  # on_disconnect is not called for a drop
        if was_up is None:
            was_up = self.state == "up"
        if was_up:
            log.warning("mqtt: lost %s (%s)", self.cfg.broker, reason)
        elif self.reason != reason:
            log.warning("mqtt: cannot connect to %s (%s)", self.cfg.broker, reason)
        self.reconnects += 1
        label = reason.split(":", 1)[0]
        self.failures[label] = self.failures.get(label, 0) + 1
        self._forget_unwritten()
        for feed in self.feeds.values():
            feed.block(feed.has_pending())
        if self._stopping:
            self.close()
            return
        delay = self.cfg.backoff_min if was_up else self._backoff
        self._backoff = min(self.cfg.backoff_max, max(delay, self.cfg.backoff_min) * 2)
        self.state, self.reason = "backing-off", reason
        self._timer = self.reactor.call_later(delay, self._attempt)

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
        self.reactor.add(self._fd, IN, self._on_io, lambda _exc: self._fail("internal error"))

    def _on_socket_close(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self.reactor.remove(sock.fileno())
        self._fd = -1

    def _on_register_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError):
            self.reactor.modify(sock.fileno(), IN | OUT)

    def _on_unregister_write(self, _client: Any, _userdata: Any, sock: Any) -> None:
        with contextlib.suppress(KeyError):
            self.reactor.modify(sock.fileno(), IN)

    def _on_io(self, mask: int) -> None:
        client = self.client
        if mask & (IN | ERRMASK):
            rc = client.loop_read()
            sock = client.socket()
            while rc == paho.MQTT_ERR_SUCCESS and isinstance(sock, ssl.SSLSocket) and sock.pending():
                rc = client.loop_read()  # TLS may hold decrypted bytes epoll cannot see
            if rc != paho.MQTT_ERR_SUCCESS and client.socket() is None:
                self._fail(f"read: {paho.error_string(rc)}")  # once: _fail ignores a second
                return
        if mask & OUT and client.socket() is not None:
            client.loop_write()

    def _tick_misc(self) -> None:
        self._misc = self.reactor.call_later(MISC_INTERVAL, self._tick_misc)
        if self.client.socket() is not None:
            self.client.loop_misc()

    # -- paho's protocol callbacks ----------------------------------------------------------

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._fail_soon(f"refused: {reason}")
            return
        self._cancel_timer()
        self.state, self.reason = "up", "connected"
        self.connects += 1
        self._backoff = self.cfg.backoff_min
        log.info("mqtt: connected to %s", self.cfg.broker)
        # QoS 1 messages paho held are sent again by paho; forget none of them.
        client.publish(self.online_topic, b"online", qos=1, retain=True)
        for feed in self.feeds.values():
            if feed.spec.write:
                client.subscribe(feed.tx_topic, qos=feed.spec.qos)
        self._publish_states(force=True)
        for feed in self.feeds.values():
            feed.block(False)
        self.reactor.call_soon(self.pump)

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._stopping and self._offline_mid is not None and self._offline_mid not in self._unacked:
            self.reactor.call_soon(self.close)
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
        if self.client.socket() is not None:
            self.client.disconnect()
            self.client.loop_write()  # the 2-byte packet goes out now, before the close
        self.close()

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        for feed in self.feeds.values():
            if msg.topic == feed.tx_topic:
                feed.write(bytes(msg.payload))
                return

    # -- publishing --------------------------------------------------------------------

    def pump(self) -> None:
        """Hand paho what the feeds have, round robin, up to MAX_INFLIGHT."""
        if self.state != "up":
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
                    if self.client.socket() is None:  # the write failed: the link is gone
                        return
            for feed in feeds:
                feed.block(feed.has_pending())
        finally:
            self._pumping = False

    def _tick_state(self) -> None:
        self._state_timer = self.reactor.call_later(STATE_INTERVAL, self._tick_state)
        self._publish_states()

    def _publish_states(self, force: bool = False) -> None:
        if self.state != "up":
            return
        for feed in self.feeds.values():
            key, payload = feed.state_payload()
            if force or key != feed._last_state:
                feed._last_state = key
                self.client.publish(feed.state_topic, payload, qos=1, retain=True)


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


def _read_password(path: str | None) -> str | None:
    if path is None:
        return None
    # A regular file of one line (muxd.files): a FIFO there must not block the loop on reload.
    data = read_regular(path, MAX_PASSWORD_BYTES)
    return data.decode("utf-8").partition("\n")[0].rstrip("\r")
