"""Raw byte-stream readers over TCP and Unix sockets.

A StreamListener owns one listening socket, accepted from by an Acceptor
(bounded batches, a pause on EMFILE), and turns each connection into a
client, refusing those over ``max_clients``.

A StreamClient is one connection. Output goes straight from the hub's ring to
the socket: ``send`` of one memoryview, or ``sendmsg`` of two when the range
wraps. It asks for EPOLLOUT only while the kernel's buffer is full, so idle
clients cost no wake-ups. Input, for rw listeners, goes to the hub, which may
tell the client to stop reading (backpressure). EOF, ECONNRESET and EPIPE are
ordinary disconnects. Closing shuts down the write side first and discards
unread input, so the peer sees FIN after the last byte rather than RST.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import logging
import os
import socket
import stat
from collections.abc import Callable

from muxd.config import Listener
from muxd.hub import Hub, Reader
from muxd.listeners.acceptor import Acceptor, bind_tcp
from muxd.reactor import ERRMASK, IN, OUT, Reactor, Timer, is_disconnect

log = logging.getLogger("muxd.listener")

# The kernel's send buffer per client. Left alone, Linux autotunes it up to
# net.ipv4.tcp_wmem's max (4 MiB): memory our accounting cannot see, backlog
# the overflow policy cannot govern. 64 KiB (the kernel doubles it) is over
# 5 s at 115200 baud and fills any LAN path at serial data rates.
SEND_BUFFER = 64 * 1024
# How long a client that sent input and then half-closed (`printf cmd | nc -q1`)
# keeps receiving. A peer that closed entirely looks the same until muxd next
# sends to it (then it resets), so this is also how long such a peer may count
# as connected on a quiet device: enough for a console's answer, no more.
HALF_CLOSE_LINGER = 5.0
# Unread input discarded at close, at most: enough to avoid an RST in every
# normal case without letting a flooding peer hold up the close.
CLOSE_DRAIN = 64 * 1024


class StreamClient:
    # Output is the ring's bytes unchanged, so the hub may write them directly.
    # A subclass that encodes its output (RFC 2217 escaping) must set False.
    PLAIN = True

    def __init__(self, sock: socket.socket, peer: str, cfg: Listener, hub: Hub, reactor: Reactor) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.cfg = cfg
        self.hub = hub
        self.reactor = reactor
        self.closed = False
        self.finishing = False
        self._had_input = False
        self._input_ended = False
        self._linger: Timer | None = None
        self.on_close: list[Callable[[StreamClient], None]] = []
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # The hub already batches; Nagle would only add latency to small frames.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The hub's fan-out pass calls these directly: C-level callables, no
        # Python frame per client per chunk (see Hub._flush).
        self.write = functools.partial(os.write, self.fd)
        self.writev = functools.partial(os.writev, self.fd)
        self.reader: Reader = hub.attach(self, cfg, peer)
        if self.PLAIN:
            self.reader.transport = self
        reactor.add(self.fd, IN, self._on_events, self._on_internal_error)
        self.on_data()  # history or already-published bytes, if any

    # -- Transport (the hub's fast path) ------------------------------------

    def blocked(self) -> None:
        self._set_blocked(True)

    def failed(self, exc: OSError) -> None:
        self._gone(exc)

    # -- ReaderOwner ------------------------------------------------------------

    def on_data(self) -> None:
        if self.closed:
            return
        hub, reader = self.hub, self.reader
        try:
            hub.drain(reader, self.writev)
        except OSError as exc:
            self._gone(exc)
            return
        if reader.id not in hub.readers:  # closed by the overflow policy
            return
        if self.finishing and hub.caught_up(reader):
            self.close("shutdown")
            return
        self._set_blocked(not hub.caught_up(reader))

    def on_write_room(self) -> None:
        if not self.closed:
            self._watch()

    def finish(self) -> None:
        """Graceful stop: stop reading, send what this reader is owed, then close."""
        self.finishing = True
        self.reader.transport = None  # on_data() decides when it is done
        self._watch()
        self.on_data()

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        if self._linger is not None:
            self._linger.cancel()
        self.hub.detach(self.reader, reason)
        self.reactor.remove(self.fd)
        for callback in self.on_close:
            callback(self)
        log.debug("%s: %s disconnected (%s)", self.cfg.name, self.peer, reason)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            for _ in range(CLOSE_DRAIN // 4096):
                if not self.sock.recv(4096):
                    break
        self.sock.close()

    # -- events -------------------------------------------------------------

    def _set_blocked(self, blocked: bool) -> None:
        if blocked != self.reader.blocked:
            self.hub.set_blocked(self.reader, blocked)
            if not self.closed:  # the overflow policy may have closed it
                self._watch()

    def _watch(self) -> None:
        mask = 0 if self.reader.input_paused or self.finishing or self._input_ended else IN
        if self.reader.blocked:
            mask |= OUT
        self.reactor.modify(self.fd, mask)

    def _on_events(self, mask: int) -> None:
        if mask & OUT:
            self.on_data()
        if self.closed:
            return
        if self._input_ended and mask & ERRMASK:
            self.close("peer closed")  # the half-closed peer is gone entirely
        elif mask & (IN | ERRMASK):
            self._on_readable()

    def _on_readable(self) -> None:
        budget = self.hub.input_budget(self.reader)
        if budget == 0:
            self._watch()  # the write queue is full: stop reading until it drains
            return
        try:
            data = self.sock.recv(budget)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(exc)
            return
        if not data:
            self._end_of_input()
            return
        self._had_input = True
        self._received(data)

    def _end_of_input(self) -> None:
        """EOF. A client that sent nothing (a probe, a reader) is gone. One that
        sent input may have only half-closed and still await the answer."""
        if not self._had_input:
            self.close("peer closed")
            return
        self._input_ended = True
        self.hub.input_ended(self.reader)
        self._linger = self.reactor.call_later(HALF_CLOSE_LINGER, lambda: self.close("peer closed"))
        self._watch()

    def _received(self, data: bytes) -> None:
        """Bytes from the peer; a protocol subclass decodes them first."""
        self.hub.submit(self.reader, data)

    def _gone(self, exc: OSError) -> None:
        if self._input_ended:  # it had said it was done: this is how its close shows
            self.close("peer closed")
            return
        if not is_disconnect(exc):
            log.warning("%s: %s: %s", self.cfg.name, self.peer, exc)
        self.close("reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else "error")

    def _on_internal_error(self, _exc: BaseException) -> None:
        self.close("internal error")


class StreamListener:
    def __init__(self, cfg: Listener, hub: Hub, reactor: Reactor, sock: socket.socket | None = None) -> None:
        self.cfg = cfg
        self.hub = hub
        self.reactor = reactor
        self.clients: set[StreamClient] = set()
        self._sock = sock  # passed in by socket activation, or bound in start()
        self._acceptor: Acceptor | None = None
        self._owns_path = False

    def start(self) -> None:
        cfg = self.cfg
        sock = self._sock or (self._bind_unix() if cfg.kind == "unix" else bind_tcp(cfg.host, cfg.port))
        self._sock = None  # the acceptor owns it from here
        self._acceptor = Acceptor(cfg.name, sock, self.reactor, self._on_connection)
        self._acceptor.start()
        log.info("%s: listening on %s (%s)", self.hub.name, cfg.address, cfg.mode)

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
        stats = self.hub.stats_for(self.cfg)
        if len(self.clients) >= self.cfg.max_clients:
            stats.rejected += 1
            log.warning("%s: %s refused: max_clients (%d) reached", self.cfg.name, peer, self.cfg.max_clients)
            conn.close()
            return
        log.debug("%s: %s connected", self.cfg.name, peer)
        client = self._client(conn, peer)
        if not client.closed:
            self.clients.add(client)
            client.on_close.append(self.clients.discard)

    def _client(self, conn: socket.socket, peer: str) -> StreamClient:
        """The connection object for an accepted socket; protocol listeners override it."""
        return StreamClient(conn, peer, self.cfg, self.hub, self.reactor)


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
