"""WebSocket readers at /ws/<port>, with wsproto: the handshake's checks.

The WebSocket itself (the 101, WebSocketClient) is muxd.listeners.wsclient,
imported at the first upgrade accepted: wsproto imports hashlib, and with it
libcrypto (3.6 MiB), which a daemon without WebSocket clients never needs
(memory: docs/benchmarks.md). The sections below describe both halves.

Handshake
    The HTTP connection has already parsed the request with h11. upgrade()
    checks the Origin against the server's allow-list (same-origin, i.e. an
    Origin whose host:port equals the Host header, is always allowed; "*"
    allows any; a request with no Origin is not from a browser and is
    allowed), the listener's max_clients and the query, then lets wsproto's
    H11Handshake validate the upgrade headers and write the 101 response. A
    refusal is an ordinary HTTP error response (403, 400, 426, 503), never a
    WebSocket that is opened only to be closed. Same-origin is only as good
    as Host: the HTTP front has already refused (421) a Host that does not
    name the server, which is what stops DNS rebinding. The query is split by
    hand and bounded (MAX_QUERY_FIELDS fields, MAX_HISTORY_DIGITS digits), so
    no target makes urlsplit, parse_qs or int() raise.

Output
    A WebSocketClient is the connection core (muxd.connection) with wsproto
    as its encoder: one frame of at most FRAME_PAYLOAD device bytes at a
    time, taken from the hub only while the core's small output buffer is
    below its low-water mark. Any backlog beyond that stays in the hub as the
    reader's lag, where the listener's ``buffer`` and ``overflow`` policy
    govern it exactly as for a TCP client.

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
    device if the listener is rw, through the hub's writes (muxd.writes), so a full
    write queue stops this socket being read (backpressure); discarded and
    counted if it is ro. A message over MAX_MESSAGE closes with 1009.

Keepalive and close
    A ping every ``ping_interval`` (the HTTP front's timeouts); no pong by the next one closes the
    connection (1011). A close we start (shutdown 1001, protocol error 1002,
    message too big 1009) is queued after what is already buffered, flushed,
    then the TCP connection is shut down; the peer's close is answered the
    same way.

Access
    The HTTP front checks the listener's allow-list and the token before
    calling upgrade() (muxd.access). A client that offers the subprotocol
    ``muxd`` (a browser presenting its token as ``bearer.<base64url>`` next
    to it) gets ``muxd`` selected, as browsers fail a handshake that selects
    none of the offered protocols. A WebSocket accepted with a read-scoped
    token on a rw listener is read-only: each message is discarded and added
    to the port's discarded-input count, exactly as on a ro listener.
"""

from __future__ import annotations

import logging
import sys
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from muxd.access import WS_PROTOCOL, Tokens, presented, ws_protocols
from muxd.config import Listener
from muxd.connection import Connection
from muxd.errors import RemoteProtocolError
from muxd.hub import Hub
from muxd.records import FORMATS, Format

if TYPE_CHECKING:
    import h11
    from wsproto.connection import Connection as WsConnection

log = logging.getLogger("muxd.listener")

# Device bytes per frame: 8 KiB is most of a second at 115200 baud, so frames
# stay few, and small enough that one frame never delays a ping for long.
FRAME_PAYLOAD = 8 * 1024
# (The output buffer's marks are the core's: muxd.connection.LOW_WATER; with a
# frame of JSON, where a stray byte is the 6-character escape \udcNN, it holds
# under 100 KiB, small next to the hub backlog it keeps bounded.)
# The largest message a client may send: far more than any typed or pasted
# command; more is not a console's traffic and would only fill the write queue.
MAX_MESSAGE = 64 * 1024
# Time to flush our close frame to a peer that has stopped reading.
CLOSE_TIMEOUT = 5.0

# ?history=N: any N past the port's history is capped to it, so 18 digits (an
# int64's worth, far beyond any ring) lose nothing, and int() never sees the
# thousands of digits it refuses.
MAX_HISTORY_DIGITS = 18
# Query fields parsed: the handshake reads two; a query of thousands of
# "&a=&a=" is refused instead of parsed into a dict of lists.
MAX_QUERY_FIELDS = 16


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
    connection: WsConnection
    hub: Hub
    listener: Listener
    options: WsOptions
    read_only: bool = False  # a read-scoped token on a rw listener: input discarded
    # The secret presented, checked again on reload (reauthorize); never shown.
    secret: str | None = field(default=None, repr=False)
    token: str | None = None  # its name, shown as the write lock's holder (muxd.api)


