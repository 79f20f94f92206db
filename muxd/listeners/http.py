"""The HTTP front, with h11, inside the one event loop.

An HttpFront owns one listening socket (bound from the config's ``http:``
entry, or passed in by socket activation under its ``name``). Each
connection is an h11 state machine fed from the socket: requests are
answered at once from memory, one at a time (a pipelined request waits until
the previous response has been handed to the kernel, so input is not read
while output is pending), and the connection is kept alive until the peer
closes, asks to close, or idles.

Limits: the request line and headers must fit in HEADER_LIMIT (h11's
max_incomplete_event_size; 431 otherwise), a body in BODY_LIMIT (413), and a
request must arrive within IDLE_TIMEOUT of the connection or of the last
response (408 if one was begun, a quiet close if none). Anything h11 cannot
parse is the peer's RemoteProtocolError: a 400 and a close, for that peer only.

Routes: ``/`` and the console's files (muxd/web, package data), ``/metrics``,
``/api/v1/...`` (muxd.api) and ``/ws/<port>``, where an accepted upgrade
hands the socket to a WebSocketClient (muxd.listeners.websocket).

Admin actions (POST .../disconnect) are allowed from a loopback peer that
presents no credentials, or to anyone presenting ``Authorization: Bearer
<token>`` when the server has a token; a wrong token is refused even from
loopback. A browser request from a foreign Origin is refused too, so a web
page cannot make the operator's browser act on a loopback-trusting muxd.
"""

from __future__ import annotations

import contextlib
import hmac
import http
import ipaddress
import itertools
import json
import logging
import socket
import urllib.parse
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

import h11

from muxd import api, metrics
from muxd.config import HttpServer, format_hostport
from muxd.listeners.acceptor import Acceptor, bind_tcp
from muxd.listeners.stream import CLOSE_DRAIN
from muxd.listeners.websocket import (
    HandshakeError,
    Upgrade,
    WebSocketClient,
    header,
    origin_allowed,
    upgrade,
)
from muxd.port import PortRuntime
from muxd.reactor import ERRMASK, IN, OUT, Reactor

log = logging.getLogger("muxd.http")

# Request line + headers: browsers send 1-2 KiB; 16 KiB is nginx's and
# Apache's order of magnitude and leaves room for big cookies on a shared host.
HEADER_LIMIT = 16 * 1024
# No route reads a body; this much is accepted (and ignored) for clients that
# always send one, such as "{}" with a POST.
BODY_LIMIT = 4 * 1024
# A keep-alive connection may idle this long; a request must be complete
# within it. Long enough for the console's 2 s poll, short enough that idle
# or slow-loris connections do not pile up.
IDLE_TIMEOUT = 30.0
# Bytes taken from a socket per wake-up: a whole ordinary request, while
# the input that can wait unparsed stays bounded (see HEADER_LIMIT).
READ_SIZE = 16 * 1024
# Plain HTTP connections per server (WebSocket readers count against their
# listener's max_clients instead): a console tab holds a few.
MAX_CONNECTIONS = 512
# Buffers per sendmsg: a response is at most headers, body and end.
SEND_VIEWS = 8

WEB = resources.files("muxd").joinpath("web")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    "": "text/plain; charset=utf-8",  # LICENSE, VERSIONS
}
# The console's files, read once: package data does not change while we run,
# and every connection then sends the same bytes without a copy.
_web_cache: dict[str, bytes] = {}


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_reply(status: int, obj: Any) -> Reply:
    return Reply(status, json.dumps(obj).encode() + b"\n", "application/json")


def error_reply(status: int, message: str, api_path: bool) -> Reply:
    if api_path:
        return json_reply(status, {"error": message})
    return Reply(status, f"{status} {http.HTTPStatus(status).phrase}: {message}\n".encode())


