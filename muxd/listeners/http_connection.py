"""One plain HTTP connection of the front: h11 fed from the socket, and the
per-peer table of them.

An HttpConnection is an h11 state machine fed from its socket: requests are
answered at once from memory (HttpFront.handle makes the Reply), one at a time
(a pipelined request waits until the previous response has been handed to the
kernel, so input is not read while output is pending), and the connection is
kept alive until the peer closes, asks to close, or idles. An accepted
WebSocket upgrade hands the socket, with any bytes after the request, to a
WebSocketClient (muxd.listeners.websocket) and forgets it.

Under https the connection is made over a TLS transport (muxd.tls) instead
of the socket, after the handshake: requests are read from it and responses
sent through it (one view at a time: it encrypts a record per send), EPOLLOUT
is watched while it holds records the socket has not taken, and input it has
already taken off the socket is read without waiting for epoll. The upgrade
hands over the transport, so the WebSocket is WSS.

Limits: the request line and headers must fit in HEADER_LIMIT (h11's
max_incomplete_event_size; 431 otherwise), a body in BODY_LIMIT (413). A new
connection must deliver a whole request within HttpTimeouts.header, and so must
each later request from its first byte, while a kept-alive connection may idle
HttpTimeouts.idle between requests (408 if a request was begun, a quiet close
if none). Anything h11 cannot parse is the peer's RemoteProtocolError: a 400
and a close, for that peer only; so is a request with both Content-Length and
Transfer-Encoding (RFC 9112 section 6.1: a smuggling vector, answered and
closed). Such refusals are logged at debug level through the front's
LogLimiter.

A ConnectionTable groups a front's connections by peer address, oldest first,
so that the front can refuse a peer over its share and, when full, evict the
oldest connection of the peer holding the most.
"""

from __future__ import annotations

import http
import itertools
import socket
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

import h11

from muxd.listeners.http_reply import Reply, error_reply
from muxd.listeners.websocket import WebSocketClient, header
from muxd.protocol.http_names import peer_ip
from muxd.reactor import ERRMASK, IN, OUT
from muxd.transport import Transport, graceful_close

if TYPE_CHECKING:
    from muxd.listeners.http import HttpFront

# Request line + headers: browsers send 1-2 KiB; 16 KiB is nginx's and
# Apache's order of magnitude and leaves room for big cookies on a shared host.
HEADER_LIMIT = 16 * 1024
# Bodies are small JSON (POST .../signals) or ignored "{}" that some clients
# always send with a POST: 4 KiB is far more than either needs.
BODY_LIMIT = 4 * 1024
# Bytes taken from a socket per wake-up: a whole ordinary request, while
# the input that can wait unparsed stays bounded (see HEADER_LIMIT).
READ_SIZE = 16 * 1024
# An error's explanation, in the answer and the log, is cut to this.
FAIL_MESSAGE_LIMIT = 200
# Buffers per sendmsg: a response is at most headers, body and end.
SEND_VIEWS = 8


class ConnectionTable:
    """A front's plain HTTP connections, grouped by peer address as they come
    and go, oldest first: the per-peer limit is checked at every accept, and a
    full server makes room by taking from the peer that holds the most."""

    def __init__(self) -> None:
        self._peers: dict[HttpConnection, str] = {}
        self._by_peer: dict[str, dict[HttpConnection, None]] = {}  # a dict keeps insertion order

    def add(self, conn: HttpConnection) -> None:
        if conn not in self._peers:
            key = self._peers[conn] = peer_ip(conn.peer_host)
            self._by_peer.setdefault(key, {})[conn] = None

    def discard(self, conn: HttpConnection) -> None:
        key = self._peers.pop(conn, None)
        if key is not None:
            mine = self._by_peer[key]
            del mine[conn]
            if not mine:
                del self._by_peer[key]

    def of_peer(self, host: str) -> int:
        return len(self._by_peer.get(peer_ip(host), ()))

    def room_for(self, host: str) -> HttpConnection | None:
        """When full: the oldest connection of the peer holding the most, if
        that peer holds more than this one would with the new connection;
        closing it gives every address a fair share. None: no one to evict.
        Loopback has 16 million addresses, so the per-peer limit alone does
        not stop one host from filling the server."""
        if not self._by_peer:
            return None
        busiest = max(self._by_peer.values(), key=len)
        if len(busiest) <= self.of_peer(host) + 1:
            return None
        return next(iter(busiest))

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self) -> Iterator[HttpConnection]:
        return iter(self._peers)

    def __contains__(self, conn: object) -> bool:
        return conn in self._peers


