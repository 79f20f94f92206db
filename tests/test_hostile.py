"""The hostile-input run of issue 15, kept in the suite: real peers against a
real muxd, each test ending with ``muxd_internal_errors_total`` at 0.

- A writer paused by a full write queue (the device unplugged) that resets,
  over TCP and over WebSocket: muxd reaps it and does not spin (item 4).
- A connection attack on the HTTP server, 16 KB of headers then RST, as fast as
  one client can: RSS stays bounded (item 3). A plain churn of 10,000
  connect/close cycles: fds and RSS flat afterwards.
- 200 ``write: lines`` writers holding partial lines leave at once: the write
  queue never exceeds its bound, and every byte reaches the device once it is
  back (item 11). Writers whose partial lines fill the bound do not stall
  the port, with or without ``line_timeout`` (the hub releases held lines
  when they alone fill the bound).
- The listeners at the fd limit (prlimit's RLIMIT_NOFILE through the fixture's
  ``nofile``): accepts pause, connected clients carry on, accepts resume.

Speeds are not asserted: the tests assert bounded counts (CPU seconds in a
window, fds, RSS growth with a wide margin) and print the figures; run with
``-s`` to see them.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from tests.helpers import (
    AUTO,
    LOCAL,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    fd_count,
    hex_field,
    recv_exactly,
    split_hostport,
    start_on_pty,
    tcp_links,
    tcp_sockets,
    wait_for,
)

KB = 1000
MB = 1000 * KB


# -- the process, from /proc ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str) -> int:
    """A /proc/PID/status figure in kB (VmRSS: resident now; VmHWM: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def rss(pid: int) -> int:
    return status_kb(pid, "VmRSS") * 1024


def cpu_over(pid: int, seconds: float) -> float:
    """CPU seconds the process used over a window of wall time (a measurement, not a wait)."""
    before = cpu_seconds(pid)
    end = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 2):
        left = end - time.monotonic()
        if left <= 0:
            break
        select.select([], [], [], min(left, 0.05))
    return cpu_seconds(pid) - before


def unread_input(pid: int, port: int) -> int:
    """Bytes clients sent that wait unread in the process's sockets accepted on
    ``port`` (the rx_queue column of /proc/PID/net/tcp)."""
    return sum(
        hex_field(cols[4]) for cols in tcp_sockets(pid) if hex_field(cols[1]) == port and cols[3] != "0A"
    )


# -- peers --------------------------------------------------------------------------------------------


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer's socket reports ERR/HUP at once."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def connect_from(source: str, port: int) -> socket.socket:
    """A TCP connection to muxd from a chosen loopback address (127.0.0.0/8 is all local)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((source, 0))
    s.connect((LOCAL, port))
    return s


def internal_errors(m: Muxd) -> float:
    return m.metric("muxd_internal_errors_total")


def ws_open(http: str, path: str = "/ws/dut") -> tuple[socket.socket, WSConnection]:
    """A raw socket with a WebSocket handshake done (wsproto as the client)."""
    host, port = split_hostport(http)
    sock = connect(port, host)
    ws = WSConnection(ConnectionType.CLIENT)
    sock.sendall(ws.send(Request(host=http, target=path)))
    deadline = time.monotonic() + 5
    for _ in range(100):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(65536)
        assert data, "EOF during the WebSocket handshake"
        ws.receive_data(data)
        for event in ws.events():
            assert isinstance(event, AcceptConnection), event
            return sock, ws
        assert time.monotonic() < deadline, "no WebSocket handshake answer"
    raise AssertionError("no WebSocket handshake answer")


def flood_until_paused(m: Muxd, sock: socket.socket, unit: bytes, queue_full: int) -> int:
    """Send ``unit`` again and again (never cut between two: a WebSocket frame
    stays whole) until muxd stops reading: its write queue is full (the metric)
    and this socket's send buffer and muxd's receive buffer are full too.
    Returns the bytes sent. Bounded in time and in rounds."""
    sock.setblocking(False)
    chunk = unit * max(1, 65536 // len(unit))
    pending = memoryview(chunk)
    sent = 0
    deadline = time.monotonic() + 10
    for _ in range(100_000):
        assert time.monotonic() < deadline, f"muxd kept reading: {sent} bytes sent"
        try:
            n = sock.send(pending)
            sent += n
            pending = pending[n:] or memoryview(chunk)
            continue
        except BlockingIOError:
            pass
        # The socket is full; muxd has stopped reading only if its queue is full.
        if m.metric("muxd_write_queue_bytes") >= queue_full:
            select.select([], [sock], [], 0.2)  # one last chance for muxd to read more
            try:
                n = sock.send(pending)
            except BlockingIOError:
                return sent
            sent += n
            pending = pending[n:] or memoryview(chunk)
        else:
            select.select([], [sock], [], 0.05)
    raise AssertionError("flood_until_paused: out of rounds")


def client_frame(payload: bytes) -> bytes:
    """A masked binary WebSocket frame as a client sends it (RFC 6455 5.2), payload < 64 KiB."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return b"\x82" + bytes([0x80 | 126]) + struct.pack("!H", len(payload)) + mask + masked


