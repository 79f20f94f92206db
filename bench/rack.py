"""Rack benchmark: P boards on one server, R TCP readers each, optional traces.

Theory of operation. Each board is a pty (bench.fanout.Device: a raw pty
whose slave is reached through a symlink) that the server under test opens as
its serial port. A feeder process writes to every pty master at ``--rate``
bytes/s per board, a slice every ``--tick`` seconds. A UART does not wait for
its reader: what the pty refuses (the server stopped reading the device) is
not retried, so "taken" (what the pty accepted) against "offered" (what fell
due) is how far the server fell behind its devices.

One reader process holds all P x R TCP connections (selectors/epoll), reads
everything and counts bytes per connection. Before the measured run a warm-up
byte (``W``, which the measured stream never contains) goes to every board
until every connection has seen one: then every server has opened its
devices and attached its readers. Readers count only non-``W`` bytes, so
"lost" is, per connection, what its board's pty took minus what arrived after
the drain: bytes the server took from the device but did not deliver.

The server's CPU is utime+stime from /proc/PID/stat over the measured run and
the drain; its peak RSS is VmHWM at the end (start-up included). muxd and
ser2net run the same workload one after the other, in one invocation: muxd
from a generated config (``trace: [{path, format}]`` per port when
``--trace`` is given), ser2net from an equivalent ser2net.yaml (its
``trace-read`` file per port, with ``trace-timestamp`` for text and jsonl,
the closest it has to a record). ``--mqtt`` also publishes every muxd port to
a local mosquitto (ser2net has no MQTT; its row says so).

``--idle`` measures instead what P quiet ports cost: the server's CPU over
``--seconds`` with no traffic and no clients. ``--startup`` measures the time
from exec to READY (muxd's ``--ready-file``) and of a reload (SIGHUP to the
``reloaded`` log line) of a P-port config.

Prints one JSON line per case. `python -m bench.rack --ports 128 --readers 4
--trace jsonl --seconds 10`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.fanout import BAUD_RATE_BPS, REPO, Device, Server, TargetError, emit, machine, raise_nofile
from bench.memory import status_kib

TARGETS = ("muxd", "ser2net")
TRACE_FORMATS = ("text", "jsonl", "raw")
# The measured stream: 64-byte lines of dots, so it never contains WARM.
_LINE = b"." * 63 + b"\n"
_BLOCK = _LINE * 1024
WARM = b"W"
# Warm-up bytes go out this often until every connection has seen one.
_WARM_PERIOD_S = 0.05
_WARM_DEADLINE_S = 30.0
# After the feeder stops: the longest wait for the tail, and the silence
# after which a connection's drain is over.
_DRAIN_S = 5.0
_QUIET_S = 1.0
_RECV = 65536
_CONNECT_DEADLINE_S = 30.0
_START_DEADLINE_S = 60.0


# ---------------------------------------------------------------- configs


def muxd_config(
    links: Sequence[Path], ports: Sequence[int], trace: str | None, trace_dir: Path, mqtt: int | None
) -> dict[str, Any]:
    entries: list[dict[str, Any]] = []
    for i, (link, port) in enumerate(zip(links, ports, strict=True)):
        entry: dict[str, Any] = {
            "name": f"b{i}",
            "upstream": {"serial": str(link), "baudrate": 115200},
            "listeners": [{"tcp": f"127.0.0.1:{port}", "mode": "ro"}],
        }
        if trace is not None:
            entry["trace"] = [{"path": str(trace_dir / f"b{i}.{trace}"), "format": trace}]
        if mqtt is not None:
            entry["mqtt"] = {"format": "text"}
        entries.append(entry)
    data: dict[str, Any] = {"ports": entries}
    if mqtt is not None:
        data["mqtt"] = {"broker": f"127.0.0.1:{mqtt}", "client_id": "muxd-rack"}
    return data


def ser2net_config(
    links: Sequence[Path], ports: Sequence[int], readers: int, trace: str | None, trace_dir: Path
) -> str:
    out = []
    for i, (link, port) in enumerate(zip(links, ports, strict=True)):
        out += [
            f"connection: &b{i}",
            f"  accepter: tcp,127.0.0.1,{port}",
            f"  connector: serialdev,{link},115200n81,local",
            "  options:",
            f"    max-connections: {readers}",
        ]
        if trace is not None:
            out.append(f"    trace-read: {trace_dir / f'b{i}.{trace}'}")
            if trace != "raw":
                out.append("    trace-timestamp: true")
    return "\n".join(out) + "\n"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports: all bound at once, so none is handed out twice."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def listening(ports: Sequence[int]) -> bool:
    """True when every 127.0.0.1:port is in LISTEN state (read from
    /proc/net/tcp: a probe connection would count as a client)."""
    want = {f"0100007F:{p:04X}" for p in ports}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                want.discard(fields[1])
    return not want


def start_server(target: str, cmd: list[str], ports: Sequence[int], log: Path) -> Server:
    server = Server(cmd, ports[-1], log)
    deadline = time.monotonic() + _START_DEADLINE_S
    while not listening(ports):
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise TargetError(f"{target}: not listening on all {len(ports)} ports: {server.log_tail()}")
        time.sleep(0.05)
    return server


# ---------------------------------------------------------------- feeder


def feeder_main(
    masters: Sequence[int],
    rate: int,
    seconds: float,
    tick: float,
    conn: Connection,
) -> None:
    """Write `rate` bytes/s to every master for `seconds`; send back
    (offered, taken) per board. Bytes the pty refuses are not retried."""
    n = len(masters)
    offered, taken = [0] * n, [0] * n
    view = memoryview(_BLOCK)
    start = time.monotonic()
    end = start + seconds
    now = start
    while now < end:
        due = int(rate * (now - start))
        for i, fd in enumerate(masters):
            k = due - offered[i]
            if k <= 0:
                continue
            at = offered[i] % len(_LINE)  # the stream continues where it was
            offered[i] = due
            with contextlib.suppress(BlockingIOError):
                taken[i] += os.write(fd, view[at : at + k])
        now = time.monotonic()
        time.sleep(max(0.0, tick - (now - start) % tick))
        now = time.monotonic()
    conn.send((offered, taken))
    conn.close()


# ---------------------------------------------------------------- readers


def reader_main(ports: Sequence[int], readers: int, conn: Connection) -> None:
    """Hold readers x ports connections. Messages: ("ready") once each has
    seen a byte; then on ("drain", taken per board) read until every
    connection has its board's bytes or is quiet, and send back
    [[bytes per connection] per board]."""
    sel = selectors.DefaultSelector()
    socks: list[tuple[int, socket.socket]] = []
    deadline = time.monotonic() + _CONNECT_DEADLINE_S
    for b, port in enumerate(ports):
        for _ in range(readers):
            while True:
                try:
                    s = socket.create_connection(("127.0.0.1", port), timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            s.setblocking(False)
            socks.append((b, s))
            sel.register(s, selectors.EVENT_READ, len(socks) - 1)
    got = [0] * len(socks)
    seen = [False] * len(socks)
    last = [0.0] * len(socks)
    alive = [True] * len(socks)

    def pump(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            i = key.data
            try:
                data = key.fileobj.recv(_RECV)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                alive[i] = False
                continue
            warm = data.count(WARM)
            seen[i] = True
            got[i] += len(data) - warm
            last[i] = time.monotonic()

    conn.send(("connected", len(socks)))
    while not all(seen):
        pump(0.05)
        if conn.poll():
            break  # the harness gave up on the warm-up
    conn.send(("ready", sum(seen)))
    while not conn.poll():
        pump(0.05)
    _, taken = conn.recv()
    end = time.monotonic() + _DRAIN_S
    while time.monotonic() < end:
        now = time.monotonic()
        pending = [
            i for i, (b, _) in enumerate(socks) if alive[i] and got[i] < taken[b] and now - last[i] < _QUIET_S
        ]
        if not pending:
            break
        pump(0.05)
    per_board: list[list[int]] = [[] for _ in ports]
    for i, (b, s) in enumerate(socks):
        per_board[b].append(got[i])
        s.close()
    conn.send(("done", per_board, sum(alive)))
    conn.close()


# ---------------------------------------------------------------- one case


def _warm(devices: Sequence[Device], ctl: multiprocessing.connection.Connection) -> int:
    deadline = time.monotonic() + _WARM_DEADLINE_S
    while not ctl.poll(_WARM_PERIOD_S):
        if time.monotonic() > deadline:
            ctl.send(("give up",))
            break
        for d in devices:
            d.write(WARM)
    tag, ready = ctl.recv()
    assert tag == "ready", tag
    # Wait for the warm-up bytes in flight to arrive before the count starts:
    # they are not counted anyway, but the server must be idle again.
    time.sleep(0.2)
    return int(ready)


def run_case(
    target: str,
    *,
    boards: int,
    readers: int,
    rate: int,
    seconds: float,
    trace: str | None,
    mqtt: int | None,
    tick: float,
    work: Path,
) -> dict[str, Any]:
    case = work / target
    case.mkdir()
    devices = [Device(case / f"tty{i}") for i in range(boards)]
    for d in devices:
        d.plug()
    ports = free_ports(boards)
    record: dict[str, Any] = {
        "bench": "rack",
        "target": target,
        "boards": boards,
        "readers": readers,
        "rate_bps": rate,
        "seconds": seconds,
        "trace": trace,
        "mqtt": mqtt is not None and target == "muxd",
    }
    if target == "muxd":
        conf = case / "muxd.yaml"
        conf.write_text(json.dumps(muxd_config([d.link for d in devices], ports, trace, case, mqtt)))
        cmd = [sys.executable, "-m", "muxd", "run", "-c", str(conf), "--log-level", "warning"]
    else:
        conf = case / "ser2net.yaml"
        conf.write_text(ser2net_config([d.link for d in devices], ports, readers, trace, case))
        cmd = ["ser2net", "-n", "-u", "-c", str(conf)]
    server = start_server(target, cmd, ports, case / "server.log")
    ctx = multiprocessing.get_context("fork")
    rd_ctl, rd_end = ctx.Pipe()
    fd_ctl, fd_end = ctx.Pipe()
    rd = ctx.Process(target=reader_main, args=(ports, readers, rd_end), daemon=True)
    fd = ctx.Process(
        target=feeder_main, args=([d.master for d in devices], rate, seconds, tick, fd_end), daemon=True
    )
    try:
        rd.start()
        if not rd_ctl.poll(_CONNECT_DEADLINE_S + 5):
            raise TargetError("readers did not connect")
        rd_ctl.recv()
        record["connections_ready"] = _warm(devices, rd_ctl)
        cpu0, t0 = server.cpu_s(), time.monotonic()
        fd.start()
        if not fd_ctl.poll(seconds + 30):
            raise TargetError("feeder did not finish")
        offered, taken = fd_ctl.recv()
        rd_ctl.send(("drain", taken))
        if not rd_ctl.poll(_DRAIN_S + 30):
            raise TargetError("readers did not drain")
        _, per_board, alive = rd_ctl.recv()
        cpu1, t1 = server.cpu_s(), time.monotonic()
        lost = sum(max(0, taken[b] - got) for b in range(boards) for got in per_board[b])
        record.update(
            offered_bytes=sum(offered),
            taken_bytes=sum(taken),
            not_taken_bytes=sum(offered) - sum(taken),
            delivered_bytes=sum(sum(g) for g in per_board),
            lost_bytes=lost,
            connections_alive_end=alive,
            server_cpu_s=round(cpu1 - cpu0, 3),
            wall_s=round(t1 - t0, 3),
            cpu_ns_per_taken_byte=round((cpu1 - cpu0) * 1e9 / max(sum(taken), 1), 1),
            server_rss_peak_kib=server.status_kib("VmHWM"),
            server_rss_end_kib=server.status_kib("VmRSS"),
        )
    finally:
        for proc in (fd, rd):
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
                proc.join(5)
        record["server_exit"] = server.stop()
        for d in devices:
            d.unplug()
    if trace is not None:  # after the stop: what a server writes on its way out counts
        record["trace_bytes"] = sum(p.stat().st_size for p in case.glob(f"b*.{trace}"))
    return record


# ---------------------------------------------------------------- idle and start-up


def _boards_with_traces(boards: int, work: Path, name: str) -> tuple[list[Device], list[int], Path]:
    """`boards` plugged pty devices and free ports, and work/NAME.yaml: a muxd
    config serving them, a jsonl trace each."""
    devices = [Device(work / f"{name}{i}") for i in range(boards)]
    for d in devices:
        d.plug()
    ports = free_ports(boards)
    conf = work / f"{name}.yaml"
    conf.write_text(json.dumps(muxd_config([d.link for d in devices], ports, "jsonl", work, None)))
    return devices, ports, conf


def run_idle(boards: int, seconds: float, work: Path) -> dict[str, Any]:
    """CPU of `boards` quiet ports (devices open, no clients, a jsonl trace
    each) over `seconds`, after a second to settle."""
    devices, ports, conf = _boards_with_traces(boards, work, "idle")
    cmd = [sys.executable, "-m", "muxd", "run", "-c", str(conf), "--log-level", "warning"]
    server = start_server("muxd", cmd, ports, work / "idle.log")
    try:
        time.sleep(1.0)
        cpu0 = server.cpu_s()
        time.sleep(seconds)
        cpu = server.cpu_s() - cpu0
        return {
            "bench": "rack-idle",
            "target": "muxd",
            "boards": boards,
            "seconds": seconds,
            "server_cpu_s": round(cpu, 3),
            "server_rss_kib": server.status_kib("VmRSS"),
        }
    finally:
        server.stop()
        for d in devices:
            d.unplug()


def run_startup(boards: int, work: Path) -> dict[str, Any]:
    """Exec to READY (the ready file appears) and SIGHUP to `reloaded`, for
    a config of `boards` ports with a jsonl trace each."""
    devices, ports, conf = _boards_with_traces(boards, work, "start")
    ready = work / "ready.json"
    log = work / "start.log"
    cmd = [
        sys.executable,
        "-m",
        "muxd",
        "run",
        "-c",
        str(conf),
        "--log-level",
        "info",
        "--ready-file",
        str(ready),
    ]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = t0 + _START_DEADLINE_S
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise TargetError(f"no ready file: {log.read_text()[-400:]}")
            time.sleep(0.005)
        started = time.monotonic() - t0
        # A reload that changes every port (a trace path each): the most work one can be.
        data = muxd_config([d.link for d in devices], ports, "jsonl", work / "reloaded", None)
        (work / "reloaded").mkdir()
        conf.write_text(json.dumps(data))
        t1 = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)
        while b"reloaded" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > t1 + _START_DEADLINE_S:
                raise TargetError(f"no reload: {log.read_text()[-400:]}")
            time.sleep(0.005)
        reloaded = time.monotonic() - t1
        rss = status_kib(proc.pid, "VmHWM")
        return {
            "bench": "rack-startup",
            "target": "muxd",
            "boards": boards,
            "start_to_ready_s": round(started, 3),
            "reload_s": round(reloaded, 3),
            "server_rss_peak_kib": rss,
        }
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
        for d in devices:
            d.unplug()


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rack", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ports", type=int, default=128, help="boards (default 128)")
    ap.add_argument("--readers", type=int, default=4, help="TCP readers per board (default 4)")
    ap.add_argument("--rate", type=int, default=BAUD_RATE_BPS, help="bytes/s per board (default 11520)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured run per case (default 10)")
    ap.add_argument("--tick", type=float, default=0.02, help="the feeder's write period (default 0.02 s)")
    ap.add_argument("--trace", choices=TRACE_FORMATS, help="a trace file per board, in this format")
    ap.add_argument("--mqtt", action="store_true", help="publish every muxd port to a local mosquitto")
    ap.add_argument("--target", action="append", choices=TARGETS, help="default: both, muxd first")
    ap.add_argument("--idle", action="store_true", help="measure the CPU of quiet ports instead")
    ap.add_argument("--startup", action="store_true", help="measure start-up and reload instead")
    ap.add_argument("--out", type=Path, help="also append each JSON line here")
    args = ap.parse_args(argv)
    raise_nofile(args.ports * (args.readers + 4) * 2)
    with tempfile.TemporaryDirectory(prefix="muxd-rack-") as tmp:
        work = Path(tmp)
        if args.idle:
            emit(run_idle(args.ports, args.seconds, work), args.out)
            return 0
        if args.startup:
            emit(run_startup(args.ports, work), args.out)
            return 0
        broker = None
        if args.mqtt:
            from bench.mqtt import start_broker  # paho and mosquitto only when asked for

            broker = start_broker(work)
        try:
            for target in args.target or TARGETS:
                try:
                    record = run_case(
                        target,
                        boards=args.ports,
                        readers=args.readers,
                        rate=args.rate,
                        seconds=args.seconds,
                        trace=args.trace,
                        mqtt=broker[1] if broker else None,
                        tick=args.tick,
                        work=work,
                    )
                except TargetError as exc:
                    record = {"bench": "rack", "target": target, "error": str(exc)}
                record["machine"] = machine()
                emit(record, args.out)
        finally:
            if broker is not None:
                os.kill(broker[0].pid, signal.SIGTERM)
                broker[0].wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
