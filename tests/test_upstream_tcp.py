"""The K2 upstream over TCP, against the fake K2 on loopback: one connection
for any number of readers, surviving resets, reboots, a hung K2 and a dead
link, without losing writes, and with a backoff that never spins.

The measured figures (reconnect after a reset, noticing a hung or dead K2) are
printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import datetime
import itertools
import os
import random
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from muxd import config as configmod
from muxd.errors import ConfigError
from muxd.hub import Hub
from muxd.port import PortRuntime
from muxd.protocol import usr
from muxd.protocol.line_settings import LineSettings
from muxd.protocol.rfc2217 import (
    ComPortCommand,
    ComPortOption,
    ConnectionClosed,
    Data,
    Rfc2217Server,
    SetBaudrate,
)
from muxd.reactor import Reactor
from muxd.upstream.tcp import TcpPort
from tests.fakes.k2 import FakeK2
from tests.helpers import (
    AUTO,
    LOCAL,
    ROOT,
    Muxd,
    StartMuxd,
    connect,
    recv_exactly,
    run_until,
    start_muxd,
    start_on_k2,
    tcp_links,
    wait_for,
)


def log_times(m: Muxd, text: str) -> list[float]:
    """Wall-clock times (s) of muxd's log lines containing text."""
    times = []
    for line in m.log().splitlines():
        if text in line:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            times.append(stamp.timestamp())
    return times


def refused(m: Muxd, n: int) -> bool:
    """The API shows at least n attempts failed in this outage (with the K2 refusing, refused)."""
    info = m.port_info()
    return bool(info["attempts"] - (info["state"] == "connecting") >= n)  # the current one has not failed yet


def assert_connected(m: Muxd, readers: list[socket.socket]) -> None:
    """muxd never dropped these readers (the log names each disconnect's peer)."""
    for r in readers:
        assert f"127.0.0.1:{r.getsockname()[1]} disconnected" not in m.log()


# -- one connection, many readers ------------------------------------------------


def test_fifty_readers_share_one_k2_connection(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    # The quick form, as in the README; the kernel picks the ports, the ready file says which.
    ready = tmp_path / "ready.json"
    any_port = f"{LOCAL}:0"
    m = muxd(
        "run", "--upstream-tcp", f"{LOCAL}:{k2.port}", "--tcp", any_port, "--http", any_port, ready_file=ready
    )
    bound = m.wait_ready_file()["listeners"]
    [lport] = [int(a.rsplit(":", 1)[1]) for name, a in bound.items() if name.startswith("tcp:")]
    [m.http] = [a for name, a in bound.items() if name.startswith("http:")]
    m.wait_state("up", port="serial0")
    readers = [connect(lport) for _ in range(50)]
    m.wait_connected(50)
    payload = random.Random(3).randbytes(64 * 1024)
    for i in range(0, len(payload), 4096):
        k2.feed(payload[i : i + 4096])
    for r in readers:
        assert recv_exactly(r, len(payload), timeout=20) == payload
        r.close()
    assert (k2.connections_seen, k2.max_active_seen) == (1, 1)
    assert (k2.lost, k2.dropped) == (0, 0)


# -- reset, reboot -------------------------------------------------------------------


def test_reset_and_reboot_keep_readers_connected(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    m = start_on_k2(muxd, tmp_path, k2.port, upstream={"backoff_max": "1s"})
    readers = [connect(m.port()) for _ in range(5)]
    m.wait_connected(5)
    k2.feed(b"before\n")
    for r in readers:
        assert recv_exactly(r, 7) == b"before\n"

    # A reset: the K2 drops every client with RST and takes new ones at once.
    t0 = time.monotonic()
    k2.reset_all()
    assert k2.wait_for(lambda: k2.connections_seen == 2, 5)
    reconnect = time.monotonic() - t0
    k2.feed(b"after reset\n")
    for r in readers:
        assert recv_exactly(r, 12) == b"after reset\n"

    # A reboot: reset, then connections refused for a while, then back.
    k2.refuse(True)
    k2.reset_all()
    wait_for(lambda: refused(m, 3), 10, "3 refusals")
    t1 = time.monotonic()
    k2.refuse(False)
    assert k2.wait_for(lambda: k2.connections_seen == 3, 5)
    reboot = time.monotonic() - t1
    k2.feed(b"after reboot\n")
    for r in readers:
        assert recv_exactly(r, 13) == b"after reboot\n"

    print(f"\nreconnect after a K2 reset: {reconnect:.3f}s; after a reboot (backoff_max 1s): {reboot:.3f}s")
    assert reconnect < 1.0  # the first retry waits at most backoff_min (0.2s)
    assert reboot < 1.5  # at most backoff_max after the K2 is back
    assert k2.max_active_seen == 1
    assert_connected(m, readers)
    assert "dut1 upstream down (connection reset)" in m.log()


# -- hung K2 (idle timeout) and dead K2 (keepalive) ---------------------------------------

LINE = 16  # b"line %010d\n"


class Feeder:
    """Feeds numbered fixed-size lines to the fake K2 from a thread, paced, bounded in count."""

    def __init__(self, k2: FakeK2, interval: float = 0.02, limit: int = 5000) -> None:
        self.k2 = k2
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval, limit), daemon=True)
        self._thread.start()

    def _run(self, interval: float, limit: int) -> None:
        while not self._stop.is_set() and self.seq < limit:
            self.k2.feed(b"line %010d\n" % self.seq)
            self.seq += 1
            self._stop.wait(interval)  # pacing the producer, not synchronising

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def received_lines(sock: socket.socket, buf: bytearray) -> None:
    """Append whatever sock has now to buf, without blocking."""
    while select.select([sock], [], [], 0)[0]:
        chunk = sock.recv(65536)
        assert chunk, "a reader was disconnected"
        buf += chunk


