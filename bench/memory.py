"""Memory benchmark: muxd's RSS per idle client, and with a stuck client.

Theory of operation. muxd runs by PID on a pty device (the quick form). After
a few warm-up connections (so first-use allocations are done), its RSS is
read from /proc; then N clients connect and stay idle, and once muxd holds N
more file descriptors (all accepted) the RSS is read again: the difference
over N is the cost of one idle reader. Then one client stops reading while
the device floods 64 MiB through muxd: a reader's backlog lives in the shared
ring, so the peak RSS (VmHWM) must stay where it was.

Prints one JSON line. `python -m bench.memory [--n 2000]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
import tty
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOOD = 64 * 1024 * 1024


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        select.select([], [], [], 0.01)


def sockets(pid: int) -> int:
    """Sockets muxd holds: its one listening socket plus one per client."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="idle clients (default 2000)")
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (args.n + 512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    os.close(slave)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "muxd", "run", "--serial", path, "--tcp", f"127.0.0.1:{port}"]
    cmd += ["--max-clients", str(args.n + 10), "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    socks: list[socket.socket] = []
    try:
        wait(lambda: connectable(port), 10, "muxd listening")
        for _ in range(20):
            connectable(port)
        wait(lambda: sockets(server.pid) == 1, 10, "warm-up clients gone")
        before = status_kib(server.pid, "VmRSS")
        for _ in range(args.n):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        wait(lambda: sockets(server.pid) == 1 + args.n, 30, "all clients accepted")
        after = status_kib(server.pid, "VmRSS")
        # One client stops reading; another drains; the device floods.
        reader = socks[1]  # socks[0] stays connected and never reads
        for s in socks[2:]:
            s.close()
        reader.setblocking(False)
        os.set_blocking(master, False)
        chunk, sent, quiet_since = os.urandom(65536), 0, time.monotonic()
        deadline = quiet_since + 120
        # Until the device has sent it all and the reader got nothing for 0.5 s.
        while (sent < FLOOD or time.monotonic() - quiet_since < 0.5) and time.monotonic() < deadline:
            r, w, _ = select.select([reader], [master] if sent < FLOOD else [], [], 0.05)
            if w:
                with contextlib.suppress(BlockingIOError):
                    sent += os.write(master, chunk)
            if r:
                with contextlib.suppress(BlockingIOError):
                    while reader.recv(1 << 20):
                        quiet_since = time.monotonic()
        hwm = status_kib(server.pid, "VmHWM")
        print(
            json.dumps(
                {
                    "scenario": "memory",
                    "idle_clients": args.n,
                    "rss_before_kib": before,
                    "rss_idle_clients_kib": after,
                    "kib_per_idle_client": round((after - before) / args.n, 2),
                    "flood_bytes_with_stuck_client": sent,
                    "peak_rss_with_stuck_client_kib": hwm,
                }
            )
        )
    finally:
        for s in socks:
            s.close()
        server.terminate()
        server.wait(10)
        os.close(master)


if __name__ == "__main__":
    main()
