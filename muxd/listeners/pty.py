"""The pty listener: a tty device that programs open like a serial port.

muxd creates a pseudo-terminal, keeps the master and publishes the slave at
the configured path as a symlink (replaced atomically; a file there that is
not a symlink is never replaced). The slave device gets ``link_mode`` and
``group`` so that, say, a dialout user can open it; when that is not allowed
(chgrp to a group muxd is not in) it says so in the log and carries on.

Sessions. Each time a program opens the slave, a session starts: one hub
reader, attached at that moment, so the program sees the device's output from
its open on, as with a real serial port, and never a backlog left from the
last program. When the last fd of the slave is closed, Linux reports HUP on
the master and reads fail with EIO (after what the program wrote has been
read). The session then ends, and muxd flushes the slave's queues (bytes
written to the master that the program never read would otherwise greet the
next program) and resets its termios to the settings in force. The listener
stays. While no program has the slave open, nothing is written to the
master, so no device output accumulates in the kernel; the hub counts the pty
as no reader at all.

Noticing the next open: HUP is level-triggered and reported whatever the
epoll mask, so the master cannot stay in the reactor while nobody has the
slave open without the loop spinning. It is taken out, and a zero-timeout
poll() checks it every ``OPEN_POLL`` seconds, as socat's ``wait-slave``
does: a session starts once HUP clears (a program has it open) or input is
pending (a program opened, wrote and closed between two checks, as
``echo reboot > /run/muxd/ttyDUT0`` does: its bytes still reach the device).
The cost is a wake-up every 100 ms per idle pty and up to 100 ms of device
output missed just after an open. The alternative, a spare slave fd kept open
by muxd so that HUP never comes, hides the closes too, and with them the end
of a session: stale bytes and a line-settings owner that never leaves.

Line settings. The master is in packet mode (TIOCPKT) and the slave has
EXTPROC set, so every tcsetattr() on the slave reaches muxd as a
TIOCPKT_IOCTL status. When a program's baud rate, stop bits or flow control
differ from what the session last saw, that is a request to the port's
LineControl; when it is refused the slave's termios are set back to the
settings in force, as an RFC 2217 server answers with the value in force.
Under ``line_control: virtual`` (the default) every request is acknowledged:
the slave's termios stay as the program set them, and the device keeps its
own settings.
Limits: a Linux pty forces 8 data bits and no parity whatever is asked, so
those two cannot be requested through a pty (use rfc2217); only the standard
Bnnn rates are seen (a custom rate set with BOTHER is not a request); and a
program that clears EXTPROC (by zeroing c_lflag) is not heard after that;
cfmakeraw() and pyserial keep it.

Hang-up. Closing the session from muxd's side (overflow with ``disconnect``,
an admin's disconnect) hangs the program up the way an unplugged USB adapter
does: the master is closed, so the program's reads return EOF, and a new pty
is published at the same path for it to open again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import select
import stat
import struct
import termios
import tty
from typing import Any

from muxd.checks import group_id
from muxd.config import Listener
from muxd.connection import Connection
from muxd.fdconn import State
from muxd.hub import Hub
from muxd.linecontrol import LineControl
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor, Timer
from muxd.transport import PtyTransport

log = logging.getLogger("muxd.listener")

# How often a pty that no program has open is checked for an open.
OPEN_POLL = 0.1
# Linux values Python's termios module lacks (asm-generic/termbits.h, tty.h).
EXTPROC = 0o200000
TIOCPKT_IOCTL = 0x40

_SPEEDS = {
    int(name[1:]): getattr(termios, name) for name in dir(termios) if name[1:].isdigit() and name[0] == "B"
}
_RATES = {code: rate for rate, code in _SPEEDS.items()}
_IFLAG, _CFLAG, _LFLAG, _ISPEED, _OSPEED = 0, 2, 3, 4, 5


def read_line_settings(attrs: list[Any], fallback: LineSettings) -> LineSettings:
    """The line settings a pty's termios say. Data bits and parity, which a
    Linux pty forces to 8 and none, and a rate termios cannot name, are
    fallback's."""
    iflag: int = attrs[_IFLAG]
    cflag: int = attrs[_CFLAG]
    flow = "rtscts" if cflag & termios.CRTSCTS else "xonxoff" if iflag & termios.IXON else "none"
    return dataclasses.replace(
        fallback,
        baudrate=_RATES.get(attrs[_ISPEED], 0) or fallback.baudrate,
        # CSTOPB means 1.5 as well as 2 (pyserial's mapping): keep a 1.5 we knew.
        stopbits=(2 if fallback.stopbits == 1 else fallback.stopbits) if cflag & termios.CSTOPB else 1,
        flow=flow,
    )


