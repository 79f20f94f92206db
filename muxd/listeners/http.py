"""The HTTP front, with h11, inside the one event loop.

An HttpFront owns one listening socket (bound from the config's ``http:``
entry, or passed in by socket activation under its ``name``). Each
connection is an h11 state machine fed from the socket: requests are
answered at once from memory, one at a time (a pipelined request waits until
the previous response has been handed to the kernel, so input is not read
while output is pending), and the connection is kept alive until the peer
closes, asks to close, or idles.

Limits: the request line and headers must fit in HEADER_LIMIT (h11's
max_incomplete_event_size; 431 otherwise), a body in BODY_LIMIT (413). A new
connection must deliver a whole request within HttpTimeouts.header, and so must each
later request from its first byte, while a kept-alive connection may idle
HttpTimeouts.idle between requests (408 if a request was begun, a quiet close if
none). Anything h11 cannot parse is the peer's RemoteProtocolError: a 400 and a
close, for that peer only; so is a request with both Content-Length and
Transfer-Encoding (RFC 9112 section 6.1: a smuggling vector, answered and
closed). A server holds at most MAX_CONNECTIONS plain HTTP connections, and at
most MAX_PER_PEER from one peer address, so one host's idle sockets cannot
lock the others out. A host with many addresses (loopback has 16 million) can
still fill the server: then a newcomer takes the place of the oldest
connection of the address holding the most, so every address keeps a fair
share. Refusals are logged through a LogLimiter (one line per peer and kind
per minute, muxd.ratelimit).

Host: DNS rebinding makes a browser send a hostile page's requests to muxd
with the hostile name in Host, and with an Origin that matches it. So every
request's Host (or an absolute-form target's authority) must name the server:
``localhost``, ``127.0.0.1`` or ``[::1]``, the host of the ``listen`` address
(its literal, even a wildcard's), or the address the socket is really bound to,
each with the port; or one of the config's ``server_names`` (a bare name
matches any port: behind a proxy, Host carries the proxy's port). Another Host
gets 421 Misdirected Request, on every route; a malformed or repeated one, 400.
The target is split by hand (origin-form or absolute-form), path segments are
looked up in an index of the console's files built once, and numbers are parsed
with a bound on their digits, so no crafted path reaches the file system or
int() with something they raise on.

Routes: ``/`` and the console's files (muxd/web, package data), ``/metrics``,
``/api/v1/...`` (muxd.api) and ``/ws/<port>``, where an accepted upgrade
hands the socket to a WebSocketClient (muxd.listeners.websocket).

Admin actions (POST .../disconnect) are allowed from a loopback peer that
presents no credentials, or to anyone presenting ``Authorization: Bearer
<token>`` when the server has a token; a wrong token is refused even from
loopback. A browser request from a foreign Origin is refused too, so a web
page cannot make the operator's browser act on a loopback-trusting muxd. The
console's files carry ``X-Frame-Options: DENY`` and CSP ``frame-ancestors
'none'``, so no other site can frame it and trick clicks into it.
"""

from __future__ import annotations

import hmac
import http
import ipaddress
import itertools
import json
import logging
import re
import socket
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import h11

from muxd import api, metrics
from muxd.config import HttpServer, format_hostport
from muxd.connection import Connection
from muxd.listeners.acceptor import Acceptor, bind_tcp
from muxd.listeners.websocket import (
    HandshakeError,
    Upgrade,
    WebSocketClient,
    ascii_int,
    header,
    origin_allowed,
    upgrade,
)
from muxd.port import PortRuntime
from muxd.ratelimit import LogLimiter
from muxd.reactor import ERRMASK, IN, OUT, Reactor
from muxd.transport import graceful_close

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; this alias is 3.9..3.13
    from importlib.abc import Traversable

log = logging.getLogger("muxd.http")

# Request line + headers: browsers send 1-2 KiB; 16 KiB is nginx's and
# Apache's order of magnitude and leaves room for big cookies on a shared host.
HEADER_LIMIT = 16 * 1024
# No route reads a body; this much is accepted (and ignored) for clients that
# always send one, such as "{}" with a POST.
BODY_LIMIT = 4 * 1024


@dataclass(frozen=True)
class HttpTimeouts:
    """The front's timeouts; tests pass shorter ones instead of patching constants."""

    # A request, from a new connection's accept or from its first byte on a
    # kept-alive one, must be whole (head and its small body) within this. Any
    # client on a LAN sends a request in milliseconds; 5 s is what slow links
    # need, and it is what one idle or slow-loris socket can hold a slot for.
    header: float = 5.0
    # A keep-alive connection may idle this long between requests: long enough
    # for the console's 2 s poll to reuse its connection.
    idle: float = 30.0
    # WebSocket keepalive: well inside the 60 s idle timeouts of common proxies
    # and NATs; a dead peer is noticed within two intervals.
    ping: float = 20.0


