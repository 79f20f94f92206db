"""One plain HTTP connection of the front: h11 over the fd-connection core,
and the per-peer table of them.

An HttpConnection is the fd-connection core (muxd.fdconn) with an h11 state
machine fed from its transport: requests are answered at once from memory
(HttpFront.handle makes the Reply), one at a time (a pipelined request waits
until the previous response has been handed to the kernel, so input is not
read while output is pending), and the connection is kept alive until the
peer closes, asks to close, or idles. A response after which the connection
must close (an error, ``Connection: close``, HTTP/1.0) puts it in the core's
CLOSING state: the response is flushed, then the graceful close. An accepted
WebSocket upgrade hands the transport, with any bytes after the request, to a
WebSocketClient (muxd.listeners.wsclient): the core's SWITCHED state.

The transport is a SocketTransport, or under https a TLS transport (muxd.tls)
made after the handshake; nothing here asks which. The core watches EPOLLOUT
while the transport holds records the socket has not taken, and reads input
it has already taken off the socket without waiting for epoll. The upgrade
hands over the same transport, so the WebSocket is WSS.

Limits: the request line and headers must fit in HEADER_LIMIT (h11's
max_incomplete_event_size; 431 otherwise), a body in BODY_LIMIT (413). A new
connection must deliver a whole request within HttpTimeouts.header, and so must
each later request from its first byte, while a kept-alive connection may idle
HttpTimeouts.idle between requests (408 if a request was begun, a quiet close
if none). Anything h11 cannot parse is the peer's RemoteProtocolError: a 400
and a close, for that peer only; so is a request with both Content-Length and
Transfer-Encoding (RFC 9112 section 6.1: a smuggling vector, answered and
closed). Such refusals are logged at debug level through the front's
LogLimiter, by their reason only: h11 quotes the line it refuses, and a
header line may carry a token (Authorization, Cookie, Sec-WebSocket-Protocol),
so the quote is cut before the message is logged or answered (request_error).

A ConnectionTable groups a front's connections by peer address, oldest first,
so that the front can refuse a peer over its share and, when full, evict the
oldest connection of the peer holding the most.
"""

from __future__ import annotations

import http
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import h11

from muxd.fdconn import FdConnection, State
from muxd.listeners.http_reply import Reply, error_reply
from muxd.listeners.websocket import header
from muxd.protocol.http_names import peer_ip
from muxd.transport import Transport

if TYPE_CHECKING:
    from muxd.listeners.http import HttpFront

# Request line + headers: browsers send 1-2 KiB; 16 KiB is nginx's and
# Apache's order of magnitude and leaves room for big cookies on a shared host.
HEADER_LIMIT = 16 * 1024
# Bodies are small JSON (POST .../signals, a port's definition for POST
# /api/v1/ports: 0.2-2 KiB with listeners, traces and a few sequences) or an
# ignored "{}" that some clients always send with a POST: 4 KiB is room for
# every one of them, and is held at most once per connection.
BODY_LIMIT = 4 * 1024
# Bytes taken from a socket per wake-up: a whole ordinary request, while
# the input that can wait unparsed stays bounded (see HEADER_LIMIT).
READ_SIZE = 16 * 1024
# An error's explanation, in the answer and the log, is cut to this.
FAIL_MESSAGE_LIMIT = 200
# Where h11 starts quoting the peer's bytes in a message: a bytes repr
# (b'...' or b"...", bare or in bytearray(...)), or any opening quote (an
# apostrophe inside a word, as in "Can't", is not one).
_QUOTED = re.compile(r"""(?<![A-Za-z0-9_])(?:(?:bytearray\()?b)?['"]""")


def request_error(exc: h11.RemoteProtocolError) -> str:
    """Why h11 refused a request, without the request's bytes: h11 quotes the
    offending line, and a header line may carry a token (Authorization,
    Cookie, Sec-WebSocket-Protocol). Everything from the first quote on is
    cut, so no byte the peer sent reaches the log or the answer."""
    reason = _QUOTED.split(str(exc), maxsplit=1)[0].rstrip(" :")
    return reason or "malformed request"


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


