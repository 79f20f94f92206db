"""A local serial port, through pyserial.

pyserial opens the tty with O_NOCTTY|O_NONBLOCK, applies the line settings and,
with ``exclusive=True``, takes an flock so a second program cannot silently
share the port. From then on muxd uses the raw fd in its own event loop.

A USB adapter vanishes when the board is power-cycled. Reads then fail with EIO
or ENXIO, or the fd reports readable and returns nothing. muxd closes it and
reopens the same path: while the path does not exist it checks cheaply every
``PRESENT_POLL`` seconds (so data resumes within a fraction of a second of the
device reappearing, however long it was gone); when the path exists but will
not open (busy, permissions), it backs off exponentially. Readers stay
connected throughout and never see fabricated bytes.

When another program holds the port's lock (a miniterm left open, a second
muxd), the reason names it: the PID and command line of the holder, found in
/proc/locks by the device number and inode of the path, and /proc/PID/cmdline.
The reason stays the same while the holder does, so it is logged once per
outage and the retries at DEBUG.

Line settings: ``settings`` is the one copy of the settings in force, and it
only ever holds values the device took. A change is applied to the open port
first and stored only once pyserial accepted every field; if pyserial or the
driver refuses one (a baud rate past 2**31 overflows the kernel's field, a pty
has no 6-bit data size), the previous settings are put back on the port and
SettingsRefused is raised, so a bad value can never be what the next reopen
uses. While the device is absent a change is validated as far as pyserial can
without a device and stored for the next open; should the device then refuse
it, the port opens with its configured settings instead (logged), never stays
stuck on the refused value.

Control lines: ``control`` holds DTR and RTS as last set (both asserted at
first, as pyserial and the tty driver open a port) and whether a BREAK is on.
A change goes to the open port through pyserial (TIOCMBIS/TIOCMBIC,
TIOCSBRK/TIOCCBRK) and is stored only once the driver took it; a driver
without modem lines (a pty, some USB bridges) refuses with OSError, and that
is SettingsRefused; such a port says so (``control_lines`` False, found
with TIOCMGET at each open), and no view shows levels for it. While the
device is absent DTR and RTS are stored for the next open (pyserial
applies them as it opens), so a board held in reset stays held across a
replug; a BREAK needs a device. The modem inputs (CTS, DSR, RI,
CD) are read with TIOCMGET when asked (``modem_state``), None where the driver
cannot say.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import termios

import serial

from muxd.config import SerialUpstream
from muxd.errors import SettingsRefused
from muxd.hub import Hub
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor
from muxd.upstream.base import READ_SIZE, ControlLines, FdUpstream, ModemLines

log = logging.getLogger("muxd.upstream")

# What pyserial raises for line settings a port will not take: ValueError for a
# value it knows is invalid, OverflowError for a baud rate past the kernel's
# signed 32-bit field, termios.error when the driver refuses a value, and
# SerialException (an OSError) or OSError when the device itself fails.
_REFUSALS = (ValueError, OverflowError, termios.error, OSError)
# Those that say the device will not take the settings, as opposed to the
# device being absent or busy (which the open path backs off from as before).
_SETTINGS_REFUSALS = (ValueError, OverflowError, termios.error)

# How often a missing device path is looked for: a stat() costs nothing, and
# this bounds the resume time after a replug to well under a second.
PRESENT_POLL = 0.2
# A lock holder's command line, as logged, is cut to this: enough for the
# program and its first arguments ("python3 -m serial.tools.miniterm ..."),
# while a JVM's kilobytes of class path stay out of the log.
CMDLINE_MAX = 200


def lock_holders(path: str, proc: str = "/proc") -> list[int]:
    """PIDs holding a lock on the file at path, from proc/locks (matched by the
    device number and inode of what path points to); [] if unknown.

    A line of /proc/locks reads ``1: FLOCK  ADVISORY  WRITE 1234 00:05:3 0 EOF``:
    the PID, then the major:minor (hex) of the file's filesystem and its inode.
    Lines with ``->`` are processes waiting for a lock, not holding it.
    """
    try:
        st = os.stat(path)
        with open(os.path.join(proc, "locks"), encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return []
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    pids: list[int] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6 or "->" in fields:
            continue
        try:
            pid = int(fields[4])
            major, minor, inode = fields[5].split(":")
            key = (int(major, 16), int(minor, 16), int(inode))
        except ValueError:
            continue
        if key == want and pid > 0 and pid not in pids:
            pids.append(pid)
    return pids


def describe_process(pid: int, proc: str = "/proc") -> str:
    """``PID 1234 (python3 -m something)``, or just ``PID 1234`` if its command line is unreadable."""
    try:
        with open(os.path.join(proc, str(pid), "cmdline"), "rb") as f:
            raw = f.read(CMDLINE_MAX + 1)
    except OSError:
        return f"PID {pid}"
    # NULs separate the arguments; any other whitespace (a `-c` script's newlines)
    # would break the log line, so every run of it becomes one space.
    cmd = " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split())
    if len(cmd) > CMDLINE_MAX:
        cmd = cmd[:CMDLINE_MAX] + "..."
    return f"PID {pid} ({cmd})" if cmd else f"PID {pid}"


class SerialPort(FdUpstream):
    def __init__(self, cfg: SerialUpstream, hub: Hub, reactor: Reactor) -> None:
        super().__init__(hub, reactor, cfg.backoff_min, cfg.backoff_max)
        self.cfg = cfg
        self.settings = cfg.settings
        # pyserial asserts DTR and RTS when it opens a port, as the tty driver does.
        self.control = ControlLines(dtr=True, rts=True)
        self._serial: serial.Serial | None = None
        self._vanished = False  # the path was gone when the last loss was noticed

    def describe(self) -> str:
        return self.cfg.describe()

    def _open(self) -> None:
        path = self.cfg.path
        if not os.path.exists(path):
            self._failed("device absent", delay=PRESENT_POLL)
            return
        try:
            port = self._open_serial(path)
        except (serial.SerialException, OSError) as exc:
            err = getattr(exc, "errno", None)
            if err in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                self._failed("device absent", delay=PRESENT_POLL)
            elif err == errno.EWOULDBLOCK and "lock" in str(exc):
                # pyserial's flock(LOCK_EX|LOCK_NB) failed: name who holds it. The
                # reason stays the same while the holder does, so the state's
                # once-per-outage logging says it once and the retries at DEBUG.
                holders = ", ".join(describe_process(pid) for pid in lock_holders(path))
                self._failed(f"{path} is locked by {holders or 'another process'}")
            else:
                self._failed(f"cannot open: {exc}")
            return
        self._serial = port
        self.control_lines = _has_modem_lines(port)
        fd = port.fileno()
        os.set_blocking(fd, False)
        self._opened(fd)

    def _lost(self, reason: str) -> None:
        # Looked at before the loss is reported (and so before anyone can react to
        # it): a device replugged at once was still a device that vanished.
        self._vanished = not os.path.exists(self.cfg.path)
        super()._lost(reason)

    def _loss_delay(self) -> float | None:
        # A device that vanished is looked for every PRESENT_POLL, not backed off
        # from: however often it was replugged, data resumes as soon as it is back.
        # One that is there but fails (busy, flapping) is backed off from.
        vanished, self._vanished = self._vanished, False
        return PRESENT_POLL if vanished or not os.path.exists(self.cfg.path) else None

    def _read(self) -> bytes:
        assert self.fd is not None
        return os.read(self.fd, READ_SIZE)

    def _write(self, data: memoryview) -> int:
        assert self.fd is not None
        return os.write(self.fd, data)

    def _close_fd(self) -> None:
        port, self._serial = self._serial, None
        # A BREAK ends with the port; DTR and RTS are reapplied by the next open.
        self.control = dataclasses.replace(self.control, brk=False)
        if port is not None:
            port.close()

    def _open_serial(self, path: str) -> serial.Serial:
        """An open pyserial port with the settings in force or, if the device
        refuses those (a change stored while it was absent), the configured ones.
        Raises SerialException/OSError as pyserial's open() does."""
        refusal: Exception | None = None
        for settings in dict.fromkeys((self.settings, self.cfg.settings)):
            port = serial.Serial()
            port.port = path
            port.exclusive = True
            # The levels in force go out as it opens: a reopen keeps a board's
            # reset line where it was (pyserial ignores EINVAL/ENOTTY there).
            port.dtr, port.rts = self.control.dtr is not False, self.control.rts is not False
            try:
                _configure(port, settings)  # a closed port: pyserial only validates
                port.open()  # applies them; on failure pyserial closes the fd again
            except _SETTINGS_REFUSALS as exc:
                refusal = exc
                continue
            if settings != self.settings:
                log.warning(
                    "%s: %s refused line settings %s (%s); opened with the configured %s",
                    self.hub.name,
                    path,
                    self.settings,
                    refusal,
                    settings,
                )
                self.settings = settings
            return port
        raise serial.SerialException(f"line settings refused: {refusal}")

    def apply_settings(self, wanted: LineSettings) -> LineSettings:
        """Put ``wanted`` in force now (and on every reopen); raises SettingsRefused."""
        if wanted == self.settings:
            return wanted
        if wanted.baudrate <= 0:  # pyserial takes 0, which a tty reads as "hang up"
            raise SettingsRefused(f"baud rate {wanted.baudrate} is not a speed")
        port = self._serial
        if port is None:
            # Nothing to try it on: validate what pyserial can without a device and
            # keep it for the next open, which falls back if the device refuses it.
            try:
                _configure(serial.Serial(), wanted)
            except _REFUSALS as exc:
                raise SettingsRefused(f"{wanted}: {exc}") from exc
        else:
            try:
                _reconfigure(port, self.settings, wanted)
            except _REFUSALS as exc:
                raise SettingsRefused(f"{self.cfg.path} refused {wanted}: {exc}") from exc
        self.settings = wanted
        return wanted

    def set_control(
        self, dtr: bool | None = None, rts: bool | None = None, brk: bool | None = None
    ) -> ControlLines:
        """Set DTR, RTS and BREAK on the open port; raises SettingsRefused.

        The lines are set in the order DTR, RTS, BREAK (a reset sequence's
        order is its steps', one call per step). A refusal part-way leaves the
        lines set before it in force and recorded: they really changed.
        """
        port = self._serial
        current = self.control
        if port is None:
            if brk is not None:
                raise SettingsRefused(f"{self.cfg.path} is not open: no BREAK to send")
            # Kept for the next open, which applies them (_open_serial).
            self.control = ControlLines(
                current.dtr if dtr is None else dtr, current.rts if rts is None else rts, False
            )
            return self.control
        for name, value in (("dtr", dtr), ("rts", rts), ("break_condition", brk)):
            if value is None:
                continue
            try:
                setattr(port, name, value)
            except (OSError, ValueError, termios.error) as exc:
                what = "BREAK" if name == "break_condition" else name.upper()
                raise SettingsRefused(f"{self.cfg.path} cannot set {what}: {exc}") from exc
            field = "brk" if name == "break_condition" else name
            self.control = dataclasses.replace(self.control, **{field: value})
        return self.control

    def modem_state(self) -> ModemLines | None:
        """CTS, DSR, RI and CD of the open port; None when closed or the driver has none."""
        port = self._serial
        if port is None:
            return None
        try:
            return ModemLines(cts=port.cts, dsr=port.dsr, ri=port.ri, cd=port.cd)
        except (OSError, termios.error):  # a pty: no modem lines to read
            return None