# Bytes taken from a socket per wake-up: a whole ordinary request, while
# the input that can wait unparsed stays bounded (see HEADER_LIMIT).
READ_SIZE = 16 * 1024
# Plain HTTP connections per server (WebSocket readers count against their
# listener's max_clients instead): a console tab holds a few.
MAX_CONNECTIONS = 512
# Plain HTTP connections from one peer address (loopback included: the
# attacker may be a local page or process). A browser opens at most 6 per
# host, a scraper 1; 32 leaves room for several tabs and tools behind one NAT,
# while 16 such peers are needed to fill MAX_CONNECTIONS. Counted per address,
# not per IPv6 /64: hosts of one lab LAN share a /64.
MAX_PER_PEER = 32
# Client ids are small counters: 18 digits fit an int64 and are far beyond
# any id, and int() never sees the thousands of digits it raises on.
MAX_ID_DIGITS = 18
# Names and ids echoed in an error body are cut to this: the answer to a
# 16 KiB path need not repeat it.
ECHO_LIMIT = 64
# An error's explanation, in the answer and the log, is cut to this.
FAIL_MESSAGE_LIMIT = 200
# Names a browser on this host may use for the server whatever it is bound
# to: the only ones that always reach it, and never a rebound DNS name.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# The port a Host without one means (plain HTTP).
DEFAULT_PORT = 80
# A reg-name as hosts are written (letters, digits, "-", ".", "_"), with the
# DNS length limit; anything else in Host is malformed.
_REG_NAME = re.compile(r"[a-z0-9._-]{1,253}")
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
# Relative path -> file, of every file the console has, listed once. A request
# is looked up here, so its path never reaches the file system (where a
# 256-byte segment raises ENAMETOOLONG, and a traversal could escape).
_web_index: dict[str, Traversable] | None = None
# Directory depth listed: the console's tree is 3 deep.
WEB_DEPTH = 8
# The console's pages may not be framed by another site (clickjacking).
FRAME_HEADERS = [("x-frame-options", "DENY"), ("content-security-policy", "frame-ancestors 'none'")]


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


def _list_web(node: Traversable, prefix: str, depth: int, out: dict[str, Traversable]) -> None:
    for child in node.iterdir():
        if child.name.startswith((".", "__")):
            continue
        if child.is_dir():
            if depth < WEB_DEPTH:
                _list_web(child, f"{prefix}{child.name}/", depth + 1, out)
        elif PurePosixPath(child.name).suffix in CONTENT_TYPES:
            out[prefix + child.name] = child


def web_files() -> dict[str, Traversable]:
    global _web_index
    if _web_index is None:
        index: dict[str, Traversable] = {}
        _list_web(WEB, "", 0, index)
        _web_index = index
    return _web_index


def web_file(segments: list[str]) -> Reply | None:
    """A file of the console, or None; never anything outside muxd/web."""
    # A segment holding "/" (from %2F) is not a path of ours: no aliases.
    if not segments or any("/" in s for s in segments):
        return None
    rel = "/".join(segments)
    node = web_files().get(rel)
    if node is None:
        return None
    body = _web_cache.get(rel)
    if body is None:
        body = _web_cache[rel] = node.read_bytes()
    content_type = CONTENT_TYPES[PurePosixPath(rel).suffix]
    return Reply(200, body, content_type, [("cache-control", "no-cache"), *FRAME_HEADERS])


def echo(text: str) -> str:
    """repr() of a peer's string for an error body, cut to ECHO_LIMIT."""
    return repr(text[:ECHO_LIMIT]) + ("..." if len(text) > ECHO_LIMIT else "")


def split_target(target: bytes) -> tuple[str | None, str, str] | None:
    """(authority, path, query) of an origin-form ("/p?q") or absolute-form
    ("http://host/p?q", whose authority is returned) target; None for any
    other form (asterisk, authority, garbage).

    Split by hand: urlsplit reads "//[" as a network location and raises."""
    text = target.decode("ascii", "replace").partition("#")[0]
    authority = None
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        cut = len(rest)
        for mark in "/?":
            i = rest.find(mark)
            if 0 <= i < cut:
                cut = i
        authority, text = rest[:cut], rest[cut:]
        if not text.startswith("/"):
            text = "/" + text
    if not text.startswith("/"):
        return None
    path, _, query = text.partition("?")
    return authority, path, query