class HttpConnection:
    """One accepted socket of an HttpFront, until it closes or becomes a WebSocket."""

    def __init__(self, front: HttpFront, sock: socket.socket | Transport, peer_host: str, peer: str) -> None:
        self.front = front
        self.reactor = front.reactor
        self.sock = sock  # the socket, or under https the TLS transport
        self.fd = sock.fileno() if isinstance(sock, socket.socket) else sock.fd
        self._read_soon = False  # a read of the TLS transport's buffered input is scheduled
        self.peer_host = peer_host
        self.peer = peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HEADER_LIMIT)
        self.closed = False
        self._out: deque[memoryview] = deque()  # at most one response: see _process()
        self._close_when_sent = False
        self._request: h11.Request | None = None
        self._body = 0
        self._body_data = bytearray()  # the request's body: the few routes that read one (JSON)
        self._received = 0  # bytes since the last response: tells idle from a slow request
        self._idle = False  # between requests of a kept-alive connection: the idle timeout applies
        if isinstance(sock, socket.socket):
            sock.setblocking(False)
        self._timer = self.reactor.call_later(self.front.timeouts.header, self._on_timeout)
        self.reactor.add(self.fd, IN, self._on_events, self._on_internal_error)
        if not isinstance(sock, socket.socket):
            # A browser sends its request with the handshake's last flight: it is
            # in the TLS transport already, and epoll will not report it again.
            self._watch()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        self.reactor.remove(self.fd)
        self.front.connections.discard(self)
        if isinstance(self.sock, socket.socket):
            graceful_close(self.sock)
        else:
            self.sock.close()  # close_notify, then the same graceful close

    # -- events -------------------------------------------------------------

    def _on_events(self, mask: int) -> None:
        if mask & OUT:
            self._flush()
        if self.closed:
            return
        if mask & (IN | ERRMASK) and not self._out:
            try:
                data = self.sock.recv(READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            self._received += len(data)
            self.h11.receive_data(data)  # b"" tells h11 the peer closed
        self._process()

    def _process(self) -> None:
        """Answer every complete request h11 has, one response at a time."""
        if self._idle and self._received and not self.closed:
            # A kept-alive connection began its next request: it has
            # the header timeout to finish it, as a new connection has.
            self._idle = False
            self._timer.cancel()
            self._timer = self.reactor.call_later(self.front.timeouts.header, self._on_timeout)
        while not self.closed:
            if self._out:
                self._flush()
                if self._out or self.closed:
                    break
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, str(exc))
                continue
            if event is h11.NEED_DATA:
                break
            if isinstance(event, h11.Request):
                self._request, self._body = event, 0
                self._body_data.clear()
                length = header(event, b"content-length")
                # h11 bounds only what is still incomplete; a whole head that
                # came in one read is measured here.
                if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > HEADER_LIMIT:
                    self._fail(431, f"request head over {HEADER_LIMIT} bytes")
                elif length is not None and header(event, b"transfer-encoding") is not None:
                    # h11 lets Transfer-Encoding win; RFC 9112 section 6.1 says such a
                    # request may be a smuggling attempt, to answer and then close.
                    self._fail(400, "both Content-Length and Transfer-Encoding")
                elif length is not None and length.isdigit() and int(length) > BODY_LIMIT:
                    self._fail(413, f"a body of {length} bytes is over the limit of {BODY_LIMIT}")
            elif isinstance(event, h11.Data):
                self._body += len(event.data)
                if self._body > BODY_LIMIT:
                    self._fail(413, f"a body over the limit of {BODY_LIMIT} bytes")
                else:
                    self._body_data += event.data  # bounded by BODY_LIMIT just above
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            else:  # ConnectionClosed, or PAUSED in a state we never leave it in
                self.close()
        self._watch()

    def _dispatch(self) -> None:
        request = self._request
        assert request is not None
        result = self.front.handle(request, self.peer_host, bytes(self._body_data))
        if isinstance(result, Reply):
            self._respond(request, result)
            return
        # wsproto accepted an `Upgrade: websocket`, so h11 is waiting to switch
        # (MIGHT_SWITCH_PROTOCOL) and has kept any bytes after the request.
        # Hand the socket over: it is the WebSocket's now, not ours to close.
        self.closed = True
        self._timer.cancel()
        self.reactor.remove(self.fd)
        self.front.connections.discard(self)
        client = WebSocketClient(
            self.sock,
            self.peer,
            result,
            self.reactor,
            self.h11.trailing_data[0],
            ping_interval=self.front.timeouts.ping,
        )
        self.front.clients.add(client)
        client.on_close.append(self.front.clients.discard)
        client.start()

    def _respond(self, request: h11.Request | None, reply: Reply) -> None:
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            ("x-content-type-options", "nosniff"),
            *reply.headers,
        ]
        if self._close_when_sent:
            headers.append(("connection", "close"))
        phrase = http.HTTPStatus(reply.status).phrase.encode()
        self._send(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
        if request is None or request.method != b"HEAD":
            self._send(h11.Data(data=reply.body))
        self._send(h11.EndOfMessage())
        if self.h11.our_state is h11.MUST_CLOSE:
            self._close_when_sent = True
        elif self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self._received = 0
            self._idle = True
            self._timer.cancel()
            self._timer = self.reactor.call_later(self.front.timeouts.idle, self._on_timeout)

    def _send(self, event: h11.Event) -> None:
        for chunk in self.h11.send_with_data_passthrough(event) or ():
            if chunk:
                self._out.append(memoryview(chunk))

    def _fail(self, status: int, message: str) -> None:
        """Answer an error the peer caused (if a response can still be sent), then close."""
        # h11's messages quote the offending line whole: up to HEADER_LIMIT
        # of the peer's bytes, which neither the answer nor the log needs.
        if len(message) > FAIL_MESSAGE_LIMIT:
            message = message[:FAIL_MESSAGE_LIMIT] + "..."
        self.front.refusals.debug(
            self.peer_host, "request", "%s: %s: %d %s", self.front.cfg.name, self.peer, status, message
        )
        self._close_when_sent = True
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self._out:
            request = self._request if self.h11.our_state is h11.SEND_RESPONSE else None
            self._respond(request, error_reply(status, message, False))
            self._flush()
        else:
            self.close()

    def _flush(self) -> None:
        out = self._out
        sock = self.sock
        while out:
            try:
                if isinstance(sock, socket.socket):
                    n = sock.sendmsg(list(itertools.islice(out, SEND_VIEWS)))
                else:
                    n = sock.send(out[0])  # TLS: flushes held records first
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            while n and n >= len(out[0]):
                n -= len(out.popleft())
            if n:
                out[0] = out[0][n:]
                break
        if not isinstance(sock, socket.socket):
            try:
                sock.flush()
            except OSError:
                self.close()
                return
        if not out and self._close_when_sent and not self._unsent():
            self.close()

    def _unsent(self) -> int:
        return 0 if isinstance(self.sock, socket.socket) else self.sock.unsent

    def _watch(self) -> None:
        if self.closed:
            return
        pending = self._out or self._unsent()
        self.reactor.modify(self.fd, OUT if pending else IN)
        # Input the TLS transport already took off the socket: epoll will not
        # report it, so read it on the next turn of the loop.
        tls_input = not isinstance(self.sock, socket.socket) and self.sock.buffered
        if not pending and tls_input and not self._read_soon:
            self._read_soon = True
            self.reactor.call_soon(self._read_buffered)

    def _read_buffered(self) -> None:
        self._read_soon = False
        if not self.closed:
            self._on_events(IN)

    def _on_timeout(self) -> None:
        if self._out or (self.h11.their_state is h11.IDLE and not self._received):
            self.close()  # idle, or not reading its response
        else:
            self._fail(408, f"no complete request within {self.front.timeouts.header:g}s")

    def _on_internal_error(self, _exc: BaseException) -> None:
        self.close()
