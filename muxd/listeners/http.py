"""The HTTP front, with h11, inside the one event loop.

An HttpFront owns one listening socket (bound from the config's ``http:``
entry, or passed in by socket activation under its ``name``), accepts
connections, and answers their requests: each connection is an HttpConnection
(muxd.listeners.http_connection: h11, request limits, timeouts, close), which
hands every whole request to HttpFront.handle and sends back the Reply
(muxd.listeners.http_reply) it returns.

Connections: a server holds at most MAX_CONNECTIONS plain HTTP connections,
and at most MAX_PER_PEER from one peer address, so one host's idle sockets
cannot lock the others out. A host with many addresses (loopback has 16
million) can still fill the server: then a newcomer takes the place of the
oldest connection of the address holding the most, so every address keeps a
fair share (ConnectionTable). Refusals are logged through a LogLimiter (one
line per peer and kind per minute, muxd.ratelimit).

Host: every request must name this server, in Host or in an absolute-form
target, against DNS rebinding: 421 Misdirected Request otherwise, on every
route; 400 for a malformed or repeated Host. The target is split by hand, and
names are parsed and compared in muxd.protocol.http_names, which explains why.

Routes: ``/`` and the console's files (muxd.web, looked up in an index, never
on the file system), ``/metrics``, ``/api/v1/...`` (muxd.api) and
``/ws/<port>``, where an accepted upgrade hands the transport to a
WebSocketClient (muxd.listeners.wsclient). Numbers in a path are parsed with
a bound on their digits, so int() never sees something it raises on.

Access (muxd.access). A peer outside the server's ``allow:`` is closed at
accept, before h11 sees a byte; one outside the websocket listener's
``allow:`` gets 403 at the upgrade. Without ``tokens:``, reading is open and
admin actions (POST .../disconnect, .../trace/reopen, and board control:
.../signals and .../sequences/NAME, muxd.api) are allowed from a
loopback peer only. Once any token is configured, every request for data
needs one: ``/api`` GETs and ``/ws`` need ``read`` or higher, writing through
``/ws`` needs ``write`` (a read-scoped WebSocket on a rw listener is
connected read-only: its input is discarded and counted as a ro listener's
is), admin actions need ``admin``, with no exception for loopback;
``/metrics`` needs ``read`` only with ``metrics_token: true``. The console's
own files stay open, since the page is what asks for the token. A missing or
wrong token is 401 (with ``WWW-Authenticate: Bearer``), a token whose scope is
too low 403. A browser request from a foreign Origin is refused for admin
actions too, so a web page cannot make the operator's browser act on a
loopback-trusting muxd. The console's files carry ``X-Frame-Options: DENY``
and CSP ``frame-ancestors 'none'``, so no other site can frame it and trick
clicks into it.

Ports at run time (muxd.api, with the daemon as ``manager``): ``POST
/api/v1/ports`` adds one, ``DELETE /api/v1/ports/NAME`` removes it; both are
admin actions. With ``?hold=1`` the port lives as long as the connection that
added it: the reply carries the release (Reply.on_close), so that connection
is kept open without an idle timeout and its end removes the port. A port's
listeners are added and removed alike (``/api/v1/ports/NAME/listeners``).

Why this module is long: every route is checked for Host, allow-list, token
scope and Origin here, in one place, so that no route can skip a check; the
answers themselves are muxd.api's.
"""

from __future__ import annotations

import logging
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import h11

from muxd import api, metrics
from muxd.access import Scope, Tokens, permitted, presented, scope_allows
from muxd.config import HttpServer, format_hostport
from muxd.connection import Connection
from muxd.errors import MuxdError
from muxd.listeners.acceptor import Acceptor, bind_tcp
from muxd.listeners.http_connection import ConnectionTable, HttpConnection
from muxd.listeners.http_reply import Reply, error_reply, json_reply
from muxd.listeners.websocket import (
    HandshakeError,
    Upgrade,
    ascii_int,
    header,
    offered,
    origin_allowed,
    upgrade,
)
from muxd.port import PortRuntime
from muxd.protocol.http_names import (
    KnownHosts,
    echo,
    host_names,
    is_loopback,
    names_server,
    parse_host,
    split_target,
)
from muxd.ratelimit import LogLimiter
from muxd.reactor import Reactor
from muxd.tls_handshakes import TlsServer
from muxd.transport import SocketTransport, Transport
from muxd.web import web_file