# -- item 4: a paused writer that resets -------------------------------------------------------------

# The device's write queue in the paused-writer tests: small, so one client
# fills it at once. max_line must not exceed it.
SMALL_QUEUE = 1024
# Measured over this much wall time after the reset...
CPU_WINDOW = 2.0
# ...muxd may use this much CPU (idle it uses ~0.01 s: the 0.2 s device polls).
# Before the fix it spun: a whole core, ~2 s.
CPU_LIMIT = 0.3


def _paused_writer_reset(
    m: Muxd, dev: PtyDevice, open_writer: Callable[[], socket.socket], *, unit: bytes, port: int, what: str
) -> None:
    """Unplug, flood until muxd pauses the writer, reset it; muxd must neither
    spin nor keep it. ``port``: where muxd accepted the writer."""
    dev.unplug()
    wait_for(lambda: m.port_info()["state"] != "up", 5, "muxd to see the device unplugged")
    writer = open_writer()
    m.wait_connected(1)
    sent = flood_until_paused(m, writer, unit, SMALL_QUEUE - 64)
    # muxd holds input it no longer reads: EPOLLIN is off for this writer.
    assert unread_input(m.pid, port) > 0, "muxd is still reading the writer"
    queued = int(m.metric("muxd_write_queue_bytes"))
    assert queued <= SMALL_QUEUE
    reset(writer)
    used = cpu_over(m.pid, CPU_WINDOW)
    print(
        f"\n{what}: paused writer ({sent} B sent, {queued} B queued) reset:"
        f" muxd used {used:.3f} s CPU over {CPU_WINDOW:.1f} s"
    )
    assert used < CPU_LIMIT, f"muxd spun after a paused writer reset: {used:.2f} s CPU in {CPU_WINDOW} s"
    m.wait_connected(0, timeout=2)  # reaped while the device is still away
    assert m.port_info()["state"] != "up"
    # The device returns: what was queued goes out, nothing more.
    dev.plug()
    m.wait_state("up")
    assert dev.read(queued, timeout=10) == b"x" * queued
    assert internal_errors(m) == 0


