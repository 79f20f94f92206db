"""Raw byte-stream readers over TCP and Unix sockets.

A StreamListener owns one listening socket, accepted from by an Acceptor
(bounded batches, a pause on EMFILE), and turns each connection into a
StreamClient, refusing those over ``max_clients``.

A StreamClient is the connection core (muxd.connection) over a socket with no
encoder: the hub's fan-out pass writes the ring's bytes to it directly, one
memoryview or two (the range wrapped), zero copy. Everything else, from
backpressure to the half-close linger and the graceful close, is the core's.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat

from muxd.config import Listener
from muxd.connection import Connection
from muxd.hub import Hub
from muxd.listeners.acceptor import Acceptor, bind_tcp
from muxd.ratelimit import LogLimiter
from muxd.reactor import Reactor
from muxd.transport import SocketTransport

log = logging.getLogger("muxd.listener")


class StreamClient(Connection):
    def __init__(self, sock: socket.socket, peer: str, cfg: Listener, hub: Hub, reactor: Reactor) -> None:
        super().__init__(SocketTransport(sock), hub, cfg, peer, reactor)


class StreamListener:
    def __init__(self, cfg: Listener, hub: Hub, reactor: Reactor, sock: socket.socket | None = None) -> None:
        self.cfg = cfg
        self.hub = hub
        self.reactor = reactor
        self.clients: set[Connection] = set()
        self._sock = sock  # passed in by socket activation, or bound in start()
        self._acceptor: Acceptor | None = None
        self._owns_path = False
        self.refusals = LogLimiter(log)  # one line per peer a minute, however many refusals

    def start(self) -> None:
        cfg = self.cfg
        sock = self._sock or (self._bind_unix() if cfg.kind == "unix" else bind_tcp(cfg.host, cfg.port))
        self._sock = None  # the acceptor owns it from here
        self._acceptor = Acceptor(cfg.name, sock, self.reactor, self._on_connection)
        self._acceptor.start()
        log.info("%s: listening on %s (%s)", self.hub.name, self.bound_address, cfg.mode)

    def _bind_unix(self) -> socket.socket:
        path = self.cfg.path
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
            self._owns_path = True
            os.chmod(path, self.cfg.file_mode)
            if self.cfg.group is not None:
                gid = (
                    self.cfg.group if isinstance(self.cfg.group, int) else grp.getgrnam(self.cfg.group).gr_gid
                )
                os.chown(path, -1, gid)
            sock.listen(socket.SOMAXCONN)
        except (OSError, KeyError):
            sock.close()
            raise
        return sock

    def stop(self) -> None:
        """Stop accepting; connected clients are left to the caller."""
        if self._acceptor is not None:
            self._acceptor.stop()
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.cfg.path)
            self._owns_path = False

    def _on_connection(self, conn: socket.socket, addr: object) -> None:
        self._accepted(conn, _peer_name(addr, self.cfg))

    def _accepted(self, conn: socket.socket, peer: str) -> None:
        if len(self.clients) >= self.cfg.max_clients:
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
        client = self._client(conn, peer)
        self.clients.add(client)
        client.on_close.append(self.clients.discard)
        client.start()

    def _client(self, conn: socket.socket, peer: str) -> Connection:
        """The connection object for an accepted socket; protocol listeners override it."""
        return StreamClient(conn, peer, self.cfg, self.hub, self.reactor)

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


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by a dead instance; refuse to steal a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