def write_line_settings(attrs: list[Any], settings: LineSettings) -> None:
    """Put what a pty's termios can hold of settings into an attribute list."""
    iflag: int = attrs[_IFLAG]
    cflag: int = attrs[_CFLAG]
    cflag &= ~(termios.CSTOPB | termios.CRTSCTS)
    iflag &= ~(termios.IXON | termios.IXOFF | termios.IXANY)
    if settings.stopbits != 1:
        cflag |= termios.CSTOPB
    if settings.flow == "rtscts":
        cflag |= termios.CRTSCTS
    elif settings.flow == "xonxoff":
        iflag |= termios.IXON | termios.IXOFF
    attrs[_IFLAG], attrs[_CFLAG] = iflag, cflag
    speed = _SPEEDS.get(settings.baudrate)
    if speed is not None:
        attrs[_ISPEED] = attrs[_OSPEED] = speed


class PtySession(Connection):
    """One program's use of the slave, from its open to its last close: the
    connection core over the master, one hub reader."""

    HALF_CLOSE = False

    def __init__(self, listener: PtyListener) -> None:
        self.listener = listener
        # The line settings the program asked for last; a tcsetattr that leaves
        # them alone (VMIN, echo, ...) is no request. It starts from what muxd
        # showed on the slave before the program opened it (the settings in
        # force, as far as a pty holds them): a program that set its baud rate
        # before this session began has a request pending, judged against that.
        settings = listener.line_control.settings
        shown = termios.tcgetattr(listener.master)
        write_line_settings(shown, settings)
        self._seen = read_line_settings(shown, settings)
        master = PtyTransport(listener.master)
        super().__init__(master, listener.hub, listener.cfg, f"pty:{listener.slave_name}", listener.reactor)

    def on_write_room(self) -> None:
        if self.state is State.PARKED:
            self._unpark()  # what the program wrote can go to the device now
        super().on_write_room()

    def _hung_up(self) -> None:
        if self.state is State.OPEN and self.reader.input_paused:
            # The program closed the slave while its input waits for room in
            # the write queue: what it wrote is still unread in the master, so
            # the session stays PARKED, out of epoll (whose HUP would otherwise
            # wake the loop without end), until the queue drains.
            self._park()
        else:
            super()._hung_up()

    def _received(self, packet: bytes) -> None:
        # Packet mode: a status byte first (muxd.transport.PtyTransport).
        if packet[0] == termios.TIOCPKT_DATA:
            self._submit(packet[1:])  # through the escape, where it has one
        elif packet[0] & TIOCPKT_IOCTL:
            self._termios_changed()
        # Other statuses (the program flushed or stopped its queues) need nothing.

    def _termios_changed(self) -> None:
        attrs = termios.tcgetattr(self.fd)  # on a Linux master: the slave's termios
        wanted = read_line_settings(attrs, self._seen)
        if wanted == self._seen:
            return
        granted = self.listener.line_control.request(self.reader, wanted)
        if granted != wanted:
            write_line_settings(attrs, granted)
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
            attrs = termios.tcgetattr(self.fd)
        self._seen = read_line_settings(attrs, granted)

    def _closed(self, reason: str) -> None:
        """The session ends. A close muxd decided (overflow, admin, shutdown)
        hangs the program up (see the module doc); the program's own close
        does not."""
        self.listener.line_control.release(self.reader)
        self.listener.session_ended(self, hangup=reason != "peer closed")


