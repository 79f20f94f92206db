"""Fixtures: the pty device, muxd as a subprocess (stopped by PID), the fake K2.

The plain functions and classes live in tests/helpers.py; the names below are
re-exported for test modules that still import them from tests.conftest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.fakes.k2 import FakeK2
from tests.helpers import (
    ROOT,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    free_port,
    recv_exactly,
    recv_until,
    wait_for,
    write_config,
)

if TYPE_CHECKING:
    import serial

__all__ = [
    "ROOT",
    "Muxd",
    "PtyDevice",
    "StartMuxd",
    "connect",
    "free_port",
    "k2",
    "muxd",
    "pty_device",
    "recv_exactly",
    "recv_until",
    "serial_ports",
    "wait_for",
    "write_config",
]


@pytest.fixture
def pty_device(tmp_path: Path) -> Iterator[PtyDevice]:
    dev = PtyDevice(tmp_path / "ttyDUT")
    yield dev
    dev.close()


@pytest.fixture
def muxd(tmp_path: Path) -> Iterator[Callable[..., Muxd]]:
    """Start muxd with these arguments: ``muxd("run", "-c", path)``; each is stopped at the end."""
    started: list[Muxd] = []

    def start(
        *args: str,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        ready_file: Path | None = None,
    ) -> Muxd:
        m = Muxd(list(args), tmp_path, env, nofile, ready_file)
        started.append(m)
        return m

    yield start
    for m in started:
        m.stop()


@pytest.fixture
def k2() -> Iterator[FakeK2]:
    """A fake USR K2 on 127.0.0.1 (tests/fakes/k2.py), stopped at the end."""
    fake = FakeK2()
    yield fake
    fake.stop()


@pytest.fixture
def serial_ports() -> Iterator[list[serial.Serial]]:
    """pyserial ports the test opens (it appends them here), closed at the end."""
    opened: list[serial.Serial] = []
    yield opened
    for s in opened:
        s.close()
