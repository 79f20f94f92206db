"""Shared test harness: a pty that stands in for the serial device, muxd run
as a real subprocess (stopped by PID), and waiting on conditions with deadlines.

Nothing here sleeps to synchronise: every wait polls a condition until a
deadline, with a bounded number of rounds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll cond() until truthy; fail after timeout. Bounded in time and rounds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.005) + 2):
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        select.select([], [], [], 0.005)  # a poll interval, not a synchronisation
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(buf)} of {n} bytes before the deadline: {bytes(buf[-80:])!r}")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until(sock: socket.socket, marker: bytes, timeout: float = 5.0, limit: int = 1 << 20) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or len(buf) > limit:
            raise AssertionError(f"no {marker!r} before the deadline; got {bytes(buf[-200:])!r}")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"EOF before {marker!r}; got {bytes(buf[-200:])!r}")
        buf += chunk
    return bytes(buf)


class PtyDevice:
    """A pty pair: muxd opens the slave as its 'serial port', the test drives the master.

    ``path`` is a symlink to the slave, like /dev/serial/by-id/..., so the device
    can be unplugged (master closed, link removed) and replugged (a new pty
    behind the same link).
    """

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self.slave_name = ""
        self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        self.slave_name = os.ttyname(slave)
        # Keep no slave fd open: muxd's open must be the one that counts, and
        # a pty whose slave was never opened still buffers master writes.
        os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        tmp = self.link.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.slave_name)
        tmp.replace(self.link)

    def unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    @property
    def path(self) -> str:
        return str(self.link)

    def write(self, data: bytes, timeout: float = 5.0) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            if time.monotonic() > deadline:
                raise AssertionError("pty write timed out")
            select.select([], [self.master], [], 0.1)
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                continue
            view = view[n:]

    def read(self, n: int, timeout: float = 5.0) -> bytes:
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"device got {len(buf)} of {n} bytes: {bytes(buf[-200:])!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    buf += os.read(self.master, n - len(buf))
                except BlockingIOError:
                    pass
                except OSError as exc:  # EIO: nobody has the slave open (yet); poll again
                    if exc.errno != errno.EIO:
                        raise
                    select.select([], [], [], 0.01)
        return bytes(buf)

    def speed(self) -> int:
        """The baud rate muxd set, read back with termios on the pty."""
        ispeed = termios.tcgetattr(self.master)[4]
        return int(ispeed)

    def close(self) -> None:
        self.unplug()


@pytest.fixture
def pty_device(tmp_path: Path) -> Iterator[PtyDevice]:
    dev = PtyDevice(tmp_path / "ttyDUT")
    yield dev
    dev.close()


class Muxd:
    """muxd as a real subprocess; stopped by its PID at the end of the test."""

    def __init__(
        self, args: list[str], tmp_path: Path, env: dict[str, str] | None = None, nofile: int | None = None
    ) -> None:
        self.log_path = tmp_path / f"muxd-{len(list(tmp_path.glob('muxd-*.log')))}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        cmd = [sys.executable, "-m", "muxd", *args]
        if nofile is not None:  # a hard fd limit for this muxd only; exec keeps the PID
            cmd = ["sh", "-c", f'ulimit -n {nofile} && exec "$0" "$@"', *cmd]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        wait_for(lambda: text in self.log() or self.proc.poll() is not None, timeout, f"log line {text!r}")
        if text not in self.log():
            raise AssertionError(
                f"muxd exited ({self.proc.returncode}) before logging {text!r}:\n{self.log()}"
            )

    def wait_clients(self, n: int, timeout: float = 10.0) -> None:
        """Wait until muxd has logged n client connections (needs --log-level debug)."""
        wait_for(lambda: self.log().count(" connected\n") >= n, timeout, f"{n} clients connected")

    def wait_port(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"muxd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                socket.create_connection((host, port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_for(up, timeout, f"muxd listening on {host}:{port}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def muxd(tmp_path: Path) -> Iterator[Callable[..., Muxd]]:
    started: list[Muxd] = []

    def start(*args: str, env: dict[str, str] | None = None, nofile: int | None = None) -> Muxd:
        m = Muxd(list(args), tmp_path, env, nofile)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "muxd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def connect(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s
