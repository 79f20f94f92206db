"""Lossless readers (``overflow: block``, muxd.hub): a reader that cannot keep
up holds the device instead of losing bytes, other readers are still served
what the ring holds, and ``block_timeout`` bounds the hold.

End to end on a pty device: the test writes the device from a thread (a pty
writer blocks while muxd holds the device, which is the flow control under
test) and reads muxd's TCP listeners as real clients.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from muxd import config as configmod
from muxd.errors import ConfigError
from muxd.hub import Hub, PortBounds, ReaderPolicy
from muxd.port import bounds_for
from muxd.reactor import Reactor
from muxd.upstream.sim import SimDevice
from muxd.upstream.tcp import TcpPort
from tests.fakes.k2 import FakeK2
from tests.helpers import (
    AUTO,
    IdleOwner,
    PtyDevice,
    StartMuxd,
    connect,
    muxd_cmd,
    recv_until,
    run_until,
    start_on_pty,
    stuck_reader,
    wait_for,
    write_config,
)

KiB, MiB = 1024, 1024 * 1024
BURST = 20 * MiB


class Writer(threading.Thread):
    """Writes `data` into the pty master, blocking as the device's flow control says."""

    def __init__(self, dev: PtyDevice, data: bytes, timeout: float) -> None:
        super().__init__(daemon=True)
        self.dev, self.data, self.timeout = dev, data, timeout
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.dev.write(self.data, timeout=self.timeout)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.error = exc
        finally:
            self.done.set()


