"""A serial device that vanishes and returns: a pty behind a stable symlink,
unplugged and replugged 20 times while the same clients stay connected.

The resume time (replug to the first new byte at a reader) is printed; run
with ``-s`` to see it.
"""

from __future__ import annotations

import os
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from muxd.upstream.serial import CMDLINE_MAX, PRESENT_POLL, describe_process, lock_holders
from tests.helpers import (
    AUTO,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    fd_count,
    recv_exactly,
    split_hostport,
    start_muxd,
    start_on_pty,
    tcp_links,
    wait_for,
)
from tests.test_metrics import scrape, value

CYCLES = 20

CONNECTS = "muxd_upstream_connects_total"
DISCONNECTS = "muxd_upstream_disconnects_total"


def settled_fd_count(m: Muxd) -> int:
    """muxd's fds once it has closed the API connections the harness opened
    (each wait polls the API): only then is a comparison fair."""
    http_port = split_hostport(m.http)[1]
    wait_for(lambda: tcp_links(m.pid, http_port, local=True) == 0, 5, "muxd to close the API connections")
    return fd_count(m.pid)


def test_unplug_replug_twenty_times(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    m = start_on_pty(muxd, tmp_path, pty_device, [{"tcp": AUTO, "mode": "rw"}])
    readers = [connect(m.port()) for _ in range(3)]
    writer = readers[0]
    m.wait_connected(3)
    fds_before = settled_fd_count(m)

    resume: list[float] = []
    for i in range(CYCLES):
        data = b"cycle %02d: device output\n" % i
        pty_device.write(data)
        for r in readers:
            assert recv_exactly(r, len(data)) == data

        downs = m.metric(DISCONNECTS)
        pty_device.unplug()
        m.wait_metric(DISCONNECTS, downs + 1, timeout=5)  # muxd noticed the unplug
        command = b"typed while unplugged %02d\n" % i
        writer.sendall(command)  # queued in muxd until the device is back

        ups = m.metric(CONNECTS)
        t0 = time.monotonic()
        pty_device.plug()
        # pyserial flushes the tty's input on open, so the device speaks once muxd has it open.
        m.wait_metric(CONNECTS, ups + 1, timeout=5)  # muxd reopened it
        marker = b"back %02d\n" % i
        pty_device.write(marker)
        for r in readers:
            assert recv_exactly(r, len(marker)) == marker
        resume.append(time.monotonic() - t0)
        assert pty_device.read(len(command)) == command

    final = b"the end\n"
    pty_device.write(final)
    for r in readers:
        assert recv_exactly(r, len(final)) == final  # nothing fabricated was waiting ahead of it
        assert f"127.0.0.1:{r.getsockname()[1]} disconnected" not in m.log()
    assert m.proc.poll() is None
    assert settled_fd_count(m) == fds_before, "muxd leaked file descriptors"
    for r in readers:
        r.close()
    print(
        f"\nresume after replug over {CYCLES} cycles: median {statistics.median(resume):.3f}s, "
        f"max {max(resume):.3f}s"
    )
    assert max(resume) < 1.0


def start_with_http(
    muxd: StartMuxd, tmp_path: Path, dev: PtyDevice, wait_up: bool = True, **upstream: Any
) -> Muxd:
    """muxd on the pty as port "dut", with no listener but the harness's http server."""
    return start_muxd(muxd, tmp_path, {"serial": dev.path, **upstream}, [], wait_up=wait_up)


# How long the device stays away in the outage test: the figure, 15
# presence polls, where a `since` that followed the retries would be 0.2 s old.
ABSENT_FOR = 3.0


def test_since_tells_how_long_the_device_has_been_gone(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_with_http(muxd, tmp_path, pty_device)
    before = m.port_info()
    assert before["state"] == "up" and before["attempts"] == 0 and before["next_attempt_in"] is None
    pty_device.unplug()
    gone = time.time()
    wait_for(lambda: m.port_info()["state"] != "up", 5, "muxd to notice the unplug")
    first = m.port_info()
    wait_for(
        lambda: time.time() - m.port_info()["since"] >= ABSENT_FOR, ABSENT_FOR + 2, f"{ABSENT_FOR}s down"
    )
    info = m.port_info()
    assert info["since"] == first["since"] and gone - 0.5 <= info["since"] <= gone + 1.0
    assert info["attempts"] > first["attempts"] and info["attempts"] >= 5
    assert info["reason"] == "device absent"
    if info["state"] == "backing-off":
        assert 0 <= info["next_attempt_in"] <= PRESENT_POLL
    # The console and `muxd status` read the same `since`; the gauge is that moment too.
    samples = scrape(m.http)[1]
    assert value(samples, "muxd_upstream_last_change_timestamp_seconds", port="dut") == pytest.approx(
        info["since"]
    )
    assert value(samples, "muxd_upstream_down_seconds_total", port="dut") >= ABSENT_FOR - 0.5
    assert m.log().count("dut upstream backing-off (device absent)") >= 5  # each at DEBUG
    pty_device.plug()
    wait_for(lambda: m.port_info()["state"] == "up", 5, "back up")
    back = m.port_info()
    assert back["since"] > info["since"] and back["attempts"] == 0


# The lock holder, as another program would be (a miniterm left open): it opens
# the tty, takes the same flock pyserial takes, says so, and holds it until its
# stdin closes (or a minute passes, if the test died without closing it).
LOCKER = """
import fcntl, os, select, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
select.select([sys.stdin], [], [], 60)
"""


def test_a_locked_device_names_the_process_holding_it(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCKER, pty_device.slave_name], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        assert select.select([holder.stdout], [], [], 10)[0], "the lock holder did not start"
        assert holder.stdout.readline() == b"locked\n"
        m = start_with_http(
            muxd, tmp_path, pty_device, wait_up=False, backoff_min="100ms", backoff_max="300ms"
        )
        named = f"is locked by PID {holder.pid} ({sys.executable} -c "
        m.wait_log(named)  # what is checked is the log: the holder named, once loudly
        # Retried, and each retry at DEBUG: the line is news once per outage.
        attempts = m.port_info()["attempts"]
        wait_for(lambda: m.port_info()["attempts"] >= attempts + 3, 10, "3 more attempts")
        lines = [line for line in m.log().splitlines() if named in line]
        assert len(lines) >= 3  # the last attempt's line may not be written yet
        assert " DEBUG " not in lines[0] and all(" DEBUG " in line for line in lines[1:]), lines
        assert named in m.port_info()["reason"]
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        try:
            holder.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)
    m.wait_state("up")  # the lock is gone with its holder: muxd gets the device
    assert m.port_info()["state"] == "up"


def test_lock_holders_read_from_proc_locks(tmp_path: Path) -> None:
    """/proc/locks parsing, on a made-up proc tree: only the holder of this file's lock
    (same device and inode), not waiters, not other files."""
    dev = tmp_path / "ttyX"
    dev.write_bytes(b"")
    st = os.stat(dev)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cmdline").write_bytes(b"python3\0-m\0serial.tools.miniterm\0" + b"x" * 500 + b"\0")
    (proc / "locks").write_text(
        f"1: POSIX  ADVISORY  WRITE 77 {where} 0 EOF\n"
        f"1: -> FLOCK  ADVISORY  WRITE 99 {where} 0 EOF\n"
        f"2: FLOCK  ADVISORY  WRITE 4242 {where} 0 EOF\n"
        f"3: FLOCK  ADVISORY  WRITE 5 00:00:{st.st_ino + 1} 0 EOF\n"
        "garbage line\n"
    )
    assert lock_holders(str(dev), str(proc)) == [77, 4242]
    named = describe_process(4242, str(proc))
    assert named.startswith("PID 4242 (python3 -m serial.tools.miniterm xxx") and named.endswith("...)")
    assert len(named) <= CMDLINE_MAX + 20
    assert describe_process(77, str(proc)) == "PID 77"  # gone, or not ours to read
    assert lock_holders(str(tmp_path / "absent"), str(proc)) == []