def _has_modem_lines(port: serial.Serial) -> bool:
    """Whether the open port has modem lines: TIOCMGET works (a pty and some
    USB bridges refuse it, and then refuse DTR and RTS too)."""
    try:
        port.cts  # noqa: B018 - the read is the probe
    except (OSError, termios.error):
        return False
    return True


def _fields(s: LineSettings) -> list[tuple[str, object]]:
    """The settings as pyserial attribute assignments, in the order they are made."""
    return [
        ("baudrate", s.baudrate),
        ("bytesize", s.bytesize),
        ("parity", s.parity),
        ("stopbits", s.stopbits),
        ("rtscts", s.flow == "rtscts"),
        ("xonxoff", s.flow == "xonxoff"),
    ]


def _configure(port: serial.Serial, s: LineSettings) -> None:
    # On an open port each assignment is applied by pyserial immediately; on a
    # closed one it is only validated and kept for open().
    for name, value in _fields(s):
        setattr(port, name, value)


def _reconfigure(port: serial.Serial, old: LineSettings, new: LineSettings) -> None:
    """Change an open port from ``old`` to ``new``; if a field is refused, put
    ``old`` back and raise what pyserial raised.

    pyserial stores a value before the tcsetattr() that may refuse it, and each
    later assignment re-applies every stored value, so putting back ``old`` in
    the same order would keep failing on the refused one. Undone in reverse,
    each step re-applies a combination the port already accepted.
    """
    previous = dict(_fields(old))
    changed: list[str] = []
    try:
        for name, value in _fields(new):
            if value != previous[name]:
                changed.append(name)  # first: a setter that raises may have stored the value
                setattr(port, name, value)
    except _REFUSALS:
        for name in reversed(changed):
            # A device gone meanwhile fails this too; its reopen uses ``old``.
            with contextlib.suppress(*_REFUSALS):
                setattr(port, name, previous[name])
        raise
