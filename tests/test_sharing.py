"""Sharing a console: the write lock (muxd.writelock, muxd.writes), the escape
commands (muxd.sharing) on TCP and pty clients, and the control events in traces.

The policy is tested without sockets, on a clock the test moves; the rest
through real peers: raw TCP sockets (as nc), a pty opened as a terminal, a
fake K2 in RFC 2217 mode that records what reaches the device (bytes, BREAK,
DTR/RTS), and the API.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from muxd.hub import Hub, PortBounds, Reader, ReaderPolicy
from muxd.protocol.rfc2217 import SetControl
from muxd.reactor import Reactor
from muxd.writelock import BURST_GAP, WriteLock
from tests import test_web_console as web
from tests.conftest import StartMuxd
from tests.fakes.k2 import FakeK2
from tests.helpers import (
    AUTO,
    IdleOwner,
    Muxd,
    PtyDevice,
    connect,
    metric,
    port_info,
    read_to_eof,
    recv_until,
    request,
    start_http,
    start_muxd,
    start_on_k2,
    wait_clients,
    wait_for,
)

ESC = b"\x1d"
RESET = ["dtr=0", "rts=1", "50ms", "rts=0", "dtr=1"]

# -- the policy, without sockets ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def reader(listener: str = "tcp:a", writable: bool = True) -> Reader:
    policy = ReaderPolicy(listener, 4096, True, writable, False, False)
    return Reader(IdleOwner(), policy, f"{listener}-peer")


@pytest.fixture
def lock() -> Iterator[tuple[WriteLock, Clock, list[tuple[Any, Any, str]]]]:
    clock = Clock()
    lk = WriteLock("first", idle=10.0, clock=clock, wall=clock)
    changes: list[tuple[Any, Any, str]] = []
    lk.on_change = lambda old, new, why: changes.append((old, new, why))
    yield lk, clock, changes


def test_none_admits_everyone_and_never_holds() -> None:
    lk = WriteLock("none")
    a, b = reader(), reader()
    assert lk.admit(a, 5) == (True, False)
    assert lk.admit(b, 5) == (True, False)
    assert lk.holder is None and lk.refused_bytes == 0


def test_first_writer_holds_others_refused_once_per_burst(lock: Any) -> None:
    lk, clock, changes = lock
    a, b = reader("tcp:a"), reader("tcp:b")
    assert lk.admit(a, 3) == (True, False)
    assert lk.holder.reader is a and changes == [(None, a, "first to write")]
    assert lk.admit(b, 4) == (False, True)  # told
    clock.t += BURST_GAP / 2
    assert lk.admit(b, 5) == (False, False)  # the same burst: not told again
    clock.t += BURST_GAP / 2
    assert lk.admit(b, 6) == (False, False)  # still one burst: each refusal restarts the gap
    clock.t += BURST_GAP
    assert lk.admit(b, 1) == (False, True)  # a new attempt after quiet: told again
    assert lk.refused_bytes == 16 and lk.refusals == 2
    assert lk.admit(a, 1) == (True, False)


def test_holder_leaves_or_idles_out(lock: Any) -> None:
    lk, clock, changes = lock
    a, b = reader("tcp:a"), reader("tcp:b")
    lk.admit(a, 1)
    lk.leave(a)
    assert lk.holder is None and changes[-1] == (a, None, "left")
    assert lk.admit(b, 1) == (True, False)
    clock.t += 9
    lk.admit(b, 1)  # input moves the idle clock
    clock.t += 9
    assert not lk.expire(clock.t)
    assert lk.deadline() == clock.t + 1
    clock.t += 1
    assert lk.expire(clock.t) and lk.holder is None and changes[-1] == (b, None, "idle")
    assert lk.admit(a, 1) == (True, False)  # free again: the next writer takes it


def test_force_moves_it_and_names_the_previous_holder(lock: Any) -> None:
    lk, _clock, changes = lock
    a, b = reader("tcp:a"), reader("tcp:b")
    lk.admit(a, 1)
    assert lk.force(b) is a
    assert lk.holder.reader is b and changes[-1] == (a, b, "forced")
    assert lk.admit(a, 2) == (False, True)  # a is told: another holds it now
    assert lk.force(b) is None  # already its own
    lk.reload("none", 10.0)
    assert lk.holder is None and lk.admit(a, 1) == (True, False)


def queued(hub: Hub) -> bytes:
    return b"".join(bytes(u) for u in hub.writes.queue.units)


def test_the_write_path_refuses_tells_once_and_counts_without_sockets() -> None:
    """Writes and the hub: every writer (submit, and the MQTT feed's offer)
    goes through the lock; the refused one gets one in-band notice naming
    the holder, even with notices off; a ro reader is discarded as before."""
    reactor = Reactor()
    hub = Hub("p", PortBounds(log_capacity=4096, write_queue=1024, max_line=64, history=0), reactor)
    hub.writes.tell = hub.tell
    hub.writes.lock.reload("first", 60.0)
    events: list[tuple[str, str]] = []
    hub.writes.events.append(lambda name, text, fields: events.append((name, text)))
    a, b, feed = (
        hub.attach(IdleOwner(), reader(n).policy, f"{n}-peer") for n in ("tcp:a", "tcp:b", "mqtt:p")
    )
    ro = hub.attach(IdleOwner(), reader("tcp:ro", writable=False).policy, "ro-peer")
    hub.writes.submit(a, b"from-a")
    hub.writes.submit(b, b"from-b")
    hub.writes.submit(b, b"more-b")
    assert hub.writes.offer(feed, b"mqtt message") is False
    hub.writes.submit(ro, b"ro")
    assert queued(hub) == b"from-a"
    held = hub.writes.lock.holder
    assert held is not None and held.reader is a
    since = held.since
    assert hub.writes.lock.refused_bytes == 24 and hub.writes.discarded == 2
    assert [text for _, text in b.notices] == [
        b"-- muxd: input refused: tcp:a tcp:a-peer holds the write lock (since "
        + time.strftime("%H:%M:%S", time.localtime(since)).encode()
        + b") --\r\n"
    ]
    assert len(feed.notices) == 1 and not a.notices and not ro.notices
    assert hub.writes.force(ro) == "this session is read-only: it can never hold the write lock"
    assert hub.writes.force(b) is None
    assert [t for _, t in a.notices] == [b"-- muxd: the write lock was taken over by tcp:b tcp:b-peer --\r\n"]
    hub.writes.submit(b, b"|b")
    assert queued(hub) == b"from-a|b"
    hub.detach(b, "peer closed")
    assert hub.writes.offer(feed, b"|mqtt") is True
    assert queued(hub) == b"from-a|b|mqtt"
    assert events == [
        ("lock", "write lock taken by tcp:a tcp:a-peer (first to write)"),
        ("lock", "write lock taken by tcp:b tcp:b-peer (forced)"),
        ("lock", "write lock released by tcp:b tcp:b-peer (left)"),
        ("lock", "write lock taken by mqtt:p mqtt:p-peer (first to write)"),
    ]
    # A reload that makes the holder's listener read-only takes the lock from it.
    hub.retarget(feed, reader("mqtt:p", writable=False).policy)
    assert hub.writes.lock.holder is None


# -- through muxd -------------------------------------------------------------------------------


@pytest.fixture
def k2() -> Iterator[FakeK2]:
    fake = FakeK2(rfc2217=True)
    yield fake
    fake.stop()


def start(muxd: StartMuxd, tmp_path: Path, k2: FakeK2, **opts: Any) -> Muxd:
    """Port dut1 on the K2: listeners 0, 1 tcp rw, 2 tcp ro, 3 pty rw, all with
    the escape ^]; write_lock first; text and jsonl traces with events."""
    listeners = [
        {"tcp": AUTO, "mode": "rw", "escape": "^]"},
        {"tcp": AUTO, "mode": "rw", "escape": "^]"},
        {"tcp": AUTO, "mode": "ro", "escape": "^]"},
        {"pty": str(tmp_path / "ttyDUT"), "mode": "rw", "escape": "^]"},
    ]
    traces = [
        {"path": str(tmp_path / "dut1.log"), "format": "text", "events": True},
        {"path": str(tmp_path / "dut1.jsonl"), "format": "jsonl", "events": True},
    ]
    port = {"write_lock": "first", "lock_idle": "1m", "sequences": {"reset": RESET}, "trace": traces, **opts}
    return start_on_k2(muxd, tmp_path, k2.port, listeners, upstream={"control": "rfc2217"}, **port)


def holder(m: Muxd) -> Any:
    """The API's write_lock.holder: a dict, or None while the lock is free."""
    return port_info(m.http)["write_lock"]["holder"]


