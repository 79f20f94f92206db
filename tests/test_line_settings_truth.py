"""One source of truth for line settings: the upstream holds the settings in
force, stores only what the device took, and follows what a K2 answers.

End to end, a pty stands in for the serial device and a raw socket speaks RFC
2217 to muxd's rfc2217 listener (it can send what pyserial's client refuses
to); in process, a SerialPort runs on a pty and a TcpPort on the fake K2
(tests/fakes/k2.py), whose RFC 2217 side the test plays by feeding its answers.
"""

from __future__ import annotations

import logging
import socket
import struct
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import serial
from prometheus_client.parser import text_string_to_metric_families

from muxd import config as configmod
from muxd.config import Port, SerialUpstream
from muxd.errors import SettingsRefused
from muxd.hub import Hub
from muxd.linecontrol import LineControl
from muxd.port import bounds_for
from muxd.protocol.line_settings import LineSettings
from muxd.protocol.rfc2217 import Rfc2217Client, SetBaudrate, setting_of
from muxd.reactor import Reactor
from muxd.upstream.serial import SerialPort
from muxd.upstream.tcp import TcpPort
from tests.fakes.k2 import FakeK2
from tests.helpers import (
    AUTO,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    recv_until,
    request,
    run_until,
    start_on_k2,
    start_on_pty,
    wait_for,
)

IAC, SB, SE, DO = b"\xff", b"\xfa", b"\xf0", b"\xfd"
COM_PORT = b"\x2c"  # telnet option 44
SERVER = 100  # a server answers command N as N + 100


def com_port(code: int, payload: bytes) -> bytes:
    """A COM-PORT-OPTION subnegotiation, written out by hand (no 0xFF in these payloads)."""
    return IAC + SB + COM_PORT + bytes([code]) + payload + IAC + SE


def set_baudrate(value: int, answer: bool = False) -> bytes:
    return com_port(1 + SERVER * answer, struct.pack("!I", value))


def set_datasize(value: int, answer: bool = False) -> bytes:
    return com_port(2 + SERVER * answer, bytes([value]))


def tty_settings(dev: PtyDevice) -> tuple[int, int]:
    """The baud rate constant and the data size bits in force on the pty."""
    attrs = termios.tcgetattr(dev.master)
    return int(attrs[4]), int(attrs[2]) & termios.CSIZE


