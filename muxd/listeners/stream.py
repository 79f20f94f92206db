"""Raw byte-stream readers over TCP and Unix sockets.

A StreamListener owns one listening socket, accepted from by an Acceptor
(bounded batches, a pause on EMFILE), and turns each connection into a
StreamClient, refusing those over ``max_clients``.

A StreamClient is the connection core (muxd.connection) over a socket with no
encoder: the hub's fan-out pass writes the ring's bytes to it directly, one
memoryview or two (the range wrapped), zero copy. With ``tls:`` (tcp and
rfc2217) each accepted socket first goes through its TLS handshake
(muxd.tls_handshakes.TlsServer), and the client is made over the TLS transport once it
is done; that transport is not plain, so its bytes go through the core's
small output buffer to be encrypted. Handshakes in flight count against
``max_clients``, so stalled ones cannot exceed it. Everything else, from
backpressure to the half-close linger and the graceful close, is the core's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from muxd.access import permitted
from muxd.banner import BannerContext, expand
from muxd.config import Listener
from muxd.connection import Connection
from muxd.errors import MuxdError
from muxd.hub import Hub
from muxd.linecontrol import LineControl
from muxd.listeners.acceptor import Acceptor, bind_tcp, bind_unix
from muxd.ratelimit import LogLimiter
from muxd.reactor import Reactor
from muxd.tls_handshakes import TlsServer
from muxd.transport import SocketTransport, Transport

log = logging.getLogger("muxd.listener")


class StreamClient(Connection):
    def __init__(
        self,
        transport: Transport,
        peer: str,
        cfg: Listener,
        hub: Hub,
        reactor: Reactor,
        *,
        initial: bytes = b"",
    ) -> None:
        # A banner goes out through the core's output buffer, ahead of the
        # ring's bytes, which then take the same (copying) path: the zero-copy
        # fast path writes the ring straight to the socket and knows no buffer.
        super().__init__(transport, hub, cfg, peer, reactor, encoding=bool(initial), initial=initial)


class StreamListener:
    def __init__(
        self,
        cfg: Listener,
        hub: Hub,
        reactor: Reactor,
        sock: socket.socket | None = None,
        line_control: LineControl | None = None,  # the device and settings a banner names
    ) -> None:
        self.cfg = cfg
        self.line_control = line_control
        self.hub = hub
        self.reactor = reactor
        self.clients: set[Connection] = set()
        self._sock = sock  # passed in by socket activation, or bound in start()
        self._acceptor: Acceptor | None = None
        self._owns_path = False
        self.refusals = LogLimiter(log)  # one line per peer a minute, however many refusals
        self.tls: TlsServer | None = None  # made in start(), from cfg.tls

    def start(self) -> None:
        cfg = self.cfg
        sock = self._sock or (self._bind_unix() if cfg.kind == "unix" else bind_tcp(cfg.host, cfg.port))
        self._sock = None  # the acceptor owns it from here
        try:
            self.set_tls(cfg)
        except MuxdError:  # unusable TLS files: do not keep the port bound
            sock.close()
            raise
        self._acceptor = Acceptor(cfg.name, sock, self.reactor, self._on_connection)
        self._acceptor.start()
        log.info("%s: listening on %s (%s)", self.hub.name, self.bound_address, cfg.mode)

    def _bind_unix(self) -> socket.socket:
        sock = bind_unix(self.cfg.path, self.cfg.file_mode, self.cfg.group)
        self._owns_path = True
        return sock

    def set_tls(self, cfg: Listener) -> None:
        """Start, reload (SIGHUP: files re-read, connected clients kept) or end TLS."""
        if cfg.tls is None:
            self.tls = None
        elif self.tls is None:
            self.tls = TlsServer(cfg.name, cfg.tls, self.reactor)
        else:
            self.tls.reload(cfg.tls)

    def stop(self) -> None:
        """Stop accepting; connected clients are left to the caller."""
        if self._acceptor is not None:
            self._acceptor.stop()
        if self.tls is not None:
            self.tls.stop()
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.path)
            self._owns_path = False

    def _on_connection(self, conn: socket.socket, addr: object) -> None:
        peer = _peer_name(addr, self.cfg)
        if not permitted(self.cfg.allow, addr):
            # Before the client exists: nothing (no banner, no telnet
            # negotiation, no history) has been or will be sent to it.
            self.hub.stats_for(self.cfg.name).rejected_address += 1
            self.refusals.warning(
                peer, "address", "%s: %s refused: not in the listener's allow-list", self.cfg.name, peer
            )
            conn.close()
            return
        self._accepted(conn, peer)

    def _accepted(self, conn: socket.socket, peer: str) -> None:
        handshaking = len(self.tls.handshakes) if self.tls is not None else 0
        full = len(self.clients) + handshaking >= self.cfg.max_clients
        # Silent handshakes must not hold max_clients either (muxd.tls_handshakes: slots).
        if full and not (handshaking and self.tls is not None and self.tls.make_room(peer)):
            self.hub.stats_for(self.cfg.name).rejected += 1
            self.refusals.warning(
                peer,
                "max_clients",
                "%s: %s refused: max_clients (%d) reached",
                self.cfg.name,
                peer,
                self.cfg.max_clients,
            )
            conn.close()
            return
        if self.tls is not None:
            self.tls.accept(conn, peer, lambda transport: self._start_client(transport, peer))
        else:
            self._start_client(SocketTransport(conn), peer)

    def _start_client(self, transport: Transport, peer: str) -> None:
        client = self._client(transport, peer)
        self.clients.add(client)
        client.on_close.append(lambda: self.clients.discard(client))
        client.start()

    def _client(self, transport: Transport, peer: str) -> Connection:
        """The connection object for an accepted socket; protocol listeners override it."""
        return StreamClient(transport, peer, self.cfg, self.hub, self.reactor, initial=self.banner_for(peer))

    def banner_for(self, peer: str) -> bytes:
        """The listener's banner (muxd.banner) for this client, expanded now:
        the settings it names are those in force at this connect."""
        if not self.cfg.banner:
            return b""
        lc = self.line_control
        # Every real upstream describes itself as "serial:PATH", "tcp:HOST:PORT"
        # (muxd.upstream.base.Upstream); line control knows it only as a settings owner.
        describe = getattr(lc.upstream, "describe", None) if lc is not None else None
        device = str(describe()).partition(":")[2] if describe is not None else ""
        context = BannerContext(
            port=(self.bound_address or "").rpartition(":")[2] if self.cfg.kind != "unix" else "",
            device=device,
            settings=lc.settings if lc is not None else None,
            name=self.hub.name,
            peer=peer.rpartition(":")[0].strip("[]") if self.cfg.kind != "unix" else "",
        )
        return expand(self.cfg.banner, context)

    @property
    def bound_address(self) -> str | None:
        """Where it really listens ("127.0.0.1:41234", "[::1]:5000", a path):
        the config may say port 0. None before start()."""
        return self._acceptor.bound_address if self._acceptor is not None else None


def _peer_name(addr: object, cfg: Listener) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return f"unix:{cfg.path}"