@dataclass(frozen=True)
class WsOptions:
    """What a client asked for in the query string."""

    json_format: bool = False  # ?format=json: per-frame JSON of the raw stream
    fmt: Format | None = None  # ?format=raw|text|jsonl: the records; None: the listener's
    history: int | None = None  # ?history=BYTES; None: the listener's
    history_lines: int = 0  # ?history_lines=N


def header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1")
    return None


def ascii_int(text: str, max_digits: int) -> int | None:
    """A non-negative decimal of at most max_digits ASCII digits, or None.

    str.isdigit() alone is not a parse check: it is true for "\u00b2" (which
    int() refuses) and for 5,000 digits (which int() refuses past 4,300)."""
    if not (0 < len(text) <= max_digits and text.isascii() and text.isdigit()):
        return None
    return int(text)


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    if origin is None or "*" in allowed:
        return True
    origin = origin.lower().rstrip("/")
    if origin in (a.lower().rstrip("/") for a in allowed):
        return True
    # A serialised origin is scheme "://" host [":" port] (RFC 6454), nothing
    # more; split by hand, as urlsplit raises on a stray "[" in the host.
    scheme, sep, netloc = origin.partition("://")
    return host is not None and bool(sep and scheme) and netloc == host.lower()


def parse_options(target: bytes) -> WsOptions:
    """The client's options, from the query string."""
    # The query is what follows the first "?" (RFC 3986 section 3.4), in any
    # target form; urlsplit is not used because it raises on "//[" paths.
    query_text = target.decode("ascii", "replace").partition("?")[2].partition("#")[0]
    try:
        query = urllib.parse.parse_qs(query_text, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:  # parse_qs's only complaint: more than max_num_fields
        raise HandshakeError(f"a query of more than {MAX_QUERY_FIELDS} fields", 400) from None
    fmt = query.get("format", [""])[-1]
    if fmt not in ("", "binary", "json", *FORMATS):
        raise HandshakeError(f"format must be binary, json, raw, text or jsonl, got {fmt[:64]!r}", 400)
    numbers: dict[str, int | None] = {}
    for key in ("history", "history_lines"):
        text = query.get(key, [None])[-1]
        numbers[key] = None if text is None else ascii_int(text, MAX_HISTORY_DIGITS)
        if text is not None and numbers[key] is None:
            raise HandshakeError(f"{key} must be a number, at most {MAX_HISTORY_DIGITS} digits", 400)
    return WsOptions(
        json_format=fmt == "json",
        fmt=fmt if fmt in FORMATS else ("raw" if fmt == "binary" else None),
        history=numbers["history"],
        history_lines=numbers["history_lines"] or 0,
    )


def upgrade(
    request: h11.Request,
    hub: Hub,
    cfg: Listener,
    origins: tuple[str, ...],
    *,
    read_only: bool = False,
    token: str | None = None,
) -> Upgrade:
    """Accept a WebSocket for this hub's websocket listener, or raise HandshakeError."""
    if request.method != b"GET":
        raise HandshakeError("a WebSocket upgrade must be a GET", 405, ((b"allow", b"GET"),))
    if not origin_allowed(header(request, b"origin"), header(request, b"host"), origins):
        raise HandshakeError(f"origin {header(request, b'origin')!r} is not allowed", 403)
    options = parse_options(request.target)
    if hub.clients_of(cfg.name) >= cfg.max_clients:
        hub.stats_for(cfg.name).rejected += 1
        raise HandshakeError(f"{cfg.name}: max_clients ({cfg.max_clients}) reached", 503)
    # memory: wsproto (and libcrypto, through hashlib) at the first upgrade (docs/benchmarks.md)
    from muxd.listeners.wsclient import handshake

    protocols = offered(request)
    subprotocol = WS_PROTOCOL if WS_PROTOCOL in protocols else None
    response, connection = handshake(request, subprotocol)
    secret = presented(header(request, b"authorization"), protocols)
    return Upgrade(response, connection, hub, cfg, options, read_only, secret, token)


def offered(request: h11.Request) -> list[str]:
    """The subprotocols a WebSocket request offers, in order."""
    return ws_protocols(v.decode("latin-1") for k, v in request.headers if k == b"sec-websocket-protocol")


def reauthorize(clients: Iterable[Connection], tokens: Tokens) -> None:
    """After a reload re-read the token files: each WebSocket's token checked
    again (WebSocketClient.reauthorize), so a revoked one ends its sessions."""
    # Not loaded yet (memory: docs/benchmarks.md) means no upgrade was accepted: no WebSocket.
    wsclient = sys.modules.get("muxd.listeners.wsclient")
    if wsclient is None:
        return
    for client in list(clients):
        if isinstance(client, wsclient.WebSocketClient):
            client.reauthorize(tokens)
