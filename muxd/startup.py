"""What a start needs before anything is made, and how a failure is told.

A start (muxd.daemon: the daemon's start, a port or listener added by reload
or through the API) runs in three phases: check everything, bind every
listening socket, then create the rest (pty links, trace files, upstreams);
a failure undoes what was done. This module holds the pieces of the first
phase and the words of a failure: the listener factories by kind, the checks
of a path, a group and a pty link, and StartError with its one-line cause
(the port, the listener and its address, and why).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

from muxd import config as configmod
from muxd.checks import group_problem
from muxd.config import HttpServer, Listener
from muxd.errors import MuxdError
from muxd.listeners.pty import PtyListener
from muxd.listeners.rfc2217 import Rfc2217Listener
from muxd.listeners.stream import StreamListener
from muxd.port import ListenerRuntime, PortRuntime
from muxd.reactor import Reactor

ListenerFactory = Callable[[Listener, PortRuntime, Reactor, "socket.socket | None"], ListenerRuntime]


def _stream(cfg: Listener, rt: PortRuntime, reactor: Reactor, sock: socket.socket | None) -> ListenerRuntime:
    return StreamListener(cfg, rt.hub, reactor, sock, rt.line_control)  # type: ignore[return-value]


def _rfc2217(cfg: Listener, rt: PortRuntime, reactor: Reactor, sock: socket.socket | None) -> ListenerRuntime:
    return Rfc2217Listener(cfg, rt.hub, reactor, rt.line_control, sock)  # type: ignore[return-value]


def _pty(cfg: Listener, rt: PortRuntime, reactor: Reactor, sock: socket.socket | None) -> ListenerRuntime:
    if sock is not None:
        raise MuxdError(f"socket activation passed a socket named {cfg.name!r}, a pty listener")
    return PtyListener(cfg, rt.hub, reactor, rt.line_control)  # type: ignore[return-value]


# Listener kinds with their own sockets. `websocket` has none: it is served by
# the HTTP servers at /ws/<port>.
LISTENER_FACTORIES: dict[str, ListenerFactory] = {
    "tcp": _stream,
    "unix": _stream,
    "rfc2217": _rfc2217,
    "pty": _pty,
}
# The kinds that bind a listening socket (phase 2 of a start; a pty is made in phase 3).
SOCKET_KINDS = frozenset({"tcp", "unix", "rfc2217"})


class StartError(MuxdError):
    """A listener or HTTP server that cannot start, as one line: the port, the
    listener and its address, and the cause. The CLI prints it and exits 2,
    since what fails at start (a busy address, a missing directory, an
    unknown group, an unreadable token or certificate file) is for the
    operator to fix, and a restart cannot."""


def check_group(group: str | int | None) -> None:
    problem = group_problem(group)
    if problem is not None:
        raise MuxdError(problem)


def check_path(path: str, group: str | int | None) -> None:
    """What a Unix socket, pty link or trace file needs before it is made:
    its directory, and its group."""
    parent = os.path.dirname(path) or "/"
    if not os.path.isdir(parent):
        raise OSError(errno.ENOENT, "no directory", path)
    check_group(group)


def check_pty_link(path: str) -> None:
    # A pty link replaces an old link, never a file (muxd.listeners.pty).
    if os.path.lexists(path) and not os.path.islink(path):
        raise OSError(errno.EEXIST, f"{path} exists and is not a symlink; not replacing it")


def check_start(what: str, check: Callable[[], object]) -> None:
    try:
        check()
    except (OSError, MuxdError) as exc:
        raise StartError(f"{what}: {start_cause(exc, getattr(exc, 'filename', None) or '')}") from exc


def listener_what(port: str, cfg: Listener) -> str:
    # The address, unless the (default) name already says it.
    return f"port {port}, listener {cfg.name}" + (f" ({cfg.address})" if cfg.address not in cfg.name else "")


def http_address(srv: HttpServer) -> str:
    return configmod.format_hostport(srv.host, srv.port)


def http_what(srv: HttpServer) -> str:
    address = http_address(srv)
    return f"http server {srv.name}" + (f" ({address})" if address not in srv.name else "")


def start_cause(exc: BaseException, path: str = "") -> str:
    """Why a start failed, in words, without the repetition of errno texts."""
    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return "address already in use"
        if exc.errno == errno.EADDRNOTAVAIL:
            return "no such address on this machine"
        if exc.errno == errno.ENOENT and path:
            return f"directory {os.path.dirname(path) or '/'} does not exist"
        if exc.errno in (errno.EACCES, errno.EPERM):
            where = f" ({exc.filename})" if exc.filename and exc.filename != path else ""
            return f"permission denied{where}"
        return exc.strerror or str(exc)
    return str(exc)
