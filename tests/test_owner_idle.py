"""``line_control: owner`` ownership that ends (muxd.linecontrol): when the
owner disconnects, or after ``owner_idle`` without a request or a write. Then
the port's configured line settings go back to the device, and the DTR/RTS
the owner changed return to their configured level.

End to end: pyserial's ``rfc2217://`` client is the owner, muxd talks RFC 2217
to the fake K2 (tests/fakes/k2.py), whose record of COM-PORT commands is what
the assertions read, and the API shows the owner.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import serial

from muxd.protocol.rfc2217 import SetBaudrate
from tests.fakes.k2 import FakeK2
from tests.helpers import AUTO, Muxd, StartMuxd, connect, recv_until, start_on_k2, wait_for

CONFIGURED = 115200


@pytest.fixture
def k2() -> Iterator[FakeK2]:
    """A fake K2 in RFC 2217 mode: it records what reaches it."""
    fake = FakeK2(rfc2217=True)
    yield fake
    fake.stop()


def on_k2(muxd: StartMuxd, tmp_path: Path, k2: FakeK2, **opts: Any) -> Muxd:
    """muxd on the K2 (port "dut1"): a rw rfc2217 listener, and a tcp reader with notices."""
    listeners: list[dict[str, Any]] = [{"rfc2217": AUTO, "mode": "rw"}, {"tcp": AUTO, "notices": True}]
    upstream = {"control": "rfc2217", "baudrate": CONFIGURED}
    m = start_on_k2(muxd, tmp_path, k2.port, listeners, upstream=upstream, line_control="owner", **opts)
    wait_for(lambda: k2_baud(k2) == CONFIGURED, 10, "muxd's settings at the K2")
    return m


def k2_baud(k2: FakeK2) -> int | None:
    """The last baud rate set at the K2."""
    bauds = [c.value for _, c in k2.commands() if isinstance(c, SetBaudrate) and c.value]
    return bauds[-1] if bauds else None


def lines(k2: FakeK2) -> tuple[bool | None, bool | None]:
    """DTR and RTS as last set at the K2 (None: never set)."""
    return k2.lines.get("dtr"), k2.lines.get("rts")


def owner(m: Muxd) -> str | None:
    owner: str | None = m.port_info("dut1")["line"]["owner"]
    return owner


def open_client(m: Muxd, baud: int) -> serial.Serial:
    return serial.serial_for_url(f"rfc2217://127.0.0.1:{m.port(0)}", baudrate=baud, timeout=5)


def test_an_idle_owner_loses_the_port_and_another_takes_it(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2
) -> None:
    m = on_k2(muxd, tmp_path, k2, owner_idle="500ms")
    first = open_client(m, 9600)
    second: serial.Serial | None = None
    try:
        wait_for(lambda: k2_baud(k2) == 9600, 5, "the owner's baud rate at the K2")
        assert owner(m) is not None
        # It stays connected and does nothing: its time ends, the configured rate goes back.
        wait_for(lambda: owner(m) is None, 10, "the idle owner's end")
        wait_for(lambda: k2_baud(k2) == CONFIGURED, 5, "the configured baud rate at the K2")
        m.wait_log("no longer owns the line settings (idle for 0.5s (owner_idle))")
        line = m.port_info("dut1")["line"]
        assert line["baudrate"] == CONFIGURED
        assert line["changed_by"].startswith("muxd (owner rfc2217-0 127.0.0.1:")
        # Another client can take the port now.
        second = open_client(m, 19200)
        wait_for(lambda: k2_baud(k2) == 19200, 5, "the new owner's baud rate at the K2")
        assert owner(m) is not None
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_writing_owner_keeps_the_port(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    m = on_k2(muxd, tmp_path, k2, owner_idle="500ms")
    client = open_client(m, 9600)
    try:
        wait_for(lambda: k2_baud(k2) == 9600, 5, "the owner's baud rate at the K2")
        # Writes every 100 ms for 1.5 s (three times owner_idle): it stays the owner.
        until = time.monotonic() + 1.5
        for i in range(100):
            if time.monotonic() > until:
                break
            client.write(b"x")
            wait_for(lambda: k2.uart_received().count(b"x") == i + 1, 5, "the write at the K2")  # noqa: B023
            assert owner(m) is not None, "a writing owner lost the port"
            time.sleep(0.1)  # the owner's pace of writing: what is under test, not a synchronisation
        assert k2_baud(k2) == 9600
    finally:
        client.close()


def test_the_owner_leaving_puts_back_the_configured_settings_and_lines(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2
) -> None:
    m = on_k2(muxd, tmp_path, k2)  # owner_idle: the default, 10 minutes
    reader = connect(m.port(1))
    client = open_client(m, 9600)
    try:
        client.dtr = False
        client.rts = False
        wait_for(lambda: k2_baud(k2) == 9600, 5, "the owner's baud rate at the K2")
        wait_for(lambda: lines(k2) == (False, False), 5, "the owner's lines")
    finally:
        client.close()
    wait_for(lambda: k2_baud(k2) == CONFIGURED, 10, "the configured baud rate at the K2")
    wait_for(lambda: lines(k2) == (True, True), 5, "the configured lines")
    line = m.port_info("dut1")["line"]
    assert (line["owner"], line["baudrate"], line["dtr"], line["rts"]) == (None, CONFIGURED, True, True)
    # Readers with notices are told, in-band.
    told = recv_until(reader, b"disconnected; put back: line settings 115200 8N1, DTR high, RTS high --")
    assert b"-- muxd: line settings owner rfc2217-0 127.0.0.1:" in told
    reader.close()