def normal_host(host: str) -> str:
    """A host as Host names are compared: lower case, no final dot, an IP in
    its canonical text."""
    host = host.lower().removesuffix(".")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def parse_host(value: str) -> tuple[str, int | None] | None:
    """Host's ``uri-host [":" port]`` (RFC 9110 section 7.2) as (normal host,
    port or None), or None if malformed."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            return None
        if not sep:
            return None
        host = ip.compressed
    else:
        host, sep, rest = value.partition(":")
        rest = sep + rest
        if not _REG_NAME.fullmatch(host.lower()):
            return None
        host = normal_host(host)
    if not rest or rest == ":":
        return host, None
    digits = rest[1:]
    if rest[0] != ":" or not (len(digits) <= 5 and digits.isascii() and digits.isdigit()):
        return None
    return host, int(digits)


def host_names(cfg: HttpServer, bound: tuple[str, int] | None) -> frozenset[tuple[str, int | None]]:
    """The (host, port) pairs a Host may name; port None: any port."""
    ports = {cfg.port} | ({bound[1]} if bound else set())
    hosts = {*LOCAL_NAMES, normal_host(cfg.host)} | ({normal_host(bound[0])} if bound else set())
    known: set[tuple[str, int | None]] = {(h, p) for h in hosts for p in ports}
    # A server name has no port (config.parse_server_name): behind a proxy,
    # Host carries the proxy's port, not ours, and the name alone is the proof.
    known |= {(normal_host(name), None) for name in cfg.server_names}
    return frozenset(known)


def peer_ip(host: str) -> str:
    """A peer's address as connections are counted: an IPv4-mapped IPv6
    address (from a dual-stack socket) is its IPv4 address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return ip.compressed


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


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


