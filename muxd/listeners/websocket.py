"""WebSocket readers at /ws/<port>, with wsproto.

Handshake
    The HTTP connection has already parsed the request with h11. upgrade()
    checks the Origin against the server's allow-list (same-origin, i.e. an
    Origin whose host:port equals the Host header, is always allowed; "*"
    allows any; a request with no Origin is not from a browser and is
    allowed), the listener's max_clients and the query, then lets wsproto's
    H11Handshake validate the upgrade headers and write the 101 response. A
    refusal is an ordinary HTTP error response (403, 400, 426, 503), never a
    WebSocket that is opened only to be closed.

Output
    A WebSocketClient is a hub Reader like a TCP client, plus one small
    buffer of encoded frames. It takes bytes from the hub, one frame of at
    most FRAME_PAYLOAD at a time, only while that buffer holds less than
    LOW_WATER. Any backlog beyond that stays in the hub as the reader's lag,
    where the listener's ``buffer`` and ``overflow`` policy govern it exactly
    as for a TCP client. EPOLLOUT is watched only while the buffer cannot be
    flushed.

    Frames are binary, of raw device bytes, by default. With ``?format=json``
    they are text frames ``{"t": <unix time>, "dir": "rx", "data": <text>}``,
    where ``t`` is when muxd framed the bytes. The bytes are decoded as UTF-8
    with Python's "surrogateescape" handler (PEP 383): a byte 0xNN that is
    not part of valid UTF-8 becomes the lone surrogate U+DCNN, which the JSON
    carries as the escape ``\\udcNN``. Valid text is unchanged, nothing is
    lost, and ``data.encode("utf-8", "surrogateescape")`` gives back the
    exact bytes. A multi-byte character split between two reads is held back
    (at most 3 bytes) until it is complete.

Input
    Text and binary messages go to the hub like a TCP client's bytes: to the
    device if the listener is rw, through input_budget()/submit(), so a full
    write queue stops this socket being read (backpressure); discarded and
    counted if it is ro. A message over MAX_MESSAGE closes with 1009.

Keepalive and close
    A ping every PING_INTERVAL; no pong by the next one closes the
    connection (1011). A close we start (shutdown 1001, protocol error 1002,
    message too big 1009) is queued after what is already buffered, flushed,
    then the TCP connection is shut down; the peer's close is answered the
    same way.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import logging
import socket
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    RejectConnection,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from muxd.config import Listener
from muxd.errors import RemoteProtocolError
from muxd.hub import Hub, Reader
from muxd.listeners.stream import CLOSE_DRAIN, SEND_BUFFER
from muxd.reactor import ERRMASK, IN, OUT, Reactor, is_disconnect

log = logging.getLogger("muxd.listener")

# Device bytes per frame: 8 KiB is most of a second at 115200 baud, so frames
# stay few, and small enough that one frame never delays a ping for long.
FRAME_PAYLOAD = 8 * 1024
# Frames are taken from the hub only below this many encoded bytes. The buffer
# so holds at most LOW_WATER + one frame (x6 in JSON, where a stray byte is the
# 6-character escape \udcNN) + the pongs of one read: under 100 KiB, small
# next to the hub backlog it keeps bounded.
LOW_WATER = 16 * 1024
# Above this, input (whose pings want pongs) is not read until the peer reads.
OUT_LIMIT = 64 * 1024
# The largest message a client may send: far more than any typed or pasted
# command; more is not a console's traffic and would only fill the write queue.
MAX_MESSAGE = 64 * 1024
# Well inside the 60 s idle timeouts of common proxies and NATs; a dead peer is
# noticed within two intervals.
PING_INTERVAL = 20.0
# Time to flush our close frame to a peer that has stopped reading.
CLOSE_TIMEOUT = 5.0

# Close codes for closes the hub or the daemon asks for.
CLOSE_CODES = {
    "shutdown": CloseReason.GOING_AWAY,
    "overflow": CloseReason.POLICY_VIOLATION,
    "admin": CloseReason.POLICY_VIOLATION,
    "ping timeout": CloseReason.INTERNAL_ERROR,
    "internal error": CloseReason.INTERNAL_ERROR,
}


class HandshakeError(RemoteProtocolError):
    """The upgrade request cannot be accepted: answer it with this HTTP status."""

    def __init__(self, message: str, status: int, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass(frozen=True)
class Upgrade:
    """An accepted handshake: what the HTTP connection hands to a WebSocketClient."""

    response: bytes  # the 101 Switching Protocols, to send first
    connection: Connection
    hub: Hub
    listener: Listener
    json_format: bool
    history: int


def header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    if origin is None or "*" in allowed:
        return True
    origin = origin.lower().rstrip("/")
    if origin in (a.lower().rstrip("/") for a in allowed):
        return True
    return host is not None and urllib.parse.urlsplit(origin).netloc == host.lower()


def parse_options(target: bytes) -> tuple[bool, int]:
    """(json format?, history bytes asked for) from the query string."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target.decode("ascii", "replace")).query)
    fmt = query.get("format", ["binary"])[-1]
    if fmt not in ("binary", "json"):
        raise HandshakeError(f"format must be binary or json, got {fmt!r}", 400)
    history = query.get("history", ["0"])[-1]
    if not history.isdigit():
        raise HandshakeError(f"history must be a number of bytes, got {history!r}", 400)
    return fmt == "json", int(history)