class Counter(threading.Thread):
    """Reads a socket continuously, counting bytes (a drop-oldest reader)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        self.sock.setblocking(False)
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            if ready:
                try:
                    chunk = self.sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not chunk:
                    return
                self.count += len(chunk)


def read_all(sock: socket.socket, n: int, timeout: float, digest: Callable[[bytes], object]) -> int:
    """Read n bytes (feeding digest), before the deadline; return how many came."""
    got = 0
    deadline = time.monotonic() + timeout
    sock.settimeout(0.5)
    while got < n and time.monotonic() < deadline:
        try:
            chunk = sock.recv(min(1 << 20, n - got))
        except TimeoutError:
            continue
        if not chunk:
            break
        digest(chunk)
        got += len(chunk)
    return got


def test_a_paused_lossless_reader_gets_every_byte_while_others_are_served(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    listeners = [
        {"tcp": AUTO, "name": "lossless", "overflow": "block", "buffer": "256KiB"},
        {"tcp": AUTO, "name": "fast", "overflow": "drop-oldest"},
    ]
    m = start_on_pty(muxd, tmp_path, pty_device, listeners)
    lossless = stuck_reader(m.port("lossless"), rcvbuf=16 * KiB)
    fast = connect(m.port("fast"))
    m.wait_connected(2)
    counter = Counter(fast)
    counter.start()
    data = os.urandom(BURST)
    writer = Writer(pty_device, data, timeout=120)
    try:
        writer.start()
        # The lossless reader reads the first megabyte, then stops reading.
        h = hashlib.sha256()
        assert read_all(lossless, MiB, 30, h.update) == MiB
        paused_at, fast_at_pause = time.monotonic(), counter.count
        # While it is paused muxd holds the device: the pty writer blocks.
        wait_for(lambda: m.metric("muxd_port_held", port="dut") == 1, 10, "the device held")
        wait_for(lambda: time.monotonic() - paused_at >= 2.0, 5, "a 2 s pause")
        assert not writer.done.is_set(), "the device was not held: the whole burst went out"
        fast_in_pause = counter.count - fast_at_pause
        assert fast_in_pause > 0, "the drop-oldest reader was not served while the other paused"
        got = MiB + read_all(lossless, BURST - MiB, 90, h.update)
        assert got == BURST
        assert h.hexdigest() == hashlib.sha256(data).hexdigest()
        assert writer.done.wait(10) and writer.error is None
        assert m.metric("muxd_client_dropped_bytes_total", port="dut", listener="lossless") == 0
        assert m.metric("muxd_client_block_fallbacks_total", port="dut", listener="lossless") == 0
        assert m.metric("muxd_port_holds_total", port="dut") >= 1
        assert m.metric("muxd_port_held_seconds_total", port="dut") >= 1.0  # most of the 2 s pause
        wait_for(lambda: m.metric("muxd_port_held", port="dut") == 0, 10, "the hold released")
    finally:
        counter.stop.set()
        counter.join(5)
        lossless.close()
        fast.close()


def test_block_timeout_falls_back_to_drop_oldest_counted_and_told(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    listeners = [
        {"tcp": AUTO, "name": "lossless", "overflow": "block", "block_timeout": "300ms", "notices": True},
    ]
    m = start_on_pty(muxd, tmp_path, pty_device, listeners)
    stuck = stuck_reader(m.port("lossless"), rcvbuf=4 * KiB)
    m.wait_connected(1)
    data = b"x" * (4 * MiB)
    writer = Writer(pty_device, data, timeout=60)
    try:
        writer.start()
        # The reader never reads: it holds the device, then falls back after
        # 300 ms, and the device is read again: the whole burst goes in.
        wait_for(
            lambda: m.metric("muxd_client_block_fallbacks_total", port="dut", listener="lossless") == 1,
            20,
            "the fallback counted",
        )
        assert writer.done.wait(30) and writer.error is None
        assert "held the device for 0.3s" in m.log()
        wait_for(lambda: m.metric("muxd_client_dropped_bytes_total", port="dut", listener="lossless") > 0, 10)
        wait_for(lambda: m.metric("muxd_port_held", port="dut") == 0, 10, "the hold released")
        # Told in-band, once it reads again.
        stream = recv_until(stuck, b"now drop-oldest --\r\n", timeout=20, limit=8 * MiB)
        assert b"-- muxd: lossless reader held the device for 0.3s: now drop-oldest --\r\n" in stream
    finally:
        stuck.close()


# -- the hub alone ------------------------------------------------------------------------------


def holding(hub: Hub) -> bool:
    return hub.holding


def test_hub_holds_and_resumes_reading_for_a_lossless_reader() -> None:
    reactor = Reactor()
    hub = Hub("p", PortBounds(log_capacity=1 * MiB, write_queue=4096, max_line=256, history=0), reactor)
    reading: list[bool] = []
    hub.set_reading = reading.append
    policy = ReaderPolicy("l", 256 * KiB, drop_oldest=True, writable=False, lines=False, notices=False)
    plain = hub.attach(IdleOwner(), policy, "plain")
    reader = hub.attach(IdleOwner(), ReaderPolicy(**{**policy.__dict__, "block": True}), "lossless")
    chunk = b"y" * (64 * KiB)
    for _ in range(3):  # 192 KiB: at the hold mark (256 - 128 KiB)
        hub.publish(chunk)
    assert reading == [False] and holding(hub)
    hub.set_blocked(reader, True)  # its socket is full: a plain reader would be judged now
    hub.publish(chunk)  # one read that was on its way when reading stopped: no loss
    assert reader.dropped == 0 and plain.dropped == 0
    hub.set_blocked(reader, False)
    hub.take(reader, 150 * KiB)  # still above half the hold mark (64 KiB)
    assert holding(hub) and reading == [False]
    hub.take(reader, 50 * KiB)
    assert reading == [False, True] and not holding(hub)
    hub.detach(reader, "test")
    hub.detach(plain, "test")


def test_hub_lossless_reader_that_leaves_releases_the_device() -> None:
    reactor = Reactor()
    hub = Hub("p", PortBounds(log_capacity=1 * MiB, write_queue=4096, max_line=256, history=0), reactor)
    reading: list[bool] = []
    hub.set_reading = reading.append
    policy = ReaderPolicy("l", 256 * KiB, True, False, False, False, block=True, block_timeout=0.2)
    reader = hub.attach(IdleOwner(), policy, "lossless")
    hub.publish(b"z" * (200 * KiB))
    assert reading == [False]
    hub.detach(reader, "peer closed")
    assert reading == [False, True] and not hub.holding
    # A detached reader's timer never fires a fallback.
    deadline = time.monotonic() + 0.4
    run_until(reactor, lambda: time.monotonic() > deadline, timeout=2)
    assert hub.stats_for("l").block_fallbacks == 0


# -- config and muxd check --------------------------------------------------------------------------


def _load(tmp_path: Path, listener: dict[str, object], upstream: dict[str, object] | None = None) -> None:
    up = upstream or {"sim": True}
    path = write_config(tmp_path, {"ports": [{"name": "p", "upstream": up, "listeners": [listener]}]})
    configmod.load(str(path))


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ({"tcp": "127.0.0.1:0", "overflow": "block", "buffer": "64KiB"}, "at least 256KiB"),
        ({"tcp": "127.0.0.1:0", "overflow": "block", "format": "jsonl"}, "raw streams only"),
        ({"tcp": "127.0.0.1:0", "block_timeout": "5s"}, "overflow: block only"),
        ({"tcp": "127.0.0.1:0", "overflow": "block", "block_timeout": "0"}, "between"),
    ],
)
def test_block_config_errors_name_the_key(tmp_path: Path, listener: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, listener)
    assert message in str(info.value)
    assert "listeners[0]" in str(info.value)


def _check(tmp_path: Path, upstream: dict[str, object]) -> subprocess.CompletedProcess[str]:
    data = {
        "ports": [
            {"name": "p", "upstream": upstream, "listeners": [{"tcp": "127.0.0.1:0", "overflow": "block"}]}
        ]
    }
    path = write_config(tmp_path, data)
    cmd = muxd_cmd("check", "-c", str(path))
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


def test_check_warns_for_block_on_a_uart_without_rtscts(tmp_path: Path, pty_device: PtyDevice) -> None:
    res = _check(tmp_path, {"serial": "/dev/ttyUSB-muxd-test"})
    assert res.returncode == 0, res.stderr
    assert "overflow: block on serial /dev/ttyUSB-muxd-test without flow: rtscts" in res.stdout + res.stderr
    res = _check(tmp_path, {"serial": "/dev/ttyUSB-muxd-test", "flow": "rtscts"})
    assert "rtscts" not in res.stdout + res.stderr
    res = _check(tmp_path, {"serial": pty_device.path})  # a pty's writer blocks: nothing lost
    assert "rtscts" not in res.stdout + res.stderr


# -- the upstreams stop reading while held ---------------------------------------------------------


def turn_for(reactor: Reactor, seconds: float) -> None:
    """Run the loop for a while: the hold lasting is what is under test."""
    until = time.monotonic() + seconds
    run_until(reactor, lambda: time.monotonic() > until, "the time", timeout=seconds + 2)


def test_a_held_k2_link_is_not_read_and_not_idle(k2: FakeK2) -> None:
    reactor = Reactor()
    data = {"ports": [{"name": "dut", "upstream": {"tcp": f"127.0.0.1:{k2.port}", "idle_timeout": "300ms"}}]}
    port = configmod.from_data(data).ports[0]
    assert isinstance(port.upstream, configmod.TcpUpstream)
    hub = Hub(port.name, bounds_for(port), reactor)
    up = TcpPort(port.upstream, hub, reactor)
    up.start()
    try:
        run_until(reactor, lambda: up.status.state == "up" and k2.active == 1, "the link")
        hub.set_reading(False)  # what the hub calls when a lossless reader holds the device
        k2.feed(b"held" * 1000)
        turn_for(reactor, 0.8)  # past idle_timeout: a held link is not idle
        assert hub.bytes_in == 0 and up.status.state == "up"
        hub.set_reading(True)
        run_until(reactor, lambda: hub.bytes_in == 4000, "the K2's bytes once reading resumes")
    finally:
        up.stop()
        reactor.close()


def test_a_held_simulator_keeps_its_output() -> None:
    reactor = Reactor()
    port = configmod.from_data({"ports": [{"name": "sim", "upstream": {"sim": True}}]}).ports[0]
    assert isinstance(port.upstream, configmod.SimUpstream)
    hub = Hub(port.name, bounds_for(port), reactor)
    sim = SimDevice(port.upstream, hub, reactor)
    hub.set_reading(False)
    sim.start()
    try:
        turn_for(reactor, 0.3)
        assert hub.bytes_in == 0 and sim.overruns == 0
        hub.set_reading(True)
        run_until(reactor, lambda: b"U-Boot" in hub.ring.read(hub.ring.tail), "the boot log")
    finally:
        sim.stop()
        reactor.close()


def test_an_upstream_made_while_the_device_is_held_starts_held() -> None:
    """A reload that replaces the upstream while a lossless reader holds the device."""
    reactor = Reactor()
    port = configmod.from_data({"ports": [{"name": "sim", "upstream": {"sim": True}}]}).ports[0]
    assert isinstance(port.upstream, configmod.SimUpstream)
    hub = Hub(port.name, bounds_for(port), reactor)
    policy = ReaderPolicy("l", 256 * KiB, True, False, False, False, block=True)
    reader = hub.attach(IdleOwner(), policy, "lossless")
    hub.publish(b"h" * (200 * KiB))
    assert holding(hub)
    sim = SimDevice(port.upstream, hub, reactor)
    sim.start()
    try:
        turn_for(reactor, 0.3)
        assert hub.bytes_in == 200 * KiB
        hub.take(reader, 200 * KiB)  # caught up: the hold ends, the new upstream reads
        run_until(reactor, lambda: hub.bytes_in > 200 * KiB, "the simulator's output")
    finally:
        sim.stop()
        hub.detach(reader, "test")
        reactor.close()