def web_file(segments: list[str]) -> Reply | None:
    """A file of the console, or None; never anything outside muxd/web."""
    if any(s in ("", ".", "..") or s.startswith(".") or "/" in s or "\\" in s or "\0" in s for s in segments):
        return None
    content_type = CONTENT_TYPES.get(PurePosixPath(segments[-1]).suffix)
    if content_type is None:
        return None
    rel = "/".join(segments)
    body = _web_cache.get(rel)
    if body is None:
        node = WEB.joinpath(*segments)
        if not node.is_file():
            return None
        body = _web_cache[rel] = node.read_bytes()
    return Reply(200, body, content_type, [("cache-control", "no-cache")])


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class HttpFront:
    def __init__(
        self,
        cfg: HttpServer,
        ports: Callable[[], Mapping[str, PortRuntime]],
        reactor: Reactor,
        sock: socket.socket | None = None,
    ) -> None:
        self.cfg = cfg
        self.ports = ports
        self.reactor = reactor
        self.registry = metrics.make_registry(lambda: ports().values(), reactor)
        self.connections: set[HttpConnection] = set()
        self.clients: set[WebSocketClient] = set()  # WebSocket readers, for the daemon's shutdown
        self._sock = sock  # passed in by socket activation, or bound in start()
        self._acceptor: Acceptor | None = None

    # -- listening -------------------------------------------------------------

    def start(self) -> None:
        sock = self._sock or bind_tcp(self.cfg.host, self.cfg.port)
        self._sock = None  # the acceptor owns it from here
        self._acceptor = Acceptor(self.cfg.name, sock, self.reactor, self._on_connection)
        self._acceptor.start()
        log.info(
            "%s: web console at http://%s/", self.cfg.name, format_hostport(self.cfg.host, self.cfg.port)
        )

    def stop(self) -> None:
        """Stop accepting and close plain HTTP connections; WebSocket readers
        (``clients``) are left to the caller to finish."""
        if self._acceptor is not None:
            self._acceptor.stop()
        for conn in list(self.connections):
            conn.close()

    def finish_orphans(self) -> None:
        """After a reload: finish WebSockets whose port or websocket listener is gone."""
        ports = self.ports()
        for client in list(self.clients):
            rt = ports.get(client.hub.name)
            listener = api.websocket_listener(rt.hub) if rt is not None and rt.hub is client.hub else None
            if listener is None or listener.name != client.reader.listener.name:
                client.finish()

    def _on_connection(self, conn: socket.socket, addr: object) -> None:
        host, port = addr[0], addr[1]  # type: ignore[index]
        if len(self.connections) >= MAX_CONNECTIONS:
            log.warning("%s: refused %s: %d connections open", self.cfg.name, host, MAX_CONNECTIONS)
            conn.close()
            return
        self.connections.add(HttpConnection(self, conn, str(host), format_hostport(host, port)))

    # -- routing ------------------------------------------------------------------

    def handle(self, request: h11.Request, peer_host: str) -> Reply | Upgrade:
        target = urllib.parse.urlsplit(request.target.decode("ascii", "replace"))
        parts = [urllib.parse.unquote(p) for p in target.path.split("/")[1:]]
        method = request.method.decode("ascii", "replace")
        api_path = parts[:2] == ["api", "v1"]
        try:
            if parts and parts[0] == "ws" and len(parts) == 2:
                return self._websocket(request, parts[1])
            if api_path:
                return self._api(method, parts[2:], request, peer_host)
            if method not in ("GET", "HEAD"):
                return Reply(405, b"405 Method Not Allowed\n", headers=[("allow", "GET, HEAD")])
            if parts == ["metrics"]:
                return Reply(200, metrics.render(self.registry), metrics.CONTENT_TYPE)
            reply = web_file(["index.html"] if parts == [""] else parts) if parts else None
            return reply or error_reply(404, "no such page", False)
        except HandshakeError as exc:
            reply = error_reply(exc.status, str(exc), False)
            reply.headers += [(k.decode(), v.decode()) for k, v in exc.headers]
            return reply

    def _websocket(self, request: h11.Request, name: str) -> Reply | Upgrade:
        rt = self.ports().get(name)
        listener = api.websocket_listener(rt.hub) if rt is not None else None
        if rt is None or listener is None:
            return error_reply(404, f"no port {name!r} with a websocket listener", False)
        return upgrade(request, rt.hub, listener, self.cfg.origins)

    def _api(self, method: str, parts: list[str], request: h11.Request, peer_host: str) -> Reply:
        ports = self.ports()
        if not parts or parts[0] != "ports":
            return error_reply(404, "no such resource", True)
        rt = ports.get(parts[1]) if len(parts) > 1 else None
        hub = rt.hub if rt is not None else None
        if len(parts) > 1 and hub is None:
            return error_reply(404, f"no port {parts[1]!r}", True)
        if len(parts) == 5 and parts[2] == "clients" and parts[4] == "disconnect":
            assert hub is not None
            if method != "POST":
                return Reply(405, b"405 Method Not Allowed\n", headers=[("allow", "POST")])
            refusal = self._admin_refusal(request, peer_host)
            if refusal:
                return error_reply(403, refusal, True)
            if not parts[3].isdigit() or not api.disconnect(hub, int(parts[3])):
                return error_reply(404, f"no client {parts[3]!r} on port {hub.name!r}", True)
            log.info("%s: client %s disconnected by admin request from %s", hub.name, parts[3], peer_host)
            return json_reply(200, {"ok": True})
        if method not in ("GET", "HEAD"):
            return Reply(405, b"405 Method Not Allowed\n", headers=[("allow", "GET, HEAD")])
        if len(parts) == 1:
            reply = json_reply(200, api.ports_view(ports.values()))
        elif len(parts) == 3 and parts[2] == "clients":
            assert hub is not None
            reply = json_reply(200, api.clients_view(hub))
        else:
            return error_reply(404, "no such resource", True)
        reply.headers.append(("cache-control", "no-store"))
        return reply

    def _admin_refusal(self, request: h11.Request, peer_host: str) -> str | None:
        if not origin_allowed(header(request, b"origin"), header(request, b"host"), self.cfg.origins):
            return "origin not allowed"
        auth = header(request, b"authorization")
        if auth is None:
            return None if is_loopback(peer_host) else "admin actions need a loopback peer or a token"
        token = self.cfg.token
        if token is None or not hmac.compare_digest(auth.encode(), f"Bearer {token}".encode()):
            return "wrong credentials"
        return None