def test_a_paused_tcp_writer_that_resets_is_reaped_without_a_spin(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(
        muxd, tmp_path, pty_device, [{"tcp": AUTO, "mode": "rw"}], write_queue=SMALL_QUEUE, max_line=256
    )
    _paused_writer_reset(
        m, pty_device, lambda: connect(m.port()), unit=b"x" * 4096, port=m.port(), what="tcp"
    )


def test_a_paused_websocket_writer_that_resets_is_reaped_without_a_spin(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(
        muxd,
        tmp_path,
        pty_device,
        [{"websocket": True, "mode": "rw"}],
        write_queue=SMALL_QUEUE,
        max_line=256,
    )
    http_port = split_hostport(m.http)[1]
    _paused_writer_reset(
        m,
        pty_device,
        lambda: ws_open(m.http)[0],
        unit=client_frame(b"x" * 4096),
        port=http_port,
        what="websocket",
    )


# -- item 3: RSS under a connection attack, and a plain churn ----------------------------------------

# The attack: each connection sends this much of a request head (under the
# server's 16 KiB HEADER_LIMIT, so it is buffered, not refused), never ends it,
# and is reset. Before the fix each closed connection, its 16 KB and its h11
# state stayed referenced by its cancelled timer until the timer's deadline:
# 1,754 a second took RSS from 30 MB to 1,224 MB in 38 s.
ATTACK_HEAD = 16_000
ATTACK_SECONDS = 5.0
ATTACK_MAX = 20_000
# Connections each attacker keeps open before resetting the oldest: time for
# muxd to read each head before the RST.
ATTACK_WINDOW = 16
# Two attackers, each cycling through 64 loopback addresses: however far muxd
# lags, few connections from one address are open in it at once, so the
# per-peer limit (32) refuses few and muxd reads the heads.
ATTACK_SOURCES = tuple(tuple(f"127.0.{net}.{host}" for host in range(2, 66)) for net in (1, 2))
# muxd idles at ~30 MB; under the attack it must stay well below the old figures.
RSS_LIMIT = 100 * MB
RSS_GROWTH_LIMIT = 40 * MB


def _attack(port: int, sources: tuple[str, ...], stop_at: float, budget: int, counts: list[int]) -> None:
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: "
    head += b"a" * (ATTACK_HEAD - len(head))
    window: collections.deque[socket.socket] = collections.deque()
    done = 0
    try:
        for source in itertools.islice(itertools.cycle(sources), budget):
            if time.monotonic() > stop_at:
                break
            try:
                s = connect_from(source, port)
                window.append(s)
                s.sendall(head)
            except OSError:
                pass  # refused at the per-peer limit: that counts as an attempt too
            done += 1
            if len(window) > ATTACK_WINDOW:
                reset(window.popleft())
    finally:
        for s in window:
            reset(s)
        counts.append(done)


def backlog(pid: int, port: int) -> int:
    """Connections waiting in the accept queue of the process's listening socket on ``port``
    (a LISTEN socket's rx_queue in /proc/PID/net/tcp)."""
    with open(f"/proc/{pid}/net/tcp") as f:
        for row in f.read().splitlines()[1:]:
            cols = row.split()
            if int(cols[1].split(":")[1], 16) == port and cols[3] == "0A":
                return int(cols[4].split(":")[1], 16)
    raise AssertionError(f"no listening socket on port {port}")


def _settled_fds(m: Muxd, ports: list[int], timeout: float = 10.0) -> int:
    """muxd's fd count once it has accepted every connection to these ports and closed them all."""

    def settled(port: int) -> bool:
        return backlog(m.pid, port) == 0 and tcp_links(m.pid, port, local=True) == 0

    for port in ports:
        wait_for(functools.partial(settled, port), timeout, f"muxd to accept and close port {port}'s peers")
    return fd_count(m.pid)


def test_rss_stays_bounded_under_a_header_and_reset_attack(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(muxd, tmp_path, pty_device, [{"tcp": AUTO}], log_level="info")
    http_port = split_hostport(m.http)[1]
    fds_before = _settled_fds(m, [http_port])
    rss_before = rss(m.pid)
    counts: list[int] = []
    started = time.monotonic()
    stop_at = started + ATTACK_SECONDS
    threads = [
        threading.Thread(target=_attack, args=(http_port, src, stop_at, ATTACK_MAX // 2, counts))
        for src in ATTACK_SOURCES
    ]
    for t in threads:
        t.start()
    peak = rss_before
    for _ in range(int(ATTACK_SECONDS / 0.05) + 100):  # sample RSS while the attack runs
        if not any(t.is_alive() for t in threads):
            break
        peak = max(peak, rss(m.pid))
        select.select([], [], [], 0.05)
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    elapsed = time.monotonic() - started
    total = sum(counts)
    fds_after = _settled_fds(m, [http_port], timeout=30)
    settled = time.monotonic() - started
    rss_after = rss(m.pid)
    hwm = status_kb(m.pid, "VmHWM") * 1024
    peak = max(peak, rss_after)
    print(
        f"\nattack: {total} connections ({ATTACK_HEAD} B head, RST) in {elapsed:.1f} s"
        f" = {total / elapsed:.0f}/s (muxd done after {settled:.1f} s);"
        f" RSS {rss_before / MB:.1f} MB before, peak {peak / MB:.1f} MB"
        f" (VmHWM {hwm / MB:.1f} MB), {rss_after / MB:.1f} MB after; fds {fds_before} -> {fds_after}"
    )
    assert total >= 1000, f"the attack made only {total} connections"
    assert hwm < RSS_LIMIT, f"RSS peaked at {hwm / MB:.0f} MB"
    assert peak - rss_before < RSS_GROWTH_LIMIT, f"RSS grew {(peak - rss_before) / MB:.0f} MB"
    assert fds_after == fds_before
    # Still serving: the API answers, and the device's bytes reach a reader.
    reader = connect(m.port())
    m.wait_connected(1)
    pty_device.write(b"still here\n")
    assert recv_exactly(reader, 11) == b"still here\n"
    assert internal_errors(m) == 0


CHURN_TCP = 10_000
CHURN_HTTP = 2_000
# Connections open at once in the churn: far below the listen backlog and the
# http server's limits (25 per source address, under its per-peer 32).
CHURN_BATCH = 100
CHURN_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
CHURN_RSS_LIMIT = 10 * MB


def _churn(m: Muxd, port: int, cycles: int, settle: Callable[[], object]) -> None:
    """Open CHURN_BATCH connections, close them all, wait for muxd to let go; repeat."""
    for batch in range(cycles // CHURN_BATCH):
        socks = [connect_from(CHURN_SOURCES[i % len(CHURN_SOURCES)], port) for i in range(CHURN_BATCH)]
        for s in socks:
            s.close()
        if batch % 10 == 9:
            settle()


def test_fds_and_rss_are_flat_after_connect_disconnect_churn(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(muxd, tmp_path, pty_device, [{"tcp": AUTO, "mode": "rw"}], log_level="info")
    tcp_port, http_port = m.port(), split_hostport(m.http)[1]
    ports = [tcp_port, http_port]

    def settle() -> None:
        _settled_fds(m, ports)

    # A warm-up of each kind, so lazily built things (imports, caches) are in the "before".
    _churn(m, tcp_port, 1000, settle)
    _churn(m, http_port, 200, settle)
    m.wait_connected(0)
    fds_before, rss_before = _settled_fds(m, ports), rss(m.pid)
    started = time.monotonic()
    _churn(m, tcp_port, CHURN_TCP, settle)
    tcp_elapsed = time.monotonic() - started
    _churn(m, http_port, CHURN_HTTP, settle)
    m.wait_connected(0)
    fds_after, rss_after = _settled_fds(m, ports), rss(m.pid)
    accepted = m.metric("muxd_client_connections_total")
    print(
        f"\nchurn: {CHURN_TCP} tcp cycles in {tcp_elapsed:.1f} s ({CHURN_TCP / tcp_elapsed:.0f}/s)"
        f" + {CHURN_HTTP} http; fds {fds_before} -> {fds_after};"
        f" RSS {rss_before / MB:.1f} -> {rss_after / MB:.1f} MB"
    )
    assert accepted >= CHURN_TCP + 1000  # every cycle was a client muxd accepted and let go
    assert fds_after == fds_before
    assert rss_after - rss_before < CHURN_RSS_LIMIT
    assert m.metric("muxd_client_disconnects_total") == accepted
    assert internal_errors(m) == 0


# -- item 11: partial lines released at once stay within the write queue's bound ---------------------

QUEUE_LIMIT = 64 * 1024
WRITERS = 200
# Each writer's partial line (no newline): together more than the queue holds,
# so muxd must stop reading some of them. Before the fix the held partial lines
# were not counted against the bound, and their release when 200 writers left
# at once put 69,615 B in a 64 KiB queue.
PARTIAL = 400
# How long the queue is watched after the writers leave (a measurement window:
# before the fix the released lines were all queued within milliseconds).
LEAVE_WINDOW = 1.0


def _partial_line(i: int) -> bytes:
    return (f"w{i:03d}-".encode() + b"abcdefghij" * (PARTIAL // 10))[:PARTIAL]


def _start_line_writers(muxd: StartMuxd, tmp_path: Path, dev: PtyDevice, **opts: Any) -> Muxd:
    """muxd on the pty with one rw TCP listener that writes whole lines; by default
    a QUEUE_LIMIT write queue and info logging."""
    port_opts = {"write_queue": QUEUE_LIMIT, "log_level": "info", **opts}
    return start_on_pty(muxd, tmp_path, dev, [{"tcp": AUTO, "mode": "rw", "write": "lines"}], **port_opts)


def _writers_leave_at_once(m: Muxd, dev: PtyDevice) -> tuple[int, list[int]]:
    """Unplug; WRITERS writers each send a partial line, then all close at once.
    Returns what muxd read, and the queue's samples while they left."""
    port = m.port()
    dev.unplug()  # the queue cannot drain
    wait_for(lambda: m.port_info()["state"] != "up", 5, "muxd to see the device unplugged")
    writers = [connect(port) for _ in range(WRITERS)]
    m.wait_connected(WRITERS)
    for i, w in enumerate(writers):
        w.sendall(_partial_line(i))
    total = WRITERS * PARTIAL
    # muxd reads until what it holds fills the bound (or, before the fix, all of it).
    wait_for(lambda: unread_input(m.pid, port) <= total - QUEUE_LIMIT, 10, "muxd to read what fits")
    read = total - unread_input(m.pid, port)
    for w in writers:  # all leave at once; each muxd read whole may release its line
        w.close()
    samples = []
    end = time.monotonic() + LEAVE_WINDOW
    for _ in range(5000):
        samples.append(int(m.metric("muxd_write_queue_bytes")))
        if time.monotonic() > end or samples[-1] > QUEUE_LIMIT:
            break
    return read, samples


def test_the_write_queue_stays_within_its_bound_when_writers_leave_at_once(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = _start_line_writers(muxd, tmp_path, pty_device)
    read, samples = _writers_leave_at_once(m, pty_device)
    peak = max(samples)
    print(
        f"\n{WRITERS} writers x {PARTIAL} B partial lines left at once: muxd had read {read} B;"
        f" the queue peaked at {peak} B of {QUEUE_LIMIT} ({len(samples)} samples)"
    )
    assert read <= QUEUE_LIMIT, f"muxd accepted {read} B of partial lines against a bound of {QUEUE_LIMIT}"
    assert peak <= QUEUE_LIMIT, f"the write queue held {peak} B against a bound of {QUEUE_LIMIT}"
    assert internal_errors(m) == 0


def test_every_partial_line_reaches_the_device_once_it_returns(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = _start_line_writers(muxd, tmp_path, pty_device)
    _writers_leave_at_once(m, pty_device)
    # The device returns: every writer's bytes arrive, none lost, none twice; the queue stays
    # within its bound while the writers that were paused are read again. (A partial line
    # may go out in pieces: line_timeout releases what a writer sent before it was paused.)
    pty_device.plug()
    m.wait_state("up")
    samples: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        for _ in range(20_000):
            if stop.is_set():
                return
            samples.append(int(m.metric("muxd_write_queue_bytes")))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        total = WRITERS * PARTIAL
        got = pty_device.read(total, timeout=10)
    finally:
        stop.set()
        watcher.join(10)
    print(f"\nafter the replug: {len(got)} B delivered, the queue peaked at {max(samples, default=0)} B")
    sent = b"".join(_partial_line(i) for i in range(WRITERS))
    assert sorted(got) == sorted(sent)
    assert all(got.count(f"w{i:03d}-".encode()) == 1 for i in range(WRITERS))
    assert max(samples, default=0) <= QUEUE_LIMIT
    m.wait_connected(0, timeout=15)  # each after its half-close linger
    assert m.metric("muxd_write_queue_bytes") == 0
    assert internal_errors(m) == 0


@pytest.mark.parametrize(
    "line_timeout",
    [pytest.param("0", id="off"), "500ms"],
)
def test_writers_holding_partial_lines_do_not_stall_the_port(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, line_timeout: str
) -> None:
    """The device is up. Five writers type 250 B without a newline into a 1 KiB
    queue: 1,250 B of partial lines against the bound. Another writer's command,
    and their own newlines, must still reach the device."""
    m = _start_line_writers(
        muxd, tmp_path, pty_device, write_queue=1024, max_line=256, line_timeout=line_timeout
    )
    port = m.port()
    typists = [connect(port) for _ in range(5)]
    m.wait_connected(5)
    for t in typists:
        t.sendall(b"p" * 250)
    wait_for(lambda: unread_input(m.pid, port) <= 5 * 250 - 1024, 5, "muxd to read what fits")
    late = connect(port)
    m.wait_connected(6)
    late.sendall(b"status\n")
    for t in typists:
        t.sendall(b"\n")
    got = pty_device.read(7 + 5 * 251, timeout=5)
    assert b"status\n" in got and got.count(b"p") == 5 * 250 and got.count(b"\n") == 6, got
    assert internal_errors(m) == 0


# -- the listeners at the fd limit ---------------------------------------------------------------------

# muxd's fd limit: the figure, a few dozen above what it needs idle
# (interpreter, epoll, signal pipe, two listening sockets, the pty).
NOFILE = 64


def test_listeners_pause_accepts_at_the_fd_limit_and_resume(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(
        muxd, tmp_path, pty_device, [{"tcp": AUTO, "mode": "rw"}], nofile=NOFILE, log_level="info"
    )
    port = m.port()
    a, b = connect(port), connect(port)
    m.wait_connected(2)
    flood: list[socket.socket] = []
    try:
        # Fill muxd's fd table; the rest wait in its listen backlog.
        for _ in range(NOFILE + 32):
            flood.append(connect(port))
        wait_for(lambda: fd_count(m.pid) >= NOFILE, 10, "muxd at its fd limit")
        m.wait_log("cannot accept (Too many open files)")
        at_limit = time.monotonic()
        # Paused, not spinning on the connections it cannot take.
        used = cpu_over(m.pid, 1.0)
        print(f"\nat the fd limit: muxd used {used:.3f} s CPU over 1.0 s")
        assert used < CPU_LIMIT, f"muxd spun at its fd limit: {used:.2f} s CPU in 1 s"
        assert backlog(m.pid, port) > 0  # some still wait: muxd paused, it did not drop them
        # The clients it has still get the device's bytes, and their commands reach it.
        pty_device.write(b"hello\n")
        assert recv_exactly(a, 6) == b"hello\n"
        assert recv_exactly(b, 6) == b"hello\n"
        a.sendall(b"cmd\n")
        assert pty_device.read(4) == b"cmd\n"
        assert m.proc.poll() is None
    finally:
        for s in flood:
            s.close()
    # Accepts resume: the waiting connections are taken (and found closed), then a newcomer.
    wait_for(lambda: backlog(m.pid, port) == 0, 10, "muxd to take the waiting connections")
    c = connect(port)
    m.wait_connected(3)
    pty_device.write(b"again\n")
    for s in (a, b, c):
        assert recv_exactly(s, 6) == b"again\n"
    pauses = m.log().count("pausing accepts")
    print(f"fd limit {NOFILE}: {pauses} accept pauses logged in {time.monotonic() - at_limit:.1f} s")
    assert pauses >= 1
    assert internal_errors(m) == 0
