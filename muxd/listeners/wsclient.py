"""A WebSocket reader (WebSocketClient) and the 101 that opens it, with wsproto.

Imported at the first upgrade accepted (muxd.listeners.websocket.upgrade):
wsproto imports hashlib, and with it libcrypto, which a daemon without
WebSocket clients never needs (memory: docs/benchmarks.md). Theory of
operation: muxd.listeners.websocket.
"""

from __future__ import annotations

import codecs
import json
import time

import h11
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState, ConnectionType
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

from muxd.access import Tokens, scope_allows
from muxd.connection import Connection
from muxd.fdconn import State
from muxd.listeners.websocket import CLOSE_TIMEOUT, FRAME_PAYLOAD, MAX_MESSAGE, HandshakeError, Upgrade, log
from muxd.reactor import Reactor
from muxd.transport import Transport

# Close codes for closes the hub or the daemon asks for.
CLOSE_CODES = {
    "shutdown": CloseReason.GOING_AWAY,
    "overflow": CloseReason.POLICY_VIOLATION,
    "admin": CloseReason.POLICY_VIOLATION,
    "ping timeout": CloseReason.INTERNAL_ERROR,
    "internal error": CloseReason.INTERNAL_ERROR,
}


def answer_code(code: int) -> int:
    """The code to close with when answering a peer's close: its own, where a
    server may send it (RFC 6455 7.4: 1005, 1006 and 1015 are never sent, 1010
    is the client's), else 1000."""
    sendable = code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1012, 1013, 1014)
    return code if sendable or 3000 <= code <= 4999 else CloseReason.NORMAL_CLOSURE


def handshake(request: h11.Request, subprotocol: str | None) -> tuple[bytes, WsConnection]:
    """wsproto's checks of the upgrade headers, then the 101 and the
    connection it opens; HandshakeError with the status to answer."""
    shake = H11Handshake(ConnectionType.SERVER)
    try:
        shake.initiate_upgrade_connection(list(request.headers), request.target)
    except UnicodeError:  # wsproto decodes Host as IDNA and the target as ASCII
        raise HandshakeError("Host or target is not valid text", 400) from None
    except WsRemoteProtocolError as exc:
        hint = exc.event_hint
        status = hint.status_code if isinstance(hint, RejectConnection) else 400
        headers = tuple(hint.headers) if isinstance(hint, RejectConnection) else ()
        raise HandshakeError(str(exc), status, headers) from None
    response = shake.send(AcceptConnection(subprotocol=subprotocol))
    assert shake.connection is not None
    return response, shake.connection


class WebSocketClient(Connection):
    """A hub reader over a WebSocket: the connection core with wsproto as its encoder."""

    HALF_CLOSE = False
    encoder_chunk = FRAME_PAYLOAD

    def __init__(
        self,
        transport: Transport,  # the HTTP connection's: a TLS transport under https
        peer: str,
        accepted: Upgrade,
        reactor: Reactor,
        trailing: bytes = b"",
        *,
        ping_interval: float = 20.0,
    ) -> None:
        self.ping_interval = ping_interval
        self.ws = accepted.connection
        self._decoder = (
            codecs.getincrementaldecoder("utf-8")("surrogateescape") if accepted.options.json_format else None
        )
        self._message_size = 0
        self._awaiting_pong = False
        self._trailing = trailing
        self.read_only = accepted.read_only
        self._secret = accepted.secret
        self._revoked = False  # closing for a token a reload revoked
        super().__init__(
            transport,
            accepted.hub,
            accepted.listener,
            peer,
            reactor,
            encoding=True,
            fmt=accepted.options.fmt,
            history=accepted.options.history,
            history_lines=accepted.options.history_lines,
            initial=accepted.response,
        )
        self.reader.token = accepted.token

    def start(self) -> None:
        self._set_timer("ping", self.ping_interval, self._ping)
        super().start()
        if self._trailing:  # bytes the peer sent right after its upgrade request
            trailing, self._trailing = self._trailing, b""
            self._received(trailing)

    # -- output -------------------------------------------------------------

    def encode(self, data: bytes) -> bytes:
        fmt = self.reader.policy.format
        if fmt == "jsonl":  # records from the shared log: valid UTF-8 by construction
            return self.ws.send(TextMessage(data.decode()))
        if self._decoder is None:  # raw bytes, or stamped text (which may not be UTF-8)
            return self.ws.send(BytesMessage(data))
        text = self._decoder.decode(data)
        if not text:  # only the start of a multi-byte character so far
            return b""
        record = {"t": round(time.time(), 6), "dir": "rx", "data": text}
        return self.ws.send(TextMessage(json.dumps(record)))

    def _finished(self) -> None:
        self._start_close(CloseReason.GOING_AWAY, "shutdown")

    def _last_words(self, reason: str) -> bytes:
        if self.ws.state is not ConnectionState.OPEN:  # a close we queued is in _out already
            return b""
        return self.ws.send(CloseConnection(CLOSE_CODES.get(reason, CloseReason.NORMAL_CLOSURE)))

    def _start_close(self, code: int, reason: str, notice: str | None = None) -> None:
        """Queue our close frame (with ``notice``, the reason the peer reads)
        after what is buffered; close once it is sent (CLOSING: the core sends
        nothing after it, and pings stop)."""
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._out += self.ws.send(CloseConnection(code, notice))
        self._cancel_timer("ping")
        self.close_after_flush(reason, CLOSE_TIMEOUT)

    # -- access -------------------------------------------------------------

    def reauthorize(self, tokens: Tokens) -> None:
        """The token files were read again (a reload): this session keeps its
        rights only if the token it opened with still grants them. If it no
        longer matches (revoked, rotated), or no longer allows writing to a
        session that writes, the session loses its write right at once (what
        it sends from now on is discarded and counted) and is closed with 1008
        and a reason; it may reconnect with a valid token."""
        if not tokens.configured or self.state is State.CLOSED or self._revoked:
            return
        found = tokens.match(self._secret)
        if found is None:
            why = "token revoked"
        elif not self.read_only and self.cfg.writable and not scope_allows(found[1], "write"):
            why = "token no longer allows writing"
        else:
            return
        self.read_only = self._revoked = True
        log.warning("%s: %s: WebSocket closed after a reload: %s", self.cfg.name, self.peer, why)
        self._start_close(CloseReason.POLICY_VIOLATION, why, why)

    def _ping(self) -> None:
        if self._awaiting_pong:
            self.close("ping timeout")
            return
        self._awaiting_pong = True
        self._out += self.ws.send(Ping(b"muxd"))
        self._set_timer("ping", self.ping_interval, self._ping)
        self.on_data()

    # -- input --------------------------------------------------------------

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
                if self.read_only:
                    self.hub.writes.discarded += len(payload)  # as hub.submit does for a ro reader
                else:
                    self.hub.writes.submit(self.reader, payload)
            elif isinstance(event, Ping):
                self._out += self.ws.send(event.response())
            elif isinstance(event, Pong):
                self._awaiting_pong = False
            elif isinstance(event, CloseConnection):
                # Still OPEN means wsproto found a protocol error and reports it as
                # a close; otherwise the peer closed and this answers it.
                broken = self.ws.state is ConnectionState.OPEN
                self._start_close(answer_code(event.code), "protocol error" if broken else "peer closed")
                return
        self.on_data()
