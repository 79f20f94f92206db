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
"""

from __future__ import annotations

import errno
import os

import serial

from muxd.config import SerialUpstream
from muxd.hub import Hub
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor
from muxd.upstream.base import READ_SIZE, FdUpstream

# How often a missing device path is looked for: a stat() costs nothing, and
# this bounds the resume time after a replug to well under a second.
PRESENT_POLL = 0.2


class SerialPort(FdUpstream):
    def __init__(self, cfg: SerialUpstream, hub: Hub, reactor: Reactor) -> None:
        super().__init__(hub, reactor, cfg.backoff_min, cfg.backoff_max)
        self.cfg = cfg
        self.settings = cfg.settings
        self._serial: serial.Serial | None = None

    def describe(self) -> str:
        return self.cfg.describe()

    def _open(self) -> None:
        path = self.cfg.path
        if not os.path.exists(path):
            self._failed("device absent", delay=PRESENT_POLL)
            return
        s = self.settings
        port = serial.Serial()
        port.port = path
        port.exclusive = True
        _configure(port, s)
        try:
            port.open()
        except (serial.SerialException, OSError) as exc:
            err = getattr(exc, "errno", None)
            if err in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
                self._failed("device absent", delay=PRESENT_POLL)
            else:
                self._failed(f"cannot open: {exc}")
            return
        self._serial = port
        fd = port.fileno()
        os.set_blocking(fd, False)
        self._opened(fd)

    def _read(self) -> bytes:
        assert self.fd is not None
        return os.read(self.fd, READ_SIZE)

    def _write(self, data: memoryview) -> int:
        assert self.fd is not None
        return os.write(self.fd, data)

    def _close_fd(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            port.close()

    def apply_settings(self, settings: LineSettings) -> None:
        """Change the line settings now (and on every reopen)."""
        self.settings = settings
        if self._serial is not None:
            _configure(self._serial, settings)


def _configure(port: serial.Serial, s: LineSettings) -> None:
    # On an open port each assignment is applied by pyserial immediately.
    port.baudrate = s.baudrate
    port.bytesize = s.bytesize
    port.parity = s.parity
    port.stopbits = s.stopbits
    port.rtscts = s.flow == "rtscts"
    port.xonxoff = s.flow == "xonxoff"