class PtyListener:
    def __init__(self, cfg: Listener, hub: Hub, reactor: Reactor, line_control: LineControl) -> None:
        self.cfg = cfg
        self.hub = hub
        self.reactor = reactor
        self.line_control = line_control
        self.clients: set[Connection] = set()  # the session, while a program has the slave open
        self.master = -1
        self.slave_name = ""
        self._poller = select.poll()
        self._timer: Timer | None = None
        self._stopped = False

    def start(self) -> None:
        self._stopped = False
        self._create()
        log.info("%s: pty %s -> %s (%s)", self.hub.name, self.cfg.path, self.slave_name, self.cfg.mode)

    def stop(self) -> None:
        """Unpublish the path; a program that has the slave open keeps its session."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(OSError):  # gone, or no longer ours: leave it alone
            if os.readlink(self.cfg.path) == self.slave_name:
                os.unlink(self.cfg.path)
        if not self.clients:
            self._close_master()

    def session_ended(self, session: PtySession, hangup: bool) -> None:
        self.clients.discard(session)
        if hangup or self._stopped:
            self._close_master()  # the program sees a hang-up
            if not self._stopped:
                try:
                    self._create()
                except OSError as exc:
                    log.error("%s: cannot create a new pty: %s; listener stopped", self.cfg.name, exc)
        else:
            self._reset_slave()
            self._timer = self.reactor.call_later(OPEN_POLL, self._check_open)

    # -- the pty ------------------------------------------------------------

    def _create(self) -> None:
        master, slave = os.openpty()  # both close-on-exec
        try:
            self.slave_name = os.ttyname(slave)
            tty.setraw(slave)
            attrs = termios.tcgetattr(slave)
            attrs[_LFLAG] |= EXTPROC  # so that the program's tcsetattr() reaches us
            self._show_settings(slave, attrs)
            fcntl.ioctl(master, termios.TIOCPKT, struct.pack("i", 1))
            os.set_blocking(master, False)
            self._set_permissions()
            self._publish()
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.master = master
        self._poller = select.poll()
        self._poller.register(master, select.POLLIN)
        self._timer = self.reactor.call_later(0, self._check_open)

    def _close_master(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def _set_permissions(self) -> None:
        name, cfg = self.slave_name, self.cfg
        try:
            os.chmod(name, cfg.file_mode)
        except OSError as exc:
            log.error("%s: cannot chmod %s to %04o: %s", cfg.name, name, cfg.file_mode, exc.strerror)
        if cfg.group is None:
            return
        try:
            os.chown(name, -1, group_id(cfg.group))
        except KeyError:
            log.error("%s: cannot chgrp %s: no group %r", cfg.name, name, cfg.group)
        except OSError as exc:
            log.error(
                "%s: cannot chgrp %s to %s: %s (is muxd a member of that group?)",
                cfg.name,
                name,
                cfg.group,
                exc.strerror,
            )

    def _publish(self) -> None:
        path = self.cfg.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISLNK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a symlink; not replacing it")
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(self.slave_name, tmp)
        os.replace(tmp, path)  # atomic: a program opening the path finds the old or the new pty

    def _check_open(self) -> None:
        self._timer = None
        if self._stopped or self.master < 0:
            return
        events = 0
        for _fd, ev in self._poller.poll(0):
            events |= ev
        if events & select.POLLHUP and not events & select.POLLIN:
            self._timer = self.reactor.call_later(OPEN_POLL, self._check_open)
            return
        session = PtySession(self)
        self.clients.add(session)
        session.start()

    def _show_settings(self, fd: int, attrs: list[Any]) -> None:
        """Set the slave's termios to the settings in force, as far as they go."""
        settings = self.line_control.settings
        write_line_settings(attrs, settings)
        termios.tcsetattr(fd, termios.TCSANOW, attrs)

    def _reset_slave(self) -> None:
        """Discard what the last program left unread, and show the settings in force."""
        try:
            fd = os.open(self.slave_name, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            log.warning("%s: cannot reset %s: %s", self.cfg.name, self.slave_name, exc.strerror)
            return
        try:
            termios.tcflush(fd, termios.TCIOFLUSH)
            self._show_settings(fd, termios.tcgetattr(fd))
        except termios.error as exc:
            log.warning("%s: cannot reset %s: %s", self.cfg.name, self.slave_name, exc)
        finally:
            os.close(fd)
        # Re-entering packet mode clears the statuses our own flush and
        # tcsetattr() left, which would otherwise look like a program's.
        fcntl.ioctl(self.master, termios.TIOCPKT, struct.pack("i", 0))
        fcntl.ioctl(self.master, termios.TIOCPKT, struct.pack("i", 1))
