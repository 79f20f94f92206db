"""A listening socket in the event loop: bind, a bounded accept loop, and a
pause instead of a spin when the process runs out of file descriptors.

Connections are taken in batches of ACCEPT_BATCH per wake-up, so a burst of a
thousand connects shares the loop with the device and the readers. On
EMFILE/ENFILE (or a kernel short of memory) the socket is taken out of epoll
for ACCEPT_BACKOFF: level-triggered epoll would otherwise report the same
pending connection forever, and connected clients carry on meanwhile. What
to do with each connection is the owner's business (``on_connection``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from muxd.checks import group_id
from muxd.config import format_hostport
from muxd.reactor import IN, Reactor

log = logging.getLogger("muxd.listener")

# Connections taken per wake-up: bounded so a connect storm shares the loop.
ACCEPT_BATCH = 64
# Pause after EMFILE/ENFILE before trying to accept again.
ACCEPT_BACKOFF = 0.5


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        # A restarted daemon must bind at once, not after TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # IPv6 only, whatever net.ipv6.bindv6only says: "[::]:P" then leaves
            # IPv4 to a "0.0.0.0:P" listener beside it, with its own allow-list
            # (muxd.yaml(5), address; tests/test_netns.py).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            # "Address already in use" alone does not say which of several
            # listeners failed: name the address the way the config writes it.
            exc.filename = format_hostport(host, port)
            raise
        # The kernel caps this at net.core.somaxconn; a small backlog would make
        # a burst of connects wait for SYN retries.
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def bind_unix(path: str, mode: int, group: str | int | None) -> socket.socket:
    """A listening Unix socket at path with this mode and group (a unix
    listener's, the control socket's). It is made under umask 0177, so it is
    never reachable by others before its mode is set; a stale socket file of
    a dead instance is replaced, a live one is never taken over. On failure
    nothing is left behind: the socket is closed, the file this made removed."""
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    made = False
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        made = True
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, group_id(group))
        sock.listen(socket.SOMAXCONN)
    except (OSError, KeyError):
        sock.close()
        if made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    finally:
        os.umask(old_umask)
    return sock


def remove_stale_socket(path: str) -> None:
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


def sock_address(sock: socket.socket) -> str:
    """A bound socket's address as muxd writes addresses: "127.0.0.1:41234",
    "[::1]:5000", or a Unix socket's path."""
    addr = sock.getsockname()
    if isinstance(addr, tuple):
        return format_hostport(str(addr[0]), int(addr[1]))
    # Unix: a str path; an abstract socket's name comes back as bytes.
    return addr if isinstance(addr, str) else addr.decode("utf-8", "backslashreplace")


class Acceptor:
    def __init__(
        self,
        name: str,
        sock: socket.socket,
        reactor: Reactor,
        on_connection: Callable[[socket.socket, object], None],
    ) -> None:
        self.name = name
        self.sock: socket.socket | None = sock
        self.reactor = reactor
        self.on_connection = on_connection
        self._paused = False
        # Read now, while the socket is open: with port 0 in the config only
        # the kernel knows the port, and readers need it after a stop too.
        self.bound_address = sock_address(sock)

    def start(self) -> None:
        assert self.sock is not None
        self.sock.setblocking(False)
        self.reactor.add(self.sock.fileno(), IN, self._on_accept)

    def stop(self) -> None:
        """Close the listening socket; safe to call twice."""
        if self.sock is not None:
            self.reactor.remove(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def _on_accept(self, _mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.sock is None:  # stopped by a callback
                return
            try:
                conn, addr = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the peer gave up while queued
                raise
            self.on_connection(conn, addr)

    def _pause(self, exc: OSError) -> None:
        if self._paused or self.sock is None:
            return
        self._paused = True
        log.error(
            "%s: cannot accept (%s); pausing accepts for %.1fs", self.name, exc.strerror, ACCEPT_BACKOFF
        )
        self.reactor.remove(self.sock.fileno())
        self.reactor.call_later(ACCEPT_BACKOFF, self._resume)

    def _resume(self) -> None:
        self._paused = False
        if self.sock is not None:
            self.reactor.add(self.sock.fileno(), IN, self._on_accept)
