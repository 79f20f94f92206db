"""`muxd tail`: follow a port from the shell, the `tail -f` of a serial console.

Theory of operation
    A running muxd serves every port's stream at ``/ws/<port>`` on its HTTP
    front (muxd.listeners.websocket). This is a client of that: one TCP
    socket (TLS on it for https://, as muxd.apiclient sets up for every
    command), blocking with a timeout, and wsproto as a sans-I/O WebSocket
    client on top of it. The query string asks for the format (``raw``,
    ``text``: an ISO 8601 UTC stamp per line, ``jsonl``: one JSON object per
    line) and for the history to replay first (``history=BYTES``,
    ``history_lines=N``); what is not asked for is the listener's own
    setting. Each frame's payload goes to standard output as it arrives and
    is flushed at once, so a pipe sees the port live.

    The loop waits in poll() on two things (but first takes what TLS has
    already decrypted, which poll() cannot see): the socket (data, pings, the
    server's close) and standard output registered for no events at all, so
    that only an error or hang-up is reported for it. A pipe whose reader has
    gone reports POLLERR: `muxd tail dut | head -3` ends as soon as head
    does, even on a quiet port, instead of at the next line the device sends.

    A slow consumer of standard output (a paused pager) stops this loop
    reading the socket; the backlog then builds up in muxd, where the
    listener's ``buffer`` and ``overflow`` policy bound it, never here.

Endings
    The server's close frame is answered and ends the tail normally, as does
    the end of the TCP stream; an unusual close code (muxd's overflow or admin
    disconnect, say) is returned so the command line can say why. No refusal
    is retried: a socket that cannot be connected, a certificate not trusted,
    or a handshake the server refuses (an unknown port is a 404), raises
    Unreachable; a refusal for want of a token (401, 403) raises
    apiclient.Unauthorised. muxd pings every
    reader every HttpTimeouts.ping seconds, so a connection silent for
    IDLE_TIMEOUT has lost its server (a cable pulled, a host gone), which
    raises Lost. Ctrl-C sends a close frame, as a courtesy bounded by
    CLOSE_TIMEOUT, and lets the KeyboardInterrupt through to the command
    line, which exits 130; a closed standard output is a BrokenPipeError,
    which it turns into 141.

Light on purpose: what a shell pipeline starts should start at once, so
nothing here imports the config module (PyYAML) or the daemon's side.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import BinaryIO

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from muxd import apiclient
from muxd.apiclient import Endpoint

# Connecting, TLS and the upgrade together: muxd answers a handshake from
# memory, so a server slower than this is not going to answer.
CONNECT_TIMEOUT = 5.0
# muxd pings every WebSocket reader this often: HttpTimeouts.ping, written
# here rather than imported, which would load the daemon's HTTP side (a test
# keeps the two equal).
SERVER_PING = 20.0
# Three of muxd's pings missed: the server or the path to it is gone.
IDLE_TIMEOUT = 3 * SERVER_PING
# The most a send (a pong, our close) may block on a server that stopped reading.
SEND_TIMEOUT = 5.0
# After Ctrl-C the operator wants the prompt back: the close frame is a courtesy.
CLOSE_TIMEOUT = 0.5
# Bytes per recv(). wsproto hands out frame payloads as they arrive, not whole
# frames, so its buffer holds at most one read plus a frame header; the upgrade
# response is held by h11, bounded by its 16 KiB limit on an incomplete head.
RECV_SIZE = 64 * 1024
# Characters kept of a refusal's body for the one-line error: muxd's are a
# sentence; anything longer is not meant for a terminal.
MAX_REASON = 200

_POLL_IN = select.POLLIN | select.POLLPRI


class Unreachable(apiclient.Unreachable):
    """No tail: the socket did not connect, or the server refused the upgrade."""


class Lost(apiclient.ApiError):
    """The server went silent (no data and no ping for IDLE_TIMEOUT)."""


@dataclass(frozen=True)
class Target:
    """Where to connect, how, and what to ask for."""

    host: str
    port: int
    host_header: str  # the Host muxd checks against its own names (DNS rebinding)
    path: str  # the request target: /ws/<port>?query
    context: ssl.SSLContext | None = None  # TLS (wss://) when set
    token: str | None = None

    @property
    def url(self) -> str:
        return f"{'wss' if self.context else 'ws'}://{self.host_header}{self.path}"


def target(
    ep: Endpoint | str,
    port_name: str,
    fmt: str | None = None,
    history: int | None = None,
    lines: int | None = None,
) -> Target:
    """The WebSocket of `port_name` on the HTTP server `ep` (or a base URL,
    as muxd.apiclient.normalize_url gives it). Raises ValueError for a URL
    that cannot be followed."""
    if isinstance(ep, str):
        ep = Endpoint(ep, apiclient.client_context() if ep.startswith("https:") else None)
    parts = ep.parts
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{ep.url}: not an http:// or https:// URL")
    if parts.scheme == "https" and ep.context is None:
        raise ValueError(f"{ep.url}: https without a TLS context")
    if not parts.hostname:
        raise ValueError(f"{ep.url}: no host")
    if not port_name:
        raise ValueError("the port name is empty")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    query: dict[str, str] = {}
    if fmt is not None:
        query["format"] = fmt
    if history is not None:
        query["history"] = str(history)
    if lines is not None:
        query["history_lines"] = str(lines)
    # A base path is kept: behind a reverse proxy muxd may live under a prefix.
    path = f"{parts.path.rstrip('/')}/ws/{urllib.parse.quote(port_name, safe='')}"
    if query:
        path += "?" + urllib.parse.urlencode(query)
    # The URL's own host[:port] is the Host header, as any HTTP client sends it.
    host_header = parts.netloc.rpartition("@")[2]
    return Target(
        parts.hostname, port, host_header, path, ep.context if parts.scheme == "https" else None, ep.token
    )


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(RECV_SIZE)
    except ConnectionResetError:  # the server's reset is an end of stream like any other
        return b""


def _feed(ws: WSConnection, data: bytes, where: Target) -> list[Event]:
    try:
        ws.receive_data(data)
        return list(ws.events())
    except RemoteProtocolError as exc:
        raise Unreachable(f"{where.url}: not a WebSocket answer: {exc}") from None


def _handshake(sock: socket.socket, ws: WSConnection, where: Target, deadline: float) -> list[Event]:
    """Send the upgrade and read its answer by the deadline; return the
    events that came after the acceptance in the same reads (first frames)."""
    token = where.token
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    sock.sendall(ws.send(Request(host=where.host_header, target=where.path, extra_headers=headers)))
    refused: RejectConnection | None = None
    body = bytearray()
    finished = False
    while not finished:  # bounded by the deadline, whatever the server trickles
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(left)
        data = _recv(sock)
        if not data:
            if refused is not None:  # a refusal's body may end with the connection
                break
            raise Unreachable(f"{where.url}: the server closed the connection during the upgrade")
        for i, event in enumerate(events := _feed(ws, data, where)):
            if isinstance(event, AcceptConnection):
                return events[i + 1 :]
            if isinstance(event, RejectConnection):
                refused, finished = event, not event.has_body
            elif isinstance(event, RejectData):
                body += event.data[: max(0, MAX_REASON - len(body))]
                finished = event.body_finished
    assert refused is not None  # the loop ends only on a refusal
    lines = bytes(body).decode("utf-8", "replace").strip().splitlines()
    why = lines[0] if lines else ""
    if refused.status_code in (401, 403):
        raise apiclient.Unauthorised(refused.status_code, why.removeprefix(str(refused.status_code)).strip())
    if not why.startswith(str(refused.status_code)):  # muxd's bodies begin with the status already
        why = f"HTTP {refused.status_code}" + (f": {why}" if why else "")
    raise Unreachable(f"{where.url}: refused: {why}")


def _write(out: BinaryIO, event: TextMessage | BytesMessage) -> None:
    if isinstance(event, TextMessage):  # jsonl records: UTF-8 by construction
        out.write(event.data.encode("utf-8", "surrogateescape"))
    else:
        out.write(event.data)


def follow(where: Target, out: BinaryIO, out_fd: int | None = None) -> CloseConnection | None:
    """Copy the port's stream to `out` until the server closes or the stream ends.

    Returns the server's close when it was not an ordinary one (1000, 1001),
    else None. `out_fd` is watched for a reader that went away (see the module
    docstring); a write to it then raises BrokenPipeError as usual.
    Raises Unreachable, apiclient.Unauthorised, Lost, BrokenPipeError and KeyboardInterrupt.
    """
    deadline = time.monotonic() + CONNECT_TIMEOUT
    try:
        sock = socket.create_connection((where.host, where.port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise Unreachable(f"cannot connect to {where.url}: {exc.strerror or exc}") from None
    if where.context is not None:
        try:  # the handshake runs in wrap_socket, under the connect timeout
            sock = where.context.wrap_socket(sock, server_hostname=where.host)
        except (OSError, ssl.SSLError) as exc:  # an untrusted certificate is one
            sock.close()
            raise Unreachable(f"{where.url}: no TLS: {getattr(exc, 'reason', None) or exc}") from None
    ws = WSConnection(ConnectionType.CLIENT)
    with sock:
        try:
            try:
                pending = _handshake(sock, ws, where, deadline)
            except OSError as exc:  # a timeout, or a reset mid-handshake
                raise Unreachable(f"{where.url}: no WebSocket upgrade: {exc.strerror or exc}") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # pongs are tiny and late ones cost
            sock.settimeout(SEND_TIMEOUT)
            return _stream(sock, ws, where, out, out_fd=out_fd, pending=pending)
        except KeyboardInterrupt:
            _say_goodbye(sock, ws)
            raise


def _stream(
    sock: socket.socket,
    ws: WSConnection,
    where: Target,
    out: BinaryIO,
    *,
    out_fd: int | None,
    pending: list[Event],
) -> CloseConnection | None:
    poller = select.poll()
    poller.register(sock, _POLL_IN)
    if out_fd is not None:
        poller.register(out_fd, 0)  # errors and hang-ups only: see the module docstring
    events = pending
    while True:  # each turn waits at most IDLE_TIMEOUT, and a silent one ends it
        for event in events:
            if isinstance(event, (TextMessage, BytesMessage)):
                _write(out, event)
            elif isinstance(event, Ping):
                sock.sendall(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                out.flush()
                if ws.state is ConnectionState.REMOTE_CLOSING:  # answer it, as RFC 6455 asks
                    with contextlib.suppress(OSError, LocalProtocolError):
                        sock.sendall(ws.send(event.response()))
                ordinary = event.code in (CloseReason.NORMAL_CLOSURE, CloseReason.GOING_AWAY)
                return None if ordinary else event
        out.flush()
        # Records TLS has decrypted already are not in the socket any more: poll() would wait past them.
        held = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
        ready = [(sock.fileno(), select.POLLIN)] if held else poller.poll(IDLE_TIMEOUT * 1000)
        if not ready:
            raise Lost(f"{where.url}: nothing from the server for {IDLE_TIMEOUT:.0f}s, not even a ping")
        if any(fd != sock.fileno() for fd, _ in ready):
            raise BrokenPipeError("standard output was closed")
        data = _recv(sock)
        if not data:  # the end of the stream without a close frame: still an end
            return None
        try:
            ws.receive_data(data)
            events = list(ws.events())
        except RemoteProtocolError as exc:
            raise Lost(f"{where.url}: broken WebSocket stream: {exc}") from None


def _say_goodbye(sock: socket.socket, ws: WSConnection) -> None:
    """A close frame on Ctrl-C, if it goes at once: the daemon then logs a
    clean close rather than a reset."""
    if ws.state is not ConnectionState.OPEN or sock.fileno() < 0:
        return
    with contextlib.suppress(OSError, LocalProtocolError):
        sock.settimeout(CLOSE_TIMEOUT)
        sock.sendall(ws.send(CloseConnection(CloseReason.NORMAL_CLOSURE)))
