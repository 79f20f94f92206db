"""systemd integration: readiness, watchdog, socket activation and journald.

Theory of operation. systemd talks to a service through the environment and
two tiny protocols, so muxd works with or without systemd-python (the optional
``systemd`` extra, Debian's python3-systemd):

- sd_notify: one datagram of newline-separated ``KEY=VALUE`` states sent to the
  AF_UNIX socket named by $NOTIFY_SOCKET (a path, or an abstract name written
  with a leading ``@``). Not under systemd means no $NOTIFY_SOCKET, and every
  call is a cheap no-op that returns False.
- watchdog: $WATCHDOG_USEC (and $WATCHDOG_PID, when set, naming us) asks for a
  ``WATCHDOG=1`` more often than that; we ping at half the interval, as
  sd_watchdog_enabled(3) advises.
- socket activation: fds 3.. ($LISTEN_FDS of them, when $LISTEN_PID is us),
  named by $LISTEN_FDNAMES. Names match the config's listener ``name:`` keys.
  The variables are removed afterwards so that children never think the fds
  are theirs.
- logging: when stderr *is* the journal stream ($JOURNAL_STREAM holds its
  device:inode) journald already timestamps every line, so we drop ours; with
  systemd-python we log natively instead, so ``extra={"MUXD_PORT": ...}``
  becomes a journal field that ``journalctl MUXD_PORT=dut1`` can match.

When systemd-python is importable it does the talking (libsystemd knows every
transport, present and future); otherwise the stdlib code below speaks the same
protocols.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
import time
from types import ModuleType

from muxd.errors import ConfigError

# systemd's variables for the processes it starts: with none of them set,
# nothing here talks to systemd, and the stdlib fallbacks below are enough.
SYSTEMD_VARS = ("NOTIFY_SOCKET", "LISTEN_FDS", "JOURNAL_STREAM", "WATCHDOG_USEC")


def systemd_python() -> tuple[ModuleType, ModuleType] | None:
    """systemd-python's daemon and journal modules, or None if not installed."""
    try:
        # By name, not `from systemd import ...`: a checker run from the source tree
        # would take the repo's systemd/ directory (the unit files) for the package.
        return importlib.import_module("systemd.daemon"), importlib.import_module("systemd.journal")
    except ImportError:
        return None


# Loaded only under systemd: libsystemd and what it links (libgcrypt, lz4,
# zstd, lzma) cost about 2 MiB that a process started by hand never uses.
_loaded = systemd_python() if any(var in os.environ for var in SYSTEMD_VARS) else None
_sd_daemon: ModuleType | None = _loaded[0] if _loaded else None
_sd_journal: ModuleType | None = _loaded[1] if _loaded else None

log = logging.getLogger(__name__)

LISTEN_FDS_START = 3  # sd_listen_fds(3): passed fds always start right after stdio
_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_STDERR_FORMAT = "%(levelname)s %(name)s: %(message)s"
# syslog priorities by logging level: journald reads a "<N>" line prefix as the priority
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

_notify_failed = False  # a broken $NOTIFY_SOCKET is reported once, not on every watchdog ping


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. "READY=1", "STATUS=...") to systemd as one datagram.

    Returns True when sent, False when not under systemd or when sending
    failed (logged once). "RELOADING=1" gets the "MONOTONIC_USEC=" stamp that
    systemd >= 253 requires for reloads, unless the caller gave one.
    """
    global _notify_failed
    if "RELOADING=1" in states and not any(s.startswith("MONOTONIC_USEC=") for s in states):
        states = (*states, f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    message = "\n".join(states)
    try:
        if _sd_daemon is not None:
            return bool(_sd_daemon.notify(message))
        return _notify_stdlib(message.encode())
    except OSError as e:
        if not _notify_failed:
            _notify_failed = True
            log.warning("cannot notify systemd at %r: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False


def _notify_stdlib(message: bytes) -> bool:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        raise OSError(f"unsupported NOTIFY_SOCKET transport {address!r} (install python3-systemd)")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message, address)
    return True


def watchdog_interval() -> float | None:
    """Seconds between "WATCHDOG=1" pings (half of $WATCHDOG_USEC), or None if not asked."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = os.environ.get("WATCHDOG_PID")
        if pid is not None and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def listen_fds() -> dict[str, list[socket.socket]]:
    """Sockets passed by socket activation, by FileDescriptorName ("unknown" if unnamed).

    Each is non-blocking and close-on-exec. Raises ConfigError when a passed fd
    is not a socket (a ListenFIFO= or similar in the .socket unit).
    """
    if _sd_daemon is not None:
        named = list(_sd_daemon.listen_fds_with_names(True).items())
    else:
        named = _listen_fds_stdlib()
    for var in _LISTEN_VARS:  # libsystemd only unsets the C environ, not os.environ
        os.environ.pop(var, None)
    result: dict[str, list[socket.socket]] = {}
    for fd, name in named:
        os.set_inheritable(fd, False)
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ConfigError(f"passed fd {fd} named {name!r} is not a socket: {e}", file="LISTEN_FDS") from e
        sock.setblocking(False)
        result.setdefault(name, []).append(sock)
    return result


def _listen_fds_stdlib() -> list[tuple[int, str]]:
    try:
        if int(os.environ.get("LISTEN_PID", "")) != os.getpid():
            return []
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    return [
        (LISTEN_FDS_START + i, names[i] if i < len(names) and names[i] else "unknown") for i in range(count)
    ]


class _JournalStreamFormatter(logging.Formatter):
    """Plain lines for a stderr that journald reads: a priority prefix, no timestamp."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{super().format(record)}"


def _stderr_is_journal() -> bool:
    try:
        st = os.fstat(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # no stderr, or one without an fd
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str) -> None:
    """Route the root logger to journald or stderr at ``level`` (debug|info|warning|error).

    Safe to call again (on reload): it replaces the handler it installed before.
    """
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    handler: logging.Handler
    if _stderr_is_journal():
        if _sd_journal is not None:
            handler = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER="muxd")
            handler.setFormatter(logging.Formatter("%(message)s"))
        else:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(_JournalStreamFormatter(_STDERR_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s " + _STDERR_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
