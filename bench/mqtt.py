"""MQTT bridge benchmark: latency from the pty to a subscriber through
mosquitto, and muxd's CPU with the bridge on and off, in one run.

Theory of operation. mosquitto runs by PID on a free loopback port with a
generated config. For each mode muxd runs by PID on a pty device with one TCP
reader; with ``on`` its port is also published (``mqtt: {format: text, qos:
1}``) and a paho subscriber (its own network thread) follows
``muxd/dut/rx`` at QoS 1. The device is fed numbered 64-byte lines at
``--rate`` bytes per second (WRITES_PER_SECOND writes) for ``--seconds``;
each line's latency is from the write to the pty to its arrival at the TCP
reader and at the subscriber. muxd's CPU (utime + stime from /proc) is read
before and after. Every line must arrive at every reader.

Prints one JSON line per mode. `python -m bench.mqtt [--rate 11520] [--seconds 10]`
(needs Debian's mosquitto and paho-mqtt).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers import Muxd, PtyDevice, auto_address, free_port, split_hostport, write_config  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
WRITES_PER_SECOND = 20
LINE = 64  # bytes per line, newline included
DRAIN_LIMIT = 30.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def line(seq: int) -> bytes:
    return f"seq {seq:08d} ".ljust(LINE - 1, "x").encode() + b"\n"


def seq_of(data: bytes) -> int | None:
    at = data.find(b"seq ")
    return int(data[at + 4 : at + 12]) if at >= 0 else None


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = tmp / "mosquitto.conf"
    extra = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{extra}")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("mosquitto did not start") from None
            time.sleep(0.05)


def run(mode: str, rate: int, seconds: float, *, tmp: Path, broker: int) -> dict[str, Any]:
    dev = PtyDevice(tmp / f"tty-{mode}")
    port: dict[str, Any] = {
        "name": "dut",
        "upstream": {"serial": dev.path},
        "listeners": [{"tcp": auto_address(), "name": "l0"}],
    }
    data: dict[str, Any] = {"ports": [port], "http": {"listen": auto_address(), "name": "h"}}
    if mode == "on":
        port["mqtt"] = {"format": "text", "qos": 1}
        data["mqtt"] = {"broker": f"127.0.0.1:{broker}", "client_id": "muxd-bench"}
    cfg = write_config(tmp, data, f"{mode}.yaml")
    m = Muxd(["run", "-c", str(cfg), "--log-level", "warning"], tmp, None, None, tmp / f"ready-{mode}.json")
    sent: dict[int, float] = {}
    tcp_at: dict[int, float] = {}
    mqtt_at: dict[int, float] = {}
    sub: paho.Client | None = None
    sock: socket.socket | None = None
    try:
        addresses = m.wait_ready_file()["listeners"]
        m.http = addresses["h"]
        m.wait_state("up")
        if mode == "on":
            ready = threading.Event()
            sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{mode}")

            def on_message(_c: Any, _u: Any, msg: Any) -> None:
                seq = seq_of(bytes(msg.payload))
                if seq is not None:
                    mqtt_at.setdefault(seq, time.monotonic())

            sub.on_message = on_message
            sub.on_subscribe = lambda *_a: ready.set()
            sub.connect("127.0.0.1", broker)
            sub.subscribe("muxd/dut/rx", qos=1)
            sub.loop_start()
            if not ready.wait(10):
                raise SystemExit("subscriber did not subscribe")
            deadline = time.monotonic() + 10
            while m.api("/api/v1/ports")["ports"][0]["mqtt"]["state"] != "up":
                if time.monotonic() > deadline:
                    raise SystemExit("bridge did not connect")
                time.sleep(0.05)
        sock = socket.create_connection(split_hostport(addresses["l0"]))
        sock.setblocking(False)
        m.wait_connected(1)
        per_write = max(1, rate // WRITES_PER_SECOND // LINE)
        seq, buf = 0, b""
        cpu0 = cpu_seconds(m.pid)
        start = next_write = time.monotonic()
        while time.monotonic() - start < seconds or len(tcp_at) < seq or (sub and len(mqtt_at) < seq):
            now = time.monotonic()
            if now >= next_write and now - start < seconds:
                chunk = b"".join(line(seq + i) for i in range(per_write))
                dev.write(chunk)
                for i in range(per_write):
                    sent[seq + i] = now
                seq += per_write
                next_write += 1 / WRITES_PER_SECOND
            try:
                buf += sock.recv(65536)
            except BlockingIOError:
                time.sleep(0.001)
            now = time.monotonic()
            *lines, buf = buf.split(b"\n")
            for text in lines:
                n = seq_of(text)
                if n is not None:
                    tcp_at.setdefault(n, now)
            if now - start > seconds + DRAIN_LIMIT:
                raise SystemExit(f"{mode}: readers fell behind ({len(tcp_at)}, {len(mqtt_at)} of {seq})")
        used, wall = cpu_seconds(m.pid) - cpu0, time.monotonic() - start
        tcp_ms = [1000 * (tcp_at[n] - sent[n]) for n in sent]
        out: dict[str, Any] = {
            "mode": f"bridge-{mode}",
            "rate_Bps": round(seq * LINE / seconds),
            "lines": seq,
            "server_cpu_s": round(used, 2),
            "cpu_pct": round(100 * used / wall, 2),
            "tcp_latency_p50_ms": round(statistics.median(tcp_ms), 2),
            "tcp_latency_p99_ms": round(percentile(tcp_ms, 0.99), 2),
        }
        if sub is not None:
            mqtt_ms = [1000 * (mqtt_at[n] - sent[n]) for n in sent]
            out["mqtt_latency_p50_ms"] = round(statistics.median(mqtt_ms), 2)
            out["mqtt_latency_p99_ms"] = round(percentile(mqtt_ms, 0.99), 2)
            out["mqtt_lost"] = seq - len(mqtt_at)
        return out
    finally:
        if sub is not None:
            sub.loop_stop()
            sub.disconnect()
        if sock is not None:
            sock.close()
        m.stop()
        dev.close()


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.mqtt", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=11520, help="device bytes per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    proc, port = start_broker(tmp)
    try:
        for mode in ("off", "on"):
            print(json.dumps(run(mode, args.rate, args.seconds, tmp=tmp, broker=port)), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