log = logging.getLogger("muxd.http")


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
# The console's pages may not be framed by another site (clickjacking).
FRAME_HEADERS = [("x-frame-options", "DENY"), ("content-security-policy", "frame-ancestors 'none'")]


def console_file(segments: list[str]) -> Reply | None:
    """A file of the console (muxd.web) as a reply, kept fresh and unframed; or None."""
    found = web_file(segments)
    if found is None:
        return None
    return Reply(200, found.body, found.content_type, [("cache-control", "no-cache"), *FRAME_HEADERS])


class HttpFront:
    """One ``http:`` server of the config: listening, routing, the API and admin actions."""

    def __init__(
        self,
        cfg: HttpServer,
        ports: Callable[[], Mapping[str, PortRuntime]],
        reactor: Reactor,
        sock: socket.socket | None = None,
        timeouts: HttpTimeouts = HttpTimeouts(),
        *,
        fronts: Callable[[], Iterable[HttpFront]] | None = None,
        manager: api.PortManager | None = None,
    ) -> None:
        self.cfg = cfg
        self.manager = manager  # adds and removes ports at run time; None: not here
        self.ports = ports
        self.timeouts = timeouts
        self.reactor = reactor
        # Read here, at start (an unreadable file is a start error), and again
        # on every reload (reconfigure): the secrets are never kept in cfg.
        self.tokens = Tokens.load(cfg.tokens)
        self.rejected_address = 0  # connections refused by cfg.allow
        # Every server's allow-list refusals, as the daemon's fronts say (this
        # one's alone when built on its own), like the ports' counters.
        self.registry = metrics.make_registry(
            lambda: ports().values(),
            reactor,
            lambda: [
                (f.cfg.name, f.rejected_address) for f in (fronts() if fronts else [self]) if f.cfg.allow
            ],
        )
        self.connections = ConnectionTable()
        self.refusals = LogLimiter(log)  # refused connections and requests, per peer
        self._bound: tuple[str, int] | None = None  # (address, port) of the socket, once started
        self._names: tuple[HttpServer, KnownHosts] | None = None
        self.clients: set[Connection] = set()  # WebSocket readers, for the daemon's shutdown
        self._sock = sock  # passed in by socket activation, or bound in start()
        self._acceptor: Acceptor | None = None
        # With ``tls:``, every connection is a TLS handshake first (muxd.tls_handshakes):
        # HTTPS, and WSS for the WebSockets it hands over.
        self.tls: TlsServer | None = None

    # -- listening -------------------------------------------------------------

    def start(self) -> None:
        sock = self._sock or bind_tcp(self.cfg.host, self.cfg.port)
        self._sock = None  # the acceptor owns it from here
        try:
            self.set_tls(self.cfg)
        except MuxdError:  # unusable TLS files: do not keep the port bound
            sock.close()
            raise
        # With port 0 or a socket passed by systemd, only the socket knows
        # the address and port that browsers will name in Host.
        bound = sock.getsockname()
        self._bound = (str(bound[0]), int(bound[1]))
        self._acceptor = Acceptor(self.cfg.name, sock, self.reactor, self._on_connection)
        self._acceptor.start()
        scheme = "https" if self.tls is not None else "http"
        log.info("%s: web console at %s://%s/", self.cfg.name, scheme, self.bound_address)

    def set_tls(self, cfg: HttpServer) -> None:
        """Start, reload (SIGHUP: files re-read, connections kept) or end TLS."""
        if cfg.tls is None:
            self.tls = None
        elif self.tls is None:
            # ALPN: say HTTP/1.1, so a browser offering h2 does not try it on us.
            self.tls = TlsServer(cfg.name, cfg.tls, self.reactor, alpn=("http/1.1",))
        else:
            self.tls.reload(cfg.tls)

    def stop(self) -> None:
        """Stop accepting and close plain HTTP connections; WebSocket readers
        (``clients``) are left to the caller to finish."""
        if self._acceptor is not None:
            self._acceptor.stop()
        if self.tls is not None:
            self.tls.stop()
        for conn in list(self.connections):
            conn.close("shutdown")

    def reconfigure(self, cfg: HttpServer) -> None:
        """A reload: the new entry's origins, names, allow-list and tokens
        apply from the next request. The token files are read again (a
        rotated secret takes effect on SIGHUP); if one cannot be used,
        AccessError is raised and nothing changes."""
        tokens = Tokens.load(cfg.tokens)
        self.cfg, self.tokens = cfg, tokens

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
    def known_hosts(self) -> KnownHosts:
        """The (host, port) pairs a Host may name (port None: any port), for
        the cfg in force: a reload that changes server_names replaces cfg, and
        the new names apply from the next request, as origins and token do."""
        if self._names is None or self._names[0] is not self.cfg:
            self._names = (self.cfg, host_names(self.cfg, self._bound))
        return self._names[1]

    def _on_connection(self, conn: socket.socket, addr: object) -> None:
        host, port = addr[0], addr[1]  # type: ignore[index]
        if not permitted(self.cfg.allow, host):
            # At accept: the peer gets no byte, not even an HTTP error.
            self.rejected_address += 1
            self.refusals.warning(
                host, "address", "%s: %s refused: not in the server's allow-list", self.cfg.name, host
            )
            conn.close()
            return
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
                victim.close("evicted")
        if refusal is not None:
            self.refusals.warning(host, "connections", "%s: refused %s: %s", self.cfg.name, host, refusal)
            conn.close()
            return
        peer = format_hostport(host, port)
        if self.tls is None:
            self._start_connection(SocketTransport(conn), str(host), peer)
            return

        def ready(transport: Transport) -> None:
            if self._acceptor is not None and self._acceptor.sock is not None:  # not stopped meanwhile
                self._start_connection(transport, str(host), peer)
            else:
                transport.close()

        self.tls.accept(conn, peer, ready)

    def _start_connection(self, transport: Transport, host: str, peer: str) -> None:
        conn = HttpConnection(self, transport, host, peer)
        self.connections.add(conn)
        conn.on_close.append(lambda: self.connections.discard(conn))
        conn.start()

    # -- routing ------------------------------------------------------------------

    def handle(self, request: h11.Request, peer_host: str, body: bytes = b"") -> Reply | Upgrade:
        target = split_target(request.target)
        if target is None:
            return error_reply(400, "the request target must be a path or an http URL", False)
        authority, path, query = target
        parts = [urllib.parse.unquote(p) for p in path.split("/")[1:]]
        method = request.method.decode("ascii", "replace")
        api_path = parts[:2] == ["api", "v1"]
        refused = self._host_refusal(request, authority, peer_host)
        if refused is not None:
            return error_reply(*refused, api_path)
        try:
            if parts and parts[0] == "ws" and len(parts) == 2:
                return self._websocket(request, parts[1], peer_host)
            if api_path:
                return self._api(method, parts[2:], request, peer_host, body, query=query)
            if method not in ("GET", "HEAD"):
                return Reply(405, b"405 Method Not Allowed\n", headers=[("allow", "GET, HEAD")])
            if parts == ["metrics"]:
                denied = self._token_refusal(request, "read", False) if self.cfg.metrics_token else None
                if denied is not None:
                    return denied
                return Reply(200, metrics.render(self.registry), metrics.CONTENT_TYPE)
            reply = console_file(["index.html"] if parts == [""] else parts) if parts else None
            return reply or error_reply(404, "no such page", False)
        except HandshakeError as exc:
            reply = error_reply(exc.status, str(exc), False)
            reply.headers += [(k.decode(), v.decode()) for k, v in exc.headers]
            return reply

    def _host_refusal(
        self, request: h11.Request, authority: str | None, peer_host: str
    ) -> tuple[int, str] | None:
        """(status, why) unless the request names this server: see muxd.protocol.http_names."""
        if authority is None:  # origin-form: Host says which server was meant
            hosts = [v for k, v in request.headers if k == b"host"]
            if len(hosts) != 1:
                return 400, "a request needs exactly one Host header"
            authority = hosts[0].decode("latin-1")
        # An absolute-form target's authority overrides Host (RFC 9112 section 3.2.2).
        parsed = parse_host(authority)
        if parsed is None:
            return 400, f"malformed Host {echo(authority)}"
        if names_server(*parsed, self.known_hosts):
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

    # -- access --------------------------------------------------------------------

    def _scope(self, request: h11.Request, websocket: bool) -> tuple[bool, Scope | None]:
        """(credentials presented, the scope they carry or None): from
        Authorization, or for a WebSocket from Sec-WebSocket-Protocol."""
        secret = presented(header(request, b"authorization"), offered(request) if websocket else ())
        found = self.tokens.match(secret)
        return secret is not None, (found[1] if found is not None else None)

    def _token_refusal(
        self, request: h11.Request, need: Scope, api_path: bool, websocket: bool = False
    ) -> Reply | None:
        """None if the request may go on: no tokens configured, or one of scope
        ``need`` or higher presented. Else 401 (none, or a wrong one) or 403."""
        if not self.tokens.configured:
            return None
        presented, scope = self._scope(request, websocket)
        if scope_allows(scope, need):
            return None
        if scope is None:
            reply = error_reply(401, "a token is needed" if not presented else "wrong token", api_path)
            reply.headers.append(("www-authenticate", 'Bearer realm="muxd"'))
            return reply
        return error_reply(403, f"this needs a token of scope {need} or higher", api_path)

    def _websocket(self, request: h11.Request, name: str, peer_host: str) -> Reply | Upgrade:
        rt = self.ports().get(name)
        listener = api.websocket_listener(rt.config) if rt is not None else None
        if rt is None or listener is None:
            return error_reply(404, f"no port {echo(name)} with a websocket listener", False)
        if not permitted(listener.allow, peer_host):
            rt.hub.stats_for(listener.name).rejected_address += 1
            self.refusals.warning(
                peer_host,
                "address",
                "%s: %s refused: not in the listener's allow-list",
                listener.name,
                peer_host,
            )
            return error_reply(403, "this address may not use this port's WebSocket", False)
        denied = self._token_refusal(request, "read", False, websocket=True)
        if denied is not None:
            return denied
        read_only = False
        if self.tokens.configured and listener.writable:
            read_only = not scope_allows(self._scope(request, True)[1], "write")
        found = self.tokens.match(presented(header(request, b"authorization"), offered(request)))
        token = found[0] if found is not None else None
        return upgrade(request, rt.hub, listener, self.cfg.origins, read_only=read_only, token=token)

    def _api(
        self,
        method: str,
        parts: list[str],
        request: h11.Request,
        peer_host: str,
        body: bytes = b"",
        *,
        query: str = "",
    ) -> Reply:
        ports = self.ports()
        if not parts or parts[0] != "ports":
            return error_reply(404, "no such resource", True)
        rt = ports.get(parts[1]) if len(parts) > 1 else None
        if len(parts) > 1 and rt is None:
            return error_reply(404, f"no port {echo(parts[1])}", True)
        if (
            (parts == ["ports"] and method == "POST")
            or (len(parts) == 2 and method == "DELETE")
            or (parts[2:3] == ["listeners"] and (len(parts), method) in ((3, "POST"), (4, "DELETE")))
        ):
            return self._port_change(method, parts, request, peer_host, body=body, query=query)
        # Board control (muxd.api.set_signals, run_sequence) is an admin action too.
        control = parts[2:] == ["signals"] or (len(parts) == 4 and parts[2] == "sequences")
        action = (
            control
            or parts[2:] in (["trace", "reopen"],)
            or (len(parts) == 5 and parts[2:5:2] == ["clients", "disconnect"])
        )
        if action:
            assert rt is not None
            if method != "POST":
                return Reply(405, b"405 Method Not Allowed\n", headers=[("allow", "POST")])
            denied = self._admin_denied(request, peer_host)
            if denied is not None:
                return denied
            if control:
                by = f"api {peer_host}"
                if parts[2] == "signals":
                    status, answer = api.set_signals(rt, self.reactor, body, by)
                else:
                    status, answer = api.run_sequence(rt, self.reactor, parts[3], by)
                return json_reply(status, answer)  # an error's answer is {"error": why}, as error_reply's
            return self._admin(rt, parts[2:], peer_host)
        if method not in ("GET", "HEAD"):
            allow = "GET, HEAD" + {1: ", POST", 2: ", DELETE"}.get(len(parts), "")
            return Reply(405, b"405 Method Not Allowed\n", headers=[("allow", allow)])
        denied = self._token_refusal(request, "read", True)
        if denied is not None:
            return denied
        if len(parts) == 1:
            device = urllib.parse.parse_qs(query).get("device", [None])[-1]
            reply = json_reply(200, api.ports_view(ports.values(), device))
        elif len(parts) == 3 and parts[2] == "clients":
            assert rt is not None
            reply = json_reply(200, api.clients_view(rt))
        else:
            return error_reply(404, "no such resource", True)
        reply.headers.append(("cache-control", "no-store"))
        return reply

    def _port_change(
        self, method: str, parts: list[str], request: h11.Request, peer_host: str, *, body: bytes, query: str
    ) -> Reply:
        """POST /api/v1/ports (``?hold=1``: for the connection's life), DELETE
        /api/v1/ports/NAME; POST and DELETE of a port's listeners alike."""
        manager = self.manager
        if manager is None:
            return error_reply(405, "ports cannot be added or removed on this server", True)
        denied = self._admin_denied(request, peer_host)
        if denied is not None:
            return denied
        by = f"api {peer_host}"
        if method == "DELETE" and len(parts) == 4:
            return json_reply(*api.remove_listener(manager, parts[1], parts[3], by))
        if method == "DELETE":
            return json_reply(*api.remove_port(manager, parts[1], by))
        hold = urllib.parse.parse_qs(query).get("hold", [""])[-1] in ("1", "true", "yes")
        closing = "close" in (header(request, b"connection") or "").lower() or request.http_version == b"1.0"
        if hold and closing:
            # The port would go with the connection, right after the answer.
            return error_reply(
                400, "?hold=1 needs a kept-alive connection (HTTP/1.1, no Connection: close)", True
            )
        if len(parts) == 3:
            status, answer, added = api.add_listeners(manager, parts[1], body, by)
            reply = json_reply(status, {**answer, "held": hold} if added else answer)
            if added and hold:
                port = parts[1]
                reply.on_close = lambda: manager.release_listeners(port, added)
            return reply
        status, answer, rt = api.add_port(manager, body, by)
        reply = json_reply(status, {**answer, "held": hold} if rt is not None else answer)
        if rt is not None and hold:
            held = rt
            reply.on_close = lambda: manager.release(held.name, held)
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

    def _admin_denied(self, request: h11.Request, peer_host: str) -> Reply | None:
        """The answer refusing an admin action (an API change, a control), or
        None if it may go on: the token check, then _admin_refusal's."""
        denied = self._token_refusal(request, "admin", True)
        if denied is not None:
            return denied
        refusal = self._admin_refusal(request, peer_host)
        return error_reply(403, refusal, True) if refusal else None

    def _admin_refusal(self, request: h11.Request, peer_host: str) -> str | None:
        """Why an admin action is refused, after the token check (which,
        with tokens configured, has already asked for an admin token)."""
        if not origin_allowed(header(request, b"origin"), header(request, b"host"), self.cfg.origins):
            return "origin not allowed"
        if self.tokens.configured:
            return None
        if header(request, b"authorization") is not None:
            # Credentials where none are configured: a client that thinks it
            # is talking to another server, or a guess; never a pass.
            return "wrong credentials: this server has no tokens"
        return None if is_loopback(peer_host) else "admin actions need a loopback peer, or tokens: configured"