def has_caught_up(sock: socket.socket, buf: bytearray, n: int) -> bool:
    received_lines(sock, buf)
    return len(buf) >= n


def sequence(buf: bytes) -> list[int]:
    assert len(buf) % LINE == 0, "a partial or fabricated line"
    seqs = []
    for i in range(0, len(buf), LINE):
        m = re.fullmatch(rb"line (\d{10})\n", buf[i : i + LINE])
        assert m, f"not a fed line: {buf[i : i + LINE]!r}"
        seqs.append(int(m.group(1)))
    return seqs


def idle_timeouts(m: Muxd) -> float:
    return m.metric("muxd_upstream_disconnects_total", reason="idle timeout")


def test_hung_k2_is_noticed_by_idle_timeout(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    feeder = Feeder(k2)
    try:
        upstream = {"idle_timeout": "1s", "backoff_min": "100ms", "backoff_max": "500ms"}
        m = start_on_k2(muxd, tmp_path, k2.port, upstream=upstream)
        readers = [connect(m.port()) for _ in range(3)]
        m.wait_connected(3)
        bufs = [bytearray() for _ in readers]

        def reader0_has(seq: int) -> bool:
            received_lines(readers[0], bufs[0])
            assert tcp_links(m.pid, k2.port) <= 1
            return len(bufs[0]) >= LINE and sequence(bytes(bufs[0]))[-1] >= seq

        target = feeder.seq + 5
        wait_for(lambda: reader0_has(target), 5, "lines flowing")
        t0 = time.monotonic()
        k2.black_hole(True)
        wait_for(lambda: idle_timeouts(m) >= 1 and tcp_links(m.pid, k2.port) <= 1, 5, "idle timeout")
        noticed = time.monotonic() - t0
        # muxd keeps retrying: the hung K2 accepts, stays silent, times out again.
        wait_for(
            lambda: idle_timeouts(m) >= 2 and tcp_links(m.pid, k2.port) <= 1, 10, "a second idle timeout"
        )
        t1 = time.monotonic()
        k2.black_hole(False)
        mark = feeder.seq
        wait_for(lambda: reader0_has(mark + 1), 10, "lines after the K2 recovered")
        resumed = time.monotonic() - t1
    finally:
        feeder.stop()
    wait_for(lambda: reader0_has(feeder.seq - 1), 5, "the last line")
    print(f"\nhung K2 noticed after {noticed:.3f}s (idle_timeout 1s); data resumed {resumed:.3f}s later")
    assert 0.8 < noticed < 1.6
    assert resumed < 2.0  # at most idle_timeout + backoff_max: the current link may be a silent one
    for r, buf in zip(readers[1:], bufs[1:], strict=True):
        n = len(bufs[0])
        wait_for(partial(has_caught_up, r, buf, n), 5, "the other readers")
    seqs = [sequence(bytes(buf)) for buf in bufs]
    assert all(s == seqs[0] for s in seqs), "readers disagree"
    assert seqs[0] == sorted(set(seqs[0])), "out of order or repeated"
    # Lines fed while muxd was between links are lost at the K2; once it is back, none.
    tail = [s for s in seqs[0] if s > mark]
    assert tail == list(range(tail[0], feeder.seq)), "a line was lost after the link recovered"
    assert_connected(m, readers)


NETNS_ENV = "MUXD_TEST_IN_NETNS"


def test_dead_k2_is_noticed_by_keepalive(muxd: StartMuxd, tmp_path: Path) -> None:
    """A K2 that stops answering altogether (no ACKs) cannot be faked from user
    space: the kernel ACKs for the fake. So this test reruns itself in a private
    network namespace, where it may blackhole 127.0.0.1 by routing, and readers
    use a Unix socket. Nothing outside the namespace is touched."""
    if os.environ.get(NETNS_ENV) != "1":
        if shutil.which("unshare") is None or shutil.which("ip") is None:
            pytest.skip("needs unshare(1) and ip(8)")
        node = f"{Path(__file__).relative_to(ROOT)}::test_dead_k2_is_noticed_by_keepalive"
        cmd = ["unshare", "-rn", sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", node]
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, NETNS_ENV: "1"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0 and "unshare:" in proc.stderr:
            pytest.skip(f"no private network namespace here: {proc.stderr.strip()}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        print("\n" + "\n".join(line for line in proc.stdout.splitlines() if line.startswith("dead K2")))
        return

    def ip(*commands: str) -> None:
        for command in commands:
            subprocess.run(["ip", *command.split()], check=True, timeout=10)

    ip("link set lo up")
    with FakeK2() as k2:
        sock_path = tmp_path / "dut1.sock"
        upstream = {
            "keepalive_idle": "1s",
            "keepalive_interval": "1s",
            "keepalive_count": 2,
            "connect_timeout": "1s",
            "backoff_min": "100ms",
            "backoff_max": "500ms",
        }
        # The API on ::1, which the blackhole for 127.0.0.1 leaves reachable.
        http = {"listen": "[::1]:0", "name": "api"}
        listeners = [{"unix": str(sock_path), "mode": "rw"}]
        m = start_on_k2(muxd, tmp_path, k2.port, listeners, upstream=upstream, http=http)
        reader = socket.socket(socket.AF_UNIX)
        reader.connect(str(sock_path))
        m.wait_connected(1)
        k2.feed(b"alive\n")
        assert recv_exactly(reader, 6) == b"alive\n"
        t0 = time.monotonic()
        ip("route replace blackhole 127.0.0.1 table local", "route del local 127.0.0.0/8 table local")
        reader.sendall(b"typed into a dead link\n")  # 23 bytes the K2 will never acknowledge
        m.wait_metric("muxd_upstream_disconnects_total", 1, reason="keepalive timeout")
        noticed = time.monotonic() - t0
        assert "23 bytes written to the K2 were not acknowledged" in m.log()
        t1 = time.monotonic()
        ip(
            "route replace local 127.0.0.1 dev lo table local",
            "route replace local 127.0.0.0/8 dev lo table local",
        )
        m.wait_metric("muxd_upstream_connects_total", 2, timeout=5)
        reconnected = time.monotonic() - t1
        k2.feed(b"back\n")
        assert recv_exactly(reader, 5) == b"back\n"  # the same reader socket
        reader.sendall(b"after\n")
        assert k2.wait_uart(b"after\n")
    print(f"dead K2 noticed after {noticed:.3f}s (keepalive 1s+1sx2); reconnected {reconnected:.3f}s later")
    assert 2.5 < noticed < 4.5  # TCP_USER_TIMEOUT = idle + interval x count = 3s


# -- writes while down --------------------------------------------------------------------------


def test_writes_while_down_arrive_in_order_or_hold_the_writer(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2
) -> None:
    m = start_on_k2(
        muxd, tmp_path, k2.port, upstream={"backoff_max": "500ms"}, write_queue="1KiB", max_line="1KiB"
    )
    writer = connect(m.port())
    writer.sendall(b"cmd-0\n")
    assert k2.wait_uart(b"cmd-0\n")
    k2.refuse(True)
    k2.reset_all()
    m.wait_metric("muxd_upstream_disconnects_total", 1, reason="connection reset")
    # While the K2 is away, write until muxd stops taking input (backpressure).
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    writer.setblocking(False)
    data = random.Random(5).randbytes(32 * 1024 * 1024)
    sent = 0
    held = False
    deadline = time.monotonic() + 10
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += writer.send(data[sent : sent + 65536])
        except BlockingIOError:
            # Full now; give muxd a moment to read more, and stop if it doesn't.
            if not select.select([], [writer], [], 0.5)[1]:
                held = True
                break
    assert held, f"muxd took {sent} bytes with the upstream down and a 1 KiB write queue"
    assert k2.uart_received() == b"cmd-0\n"
    k2.refuse(False)
    # Back up: the rest of the data goes as room appears; every byte arrives, in order.
    writer.settimeout(20)
    writer.sendall(data[sent : sent + 100_000])
    sent += 100_000
    assert k2.wait_uart(lambda uart: len(uart) >= 6 + sent, 20)
    assert k2.uart_received() == b"cmd-0\n" + data[:sent]
    print(f"\nbackpressure held the writer after {sent - 100_000} bytes with the K2 down")


# -- backoff ------------------------------------------------------------------------------------


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_backoff_caps_and_never_spins_when_refused(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    """Refused connects leave no trace at the K2, so attempts are timed from
    muxd's debug log: one "connecting" line per attempt, with its time."""
    m = start_on_k2(muxd, tmp_path, k2.port, upstream={"backoff_min": "100ms", "backoff_max": "1s"})
    k2.refuse(True)
    k2.reset_all()
    # The API counts the attempts in this outage; each one's line is logged as it starts.
    wait_for(lambda: m.port_info()["attempts"] >= 10, 20, "10 retries")
    attempts = log_times(m, "dut1 upstream connecting")[1:11]  # the first was the initial connect
    g = gaps(attempts)
    print(f"\nretry gaps while refused: {' '.join(f'{x:.2f}' for x in g)}")
    # Equal jitter: each wait is in [ceiling/2, ceiling], the ceiling doubling from 0.1s to 1s.
    assert min(g) >= 0.05 - 0.005
    assert all(x >= 0.5 - 0.005 for x in g[4:]), "not backing off to the cap"
    assert max(g) <= 1.0 + 0.1, "the cap is not applied"
    assert k2.connections_seen == 1


def test_backoff_applies_to_a_peer_that_accepts_and_drops(muxd: StartMuxd, tmp_path: Path) -> None:
    """A K2 full of other clients kicks the oldest: a link that never carried a
    byte is not a success, so the retries must back off all the same."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    accepts: list[float] = []
    stop = threading.Event()

    def accept_and_drop() -> None:
        while not stop.is_set() and len(accepts) < 1000:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepts.append(time.monotonic())
            conn.close()

    thread = threading.Thread(target=accept_and_drop, daemon=True)
    thread.start()
    try:
        upstream = {"tcp": f"{LOCAL}:{server.getsockname()[1]}", "backoff_min": "100ms", "backoff_max": "1s"}
        m = start_muxd(muxd, tmp_path, upstream, [{"tcp": AUTO}], name="dut1", wait_up=False, log_level=None)
        wait_for(lambda: len(accepts) >= 8, 20, "8 connections")
    finally:
        stop.set()
        thread.join(5)
        server.close()
    g = gaps(accepts[:8])
    print(f"\nretry gaps against accept-and-drop: {' '.join(f'{x:.2f}' for x in g)}")
    assert all(x >= 0.5 - 0.01 for x in g[4:]), "a peer that drops at once makes muxd spin"
    assert m.proc.poll() is None


# -- control: usr and rfc2217 ----------------------------------------------------------------------


def test_control_usr_sends_the_packet_first_on_every_connection(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2
) -> None:
    packet = bytes.fromhex("55 AA 55 01 C2 00 83 46")  # 115200 8N1, the GUIDE's vector
    m = start_on_k2(muxd, tmp_path, k2.port, upstream={"control": "usr", "baudrate": 115200})
    assert k2.wait_uart(packet)
    writer = connect(m.port())
    writer.sendall(b"x")
    assert k2.wait_uart(packet + b"x")
    k2.reset_all()
    assert k2.wait_uart(packet + b"x" + packet)
    assert k2.uart_received() == packet + b"x" + packet


class Rfc2217Peer:
    """A small RFC 2217 server on a thread: the device side, from muxd's codec."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.settings = LineSettings(9600)  # what the "device" is set to until asked
        self.received = bytearray()
        self.requests: list[ComPortCommand] = []
        self.conn: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.server.settimeout(10)
        conn, _ = self.server.accept()
        self.conn = conn
        codec = Rfc2217Server()
        with self._lock:
            conn.sendall(codec.data_to_send())  # the negotiation its constructor queued
        conn.settimeout(0.1)
        deadline = time.monotonic() + 30
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            codec.receive_data(data)
            out = bytearray()
            for event in codec.next_events():
                if isinstance(event, Data):
                    self.received += event.data
                elif not isinstance(event, ComPortOption | ConnectionClosed):
                    self.requests.append(event)
                    if isinstance(event, SetBaudrate) and event.value:
                        self.settings = LineSettings(event.value)
                    codec.reply(event, self.settings)  # collected by data_to_send() below
            out += codec.data_to_send()
            with self._lock:
                conn.sendall(out)

    def send_device_data(self, data: bytes) -> None:
        assert self.conn is not None
        encoder = Rfc2217Server()
        encoder.data_to_send()  # not its negotiation: only the escaped data
        encoder.send(Data(data))
        with self._lock:
            self.conn.sendall(encoder.data_to_send())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def test_control_rfc2217_round_trip_with_iac_bytes(muxd: StartMuxd, tmp_path: Path) -> None:
    peer = Rfc2217Peer()
    try:
        m = start_on_k2(muxd, tmp_path, peer.port, upstream={"control": "rfc2217", "baudrate": 57600})
        client = connect(m.port())
        m.wait_connected(1)
        wait_for(
            lambda: peer.conn is not None and any(isinstance(r, SetBaudrate) for r in peer.requests),
            5,
            "the line settings",
        )
        assert SetBaudrate(57600) in peer.requests
        down = bytes(range(256)) * 4 + b"\xff\xff\xff"
        peer.send_device_data(down)
        assert recv_exactly(client, len(down)) == down  # unescaped, nothing added or lost
        up = b"\xff" + bytes(range(256)) * 40 + b"\xff\xff"  # more than one encode step
        client.sendall(up)
        wait_for(lambda: len(peer.received) >= len(up), 5, "the device to get the writes")
        assert bytes(peer.received) == up
    finally:
        peer.close()


# -- in process: counters and apply_settings --------------------------------------------------------


def in_process(k2: FakeK2, **upstream: Any) -> tuple[Reactor, Hub, TcpPort]:
    cfg = configmod.from_data(
        {"ports": [{"name": "dut1", "upstream": {"tcp": f"127.0.0.1:{k2.port}", **upstream}}]}
    )
    reactor = Reactor()
    rt = PortRuntime.build(cfg.ports[0], reactor)  # the hub and upstream, as the daemon makes them
    assert isinstance(rt.upstream, TcpPort)
    rt.upstream.start()
    return reactor, rt.hub, rt.upstream


def test_state_counters_across_a_reset(k2: FakeK2) -> None:
    reactor, hub, up = in_process(k2)
    try:
        run_until(reactor, lambda: up.status.state == "up")
        k2.feed(b"12345")
        run_until(reactor, lambda: hub.bytes_in == 5)
        k2.reset_all()
        run_until(reactor, lambda: up.status.state != "up")
        assert up.status.reason == "connection reset"
        run_until(reactor, lambda: up.status.state == "up")
        st = up.status
        assert st.connects == 2
        assert st.disconnects == {"connection reset": 1}
        assert st.seconds_down() > 0
        assert k2.max_active_seen == 1
    finally:
        up.stop()
        reactor.close()
    assert up.status.state == "down" and up.status.reason == "stopped"


def test_apply_settings_sends_a_usr_packet(k2: FakeK2) -> None:
    reactor, _hub, up = in_process(k2, control="usr")
    try:
        first = usr.encode(LineSettings())
        run_until(reactor, lambda: first in k2.uart_received())
        up.apply_settings(LineSettings(9600, 7, "E", 2))
        second = usr.encode(LineSettings(9600, 7, "E", 2))
        run_until(reactor, lambda: k2.uart_received() == first + second)
        with pytest.raises(ValueError, match="stop bits"):  # the packet cannot say 1.5
            up.apply_settings(LineSettings(9600, 8, "N", 1.5))
        assert up.settings == LineSettings(9600, 7, "E", 2)
    finally:
        up.stop()
        reactor.close()


def test_a_host_name_is_refused_by_the_config() -> None:
    text = "ports:\n  - name: d\n    upstream:\n      tcp: k2.lab:8899\n      keepalive_idle: 5s\n"
    with pytest.raises(
        ConfigError, match=r"^k\.yaml:4: ports\[0\]\.upstream\.tcp: give a numeric IP address"
    ):
        configmod.loads(text, "k.yaml")
    with pytest.raises(ConfigError, match=r"keepalive_idle: must be between 1 and 7200 seconds, got 0"):
        configmod.loads(text.replace("k2.lab", "10.0.0.1").replace("5s", "0"), "k.yaml")