class HttpConnection(FdConnection):
    """One accepted connection of an HttpFront, until it closes or becomes a WebSocket."""

    read_size = READ_SIZE

    def __init__(self, front: HttpFront, transport: Transport, peer_host: str, peer: str) -> None:
        """Set up; start() registers it with the loop (and reads what a TLS
        handshake's last flight brought: a browser's request comes with it)."""
        super().__init__(transport, front.reactor, front.cfg.name, peer)
        self.front = front
        self.peer_host = peer_host
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HEADER_LIMIT)
        self._request: h11.Request | None = None
        self._body = 0
        self._body_data = bytearray()  # the request's body: the few routes that read one (JSON)
        self._since_response = 0  # bytes since the last response: tells idle from a slow request
        self._idle = False  # between requests of a kept-alive connection: the idle timeout applies
        self._held = False  # holds a run-time port (Reply.on_close): no idle timeout
        self._set_timer("request", front.timeouts.header, self._on_timeout)

    # -- the core's hooks ---------------------------------------------------

    def _reading(self) -> bool:
        # One response at a time: the next request is read once this one is sent.
        return self.state is State.OPEN and not self._out and not self.transport.unsent

    def _received(self, data: bytes) -> None:
        self._since_response += len(data)
        self.h11.receive_data(data)
        self._process()

    def _end_of_input(self) -> None:
        self.h11.receive_data(b"")  # h11 says what the peer's close means now
        self._process()

    def _on_writable(self) -> None:
        self.pump()
        if self.state is State.OPEN and not self._out:
            self._process()  # a pipelined request h11 already holds

    # -- requests -------------------------------------------------------------

    def _process(self) -> None:
        """Answer every complete request h11 has, one response at a time."""
        if self._idle and self._since_response and self.state is State.OPEN:
            # A kept-alive connection began its next request: it has
            # the header timeout to finish it, as a new connection has.
            self._idle = False
            self._set_timer("request", self.front.timeouts.header, self._on_timeout)
        while self.state is State.OPEN:
            if self._out:
                self.pump()
                if self._out or self.state is not State.OPEN:
                    break
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(exc.error_status_hint, request_error(exc))
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
                self.close("peer closed")
        self._watch()

    def _dispatch(self) -> None:
        request = self._request
        assert request is not None
        result = self.front.handle(request, self.peer_host, bytes(self._body_data))
        if isinstance(result, Reply):
            if result.on_close is not None:
                # Before the response: a close while it is sent still lets go.
                self.on_close.append(result.on_close)
                self._held = True
            self._respond(request, result)
            return
        # wsproto accepted an `Upgrade: websocket`, so h11 is waiting to switch
        # (MIGHT_SWITCH_PROTOCOL) and has kept any bytes after the request.
        # Hand the transport over: it is the WebSocket's now, not ours to close.
        transport, trailing = self.transport, self.h11.trailing_data[0]
        self._switch()
        # memory: wsproto loaded by the upgrade that made `result` (docs/benchmarks.md)
        from muxd.listeners.wsclient import WebSocketClient

        client = WebSocketClient(
            transport,
            self.peer,
            result,
            self.reactor,
            trailing,
            ping_interval=self.front.timeouts.ping,
        )
        clients = self.front.clients
        clients.add(client)
        client.on_close.append(lambda: clients.discard(client))
        client.start()

    def _respond(self, request: h11.Request | None, reply: Reply, close: bool = False) -> None:
        """Queue the response and send it; `close`: say so, and close once it is sent."""
        headers = [
            ("content-type", reply.content_type),
            ("content-length", str(len(reply.body))),
            ("x-content-type-options", "nosniff"),
            *reply.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        phrase = http.HTTPStatus(reply.status).phrase.encode()
        self._send_event(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
        if request is None or request.method != b"HEAD":
            self._send_event(h11.Data(data=reply.body))
        self._send_event(h11.EndOfMessage())
        if self.h11.our_state is h11.MUST_CLOSE:
            # The response is bounded by the request timer: a peer that does not read it is closed.
            self.close_after_flush("done", self.front.timeouts.header)
        elif self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self._since_response = 0
            self._idle = True
            if self._held:
                self._cancel_timer("request")  # it may idle for as long as it holds
            else:
                self._set_timer("request", self.front.timeouts.idle, self._on_timeout)

    def _send_event(self, event: h11.Event) -> None:
        # At most one response is queued (see _reading): headers, a body of
        # memory the front already holds, and the end.
        for chunk in self.h11.send_with_data_passthrough(event) or ():
            self._out += chunk

    def _fail(self, status: int, message: str) -> None:
        """Answer an error the peer caused (if a response can still be sent), then close.
        `message` must not quote the peer's bytes (see request_error)."""
        if len(message) > FAIL_MESSAGE_LIMIT:
            message = message[:FAIL_MESSAGE_LIMIT] + "..."
        self.front.refusals.debug(
            self.peer_host, "request", "%s: %s: %d %s", self.front.cfg.name, self.peer, status, message
        )
        if self.state is State.OPEN and self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self._out:
            request = self._request if self.h11.our_state is h11.SEND_RESPONSE else None
            self._respond(request, error_reply(status, message, False), close=True)
        else:
            self.close("refused")

    def _on_timeout(self) -> None:
        if (
            self.state is not State.OPEN
            or self._out
            or (self.h11.their_state is h11.IDLE and not self._since_response)
        ):
            self.close("timeout")  # idle, or not reading its response
        else:
            self._fail(408, f"no complete request within {self.front.timeouts.header:g}s")
