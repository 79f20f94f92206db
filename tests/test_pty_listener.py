"""The pty listener: programs open a tty path and talk to the device.

End to end, muxd runs as a subprocess with a pty standing in for the serial
device, and the program is pyserial's plain ``serial.Serial(path)``. In
process, a Hub with no upstream shows what cannot be arranged from outside:
a write queue that never drains while the program closes the tty.
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import os
import select
import stat
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from muxd.config import Listener, Port, SimUpstream
from muxd.fdconn import State
from muxd.hub import Hub
from muxd.linecontrol import LineControl
from muxd.listeners.pty import PtyListener, PtySession, read_line_settings, write_line_settings
from muxd.port import bounds_for
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor
from tests.helpers import Muxd, PtyDevice, StartMuxd, run_until, start_on_pty, wait_for, write_config


def start(
    muxd: StartMuxd, tmp_path: Path, dev: PtyDevice, listener: dict[str, object], **port: object
) -> tuple[Muxd, Path]:
    link = tmp_path / "ttyDUT0"
    m = start_on_pty(muxd, tmp_path, dev, [{"pty": str(link), **listener}], **port)
    return m, link


def test_a_plain_tty_open_reads_writes_and_reopens(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, link = start(muxd, tmp_path, pty_device, {"mode": "rw"})
    assert os.readlink(link).startswith("/dev/pts/")
    for i in range(5):
        port = serial.Serial(str(link), 115200, timeout=5)
        try:
            m.wait_connected(1)  # session i+1 open
            pty_device.write(b"round %d\n" % i)
            assert port.read(8) == b"round %d\n" % i
            port.write(b"back %d\n" % i)
            assert pty_device.read(7) == b"back %d\n" % i
        finally:
            port.close()
        m.wait_connected(0)  # and ended


def test_slave_mode_and_group_and_the_link_is_removed_on_stop(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    gid = grp.getgrnam("dialout").gr_gid if os.geteuid() == 0 else os.getgid()
    m, link = start(muxd, tmp_path, pty_device, {"link_mode": "0660", "group": gid})
    st = os.stat(link)
    assert stat.S_ISCHR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    m.stop()
    assert m.proc.returncode == 0
    assert not os.path.lexists(link)


def test_a_file_at_the_path_is_never_replaced(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    link = tmp_path / "ttyDUT0"
    link.write_text("precious")
    cfg = write_config(
        tmp_path,
        {
            "ports": [
                {"name": "dut", "upstream": {"serial": pty_device.path}, "listeners": [{"pty": str(link)}]}
            ]
        },
    )
    m = muxd("run", "-c", str(cfg))
    assert m.wait_exit() != 0
    assert "exists and is not a symlink" in m.log()
    assert link.read_text() == "precious"


def test_the_next_program_never_gets_the_last_ones_unread_bytes(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, link = start(muxd, tmp_path, pty_device, {})
    first = serial.Serial(str(link), 115200, timeout=5)
    try:
        m.wait_connected(1)
        pty_device.write(b"old\n")
        wait_for(lambda: first.in_waiting >= 4, what="bytes waiting in the tty")
    finally:
        first.close()
    m.wait_connected(0)
    # A plain open: pyserial's open would flush the input itself.
    second = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        m.wait_connected(1)
        pty_device.write(b"new\n")
        got = bytearray()

        def read() -> bool:
            ready, _, _ = select.select([second], [], [], 0.01)
            if ready:
                got.extend(os.read(second, 100))
            return len(got) >= 4

        wait_for(read, what="output on the tty")
        assert got == b"new\n"
    finally:
        os.close(second)


def test_open_write_close_at_once_still_reaches_the_device(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """As `echo reboot > /run/muxd/ttyDUT0` does, faster than muxd checks for an open."""
    _m, link = start(muxd, tmp_path, pty_device, {"mode": "rw"})
    fd = os.open(link, os.O_WRONLY | os.O_NOCTTY)
    os.write(fd, b"reboot\n")
    os.close(fd)
    assert pty_device.read(7) == b"reboot\n"


def test_the_owner_sets_the_baud_rate_with_termios(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, link = start(muxd, tmp_path, pty_device, {"mode": "rw"}, line_control="owner")
    port = serial.Serial(str(link), 9600, timeout=5)
    try:
        wait_for(lambda: pty_device.speed() == termios.B9600, what="the device at 9600 baud")
        m.wait_log("line settings 115200 8N1 -> 9600 8N1, asked by pty:")
        port.baudrate = 19200
        wait_for(lambda: pty_device.speed() == termios.B19200, what="the device at 19200 baud")
    finally:
        port.close()
    m.wait_log("no longer owns the line settings")


@pytest.mark.parametrize("listener", [{"mode": "rw", "_policy": "ignore"}, {"mode": "ro", "_policy": "any"}])
def test_a_refused_baud_rate_is_set_back_on_the_tty(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, listener: dict[str, object]
) -> None:
    policy = listener.pop("_policy")
    m, link = start(muxd, tmp_path, pty_device, listener, line_control=policy)
    port = serial.Serial(str(link), 9600, timeout=5)
    try:
        m.wait_metric("muxd_line_settings_requests_total", 1, outcome="refused")
        m.wait_log("line settings 9600 8N1 refused")
        wait_for(lambda: termios.tcgetattr(port.fd)[4] == termios.B115200, what="the tty back at 115200")
        assert pty_device.speed() == termios.B115200
    finally:
        port.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_no_busy_loop_while_no_program_has_the_tty_open(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, link = start(muxd, tmp_path, pty_device, {"mode": "rw"})
    serial.Serial(str(link), 115200).close()
    m.wait_metric("muxd_client_connections_total", 1)
    m.wait_connected(0)
    before = cpu_seconds(m.pid)
    select.select([], [], [], 1.0)  # a measuring window, not a synchronisation
    assert cpu_seconds(m.pid) - before < 0.2
    assert m.log().count(" connected\n") == 1  # and no phantom sessions


# -- in process -----------------------------------------------------------------


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


class FixedSettings:
    """A device whose line settings never change (these tests are about the loop)."""

    settings = LineSettings()

    def apply_settings(self, wanted: LineSettings) -> LineSettings:
        return self.settings


def make_listener(tmp_path: Path, reactor: Reactor, write_queue: int = 64 * 1024) -> tuple[Hub, PtyListener]:
    cfg = Listener("pty", "p", path=str(tmp_path / "ttyDUT0"), mode="rw")
    port = Port("dut", SimUpstream(), (cfg,), write_queue=write_queue, max_line=16)
    hub = Hub(port.name, bounds_for(port), reactor)  # no upstream: the write queue never drains
    listener = PtyListener(cfg, hub, reactor, LineControl(port, FixedSettings()))
    listener.start()
    return hub, listener


def test_a_program_that_closes_while_input_is_paused_does_not_spin_the_loop(
    tmp_path: Path, reactor: Reactor
) -> None:
    hub, listener = make_listener(tmp_path, reactor, write_queue=1024)  # no upstream: it never drains
    try:
        fd = os.open(listener.cfg.path, os.O_RDWR | os.O_NOCTTY)
        run_until(reactor, lambda: listener.clients, "a session")
        assert len(hub.readers) == 1  # the pty is one reader
        sent = os.urandom(4096)
        os.write(fd, sent)
        os.close(fd)
        run_until(reactor, lambda: hub.writes.queue.room() == 0, "the write queue full")
        turns, deadline = 0, time.monotonic() + 0.3
        while time.monotonic() < deadline and turns < 1000:
            reactor.run_once(0.05)
            turns += 1
        assert turns < 20, f"{turns} loop turns in 0.3 s: the loop is spinning"
        assert listener.clients  # what the program wrote is still owed to the device
        (session,) = listener.clients
        assert session.state is State.PARKED  # out of the reactor until the queue has room
        got = bytearray()

        def drain() -> bool:
            got.extend(b"".join(bytes(u) for u in hub.writes.queue.units))
            hub.writes.consumed(hub.writes.queue.bytes)
            return not listener.clients

        run_until(reactor, drain, "the session to end")
        drain()
        assert bytes(got) == sent
        assert not hub.readers
    finally:
        listener.stop()


def test_closing_the_session_hangs_up_and_publishes_a_new_pty(tmp_path: Path, reactor: Reactor) -> None:
    hub, listener = make_listener(tmp_path, reactor)
    try:
        fd = os.open(listener.cfg.path, os.O_RDWR | os.O_NOCTTY)
        run_until(reactor, lambda: listener.clients, "a session")
        (session,) = listener.clients
        assert isinstance(session, PtySession)
        session.close("admin")
        try:
            assert os.read(fd, 10) == b""  # a hang-up, as an unplugged adapter
        except OSError as exc:
            assert exc.errno == errno.EIO
        os.close(fd)
        fd = os.open(listener.cfg.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        run_until(reactor, lambda: listener.clients, "a new session")
        hub.publish(b"hello")
        got = bytearray()

        def read() -> bool:
            ready, _, _ = select.select([fd], [], [], 0)
            if ready:
                got.extend(os.read(fd, 100))
            return got == b"hello"

        run_until(reactor, read, "output on the new pty")
        os.close(fd)
    finally:
        listener.stop()
        for c in list(listener.clients):
            c.close("test over")


@pytest.mark.parametrize(
    "settings",
    [
        LineSettings(),
        LineSettings(9600, 7, "E", 2, "rtscts"),
        LineSettings(300, 5, "O", 1, "xonxoff"),
        LineSettings(4000000, 6, "M", 2, "none"),
    ],
)
def test_line_settings_round_trip_through_a_pty(settings: LineSettings) -> None:
    """Baud rate, stop bits and flow control; data bits and parity, which a pty
    cannot hold, come from the fallback (the settings last seen)."""
    master, slave = os.openpty()
    try:
        attrs = termios.tcgetattr(slave)
        write_line_settings(attrs, settings)
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        attrs = termios.tcgetattr(master)
        seen = read_line_settings(attrs, LineSettings(1200, 7, "S", 1, "none"))
        assert seen == dataclasses.replace(settings, bytesize=7, parity="S")
        if settings.stopbits == 2:  # CSTOPB also stands for the 1.5 a 5-bit line has
            assert read_line_settings(attrs, LineSettings(1200, 5, "N", 1.5)).stopbits == 1.5
    finally:
        os.close(slave)
        os.close(master)
