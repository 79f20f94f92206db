"""Transports: the fd end of a connection, and how that fd ends.

A transport moves bytes between a connection (muxd.fdconn, and the hub
readers and HTTP connections built on it) and one fd. It decides nothing: a
full buffer raises BlockingIOError, a dead peer raises OSError, and the
connection decides what that means. A connection never asks which kind of
transport it has: plain or TLS, the shape is the same.

``write``/``writev`` are C-level callables (``functools.partial`` of
``os.write``/``os.writev`` on the fd), so the hub's fan-out pass, which calls
them for every plain reader on every pass, runs no Python frame per reader.

Two kinds exist: ``SocketTransport`` (a TCP or Unix stream socket) and
``PtyTransport`` (the master side of a pty in packet mode). A TLS transport
fits the same shape: ``recv``/``send`` over an ``ssl.SSLObject``, with
``plain = False`` so the hub never writes ring bytes past the encryption
(muxd.tls.TlsTransport). Such a transport may hold bytes of its own: output
the fd has not taken (``unsent``, sent by ``flush()``; the connection watches
EPOLLOUT while there is any) and input already off the fd (``buffered``,
which epoll cannot see; the connection reads it without waiting for a wake-up).
A plain transport holds none: ``unsent`` 0, ``buffered`` False.

Closing a socket gracefully (``graceful_close``): shut down the write side so
the peer sees FIN after the last byte, then read and discard what the peer
still sends, at most CLOSE_DRAIN, because close() with unread input sends RST
instead of FIN, and an RST can destroy the tail of what we sent before the
peer has read it. Then close.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from typing import Protocol

# The kernel's send buffer per client. Left alone, Linux autotunes it up to
# net.ipv4.tcp_wmem's max (4 MiB): memory our accounting cannot see, backlog
# the overflow policy cannot govern. 64 KiB (the kernel doubles it) is over
# 5 s at 115200 baud and fills any LAN path at serial data rates.
SEND_BUFFER = 64 * 1024
# Unread input discarded at close, at most: enough to avoid an RST in every
# normal case without letting a flooding peer hold up the close.
CLOSE_DRAIN = 64 * 1024


class Transport(Protocol):
    fd: int
    # True when the bytes written are the bytes the peer receives (no TLS), so
    # the hub's fan-out pass may write ring views to it directly.
    plain: bool

    def recv(self, n: int) -> bytes:
        """Up to n bytes; b"" at EOF; BlockingIOError when nothing is there."""

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Write some of data; BlockingIOError when full."""

    def write(self, data: memoryview) -> int: ...
    def writev(self, data: list[memoryview]) -> int: ...

    def pending_error(self) -> int:
        """The errno the fd reports (after EPOLLERR), or 0."""

    @property
    def unsent(self) -> int:
        """Bytes the transport holds that the fd has not taken yet."""

    @property
    def buffered(self) -> bool:
        """True when recv() may have data although the fd is not readable."""

    def flush(self) -> None:
        """Offer the fd what the transport holds; OSError if the peer is gone."""

    def close(self) -> None:
        """End the fd: gracefully where the fd has a notion of it. Safe twice."""


def graceful_close(sock: socket.socket) -> None:
    """FIN after the last byte, then a bounded drain, then close (see above)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        for _ in range(CLOSE_DRAIN // 4096):
            if not sock.recv(4096):
                break
    sock.close()


class SocketTransport:
    plain = True
    unsent = 0
    buffered = False

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # The hub already batches; Nagle would only add latency to small frames.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.write = functools.partial(os.write, self.fd)
        self.writev = functools.partial(os.writev, self.fd)
        self.recv = sock.recv
        self.send = sock.send

    def pending_error(self) -> int:
        try:
            return self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            return exc.errno or 0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            graceful_close(self.sock)


class PtyTransport:
    """The master of a pty in packet mode (TIOCPKT): every read starts with a
    status byte, so a read asks for one byte more than the caller's budget.
    The listener owns the master fd and decides when it is closed (a new
    session reuses it), so close() here leaves it open."""

    plain = True
    unsent = 0
    buffered = False

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.write = functools.partial(os.write, fd)
        self.writev = functools.partial(os.writev, fd)
        self.send = self.write

    def recv(self, n: int) -> bytes:
        return os.read(self.fd, n + 1)

    def pending_error(self) -> int:
        return 0  # a pty reports its end as EIO on read

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