def peer_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def signals(k2: FakeK2) -> list[str]:
    names = {
        SetControl.DTR_ON: "dtr=1",
        SetControl.DTR_OFF: "dtr=0",
        SetControl.RTS_ON: "rts=1",
        SetControl.RTS_OFF: "rts=0",
        SetControl.BREAK_ON: "break=1",
        SetControl.BREAK_OFF: "break=0",
    }
    return [names[c.value] for _, c in k2.control_received() if c.value in names]


def test_write_lock_over_tcp_refuse_idle_leave_force(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    # 3 s: the steps before the idle check take milliseconds, even on a loaded machine.
    m = start(muxd, tmp_path, k2, lock_idle="3s")
    a, b, ro = connect(m.port(0)), connect(m.port(1)), connect(m.port(2))
    wait_clients(m.http, 3)
    pa, pb = peer_of(a), peer_of(b)
    assert port_info(m.http)["write_lock"] == {
        "policy": "first",
        "idle": 3.0,
        "holder": None,
        "refused_bytes": 0,
    }
    a.sendall(b"from-a\r\n")
    assert k2.wait_uart(b"from-a\r\n")
    held = wait_for(lambda: holder(m), what="the holder in the API")
    assert held["peer"] == peer_of(a) and held["listener"] == m.names[0]
    assert held["token"] is None and held["since"] <= time.time()
    # b is refused, told once for the burst, naming a; nothing reaches the device.
    b.sendall(b"intrude-1\r\n")
    b.sendall(b"intrude-2\r\n")
    b.sendall(ESC + b"w")  # its answer comes after the refusals
    told = recv_until(b, b"write lock: ")
    assert told.count(b"input refused") == 1, told
    assert f"input refused: {m.names[0]} {peer_of(a)} holds the write lock".encode() in told
    a.sendall(b"again-a\r\n")
    assert k2.wait_uart(b"from-a\r\nagain-a\r\n")
    assert b"intrude" not in k2.uart_received()
    assert port_info(m.http)["write_lock"]["refused_bytes"] == 22
    assert metric(m.http, "muxd_write_lock_refused_bytes_total", port="dut1") == 22
    assert metric(m.http, "muxd_port_write_lock_holder_info", port="dut1", listener=m.names[0]) == 1
    # A read-only client can never take it.
    ro.sendall(ESC + b"f")
    assert b"read-only" in recv_until(ro, b"read-only")
    assert holder(m)["peer"] == peer_of(a)
    # b forces it: both are told, the API follows, and b writes.
    b.sendall(ESC + b"f")
    assert b"taken over by " + f"{m.names[1]} {peer_of(b)}".encode() in recv_until(a, b"taken over by")
    assert f"taken from {m.names[0]} {peer_of(a)}".encode() in recv_until(b, b"taken from")
    assert holder(m)["peer"] == peer_of(b)
    b.sendall(b"from-b\r\n")
    assert k2.wait_uart(lambda got: got.endswith(b"from-b\r\n"))
    # The holder leaves: a may write again (and holds it).
    b.close()
    wait_for(lambda: holder(m) is None, what="the lock free after its holder left")
    a.sendall(b"a-back\r\n")
    assert k2.wait_uart(lambda got: got.endswith(b"a-back\r\n"))
    assert holder(m)["peer"] == peer_of(a)
    # Idle for lock_idle (3 s): released, a is told, and another may write.
    assert b"idle" in recv_until(a, b"released: idle", timeout=10)
    assert holder(m) is None
    c = connect(m.port(1))
    c.sendall(b"from-c\r\n")
    assert k2.wait_uart(lambda got: got.endswith(b"from-c\r\n"))
    assert holder(m)["peer"] == peer_of(c)
    for s in (a, c, ro):
        s.close()
    # The traces hold the lock changing hands, text and jsonl.
    log = tmp_path / "dut1.log"
    wait_for(lambda: b"(idle)" in log.read_bytes(), what="the idle release in the text trace")
    text = log.read_text()
    assert f"write lock taken by {m.names[0]} {pa} (first to write)" in text
    assert f"write lock taken by {m.names[1]} {pb} (forced)" in text
    assert "(idle)" in text and "(left)" in text


def terminal(path: Path) -> int:
    """The pty listener's tty opened as a terminal program would (raw mode)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    termios.tcflush(fd, termios.TCIOFLUSH)
    return fd


def pty_until(fd: int, marker: bytes, timeout: float = 5.0) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while marker not in buf:
        assert time.monotonic() < deadline, f"no {marker!r} on the pty; got {bytes(buf[-300:])!r}"
        try:
            buf += os.read(fd, 65536)
        except BlockingIOError:
            import select

            select.select([fd], [], [], 0.05)
    return bytes(buf)


def test_escape_commands_on_tcp_and_pty(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    m = start(muxd, tmp_path, k2)
    a = connect(m.port(0))
    wait_clients(m.http, 1)
    pa = peer_of(a)
    k2.feed(b"".join(b"line%d\r\n" % i for i in range(1, 31)))
    assert b"line30\r\n" in recv_until(a, b"line30\r\n")
    a.sendall(ESC + b"?")
    menu = recv_until(a, b"close this session")
    assert b"b  send a BREAK" in menu and b"h  replay" in menu
    # BREAK: seen at the device (the K2's SET-CONTROL BREAK on, then off).
    a.sendall(ESC + b"b")
    assert b"BREAK sent" in recv_until(a, b"BREAK sent")
    wait_for(lambda: signals(k2)[-2:] == ["break=1", "break=0"], what="the BREAK at the K2")
    # The reset sequence: its DTR/RTS steps at the K2, in order.
    a.sendall(ESC + b"r")
    assert b"sequence reset sent" in recv_until(a, b"sequence reset sent")
    wait_for(lambda: signals(k2)[-4:] == ["dtr=0", "rts=1", "rts=0", "dtr=1"], what="the reset at the K2")
    # Replay: the last 20 lines.
    a.sendall(ESC + b"h")
    replay = recv_until(a, b"end of replay")
    assert b"last 20 lines" in replay and b"line11\r\nline12\r\n" in replay and b"line30\r\n" in replay
    assert b"line10\r\n" not in replay
    # Who: every client, the lock's holder.
    a.sendall(ESC + b"w")
    who = recv_until(a, b"write lock: ")
    assert f"{m.names[0]} {peer_of(a)} rw".encode() in who and b"(you)" in who
    # The escape twice is one literal escape; an unknown letter is answered.
    a.sendall(b"x" + ESC + ESC + b"y\r\n" + ESC + b"z")
    assert b"unknown command 'z'" in recv_until(a, b"unknown command")
    assert k2.wait_uart(b"x\x1dy\r\n")
    # The pty, opened as a terminal.
    fd = terminal(tmp_path / "ttyDUT")
    try:
        wait_clients(m.http, 2)
        os.write(fd, ESC + b"w")
        who = pty_until(fd, b"write lock: ")
        assert f"{m.names[0]} {peer_of(a)} rw".encode() in who and b"(you)" in who
        assert f"write lock: {m.names[0]} {peer_of(a)} holds".encode() in who
        os.write(fd, ESC + b"b")  # a holds the lock: refused, nothing sent
        assert b"BREAK not sent" in pty_until(fd, b"BREAK not sent")
        os.write(fd, ESC + b"f")
        assert b"taken from" in pty_until(fd, b"taken from")
        breaks = signals(k2).count("break=1")
        os.write(fd, ESC + b"b")
        assert b"BREAK sent" in pty_until(fd, b"BREAK sent")
        wait_for(lambda: signals(k2).count("break=0") == breaks + 1, what="the pty's BREAK at the K2")
        os.write(fd, b"pty" + ESC + ESC + b"\r\n")
        assert k2.wait_uart(lambda got: got.endswith(b"pty\x1d\r\n"))
    finally:
        os.close(fd)
    # Nothing of any menu or command reached the device: exactly what was typed.
    assert k2.uart_received() == b"x\x1dy\r\npty\x1d\r\n"
    # The device absent: a BREAK is answered with the reason, as the API's 503.
    k2.stop()
    wait_for(lambda: port_info(m.http)["state"] != "up", what="the port down")
    a.sendall(ESC + b"f" + ESC + b"b")
    assert b"BREAK not sent: the device is not up" in recv_until(a, b"BREAK not sent")
    a.sendall(ESC + b".")
    read_to_eof(a)
    a.close()
    # The traces: attach, detach, lock, break and sequence records, text and jsonl.
    jsonl = tmp_path / "dut1.jsonl"
    wait_for(lambda: b'"detach"' in jsonl.read_bytes(), what="the detach record")
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    events = {r["event"] for r in records if "event" in r}
    assert {"attach", "detach", "lock", "break", "sequence"} <= events, events
    attach = next(r for r in records if r.get("event") == "attach")
    assert attach["peer"] == pa and attach["listener"] == m.names[0]
    brk = next(r for r in records if r.get("event") == "break")
    assert brk["peer"] == pa
    text = (tmp_path / "dut1.log").read_text()
    assert f"{m.names[0]} {pa} attached" in text
    assert f"BREAK by {m.names[0]} {pa}" in text
    assert f"sequence reset by {m.names[0]} {pa}" in text
    assert "left (closed by escape)" in text or "left (escape)" in text


PICOCOM = shutil.which("picocom")


@pytest.mark.skipif(PICOCOM is None, reason="picocom is not installed (apt-get install picocom)")
def test_escape_through_picocom_on_the_pty(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    """A terminal user's own program on the pty listener: picocom (its escape
    is C-a, so ^] passes through to muxd). Who, a BREAK at the device, typing;
    nothing of the answers reaches the device."""
    assert PICOCOM is not None
    m = start(muxd, tmp_path, k2)
    child = pexpect.spawn(PICOCOM, ["-q", "-b", "115200", str(tmp_path / "ttyDUT")], timeout=10)
    try:
        wait_clients(m.http, 1)
        child.send(ESC + b"w")
        child.expect(b"write lock: ")
        child.send(ESC + b"b")  # the lock is free: taken, as typing would take it
        child.expect(b"BREAK sent")
        wait_for(lambda: signals(k2)[-2:] == ["break=1", "break=0"], what="picocom's BREAK at the K2")
        child.send(b"uname\r")
        assert k2.wait_uart(b"uname\r")
        k2.feed(b"Linux dut1\r\n")
        child.expect(b"Linux dut1")
        assert k2.uart_received() == b"uname\r"
    finally:
        child.sendcontrol("a")
        child.sendcontrol("x")  # picocom's exit
        child.expect(pexpect.EOF, timeout=5)
        child.close(force=True)  # by its PID, if it is still there


browser = web.browser  # headless Chromium, skipped where it is not installed


def test_web_console_input_disabled_while_another_holds_the_lock(
    browser: Any, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    listeners: list[dict[str, Any]] = [{"websocket": True, "mode": "rw"}, {"tcp": AUTO, "mode": "rw"}]
    m, addr = start_http(muxd, tmp_path, pty_device, listeners=listeners, write_lock="first")
    page = browser.new_page()
    page.goto(f"http://{addr}/")
    page.wait_for_selector("[data-testid=ws-status]:has-text('connected')", timeout=web.TIMEOUT_MS)
    page.wait_for_selector("[data-testid=send-input]:enabled", timeout=web.TIMEOUT_MS)
    a = connect(m.port(1))
    a.sendall(b"mine\r")
    assert pty_device.read(5) == b"mine\r"
    reason = f"Input disabled: {m.names[1]} {peer_of(a)} holds the write lock"
    page.wait_for_selector("[data-testid=send-input]:disabled", timeout=web.TIMEOUT_MS)
    assert reason in page.get_attribute("[data-testid=send-input]", "placeholder")
    a.close()  # the holder leaves: the console may type again
    page.wait_for_selector("[data-testid=send-input]:enabled", timeout=web.TIMEOUT_MS)
    page.fill("[data-testid=send-input]", "yours")
    page.press("[data-testid=send-input]", "Enter")
    assert pty_device.read(6) == b"yours\r"


def test_a_websocket_holder_is_shown_with_its_token_name(muxd: StartMuxd, tmp_path: Path) -> None:
    from websockets.sync.client import connect as ws_connect

    secret = "engineer-secret-0123456789abcdef"
    path = tmp_path / "engineer.token"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    tokens = [{"name": "engineer", "file": str(path), "scope": "admin"}]
    m = start_muxd(
        muxd,
        tmp_path,
        {"sim": {"boot": False}},
        [{"websocket": True, "mode": "rw"}],
        http={"tokens": tokens},
        write_lock="first",
        wait_up=False,
    )
    auth = {"Authorization": f"Bearer {secret}"}

    def lock() -> Any:
        status, _, body = request(m.http, "GET", "/api/v1/ports", auth)
        assert status == 200, body
        return json.loads(body)["ports"][0]["write_lock"]["holder"]

    with ws_connect(f"ws://{m.http}/ws/dut", additional_headers=auth, open_timeout=5) as ws:
        ws.send(b"help\r")
        held = wait_for(lock, what="the WebSocket holding the lock")
        assert held["token"] == "engineer" and held["listener"] == "websocket:dut"
    wait_for(lambda: lock() is None, what="the lock free once the WebSocket closed")


def test_muxd_status_shows_the_holder() -> None:
    from muxd.client import format_status

    port: dict[str, Any] = {
        "name": "dut2",
        "state": "up",
        "reason": "opened",
        "since": 1000.0,
        "upstream": "serial:/dev/ttyUSB0",
        "bytes_in": 0,
        "bytes_out": 0,
        "clients": 1,
        "max_lag": 0,
        "dropped": 0,
        "write_queue_bytes": 0,
        "write_lock": {
            "policy": "first",
            "idle": 300.0,
            "refused_bytes": 22,
            "holder": {
                "client": 7,
                "peer": "127.0.0.1:40412",
                "listener": "dut2-tcp",
                "token": None,
                "since": 1000.0,
            },
        },
    }
    text = format_status({"ports": [port], "clients": {}}, now=1000.0 + 123)
    assert "  write lock held by dut2-tcp 127.0.0.1:40412 (client 7) for 2m03s, 22 B refused" in text
    port["write_lock"]["holder"] = None
    assert "  write lock free, 22 B refused" in format_status({"ports": [port], "clients": {}}, now=1000.0)
    port["write_lock"]["policy"] = "none"
    assert "write lock" not in format_status({"ports": [port], "clients": {}}, now=1000.0)
