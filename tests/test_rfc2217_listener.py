"""The rfc2217 listener: pyserial's own RFC 2217 client against muxd, with a pty
as the serial device, plus a raw Telnet peer for what pyserial cannot send.

The line-settings tests read the device's baud rate back with termios on the
device pty: muxd applied it through pyserial to the real tty.
"""

from __future__ import annotations

import signal
import socket
import termios
from pathlib import Path

import pytest
import serial

from muxd.config import Listener, Port, SimUpstream
from muxd.connection import HIGH_WATER, LOW_WATER
from muxd.listeners.rfc2217 import Rfc2217Connection, Rfc2217Listener
from muxd.port import PortRuntime
from muxd.protocol.rfc2217 import Rfc2217Client, SetBaudrate, Signature
from muxd.reactor import Reactor
from tests.helpers import (
    AUTO,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    recv_until,
    run_until,
    split_hostport,
    start_on_pty,
    stuck_reader,
    wait_for,
)


def start(
    muxd: StartMuxd, tmp_path: Path, dev: PtyDevice, listeners: list[dict[str, object]], **port: object
) -> tuple[Muxd, list[int]]:
    m = start_on_pty(muxd, tmp_path, dev, [{"rfc2217": AUTO, **lst} for lst in listeners], **port)
    return m, [m.port(i) for i in range(len(listeners))]


def open_rfc2217(port: int, baudrate: int = 115200) -> serial.Serial:
    return serial.serial_for_url(f"rfc2217://127.0.0.1:{port}", baudrate=baudrate, timeout=5)


@pytest.fixture
def clients(serial_ports: list[serial.Serial]) -> list[serial.Serial]:
    """The pyserial clients the test opens, closed at the end (conftest's serial_ports)."""
    return serial_ports


def test_pyserial_reads_writes_and_the_owner_sets_the_baud_rate(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, clients: list[serial.Serial]
) -> None:
    m, (port,) = start(muxd, tmp_path, pty_device, [{"mode": "rw"}], line_control="owner")
    s = open_rfc2217(port)
    clients.append(s)
    assert s.cts and s.dsr and s.cd  # the modem state muxd reports
    data = bytes(range(256)) * 4  # 0xFF is escaped on the way out
    pty_device.write(data)
    assert s.read(len(data)) == data
    s.write(b"cmd \xff\xff end\n")  # and un-escaped on the way in
    assert pty_device.read(11) == b"cmd \xff\xff end\n"
    s.baudrate = 9600
    assert pty_device.speed() == termios.B9600
    m.wait_log("line settings 115200 8N1 -> 9600 8N1, asked by")
    s.reset_input_buffer()  # PURGE-DATA is answered
    pty_device.write(b"after\n")
    assert s.read(6) == b"after\n"


def test_a_second_client_is_refused_under_owner_until_the_owner_leaves(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, clients: list[serial.Serial]
) -> None:
    m, (port,) = start(muxd, tmp_path, pty_device, [{"mode": "rw"}], line_control="owner")
    owner = open_rfc2217(port)
    clients.append(owner)
    owner.baudrate = 9600
    assert pty_device.speed() == termios.B9600
    # Opening with the settings in force works; asking for another is refused,
    # and pyserial says so as RFC 2217 answers: with the value in force.
    other = open_rfc2217(port, baudrate=9600)
    clients.append(other)
    with pytest.raises(ValueError, match="remote rejected"):
        other.baudrate = 57600
    assert pty_device.speed() == termios.B9600
    m.wait_log("line settings 57600 8N1 refused")
    pty_device.write(b"both\n")
    assert owner.read(5) == other.read(5) == b"both\n"
    owner.close()
    m.wait_connected(1)  # the owner is gone: the other client may ask
    other.baudrate = 57600
    assert pty_device.speed() == termios.B57600


def test_any_applies_every_rw_clients_request(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, clients: list[serial.Serial]
) -> None:
    _m, (port,) = start(muxd, tmp_path, pty_device, [{"mode": "rw"}], line_control="any")
    a, b = open_rfc2217(port), open_rfc2217(port)
    clients += [a, b]
    a.baudrate = 9600
    assert pty_device.speed() == termios.B9600
    b.baudrate = 19200
    assert pty_device.speed() == termios.B19200


def raw_client(port: int) -> tuple[socket.socket, Rfc2217Client]:
    sock = connect(port)
    codec = Rfc2217Client()
    sock.sendall(codec.data_to_send())
    return sock, codec


def ask(sock: socket.socket, codec: Rfc2217Client, request: SetBaudrate | Signature) -> object:
    """Send one request; return the first answer of its kind, answering negotiation meanwhile."""
    codec.send(request)
    sock.sendall(codec.data_to_send())
    for _ in range(100):
        data = sock.recv(4096)
        codec.receive_data(data)
        sock.sendall(codec.data_to_send())
        for event in codec.next_events():
            if type(event) is type(request):
                return event
        assert data, "muxd closed the connection"
    raise AssertionError("no answer")