class HttpConnection:
    def __init__(self, front: HttpFront, sock: socket.socket, peer_host: str, peer: str) -> None:
        self.front = front
        self.reactor = front.reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_host = peer_host
        self.peer = peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=HEADER_LIMIT)
        self.closed = False
        self._out: deque[memoryview] = deque()  # at most one response: see _process()
        self._close_when_sent = False
        self._request: h11.Request | None = None
        self._body = 0
        self._received = 0  # bytes since the last response: tells idle from a slow request
        sock.setblocking(False)
        self._timer = self.reactor.call_later(IDLE_TIMEOUT, self._on_timeout)
        self.reactor.add(self.fd, IN, self._on_events, self._on_internal_error)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        self.reactor.remove(self.fd)
        self.front.connections.discard(self)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            for _ in range(CLOSE_DRAIN // 4096):
                if not self.sock.recv(4096):
                    break
        self.sock.close()

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
                length = header(event, b"content-length")
                # h11 bounds only what is still incomplete; a whole head that
                # came in one read is measured here.
                if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > HEADER_LIMIT:
                    self._fail(431, f"request head over {HEADER_LIMIT} bytes")
                elif length is not None and length.isdigit() and int(length) > BODY_LIMIT:
                    self._fail(413, f"a body of {length} bytes is over the limit of {BODY_LIMIT}")
            elif isinstance(event, h11.Data):
                self._body += len(event.data)
                if self._body > BODY_LIMIT:
                    self._fail(413, f"a body over the limit of {BODY_LIMIT} bytes")
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
            else:  # ConnectionClosed, or PAUSED in a state we never leave it in
                self.close()
        self._watch()

    def _dispatch(self) -> None:
        request = self._request
        assert request is not None
        result = self.front.handle(request, self.peer_host)
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
        client = WebSocketClient(self.sock, self.peer, result, self.reactor, self.h11.trailing_data[0])
        if not client.closed:
            self.front.clients.add(client)
            client.on_close.append(self.front.clients.discard)

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
            self._timer.cancel()
            self._timer = self.reactor.call_later(IDLE_TIMEOUT, self._on_timeout)

    def _send(self, event: h11.Event) -> None:
        for chunk in self.h11.send_with_data_passthrough(event) or ():
            if chunk:
                self._out.append(memoryview(chunk))

    def _fail(self, status: int, message: str) -> None:
        """Answer an error the peer caused (if a response can still be sent), then close."""
        log.debug("%s: %s: %d %s", self.front.cfg.name, self.peer, status, message)
        self._close_when_sent = True
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not self._out:
            request = self._request if self.h11.our_state is h11.SEND_RESPONSE else None
            self._respond(request, error_reply(status, message, False))
            self._flush()
        else:
            self.close()

    def _flush(self) -> None:
        out = self._out
        while out:
            try:
                n = self.sock.sendmsg(list(itertools.islice(out, SEND_VIEWS)))
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
        if not out and self._close_when_sent:
            self.close()

    def _watch(self) -> None:
        if not self.closed:
            self.reactor.modify(self.fd, OUT if self._out else IN)

    def _on_timeout(self) -> None:
        if self._out or (self.h11.their_state is h11.IDLE and not self._received):
            self.close()  # idle, or not reading its response
        else:
            self._fail(408, f"no complete request within {IDLE_TIMEOUT:g}s")

    def _on_internal_error(self, _exc: BaseException) -> None:
        self.close()