class HttpFront:
    def __init__(
        self,
        cfg: HttpServer,
        ports: Callable[[], Mapping[str, PortRuntime]],
        reactor: Reactor,
        sock: socket.socket | None = None,
        timeouts: HttpTimeouts = HttpTimeouts(),
    ) -> None:
        self.cfg = cfg
        self.ports = ports
        self.timeouts = timeouts
        self.reactor = reactor
        self.registry = metrics.make_registry(lambda: ports().values(), reactor)
        self.connections = ConnectionTable()
        self.refusals = LogLimiter(log)  # refused connections and requests, per peer
        self._bound: tuple[str, int] | None = None  # (address, port) of the socket, once started
        self._names: tuple[HttpServer, frozenset[tuple[str, int | None]]] | None = None
        self.clients: set[Connection] = set()  # WebSocket readers, for the daemon's shutdown
        self._sock = sock  # passed in by socket activation, or bound in start()
        self._acceptor: Acceptor | None = None

    # -- listening -------------------------------------------------------------

    def start(self) -> None:
        sock = self._sock or bind_tcp(self.cfg.host, self.cfg.port)
        self._sock = None  # the acceptor owns it from here
        # With port 0 or a socket passed by systemd, only the socket knows
        # the address and port that browsers will name in Host.
        bound = sock.getsockname()
        self._bound = (str(bound[0]), int(bound[1]))
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

    @property
    def bound_address(self) -> str | None:
        """Where it really listens, e.g. "127.0.0.1:41234" for a config's port 0.
        None before start()."""
        return self._acceptor.bound_address if self._acceptor is not None else None

    def finish_orphans(self) -> None:
        """After a reload: finish WebSockets whose port or websocket listener is gone."""
        ports = self.ports()
        for client in list(self.clients):
            rt = ports.get(client.hub.name)
            listener = api.websocket_listener(rt.config) if rt is not None and rt.hub is client.hub else None
            if listener is None or listener.name != client.reader.policy.listener:
                client.finish()

    @property
    def known_hosts(self) -> frozenset[tuple[str, int | None]]:
        """The (host, port) pairs a Host may name (port None: any port), for
        the cfg in force: a reload that changes server_names replaces cfg, and
        the new names apply from the next request, as origins and token do."""
        if self._names is None or self._names[0] is not self.cfg:
            self._names = (self.cfg, host_names(self.cfg, self._bound))
        return self._names[1]

    def _on_connection(self, conn: socket.socket, addr: object) -> None:
        host, port = addr[0], addr[1]  # type: ignore[index]
        refusal = None
        if self.connections.of_peer(str(host)) >= MAX_PER_PEER:
            refusal = f"{MAX_PER_PEER} connections open from this address"
        elif len(self.connections) >= MAX_CONNECTIONS:
            victim = self.connections.room_for(str(host))
            if victim is None:
                refusal = f"{MAX_CONNECTIONS} connections open"
            else:
                self.refusals.warning(
                    victim.peer_host,
                    "evicted",
                    "%s: %d connections open: closed the oldest of %s's %d to make room for %s",
                    self.cfg.name,
                    MAX_CONNECTIONS,
                    victim.peer_host,
                    self.connections.of_peer(victim.peer_host),
                    host,
                )
                victim.close()
        if refusal is not None:
            self.refusals.warning(host, "connections", "%s: refused %s: %s", self.cfg.name, host, refusal)
            conn.close()
            return
        self.connections.add(HttpConnection(self, conn, str(host), format_hostport(host, port)))

    # -- routing ------------------------------------------------------------------

    def handle(self, request: h11.Request, peer_host: str) -> Reply | Upgrade:
        target = split_target(request.target)
        if target is None:
            return error_reply(400, "the request target must be a path or an http URL", False)
        authority, path, _query = target
        parts = [urllib.parse.unquote(p) for p in path.split("/")[1:]]
        method = request.method.decode("ascii", "replace")
        api_path = parts[:2] == ["api", "v1"]
        refused = self._host_refusal(request, authority, peer_host)
        if refused is not None:
            return error_reply(*refused, api_path)
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

    def _host_refusal(
        self, request: h11.Request, authority: str | None, peer_host: str
    ) -> tuple[int, str] | None:
        """(status, why) unless the request names this server: see "Host" above."""
        if authority is None:  # origin-form: Host says which server was meant
            hosts = [v for k, v in request.headers if k == b"host"]
            if len(hosts) != 1:
                return 400, "a request needs exactly one Host header"
            authority = hosts[0].decode("latin-1")
        # An absolute-form target's authority overrides Host (RFC 9112 section 3.2.2).
        parsed = parse_host(authority)
        if parsed is None:
            return 400, f"malformed Host {echo(authority)}"
        host, port = parsed
        known = self.known_hosts
        if (host, DEFAULT_PORT if port is None else port) in known or (host, None) in known:
            return None
        self.refusals.warning(
            peer_host,
            "host",
            "%s: %s: refused a request for Host %s: not a name of this server (add it to server_names)",
            self.cfg.name,
            peer_host,
            echo(authority),
        )
        return 421, f"this server is not {echo(authority)}; see server_names"

    def _websocket(self, request: h11.Request, name: str) -> Reply | Upgrade:
        rt = self.ports().get(name)
        listener = api.websocket_listener(rt.config) if rt is not None else None
        if rt is None or listener is None:
            return error_reply(404, f"no port {echo(name)} with a websocket listener", False)
        return upgrade(request, rt.hub, listener, self.cfg.origins)

    def _api(self, method: str, parts: list[str], request: h11.Request, peer_host: str) -> Reply:
        ports = self.ports()
        if not parts or parts[0] != "ports":
            return error_reply(404, "no such resource", True)
        rt = ports.get(parts[1]) if len(parts) > 1 else None
        if len(parts) > 1 and rt is None:
            return error_reply(404, f"no port {echo(parts[1])}", True)
        action = parts[2:] in (["trace", "reopen"],) or (
            len(parts) == 5 and parts[2:5:2] == ["clients", "disconnect"]
        )
        if action:
            assert rt is not None
            if method != "POST":
                return Reply(405, b"405 Method Not Allowed\n", headers=[("allow", "POST")])
            refusal = self._admin_refusal(request, peer_host)
            if refusal:
                return error_reply(403, refusal, True)
            return self._admin(rt, parts[2:], peer_host)
        if method not in ("GET", "HEAD"):
            return Reply(405, b"405 Method Not Allowed\n", headers=[("allow", "GET, HEAD")])
        if len(parts) == 1:
            reply = json_reply(200, api.ports_view(ports.values()))
        elif len(parts) == 3 and parts[2] == "clients":
            assert rt is not None
            reply = json_reply(200, api.clients_view(rt))
        else:
            return error_reply(404, "no such resource", True)
        reply.headers.append(("cache-control", "no-store"))
        return reply

    @staticmethod
    def _admin(rt: PortRuntime, action: list[str], peer_host: str) -> Reply:
        """An allowed admin action: disconnect a client, or reopen the trace files."""
        if action[0] == "trace":
            for trace in rt.traces:
                trace.reopen()
            log.info("%s: trace files reopened by admin request from %s", rt.name, peer_host)
            return json_reply(200, {"ok": True, "reopened": len(rt.traces)})
        client_id = ascii_int(action[1], MAX_ID_DIGITS)
        if client_id is None or not api.disconnect(rt, client_id):
            return error_reply(404, f"no client {echo(action[1])} on port {rt.name!r}", True)
        log.info("%s: client %s disconnected by admin request from %s", rt.name, action[1], peer_host)
        return json_reply(200, {"ok": True})

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
        self._idle = False  # between requests of a kept-alive connection: the idle timeout applies
        sock.setblocking(False)
        self._timer = self.reactor.call_later(self.front.timeouts.header, self._on_timeout)
        self.reactor.add(self.fd, IN, self._on_events, self._on_internal_error)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        self.reactor.remove(self.fd)
        self.front.connections.discard(self)
        graceful_close(self.sock)

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
            self._fail(408, f"no complete request within {self.front.timeouts.header:g}s")

    def _on_internal_error(self, _exc: BaseException) -> None:
        self.close()
