"""TLS benchmark: muxd's CPU for N raw readers over plain TCP and over TLS, in
one run, and TLS handshakes per second.

Theory of operation. For each mode, muxd runs by PID on a pty device with one
TCP listener (plain, or ``tls:`` with a throwaway CA made by trustme); N
readers connect (over TLS: each completes its handshake, which is timed) and
are drained by one selector loop in this process. The device is fed a
steady stream for a fixed time; muxd's CPU (utime + stime from /proc) is read
before and after, and every reader must have received every byte. The same
stream and N for both modes, back to back, so the ratio is what TLS costs.

Prints one JSON line per mode. `python -m bench.tls [--n 100] [--rate 11520] [--seconds 8]`
(needs the test extra: trustme).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import Muxd, PtyDevice, auto_address, split_hostport, write_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
# Writes to the device per second: a UART-like trickle, as the fan-out bench.
WRITES_PER_SECOND = 20
# How long readers may take to catch up after the feed stops.
DRAIN_LIMIT = 30.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tls_files(tmp: Path, ca: trustme.CA) -> dict[str, str]:
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    return {"cert": str(cert_path), "key": str(key_path)}


def run(mode: str, n: int, rate: int, seconds: float, *, tmp: Path, ca: trustme.CA) -> dict[str, Any]:
    dev = PtyDevice(tmp / f"tty-{mode}")
    listener: dict[str, Any] = {"tcp": auto_address(), "name": "l0", "buffer": "1MiB"}
    if mode == "tls":
        listener["tls"] = tls_files(tmp, ca)
    data = {
        "ports": [{"name": "dut", "upstream": {"serial": dev.path}, "listeners": [listener]}],
        "http": {"listen": auto_address(), "name": "h"},
    }
    cfg = write_config(tmp, data, f"{mode}.yaml")
    m = Muxd(["run", "-c", str(cfg), "--log-level", "warning"], tmp, None, None, tmp / f"ready-{mode}.json")
    socks: dict[socket.socket, int] = {}
    try:
        addresses = m.wait_ready_file()["listeners"]
        m.http = addresses["h"]
        m.wait_state("up")
        host, port = split_hostport(addresses["l0"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(ctx)
        sel = selectors.DefaultSelector()
        started = time.monotonic()
        for _ in range(n):
            sock = socket.create_connection((host, port))
            if mode == "tls":
                sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            socks[sock] = 0
        connect_s = time.monotonic() - started
        m.wait_connected(n, timeout=30)
        chunk = bytes(range(256)) * max(1, rate // 256 // WRITES_PER_SECOND)
        total, cpu0 = 0, cpu_seconds(m.pid)
        start = next_write = time.monotonic()
        while time.monotonic() - start < seconds or min(socks.values()) < total:
            now = time.monotonic()
            if now >= next_write and now - start < seconds:
                dev.write(chunk)
                total += len(chunk)
                next_write += 1 / WRITES_PER_SECOND
            for key, _ in sel.select(0.01):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    while data_in := sock.recv(65536):
                        socks[sock] += len(data_in)
                except (BlockingIOError, ssl.SSLWantReadError):
                    pass
            if now - start > seconds + DRAIN_LIMIT:
                raise SystemExit(f"{mode}: readers fell behind")
        used, wall = cpu_seconds(m.pid) - cpu0, time.monotonic() - start
        return {
            "mode": mode,
            "n": n,
            "rate_Bps": round(total / seconds),
            "server_cpu_s": round(used, 2),
            "cpu_pct": round(100 * used / wall, 1),
            "lost": sum(total - got for got in socks.values()),
            "connect_s": round(connect_s, 3),
            "connects_per_s": round(n / connect_s),
        }
    finally:
        for sock in socks:
            sock.close()
        m.stop()
        dev.close()


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tls", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--rate", type=int, default=11520, help="device bytes per second")
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    tmp, ca = Path(tempfile.mkdtemp()), trustme.CA()
    for mode in ("plain", "tls"):
        print(json.dumps(run(mode, args.n, args.rate, args.seconds, tmp=tmp, ca=ca)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