def upgrade(request: h11.Request, hub: Hub, cfg: Listener, origins: tuple[str, ...]) -> Upgrade:
    """Accept a WebSocket for this hub's websocket listener, or raise HandshakeError."""
    if request.method != b"GET":
        raise HandshakeError("a WebSocket upgrade must be a GET", 405, ((b"allow", b"GET"),))
    if not origin_allowed(header(request, b"origin"), header(request, b"host"), origins):
        raise HandshakeError(f"origin {header(request, b'origin')!r} is not allowed", 403)
    json_format, history = parse_options(request.target)
    if hub.clients_of(cfg) >= cfg.max_clients:
        hub.stats_for(cfg).rejected += 1
        raise HandshakeError(f"{cfg.name}: max_clients ({cfg.max_clients}) reached", 503)
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.initiate_upgrade_connection(list(request.headers), request.target)
    except UnicodeError:  # wsproto decodes Host as IDNA and the target as ASCII
        raise HandshakeError("Host or target is not valid text", 400) from None
    except WsRemoteProtocolError as exc:
        hint = exc.event_hint
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        headers = tuple(hint.headers) if isinstance(hint, RejectConnection) else ()
        raise HandshakeError(str(exc), status, headers) from None
    response = handshake.send(AcceptConnection())
    assert handshake.connection is not None
    return Upgrade(response, handshake.connection, hub, cfg, json_format, history)


