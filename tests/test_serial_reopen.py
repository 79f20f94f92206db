"""A serial device that vanishes and returns: a pty behind a stable symlink,
unplugged and replugged 20 times while the same clients stay connected.

The resume time (replug to the first new byte at a reader) is printed; run
with ``-s`` to see it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tests.conftest import Muxd, PtyDevice, connect, free_port, recv_exactly, wait_for, write_config

StartMuxd = Callable[..., Muxd]

CYCLES = 20


UP = "dut upstream up"
DOWN = "dut upstream down"


def logged_more(m: Muxd, text: str, than: int) -> bool:
    return m.log().count(text) > than


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_unplug_replug_twenty_times(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    lport = free_port()
    cfg = write_config(
        tmp_path,
        {
            "ports": [
                {
                    "name": "dut",
                    "upstream": {"serial": pty_device.path},
                    "listeners": [{"tcp": f"127.0.0.1:{lport}", "mode": "rw"}],
                }
            ]
        },
    )
    m = muxd("run", "-c", str(cfg), "--log-level", "debug")
    m.wait_log("dut upstream up")
    m.wait_port(lport)
    readers = [connect(lport) for _ in range(3)]
    writer = readers[0]
    m.wait_clients(4)  # wait_port's probe counts as one
    fds_before = fd_count(m.pid)

    resume: list[float] = []
    for i in range(CYCLES):
        data = b"cycle %02d: device output\n" % i
        pty_device.write(data)
        for r in readers:
            assert recv_exactly(r, len(data)) == data

        downs = m.log().count(DOWN)
        pty_device.unplug()
        wait_for(partial(logged_more, m, DOWN, downs), 5, f"muxd to notice unplug {i}")
        command = b"typed while unplugged %02d\n" % i
        writer.sendall(command)  # queued in muxd until the device is back

        ups = m.log().count(UP)
        t0 = time.monotonic()
        pty_device.plug()
        # pyserial flushes the tty's input on open, so the device speaks once muxd has it open.
        wait_for(partial(logged_more, m, UP, ups), 5, f"muxd to reopen {i}")
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
    assert fd_count(m.pid) == fds_before, "muxd leaked file descriptors"
    for r in readers:
        r.close()
    print(
        f"\nresume after replug over {CYCLES} cycles: median {statistics.median(resume):.3f}s, "
        f"max {max(resume):.3f}s"
    )
    assert max(resume) < 1.0
