"""The control socket: the HTTP API on a Unix socket, where connecting is the admin right.

``control: /run/muxd/control.sock`` (muxd.yaml(5)) makes one ControlFront:
an HttpFront (muxd.listeners.http) that listens on a Unix socket instead of
TCP and serves the same routes (``/api/v1``, ``/metrics``, ``/ws``). Who may
open the socket is decided by its file mode and group (``socket_mode``,
``group``, as for a unix listener), so every request on it is allowed as an
admin's: no token, no Host check (no browser reaches a Unix socket, so DNS
rebinding has nothing to aim at), no Origin check, no loopback rule. This is
how a local process (`muxd ctl --control`, the ser2net mode's hold_ports in
muxd.apiclient) adds a port for its lifetime without a secret to keep.

The socket file is made with a umask that leaves it to its owner until the
configured mode is set, so nobody can connect in between; a stale socket left
by a dead instance is replaced, a live one is never stolen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping

import h11

from muxd.api import PortManager
from muxd.config import ControlSocket, HttpServer
from muxd.listeners.acceptor import Acceptor, bind_unix
from muxd.listeners.http import MAX_CONNECTIONS, HttpFront, HttpTimeouts
from muxd.listeners.http_reply import Reply
from muxd.port import PortRuntime
from muxd.reactor import Reactor
from muxd.transport import SocketTransport

log = logging.getLogger("muxd.http")

# How requests on the socket are named in logs and in "changed by".
PEER = "control"


class ControlFront(HttpFront):
    """The HTTP API on the ``control:`` socket; every request is an admin's."""

    def __init__(
        self,
        cfg: ControlSocket,
        ports: Callable[[], Mapping[str, PortRuntime]],
        reactor: Reactor,
        manager: PortManager | None,
        timeouts: HttpTimeouts | None = None,
    ) -> None:
        srv = HttpServer("", 0, PEER)
        super().__init__(srv, ports, reactor, None, timeouts or HttpTimeouts(), manager=manager)
        self.control = cfg
        self._owns_path = False

    def start(self) -> None:
        path = self.control.path
        sock = bind_unix(path, self.control.file_mode, self.control.group)
        self._owns_path = True
        self._acceptor = Acceptor(PEER, sock, self.reactor, self._on_connection)
        self._acceptor.start()
        log.info("control socket at %s (mode %04o)", path, self.control.file_mode)

    def stop(self) -> None:
        super().stop()
        self._unlink()

    def _unlink(self) -> None:
        if self._owns_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.control.path)
            self._owns_path = False

    def _on_connection(self, conn: socket.socket, addr: object) -> None:
        # One peer (the file mode chose who): only the server's bound applies.
        if len(self.connections) >= MAX_CONNECTIONS:
            self.refusals.warning(
                PEER, "connections", "control: refused: %d connections open", MAX_CONNECTIONS
            )
            conn.close()
            return
        self._start_connection(SocketTransport(conn), PEER, PEER)

    # Being able to connect is the right: see the module docstring.

    def _host_refusal(
        self, request: h11.Request, authority: str | None, peer_host: str
    ) -> tuple[int, str] | None:
        return None

    def _token_refusal(
        self, request: h11.Request, need: str, api_path: bool, websocket: bool = False
    ) -> Reply | None:
        return None

    def _admin_refusal(self, request: h11.Request, peer_host: str) -> str | None:
        return None