class WebSocketClient:
    def __init__(
        self, sock: socket.socket, peer: str, accepted: Upgrade, reactor: Reactor, trailing: bytes = b""
    ) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.cfg = cfg = accepted.listener
        self.hub = hub = accepted.hub
        self.reactor = reactor
        self.ws = accepted.connection
        self.closed = False
        self.finishing = False
        self.on_close: list[Callable[[WebSocketClient], None]] = []
        self._closing: str | None = None  # our close frame is queued: close(reason) once flushed
        self._out = bytearray(accepted.response)
        self._decoder = (
            codecs.getincrementaldecoder("utf-8")("surrogateescape") if accepted.json_format else None
        )
        self._message_size = 0
        self._awaiting_pong = False
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader: Reader = hub.attach(self, cfg, peer, history=accepted.history)
        self._timer = reactor.call_later(PING_INTERVAL, self._ping)
        reactor.add(self.fd, IN, self._on_events, self._on_internal_error)
        log.debug("%s: %s connected", cfg.name, peer)
        if trailing:
            self._received(trailing)
        self.on_data()

    # -- ReaderOwner ------------------------------------------------------------

    def on_data(self) -> None:
        if self.closed:
            return
        hub, reader = self.hub, self.reader
        while True:
            while self._closing is None and len(self._out) < LOW_WATER:
                views = hub.pending(reader, FRAME_PAYLOAD)
                if not views:  # caught up, or closed by the overflow policy
                    break
                chunk = b"".join(views)
                hub.advance(reader, len(chunk))
                self._out += self._frame(chunk)
            if reader.id not in hub.readers or not self._out:
                break
            try:
                n = self.sock.send(self._out)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._gone(exc)
                return
            del self._out[:n]
            if self._out:
                break  # the kernel's buffer is full
        if reader.id not in hub.readers:  # closed by the overflow policy
            return
        if self._closing is not None and not self._out:
            self.close(self._closing)
        elif self.finishing and self._closing is None and not self._out and hub.caught_up(reader):
            self._start_close(CloseReason.GOING_AWAY, "shutdown")
        else:
            self._set_blocked(bool(self._out))

    def on_write_room(self) -> None:
        if not self.closed:
            self._watch()

    def finish(self) -> None:
        """Graceful stop: send what this reader is owed, then close with 1001."""
        self.finishing = True
        self._watch()
        self.on_data()

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        self.hub.detach(self.reader, reason)
        self.reactor.remove(self.fd)
        for callback in self.on_close:
            callback(self)
        log.debug("%s: %s disconnected (%s)", self.cfg.name, self.peer, reason)
        with contextlib.suppress(OSError):
            if self.ws.state is ConnectionState.OPEN:  # not a close we queued: say why, if it fits
                self._out += self.ws.send(
                    CloseConnection(CLOSE_CODES.get(reason, CloseReason.NORMAL_CLOSURE))
                )
            self.sock.send(self._out)
            self.sock.shutdown(socket.SHUT_WR)
            for _ in range(CLOSE_DRAIN // 4096):
                if not self.sock.recv(4096):
                    break
        self.sock.close()

    # -- output -------------------------------------------------------------

    def _frame(self, chunk: bytes) -> bytes:
        if self._decoder is None:
            return self.ws.send(BytesMessage(chunk))
        text = self._decoder.decode(chunk)
        if not text:  # only the start of a multi-byte character so far
            return b""
        record = {"t": round(time.time(), 6), "dir": "rx", "data": text}
        return self.ws.send(TextMessage(json.dumps(record)))

    def _start_close(self, code: int, reason: str) -> None:
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._out += self.ws.send(CloseConnection(code))
        self._closing = reason
        self._timer.cancel()
        self._timer = self.reactor.call_later(CLOSE_TIMEOUT, lambda: self.close(reason))
        self._watch()
        self.on_data()

    def _ping(self) -> None:
        if self._awaiting_pong:
            self.close("ping timeout")
            return
        self._awaiting_pong = True
        self._out += self.ws.send(Ping(b"muxd"))
        self._timer = self.reactor.call_later(PING_INTERVAL, self._ping)
        self.on_data()

    # -- events -------------------------------------------------------------

    def _set_blocked(self, blocked: bool) -> None:
        if blocked != self.reader.blocked:
            self.hub.set_blocked(self.reader, blocked)
        self._watch()

    def _watch(self) -> None:
        if self.closed:
            return
        reading = not (self.reader.input_paused or self.finishing or self._closing)
        mask = IN if reading and len(self._out) < OUT_LIMIT else 0
        if self.reader.blocked or self._out:
            mask |= OUT
        self.reactor.modify(self.fd, mask)

    def _on_events(self, mask: int) -> None:
        if mask & OUT:
            self.on_data()
        if not self.closed and mask & (IN | ERRMASK):
            self._on_readable()

    def _on_readable(self) -> None:
        budget = self.hub.input_budget(self.reader)
        if budget == 0:
            self._watch()  # the write queue is full: stop reading until it drains
            return
        try:
            data = self.sock.recv(budget)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(exc)
            return
        if not data:
            self.close("peer closed")
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, Message):
                payload = event.data.encode() if isinstance(event, TextMessage) else bytes(event.data)
                self._message_size += len(payload)
                if self._message_size > MAX_MESSAGE:
                    self._start_close(CloseReason.MESSAGE_TOO_BIG, "message too big")
                    return
                if event.message_finished:
                    self._message_size = 0
                self.hub.submit(self.reader, payload)
            elif isinstance(event, Ping):
                self._out += self.ws.send(event.response())
            elif isinstance(event, Pong):
                self._awaiting_pong = False
            elif isinstance(event, CloseConnection):
                # Still OPEN means wsproto found a protocol error and reports it as
                # a close; otherwise the peer closed and this answers it.
                broken = self.ws.state is ConnectionState.OPEN
                self._start_close(event.code, "protocol error" if broken else "peer closed")
                return
        self.on_data()

    def _gone(self, exc: OSError) -> None:
        if not is_disconnect(exc):
            log.warning("%s: %s: %s", self.cfg.name, self.peer, exc)
        self.close("reset" if exc.errno == errno.ECONNRESET else "error")

    def _on_internal_error(self, _exc: BaseException) -> None:
        self.close("internal error")
