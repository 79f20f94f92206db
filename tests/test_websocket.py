"""WebSocket readers: the `websockets` library (an independent client) and raw
sockets against muxd on a pty; keepalive in-process with a short interval."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Ping, RejectConnection, Request

from muxd import config as configmod
from muxd.hub import Hub
from muxd.listeners import websocket as wsmod
from muxd.listeners.http import HttpFront, HttpTimeouts
from muxd.port import PortRuntime
from muxd.reactor import Reactor
from tests.helpers import (
    PtyDevice,
    StartMuxd,
    free_port,
    get_json,
    port_info,
    read_to_eof,
    request,
    start_http,
    wait_clients,
    wait_for,
    write_config,
)


def ws(addr: str, path: str = "/ws/dut", origin: str | None = None) -> ClientConnection:
    return ws_connect(f"ws://{addr}{path}", open_timeout=5, origin=origin)  # type: ignore[arg-type]


def recv_bytes(conn: ClientConnection, n: int, timeout: float = 10.0) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(buf)} of {n} bytes"
        msg = conn.recv(timeout=left)
        assert isinstance(msg, bytes), "binary frames expected"
        buf += msg
    return bytes(buf)


def quiet(conn: ClientConnection, wait: float = 0.3) -> bool:
    """True if nothing more arrives within `wait` (a bounded check for absence)."""
    try:
        conn.recv(timeout=wait)
    except TimeoutError:
        return True
    return False


def close_code(conn: ClientConnection, timeout: float = 5.0) -> int | None:
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        try:
            conn.recv(timeout=max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd is not None else None
        assert time.monotonic() < deadline, "not closed"
    raise AssertionError("not closed")


class RawWs:
    """A WebSocket client on a raw socket (wsproto as the client-side codec), for
    peers that misbehave: never read, never pong, send what they should not.
    `step` runs between polls: the in-process tests turn the reactor there."""

    def __init__(
        self,
        host: str,
        port: int,
        target: str = "/ws/dut",
        rcvbuf: int | None = None,
        step: Callable[[], None] = lambda: None,
    ) -> None:
        self.sock = socket.socket()
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, port))
        self.step = step
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.conn.send(Request(host=f"{host}:{port}", target=target)))
        self.sock.setblocking(False)
        [accepted] = self.events(bool)
        assert isinstance(accepted, AcceptConnection), accepted

    def events(self, until: Callable[[list[Event]], bool], timeout: float = 5.0) -> list[Event]:
        got: list[Event] = []
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.005) + 10):
            if until(got):
                return got
            assert time.monotonic() < deadline, f"events so far: {got!r}"
            self.step()
            if select.select([self.sock], [], [], 0.005)[0]:
                data = self.sock.recv(65536)
                self.conn.receive_data(data or None)
                got += list(self.conn.events())
        raise AssertionError(f"events so far: {got!r}")

    def close(self) -> None:
        self.sock.close()


# -- bytes in, bytes out ---------------------------------------------------------------


def test_exact_bytes_from_the_device_and_writes_to_it(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    with ws(addr) as a, ws(addr) as b:
        wait_clients(addr, 2)
        payload = random.Random(4).randbytes(300_000)  # every byte value, not UTF-8
        for i in range(0, len(payload), 4096):
            pty_device.write(payload[i : i + 4096])
        assert recv_bytes(a, len(payload)) == payload
        assert recv_bytes(b, len(payload)) == payload
        a.send(b"binary \x00\xff\r\n")
        assert pty_device.read(11) == b"binary \x00\xff\r\n"
        text = "texte accentu\u00e9\n"  # a text frame goes to the device as its UTF-8 bytes
        b.send(text)
        assert pty_device.read(len(text.encode())) == text.encode()


def test_json_frames_are_lossless(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    with ws(addr, "/ws/dut?format=json") as conn:
        wait_clients(addr, 1)
        raw = [b"ok \xff\xfe caf\xc3", b"\xa9 \x1b[0m\n"]  # an invalid pair, then a split character
        pty_device.write(raw[0])
        wait_for(lambda: port_info(addr)["bytes_in"] == len(raw[0]), 5, "the first part read alone")
        pty_device.write(raw[1])
        records: list[dict[str, Any]] = []
        text = ""
        deadline = time.monotonic() + 5
        while text.encode("utf-8", "surrogateescape") != b"".join(raw):
            assert time.monotonic() < deadline, records
            msg = conn.recv(timeout=5)
            assert isinstance(msg, str)
            records.append(json.loads(msg))
            text += records[-1]["data"]
        assert all(r["dir"] == "rx" and abs(r["t"] - time.time()) < 60 for r in records)
        assert "\udcff\udcfe" in text and "caf\u00e9" in text


def test_history_replay_is_capped_by_the_port(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device, history="4KiB")
    lines = b"".join(b"%07d\n" % i for i in range(2000))  # 16 KB
    pty_device.write(lines)
    wait_for(lambda: port_info(addr)["bytes_in"] == len(lines), 5, "the device's bytes")
    with ws(addr, "/ws/dut?history=800") as conn:
        assert recv_bytes(conn, 800) == lines[-800:]
        assert quiet(conn)
    with ws(addr, "/ws/dut?history=1000000") as conn:
        assert recv_bytes(conn, 4096) == lines[-4096:]
        assert quiet(conn)
    with ws(addr) as conn:  # no history asked: only what comes next
        wait_clients(addr, 1)
        pty_device.write(b"next\n")
        assert recv_bytes(conn, 5) == b"next\n"


def test_ro_listener_discards_browser_input(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"websocket": True}])
    assert port_info(addr)["writable"] is False
    with ws(addr) as conn:
        conn.send(b"rm -rf /\n")
        wait_for(
            lambda: 'muxd_input_discarded_bytes_total{port="dut"} 9.0' in _metrics(addr), 5, "discard counted"
        )
        pty_device.write(b"still reading\n")
        assert recv_bytes(conn, 14) == b"still reading\n"


def _metrics(addr: str) -> str:
    return request(addr, "GET", "/metrics")[2].decode()


def test_writes_wait_for_a_full_queue_and_lose_nothing(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device, write_queue="1KiB", max_line=64)
    payload = os.urandom(200_000)
    with ws(addr) as conn:

        def send_all() -> None:
            for i in range(0, len(payload), 1000):
                conn.send(payload[i : i + 1000])

        sender = threading.Thread(target=send_all)
        sender.start()
        try:
            # The device reads nothing yet: the queue fills and muxd stops reading the socket.
            wait_for(lambda: port_info(addr)["write_queue_bytes"] > 0, 10, "a backlog in the write queue")
            assert port_info(addr)["write_queue_bytes"] <= 1024
            assert pty_device.read(len(payload), timeout=30) == payload
        finally:
            sender.join(30)
        assert not sender.is_alive()


# -- misbehaving peers never disturb the others ------------------------------------------


def test_malformed_handshakes_are_refused(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    host, port = addr.rsplit(":", 1)
    with ws(addr) as healthy:
        wait_clients(addr, 1)
        cases = {
            b"GET /ws/dut HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n": b"400",  # no key
            b"GET /ws/dut HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n": b"426",
            b"GET /ws/dut HTTP/1.1\r\nHost: h\r\n\r\n": b"400",  # not an upgrade at all
            b"GET /ws/dut?history=lots HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n": b"400",
            b"POST /ws/dut HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n": b"405",
            b"GET /ws/dut HTTP/1.1\r\nHost: \xff\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n": b"400",
            b"GET /ws/dut HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\x00\x01garbage\r\n\r\n": b"400",
        }
        for raw, status in cases.items():
            # Each names the server in Host (else it would be a 421 for that first).
            named = raw.replace(b"Host: h\r\n", f"Host: {addr}\r\n".encode())
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(
                    named + f"GET /ws/dut HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode()
                )
                got = read_to_eof(s)
            assert got.startswith(b"HTTP/1.1 " + status + b" "), (raw, got[:200])
            assert b"101 Switching" not in got
        pty_device.write(b"healthy\n")
        assert recv_bytes(healthy, 8) == b"healthy\n"


def test_origin_allow_list(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device, http={"origins": ["http://console.lab:8080"]})
    with ws(addr) as healthy:  # no Origin: not a browser
        wait_clients(addr, 1)
        with pytest.raises(InvalidStatus) as refused:
            ws(addr, origin="http://evil.example")
        assert refused.value.response.status_code == 403
        for origin in (f"http://{addr}", "http://console.lab:8080", "HTTP://CONSOLE.LAB:8080"):
            with ws(addr, origin=origin) as ok:
                pty_device.write(b"x")
                assert recv_bytes(ok, 1) == b"x"
                assert recv_bytes(healthy, 1) == b"x"


def test_origin_rules() -> None:
    allowed = wsmod.origin_allowed
    assert allowed(None, "h:1", ())
    assert allowed("http://h:1", "h:1", ())
    assert not allowed("http://h:2", "h:1", ())
    assert not allowed("http://h:1.evil", "h:1", ())
    assert allowed("https://x.lab", "h:1", ("https://x.lab/",))
    assert allowed("null", "h:1", ("*",))
    assert not allowed("null", "h:1", ())


def test_oversized_message_closes_1009(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"websocket": True}])
    with ws(addr) as healthy, ws(addr) as big:
        wait_clients(addr, 2)
        big.send(b"x" * (wsmod.MAX_MESSAGE + 1000))
        assert close_code(big) == 1009
        pty_device.write(b"after\n")
        assert recv_bytes(healthy, 6) == b"after\n"
    text = _metrics(addr)
    assert 'reason="message too big"} 1.0' in text


def test_protocol_error_closes_1002(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    host, port = addr.rsplit(":", 1)
    raw = RawWs(host, int(port))
    raw.sock.sendall(b"\x82\x03abc")  # an unmasked frame: clients must mask
    events = raw.events(lambda evs: any(isinstance(e, CloseConnection) for e in evs))
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [1002]
    raw.close()


def test_max_clients_refuses_with_503(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"websocket": True, "max_clients": 1}])
    with ws(addr):
        wait_clients(addr, 1)
        with pytest.raises(InvalidStatus) as refused:
            ws(addr)
        assert refused.value.response.status_code == 503
    assert (
        'muxd_client_rejected_total{listener="websocket:dut",port="dut",reason="max_clients"} 1.0'
        in _metrics(addr)
    )


def test_client_that_never_reads_lags_and_drops_alone(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"websocket": True, "buffer": "16KiB"}])
    host, port = addr.rsplit(":", 1)
    stuck = RawWs(host, int(port), rcvbuf=4096)
    with ws(addr) as healthy:
        wait_clients(addr, 2)
        payload = os.urandom(1_000_000)
        for i in range(0, len(payload), 10_000):
            pty_device.write(payload[i : i + 10_000])
            assert recv_bytes(healthy, 10_000) == payload[i : i + 10_000]
        clients = {c["peer"]: c for c in _clients(addr)}
        stuck_peer = f"127.0.0.1:{stuck.sock.getsockname()[1]}"
        assert clients[stuck_peer]["dropped"] > 500_000
        assert 0 < clients[stuck_peer]["lag"] <= 16 * 1024
        assert all(c["dropped"] == 0 for p, c in clients.items() if p != stuck_peer)
    stuck.close()


def _clients(addr: str) -> list[dict[str, Any]]:
    clients: list[dict[str, Any]] = get_json(addr, "/api/v1/ports/dut/clients")["clients"]
    return clients


def test_sigterm_sends_the_tail_then_1001(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    m, addr = start_http(muxd, tmp_path, pty_device)
    with ws(addr) as conn:
        wait_clients(addr, 1)
        tail = os.urandom(50_000)
        pty_device.write(tail)
        wait_for(lambda: port_info(addr)["bytes_in"] == len(tail), 5, "the device's bytes")
        m.signal(signal.SIGTERM)
        assert recv_bytes(conn, len(tail)) == tail
        assert close_code(conn) == 1001
    assert m.wait_exit() == 0


def test_reload_finishes_websockets_of_a_removed_port(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    http_port = free_port()

    def config(with_sim: bool) -> Path:
        ports: list[dict[str, Any]] = [
            {"name": "dut", "upstream": {"serial": pty_device.path}, "listeners": [{"websocket": True}]}
        ]
        if with_sim:
            ports.append(
                {"name": "sim", "upstream": {"sim": {"boot": False}}, "listeners": [{"websocket": True}]}
            )
        return write_config(tmp_path, {"ports": ports, "http": {"listen": f"127.0.0.1:{http_port}"}})

    m = muxd("run", "-c", str(config(True)), "--log-level", "debug")
    m.wait_log("dut upstream up")
    m.wait_port(http_port)
    addr = f"127.0.0.1:{http_port}"
    with ws(addr, "/ws/sim") as gone, ws(addr) as stays:
        wait_for(lambda: len(get_json(addr, "/api/v1/ports")["ports"]) == 2, 5, "two ports")
        config(False)
        m.signal(signal.SIGHUP)
        assert close_code(gone, timeout=10) == 1001
        pty_device.write(b"after reload\n")
        assert recv_bytes(stays, 13) == b"after reload\n"
    assert [p["name"] for p in get_json(addr, "/api/v1/ports")["ports"]] == ["dut"]


# -- keepalive, in-process with a short interval ----------------------------------------


@pytest.fixture
def loop() -> Iterator[tuple[Reactor, HttpFront, Hub]]:
    cfg = configmod.from_data(
        {
            "ports": [{"name": "dut", "upstream": {"sim": True}, "listeners": [{"websocket": True}]}],
            "http": {"listen": f"127.0.0.1:{free_port()}"},
        }
    )
    reactor = Reactor()
    rt = PortRuntime.build(cfg.ports[0], reactor)
    hub = rt.hub
    front = HttpFront(cfg.http[0], lambda: {"dut": rt}, reactor, timeouts=HttpTimeouts(ping=0.2))
    front.start()
    yield reactor, front, hub
    for client in list(front.clients):
        client.close("shutdown")
    front.stop()
    reactor.close()


def test_a_peer_that_never_pongs_is_closed(loop: tuple[Reactor, HttpFront, Hub]) -> None:
    reactor, front, hub = loop
    raw = RawWs(front.cfg.host, front.cfg.port, step=lambda: reactor.run_once(0.005))
    events = raw.events(lambda evs: any(isinstance(e, CloseConnection) for e in evs), timeout=5)
    assert any(isinstance(e, Ping) for e in events)
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [1011]
    assert hub.listener_stats["websocket:dut"].disconnects == {"ping timeout": 1}
    raw.close()


def test_a_peer_that_pongs_stays(loop: tuple[Reactor, HttpFront, Hub]) -> None:
    reactor, front, hub = loop
    raw = RawWs(front.cfg.host, front.cfg.port, step=lambda: reactor.run_once(0.005))
    pings = 0
    for _ in range(5):  # five intervals: two would close a silent peer
        events = raw.events(lambda evs: any(isinstance(e, Ping) for e in evs), timeout=5)
        assert not any(isinstance(e, CloseConnection | RejectConnection) for e in events)
        for e in events:
            if isinstance(e, Ping):
                pings += 1
                raw.sock.sendall(raw.conn.send(e.response()))
    assert pings >= 5 and len(hub.readers) == 1
    hub.publish(b"still open\n")
    got = raw.events(lambda evs: any(getattr(e, "data", b"") == b"still open\n" for e in evs))
    assert got
    raw.close()


# -- DNS rebinding ---------------------------------------------------------------------------


def _handshake(reactor: Reactor, front: HttpFront, host: str, origin: str | None) -> Event:
    """wsproto as an independent client: the answer to one upgrade request."""
    client = WSConnection(ConnectionType.CLIENT)
    extra = [(b"origin", origin.encode())] if origin is not None else []
    with socket.create_connection((front.cfg.host, front.cfg.port)) as s:
        s.sendall(client.send(Request(host=host, target="/ws/dut", extra_headers=extra)))
        s.setblocking(False)
        deadline = time.monotonic() + 5
        for _ in range(2000):
            assert time.monotonic() < deadline, "no answer to the handshake"
            reactor.run_once(0.005)
            if select.select([s], [], [], 0)[0]:
                client.receive_data(s.recv(65536) or None)
                for event in client.events():
                    return event
    raise AssertionError("no answer to the handshake")


def test_a_rebound_name_cannot_open_a_websocket(loop: tuple[Reactor, HttpFront, Hub]) -> None:
    """evil.example rebound to 127.0.0.1: its page's Origin matches its own Host,
    so the Origin check alone let it in. Host must name this server."""
    reactor, front, hub = loop
    port = front.cfg.port
    refused = _handshake(reactor, front, f"evil.example:{port}", f"http://evil.example:{port}")
    assert isinstance(refused, RejectConnection) and refused.status_code == 421
    assert not hub.readers
    foreign = _handshake(reactor, front, f"127.0.0.1:{port}", f"http://evil.example:{port}")
    assert isinstance(foreign, RejectConnection) and foreign.status_code == 403  # the Origin check stays
    accepted = _handshake(reactor, front, f"localhost:{port}", f"http://localhost:{port}")
    assert isinstance(accepted, AcceptConnection)
    assert reactor.internal_errors == 0