def test_ignore_answers_with_the_settings_in_force_and_never_applies(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, clients: list[serial.Serial]
) -> None:
    m, (port,) = start(muxd, tmp_path, pty_device, [{"mode": "rw"}], line_control="ignore")
    sock, codec = raw_client(port)
    with sock:
        assert ask(sock, codec, SetBaudrate(9600)) == SetBaudrate(115200)
        assert ask(sock, codec, Signature(None)) == Signature(b"muxd 0.1.0 dut")
    s = open_rfc2217(port)
    clients.append(s)
    with pytest.raises(ValueError, match="remote rejected"):
        s.baudrate = 9600
    assert pty_device.speed() == termios.B115200
    m.wait_log("(line_control: ignore)")


def test_read_only_clients_never_change_settings(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    _m, (port,) = start(muxd, tmp_path, pty_device, [{}], line_control="any")
    sock, codec = raw_client(port)
    with sock:
        assert ask(sock, codec, SetBaudrate(9600)) == SetBaudrate(115200)
    assert pty_device.speed() == termios.B115200


def test_malformed_subnegotiation_closes_that_client_only(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, clients: list[serial.Serial]
) -> None:
    m, (port,) = start(muxd, tmp_path, pty_device, [{"mode": "rw"}])
    good = open_rfc2217(port)
    clients.append(good)
    bad = connect(port)
    with bad:
        # SET-PARITY with code 9: the RFC has no such parity.
        bad.sendall(b"\xff\xfa\x2c\x03\x09\xff\xf0")
        bad.settimeout(5)
        for _ in range(100):
            if not bad.recv(4096):
                break
        else:
            raise AssertionError("muxd did not close the bad client")
    m.wait_log("closing this client")
    pty_device.write(b"still here\n")
    assert good.read(11) == b"still here\n"


def test_plain_telnet_peer_gets_escaped_data_and_nothing_else(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """A client that never negotiates (nc) still receives the stream, 0xFF doubled."""
    m, (port,) = start(muxd, tmp_path, pty_device, [{}])
    sock = connect(port)
    with sock:
        m.wait_connected(1)
        pty_device.write(b"a\xffb\n")
        got = recv_until(sock, b"b\n")
        assert got.endswith(b"a\xff\xffb\n")


# -- in process: the encoded-output bound under a client that does not read --


def test_a_stalled_client_keeps_its_lag_in_the_hub() -> None:
    reactor = Reactor()
    lst = Listener("rfc2217", "r", host="127.0.0.1", port=0, buffer=64 * 1024)  # the kernel chooses
    port = Port("dut", SimUpstream(), (lst,))
    rt = PortRuntime.build(port, reactor)
    hub = rt.hub
    listener = Rfc2217Listener(lst, hub, reactor, rt.line_control)
    listener.start()
    assert listener.bound_address is not None
    peer = stuck_reader(split_hostport(listener.bound_address)[1])
    try:
        run_until(reactor, lambda: listener.clients, "accept")
        (conn,) = listener.clients
        assert isinstance(conn, Rfc2217Connection)
        chunk = b"\xff" * 4096  # the worst case: every byte doubles
        largest = 0
        for _ in range(200):  # 800 KiB, far beyond the socket buffers and `buffer`
            hub.publish(chunk)
            for _ in range(3):
                reactor.run_once(0)
            largest = max(largest, len(conn._out))
        assert largest <= LOW_WATER + 2 * Rfc2217Connection.encoder_chunk < HIGH_WATER
        assert conn.reader.dropped > 0  # drop-oldest applied in the hub
        assert hub.lag(conn.reader) <= lst.buffer
    finally:
        peer.close()
        listener.stop()
        for c in list(listener.clients):
            c.close("test over")
        reactor.close()


def test_a_reload_that_reopens_the_upstream_brings_back_the_configured_settings(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, clients: list[serial.Serial]
) -> None:
    m, (port,) = start(muxd, tmp_path, pty_device, [{"mode": "rw"}], line_control="owner")
    owner = open_rfc2217(port)
    clients.append(owner)
    owner.baudrate = 9600
    assert pty_device.speed() == termios.B9600
    listener = m.listener(0)  # the same listener, as first written
    upstream = {"serial": pty_device.path, "baudrate": 57600}
    m.rewrite([{"name": "dut", "upstream": upstream, "listeners": [listener], "line_control": "owner"}])
    m.signal(signal.SIGHUP)
    wait_for(lambda: pty_device.speed() == termios.B57600, what="the device reopened at 57600")
    # The settings in force are the configured ones again: opening with them works.
    clients.append(open_rfc2217(port, baudrate=57600))