def internal_errors(m: Muxd) -> float:
    status, _, body = request(m.http, "GET", "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "muxd_internal_errors_total":
                return float(sample.value)
    raise AssertionError("no muxd_internal_errors_total in /metrics")


# -- end to end: a refused value never poisons the device ---------------------------------------


@pytest.mark.parametrize(
    ("asked", "answer"),
    [
        # OverflowError in pyserial: the kernel's speed field is a signed 32-bit int.
        (set_baudrate(2**31), set_baudrate(115200, answer=True)),
        # termios.error: a pty has no 6-bit data size.
        (set_datasize(6), set_datasize(8, answer=True)),
    ],
    ids=["baud-2**31", "data-size-6"],
)
def test_a_setting_the_device_refuses_is_answered_and_survives_a_replug(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, asked: bytes, answer: bytes
) -> None:
    m = start_on_pty(muxd, tmp_path, pty_device, [{"rfc2217": AUTO, "mode": "rw"}], line_control="any")
    before = tty_settings(pty_device)
    client = connect(m.port(0))
    try:
        client.sendall(asked)
        # RFC 2217's refusal: the answer carries the value still in force.
        recv_until(client, answer)
        assert tty_settings(pty_device) == before == (termios.B115200, termios.CS8)
        pty_device.write(b"still there\n")
        recv_until(client, b"still there\n")

        pty_device.unplug()
        wait_for(lambda: m.port_info()["state"] != "up", 10, "muxd to notice the unplug")
        pty_device.plug()
        m.wait_state("up")  # it used to stay `connecting`, the refused value in its settings
        assert tty_settings(pty_device) == before
        client.sendall(set_baudrate(0))  # 0: "what is in force?"
        recv_until(client, set_baudrate(115200, answer=True))
        pty_device.write(b"back\n")
        recv_until(client, b"back\n")
        assert internal_errors(m) == 0
    finally:
        client.close()


# -- end to end: what a K2 can do is what clients are told -------------------------------------


def baud_answer(client: socket.socket, codec: Rfc2217Client, timeout: float = 5.0) -> int:
    """Read until muxd answers a SET-BAUDRATE; its value. ``codec`` parses muxd's
    side of the conversation (a server's answers are what a client receives)."""
    deadline = time.monotonic() + timeout
    for _ in range(1000):  # every round reads at least one byte or fails
        for event in codec.next_events():
            if isinstance(event, SetBaudrate) and event.value is not None:
                return event.value
        left = deadline - time.monotonic()
        assert left > 0, "no SET-BAUDRATE answer before the deadline"
        client.settimeout(left)
        data = client.recv(4096)
        assert data, "muxd closed the connection"
        codec.receive_data(data)
    raise AssertionError("no SET-BAUDRATE answer in 1000 reads")


def start_rfc2217_on_k2(muxd: StartMuxd, tmp_path: Path, k2: FakeK2, control: str) -> Muxd:
    """muxd on the K2 with this control and an rfc2217 listener whose clients may change settings."""
    listeners = [{"rfc2217": AUTO, "mode": "rw"}]
    return start_on_k2(muxd, tmp_path, k2.port, listeners, upstream={"control": control}, line_control="any")


def test_with_control_none_a_change_is_refused_not_recorded(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2
) -> None:
    m = start_rfc2217_on_k2(muxd, tmp_path, k2, "none")
    client, codec = connect(m.port(0)), Rfc2217Client()
    try:
        client.sendall(set_baudrate(9600))
        assert baud_answer(client, codec) == 115200  # RFC 2217's "rejected"
        client.sendall(set_baudrate(0))
        assert baud_answer(client, codec) == 115200
        m.wait_log("with control: none the K2 keeps the line settings set on its web page")
    finally:
        client.close()


def test_a_k2_answer_is_the_value_clients_are_told(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    m = start_rfc2217_on_k2(muxd, tmp_path, k2, "rfc2217")
    k2.feed(IAC + DO + COM_PORT)  # the K2 agrees to COM-PORT-OPTION: muxd sends its settings
    assert k2.wait_uart(set_baudrate(115200))
    client, codec = connect(m.port(0)), Rfc2217Client()
    try:
        client.sendall(set_baudrate(9600))
        assert baud_answer(client, codec) == 9600  # as asked: the K2's answer comes later
        assert k2.wait_uart(set_baudrate(9600))
        # Each request answered in turn: the opening 115200 as asked; 9600 not: it kept 19200.
        k2.feed(set_baudrate(115200, answer=True) + set_baudrate(19200, answer=True))

        def told() -> bool:
            client.sendall(set_baudrate(0))
            return baud_answer(client, codec) == 19200

        wait_for(told, 5, "muxd to tell the K2's value")
    finally:
        client.close()


def test_a_k2_answering_field_by_field_gets_one_request_per_field_and_no_warning(
    muxd: StartMuxd, tmp_path: Path
) -> None:
    """pyserial changes four fields at once; muxd's listener passes them on
    one at a time, and a K2 answers each on its own, late: every answer is
    matched to its own request, so nothing is sent twice and nothing is
    taken for a refusal (issue 19: the full settings went out per field, and
    "has 19200 8E2 in force where 19200 7E2 was asked" was logged six times)."""
    with FakeK2(rfc2217=True) as k2:
        k2.spread_answers(0.02)  # each answer in its own packet, 20 ms apart
        m = start_rfc2217_on_k2(muxd, tmp_path, k2, "rfc2217")
        wait_for(lambda: len(k2.commands()) >= 5 and not k2.answers_pending, 10, "the opening settings")
        opening = len(k2.commands())
        s = serial.serial_for_url(
            f"rfc2217://127.0.0.1:{m.port(0)}", baudrate=19200, bytesize=7, parity="E", stopbits=2, timeout=5
        )
        try:
            wait_for(lambda: len(k2.commands()) >= opening + 6 and not k2.answers_pending, 10, "the answers")
            k2.feed(b"after the answers\n")  # in the stream behind them: once muxd has it, it has them all
            wait_for(lambda: m.port_info("dut1")["bytes_in"] >= 18, 10, "the data behind the answers")
        finally:
            s.close()
        # The line settings asked of the K2 since (pyserial's DTR and RTS went too: not counted here).
        asked = [setting_of(c) for _, c in k2.commands()[opening:] if setting_of(c) is not None]
        assert asked == [("baudrate", 19200), ("bytesize", 7), ("parity", "E"), ("stopbits", 2)]
        line = m.port_info("dut1")["line"]
        assert (line["baudrate"], line["format"]) == (19200, "7E2"), line
        assert "in force where" not in m.log()


# -- in process: SerialPort on a pty --------------------------------------------------------------


def make_hub(port: Port, reactor: Reactor) -> Hub:
    return Hub(port.name, bounds_for(port), reactor)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


@pytest.fixture
def serial_port(reactor: Reactor, pty_device: PtyDevice) -> Iterator[SerialPort]:
    port = Port("dut", SerialUpstream(pty_device.path, backoff_min=0.05, backoff_max=0.2))
    upstream = SerialPort(port.upstream, make_hub(port, reactor), reactor)  # type: ignore[arg-type]
    upstream.start()
    run_until(reactor, lambda: upstream.status.state == "up", "the pty open")
    yield upstream
    upstream.stop()


def test_serial_stores_only_what_pyserial_took(serial_port: SerialPort, pty_device: PtyDevice) -> None:
    base = serial_port.settings
    for refused in (LineSettings(baudrate=2**31), LineSettings(bytesize=6), LineSettings(baudrate=0)):
        with pytest.raises(SettingsRefused):
            serial_port.apply_settings(refused)
        assert serial_port.settings == base
        assert tty_settings(pty_device) == (termios.B115200, termios.CS8)
    # A refusal after a field was already applied puts that one back too.
    with pytest.raises(SettingsRefused, match="refused 9600 6N1"):
        serial_port.apply_settings(LineSettings(baudrate=9600, bytesize=6))
    assert tty_settings(pty_device) == (termios.B115200, termios.CS8)
    granted = LineSettings(baudrate=9600, stopbits=2)  # what a pty takes: it has no parity either
    assert serial_port.apply_settings(granted) == granted == serial_port.settings
    assert tty_settings(pty_device) == (termios.B9600, termios.CS8)
    assert termios.tcgetattr(pty_device.master)[2] & termios.CSTOPB


def test_a_change_stored_while_absent_that_the_device_refuses_falls_back_to_the_config(
    serial_port: SerialPort, pty_device: PtyDevice, reactor: Reactor, caplog: pytest.LogCaptureFixture
) -> None:
    pty_device.unplug()
    run_until(reactor, lambda: serial_port.status.state != "up", "the unplug")
    # With no device, pyserial checks only what it can alone: any integer >= 0
    # is a baud rate to it; the kernel's limit shows at the next open.
    unknown = LineSettings(baudrate=2**31)
    assert serial_port.apply_settings(unknown) == unknown == serial_port.settings
    with pytest.raises(SettingsRefused):
        serial_port.apply_settings(LineSettings(parity="X"))
    caplog.set_level(logging.WARNING, "muxd.upstream")
    pty_device.plug()
    run_until(reactor, lambda: serial_port.status.state == "up", "the replug")
    assert serial_port.settings == serial_port.cfg.settings == LineSettings()
    assert tty_settings(pty_device) == (termios.B115200, termios.CS8)
    assert "refused line settings 2147483648 8N1" in caplog.text


# -- in process: TcpPort on the fake K2 -----------------------------------------------------------


def tcp_port(k2: FakeK2, reactor: Reactor, **upstream: Any) -> tuple[TcpPort, LineControl]:
    cfg = configmod.from_data(
        {
            "ports": [
                {
                    "name": "dut",
                    "upstream": {"tcp": f"127.0.0.1:{k2.port}", **upstream},
                    "line_control": "any",
                }
            ]
        }
    )
    port = cfg.ports[0]
    assert isinstance(port.upstream, configmod.TcpUpstream)
    up = TcpPort(port.upstream, make_hub(port, reactor), reactor)
    return up, LineControl(port, up)


def test_control_none_refuses_a_change_it_cannot_make(k2: FakeK2, reactor: Reactor) -> None:
    up, lc = tcp_port(k2, reactor)
    up.start()
    try:
        run_until(reactor, lambda: up.status.state == "up", "the link")
        with pytest.raises(SettingsRefused, match="control: none"):
            up.apply_settings(LineSettings(baudrate=9600))
        assert up.settings == lc.settings == LineSettings()
    finally:
        up.stop()


def test_a_k2_that_answers_another_baud_rate_has_that_one_in_force(
    k2: FakeK2, reactor: Reactor, caplog: pytest.LogCaptureFixture
) -> None:
    up, lc = tcp_port(k2, reactor, control="rfc2217")
    caplog.set_level(logging.INFO, "muxd.upstream")
    up.start()
    try:
        run_until(reactor, lambda: up.status.state == "up" and k2.active == 1, "the link")
        k2.feed(IAC + DO + COM_PORT)  # the K2 agrees: muxd sends the settings it opens with
        run_until(reactor, lambda: set_baudrate(115200) in k2.uart_received(), "the settings sent")
        assert up.apply_settings(LineSettings(baudrate=9600)) == LineSettings(baudrate=9600)
        run_until(reactor, lambda: set_baudrate(9600) in k2.uart_received(), "the change sent")
        # Answers in turn: to the opening 115200 (as asked), then to 9600, which it could not do.
        k2.feed(set_baudrate(115200, answer=True) + set_baudrate(19200, answer=True))
        run_until(reactor, lambda: up.settings.baudrate == 19200, "the answer")
        assert lc.settings == LineSettings(baudrate=19200)
        assert "the K2 has line settings 19200 8N1 in force where 9600 8N1 was asked" in caplog.text
        k2.feed(set_baudrate(19200, answer=True) + b"data\n")  # the same again: nothing new
        run_until(reactor, lambda: up.hub.bytes_in >= 5, "the data")
        assert caplog.text.count("in force where") == 1
    finally:
        up.stop()
