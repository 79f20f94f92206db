"""Fan-out benchmark: one serial workload against muxd, ser2net and ser2tcp.

Theory of operation. The harness plays the device: it opens a pty pair and
points a symlink at the slave, which is what the server under test opens as
its "serial port". A producer in this process writes fixed 64-byte frames to
the pty master at a UART-like pace (or as fast as the server takes them).
N TCP clients are held by separate reader processes (so parsing never runs on
the producer's core) that read with epoll, reassemble frames by the newline,
never by read boundaries, and count per client: frames received, sequence
gaps, duplicates, garbled lines and latency (receive time minus the frame's
timestamp; CLOCK_MONOTONIC is system-wide, so both ends share one clock).

A real UART does not wait for its reader. When the pty refuses bytes (the
server stopped reading the device), frames that fall due are dropped at the
device and counted as ``device_overruns``; they never get a sequence number,
so a client's "lost" count is loss inside the server only.

Frame layout (64 bytes, ASCII, newline-terminated so line-mode servers work)::

    offset  size  content
    0       1     kind: b"F" measured frame, b"W" warm-up frame (not measured)
    1       10    sequence number, decimal, zero-padded
    11      1     b" "
    12      20    producer's time.monotonic_ns() when the frame was made
    32      1     b" "
    33      30    b"." padding
    63      1     b"\\n"

Each run starts the target by PID, connects the clients, sends warm-up frames
until every client has seen one (the server is attached and fanning out),
then measures, drains, and prints one JSON line. Processes are stopped by PID.

Record formats (muxd only). ``--format jsonl`` (or ``text``) runs muxd with
its TCP listener in that format: every client then gets records, not raw
bytes. A reader takes them apart first (jsonl: joins each record's ``data``,
``data.encode("utf-8", "surrogateescape")``; text: drops the 25-byte stamp
that starts each line) and counts frames, gaps and latency on the device
bytes inside, exactly as for raw. Records with an ``event`` (a gap) are
counted as ``events``. ``--format raw,jsonl`` runs the same workload once per
format, back to back, so one invocation gives the CPU cost of N jsonl
readers against N raw ones.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FRAME_LEN = 64
_PAD = b"." * 30
_KIND_DATA = ord("F")
_KIND_WARMUP = ord("W")
BAUD_RATE_BPS = 11_520  # 115200 baud, 8N1: 10 bits per byte
REPO = Path(__file__).resolve().parent.parent
TARGETS = ("muxd", "ser2net", "ser2tcp")
FORMATS = ("raw", "text", "jsonl")
# A text record's stamp, "2026-12-01T17:10:00.123Z ", starts each line.
_TEXT_STAMP_LEN = 25

# A line longer than this cannot be a frame; cap the partial line held per
# client so a server that never sends a newline cannot grow the reader.
_MAX_PARTIAL = 4 * FRAME_LEN
# Warm-up frames go out this often until every client has seen one.
_WARMUP_PERIOD_S = 0.05
# One recv per readable event: 64 KiB is a socket buffer's worth at this
# rate, so a single call usually empties it.
_RECV_SIZE = 65536
# Flood batches are small so a frame's timestamp is close to its hand-over.
_FLOOD_BATCH_FRAMES = 16
# After the producer stops: how long readers may wait for the tail, and how
# long a stuck client must stay silent for its drain to be over.
_DRAIN_S = 5.0
_STUCK_IDLE_S = 0.3
_STUCK_RCVBUF = 4096
_CONNECT_DEADLINE_S = 30.0
# Between connects, so an accept loop fed through a backlog of 5 keeps up.
_CONNECT_PAUSE_S = 0.0005
# A server that buffers without bound (ser2tcp under flood) would eat the
# machine: the producer stops when the server's RSS passes this.
_RSS_GUARD_KIB = 2 * 1024 * 1024
_GUARD_PERIOD_S = 0.1


def make_frame(seq: int, ts_ns: int, kind: bytes = b"F") -> bytes:
    return b"%s%010d %020d %s\n" % (kind, seq, ts_ns, _PAD)


class TargetError(RuntimeError):
    """The server under test could not be started or died."""


# ---------------------------------------------------------------- device


class Device:
    """The emulated UART: a raw pty whose slave is reached through a symlink.

    We keep our own slave fd open so the tty survives the server closing and
    reopening it; unplug() closes both ends and removes the link, as a USB
    adapter does when pulled.
    """

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self._slave = -1

    @property
    def plugged(self) -> bool:
        return self.master >= 0

    def plug(self) -> None:
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)  # no echo, no line editing: a UART has none
        os.set_blocking(self.master, False)
        tmp = self.link.with_name(self.link.name + ".new")
        os.symlink(os.ttyname(self._slave), tmp)
        os.replace(tmp, self.link)  # atomic repoint

    def unplug(self) -> None:
        if self.plugged:
            self.link.unlink(missing_ok=True)
            os.close(self.master)
            os.close(self._slave)
            self.master = self._slave = -1

    def write(self, data: bytes | memoryview) -> int:
        if not self.plugged:
            return 0
        try:
            return os.write(self.master, data)
        except BlockingIOError:
            return 0

    def wait(self, events: int, timeout_s: float) -> None:
        if not self.plugged:
            time.sleep(max(timeout_s, 0.0))
            return
        poller = select.poll()
        poller.register(self.master, events)
        poller.poll(max(int(timeout_s * 1000), 1))

    def read(self) -> bytes:
        try:
            return os.read(self.master, _RECV_SIZE)
        except BlockingIOError:
            return b""

    def write_all(self, data: bytes, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        view = memoryview(data)
        while view:
            if time.monotonic() > deadline:
                return False
            k = self.write(view)
            view = view[k:]
            if k == 0:
                self.wait(select.POLLOUT, deadline - time.monotonic())
        return True


# ---------------------------------------------------------------- producer


@dataclass
class Producer:
    """Writes frames to the device at `rate` bytes/s in `chunk`-byte writes,
    or as fast as the pty takes them when rate is None (flood)."""

    device: Device
    rate: int | None
    chunk: int = FRAME_LEN
    guard: Callable[[], bool] = lambda: False  # True stops the run early
    seq: int = 0
    frames_sent: int = 0
    overruns: int = 0
    stopped_by_guard: bool = False
    _next_check: float = 0.0

    def run(self, seconds: float, events: Sequence[tuple[float, Callable[[], None]]] = ()) -> float:
        """Produce for `seconds`; returns how long production really ran."""
        start = time.monotonic()
        if self.rate is None:
            stop = self._flood(start + seconds)
        else:
            stop = self._paced(start, seconds, self.rate, sorted(events, key=lambda e: e[0]))
        return stop - start

    def _guarded(self, now: float) -> bool:
        if now >= self._next_check:
            self._next_check = now + _GUARD_PERIOD_S
            self.stopped_by_guard = self.guard()
        return self.stopped_by_guard

    def _paced(
        self, start: float, seconds: float, rate: int, events: list[tuple[float, Callable[[], None]]]
    ) -> float:
        interval = FRAME_LEN / rate
        chunk_dt = self.chunk / rate
        end = start + seconds
        next_due = start
        pending = b""
        sent = 0
        pending_due = start
        while True:
            now = time.monotonic()
            if events and now >= start + events[0][0]:
                events.pop(0)[1]()
                pending = b""  # a frame cut by an unplug is gone
                continue
            allowed = 0
            if pending:
                # Trickle releases a frame chunk by chunk on the UART's clock.
                allowed = min(len(pending), (int((now - pending_due) / chunk_dt) + 1) * self.chunk)
                if allowed > sent:
                    sent += self.device.write(memoryview(pending)[sent:allowed])
                if sent == len(pending):
                    pending = b""
                    self.frames_sent += 1
            if now >= end or self._guarded(now):
                break
            if now >= next_due:
                if pending or not self.device.plugged:
                    self.overruns += 1  # the UART overruns: nobody took its bytes
                else:
                    pending = make_frame(self.seq, time.monotonic_ns())
                    self.seq += 1
                    sent = 0
                    pending_due = next_due
                next_due += interval
                continue
            wake = next_due
            if pending and allowed < len(pending):
                wake = min(wake, pending_due + (allowed // self.chunk) * chunk_dt)
            if pending and sent < allowed:
                self.device.wait(select.POLLOUT, min(wake, end) - now)
            else:
                time.sleep(max(min(wake, end) - now, 0.0))
        if pending and self.device.write_all(pending[sent:], 1.0):
            self.frames_sent += 1
        return now

    def _flood(self, end: float) -> float:
        written = 0
        view = memoryview(b"")
        while True:
            now = time.monotonic()
            if now >= end or self._guarded(now):
                break
            if not view:
                ts = time.monotonic_ns()
                view = memoryview(b"".join(make_frame(self.seq + i, ts) for i in range(_FLOOD_BATCH_FRAMES)))
                self.seq += _FLOOD_BATCH_FRAMES
            k = self.device.write(view)
            written += k
            view = view[k:]
            if k == 0:
                self.device.wait(select.POLLOUT, end - now)
        if view and self.device.write_all(bytes(view), 1.0):
            written += len(view)
        self.frames_sent = written // FRAME_LEN
        return now


# ---------------------------------------------------------------- targets


def _listening(port: int) -> bool:
    """True when 127.0.0.1:port is in LISTEN state (no probe connection,
    which would count as a client on some targets)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1] == want and line.split()[3] == "0A" for line in f.readlines()[1:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def target_command(
    target: str, *, link: Path, port: int, n: int, workdir: Path, python: str, fmt: str = "raw"
) -> list[str]:
    if target == "muxd" and fmt != "raw":
        # The one-port command line has no --format: the same setup as a config file.
        conf = workdir / "muxd.yaml"
        conf.write_text(
            json.dumps(  # JSON is YAML
                {
                    "ports": [
                        {
                            "name": "bench",
                            "upstream": {"serial": str(link), "baudrate": 115200},
                            "listeners": [
                                {
                                    "tcp": f"127.0.0.1:{port}",
                                    "mode": "rw",
                                    "write": "lines",
                                    "max_clients": 2000,
                                    "buffer": "256KiB",
                                    "format": fmt,
                                }
                            ],
                        }
                    ]
                }
            )
        )
        return [python, "-m", "muxd", "run", "-c", str(conf)]
    if target == "muxd":
        return [
            python,
            "-m",
            "muxd",
            "run",
            "--serial",
            str(link),
            "--baud",
            "115200",
            "--tcp",
            f"127.0.0.1:{port}",
            "--mode",
            "rw",
            "--write",
            "lines",
            "--max-clients",
            "2000",
            "--buffer",
            "256KiB",
            "--name",
            "bench",
        ]
    if target == "ser2net":
        conf = workdir / "ser2net.yaml"
        conf.write_text(
            "connection: &bench\n"
            f"  accepter: tcp,127.0.0.1,{port}\n"
            f"  connector: serialdev,{link},115200n81,local\n"
            "  options:\n"
            f"    max-connections: {n}\n"
        )
        return ["ser2net", "-n", "-u", "-c", str(conf)]  # -u: no UUCP lock files
    if target == "ser2tcp":
        conf = workdir / "ser2tcp.json"
        conf.write_text(
            json.dumps(
                {
                    "ports": [
                        {
                            "serial": {"port": str(link), "baudrate": 115200},
                            "servers": [{"address": "127.0.0.1", "port": port, "protocol": "tcp"}],
                        }
                    ]
                }
            )
        )
        return [python, "-c", "from ser2tcp.main import main; main()", "-c", str(conf)]
    raise ValueError(f"unknown target {target!r}")


def target_version(target: str, python: str) -> str:
    cmd = {
        "muxd": [python, "-m", "muxd", "--version"],
        "ser2net": ["ser2net", "-v"],
        "ser2tcp": [python, "-c", "import importlib.metadata as m; print('ser2tcp', m.version('ser2tcp'))"],
    }[target]
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=20, cwd=REPO, env=_child_env(), check=True
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


def _child_env() -> dict[str, str]:
    # The muxd under test is the working tree, not whatever is installed.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


class Server:
    """One target process, started and stopped by PID."""

    def __init__(self, cmd: list[str], port: int, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=_child_env(),
            )
        deadline = time.monotonic() + 20.0
        while not _listening(port):
            if self.proc.poll() is not None:
                raise TargetError(f"exited with {self.proc.returncode} at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TargetError(f"not listening on {port} after 20 s: {self.log_tail()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, size: int = 400) -> str:
        data = self.log_path.read_bytes()[-size:]
        return data.decode(errors="replace").strip()

    def cpu_s(self) -> float:
        """utime+stime of the process and its waited-for children."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def status_kib(self, key: str) -> int | None:
        """A memory figure from /proc/PID/status: VmHWM (peak RSS) or VmRSS."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    def too_big(self) -> bool:
        return (self.status_kib("VmRSS") or 0) > _RSS_GUARD_KIB

    def stop(self) -> int | None:
        """SIGTERM by PID, SIGKILL after 5 s; returns the exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5.0)
        return self.proc.returncode


# ---------------------------------------------------------------- readers


class _Client:
    __slots__ = (
        "buf",
        "close_reason",
        "closed_at",
        "dups",
        "events",
        "expected",
        "gaps",
        "garbled",
        "last_rx",
        "longest_gap",
        "lost",
        "max_seq",
        "nbytes",
        "received",
        "records",
        "sock",
        "stuck",
        "timeline",
        "warm",
    )

    def __init__(self, sock: socket.socket, stuck: bool, buckets: int) -> None:
        self.sock = sock
        self.stuck = stuck
        self.buf = bytearray()
        self.records = bytearray()  # a partial record line (text, jsonl)
        self.events = 0  # event records (a gap) among them
        self.expected = 0
        self.received = self.lost = self.gaps = self.dups = self.garbled = self.nbytes = 0
        self.max_seq = -1
        self.warm = False
        self.last_rx = 0
        self.longest_gap = 0
        self.closed_at: int | None = None
        self.close_reason = ""
        self.timeline = [0] * buckets


@dataclass
class _ReaderState:
    clients: list[_Client]
    by_fd: dict[int, _Client]
    ep: select.epoll
    bucket_ns: int
    latencies: array.array[int] = field(default_factory=lambda: array.array("q"))
    t0: int = 0  # measurement start; 0 while warming up
    fmt: str = "raw"

    def unwrap(self, c: _Client, data: bytes) -> bytes:
        """Records in, the device bytes they carry out (whole record lines only)."""
        c.records += data
        end = c.records.rfind(b"\n")
        if end < 0:
            if len(c.records) > 4 * _MAX_PARTIAL:
                c.garbled += 1
                c.records.clear()
            return b""
        lines = bytes(c.records[:end]).split(b"\n")
        del c.records[: end + 1]
        out = []
        if self.fmt == "text":
            for line in lines:
                if line.startswith(b"-- muxd:", _TEXT_STAMP_LEN):
                    c.events += 1
                    continue
                out.append(
                    line[_TEXT_STAMP_LEN:] if line[_TEXT_STAMP_LEN - 2 : _TEXT_STAMP_LEN] == b"Z " else line
                )
                out.append(b"\n")
            return b"".join(out)
        loads = json.loads
        for line in lines:
            try:
                record = loads(line)
                out.append(record["data"].encode("utf-8", "surrogateescape"))
            except KeyError:
                c.events += 1
            except ValueError:
                c.garbled += 1
        return b"".join(out)

    def feed(self, c: _Client, data: bytes, now: int) -> None:
        c.nbytes += len(data)
        if self.fmt != "raw":
            data = self.unwrap(c, data)
        c.buf += data
        end = c.buf.rfind(b"\n")
        if end < 0:
            if len(c.buf) > _MAX_PARTIAL:
                c.garbled += 1
                c.buf.clear()
            return
        lines = bytes(c.buf[:end]).split(b"\n")
        del c.buf[: end + 1]
        frames = 0
        lat = self.latencies
        for line in lines:
            if len(line) != FRAME_LEN - 1 or line[11] != 32 or line[32] != 32:
                c.garbled += 1
                continue
            kind = line[0]
            if kind == _KIND_WARMUP:
                c.warm = True
                continue
            if kind != _KIND_DATA:
                c.garbled += 1
                continue
            try:
                seq = int(line[1:11])
                ts = int(line[12:32])
            except ValueError:
                c.garbled += 1
                continue
            if seq >= c.expected:
                if seq > c.expected:
                    c.lost += seq - c.expected
                    c.gaps += 1
                c.expected = seq + 1
                c.received += 1
                c.max_seq = seq
                frames += 1
                if not c.stuck:  # a stuck client's backlog is not the server's latency
                    lat.append(now - ts)
            else:
                c.dups += 1
        if frames and self.t0 and not c.stuck:
            b = min((now - self.t0) // self.bucket_ns, len(c.timeline) - 1)
            c.timeline[b] += frames

    def close(self, c: _Client, reason: str, now: int) -> None:
        if c.closed_at is None:
            c.closed_at = now - self.t0 if self.t0 else -1
            c.close_reason = reason
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.ep.unregister(c.sock.fileno())
            c.sock.close()

    def read(self, c: _Client, now: int) -> int:
        try:
            data = c.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return 0
        except OSError as e:
            self.close(c, type(e).__name__, now)
            return 0
        if not data:
            self.close(c, "eof", now)
            return 0
        if self.t0:
            gap = now - c.last_rx
            c.longest_gap = max(c.longest_gap, gap)
            c.last_rx = now
        self.feed(c, data, now)
        return len(data)


def _connect(port: int, n: int, n_stuck: int, buckets: int) -> tuple[list[_Client], Counter[str]]:
    clients: list[_Client] = []
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + _CONNECT_DEADLINE_S
    for i in range(n):
        if time.monotonic() > deadline:
            errors["connect deadline"] += n - i
            break
        s = socket.socket()
        if i < n_stuck:
            # Loopback autotuning lets the kernel absorb MBs for a reader that
            # never reads; a small window makes the stall reach the server in
            # seconds, as a hung client on a real link does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _STUCK_RCVBUF)
        s.settimeout(5.0)
        try:
            s.connect(("127.0.0.1", port))
        except OSError as e:
            s.close()
            errors[type(e).__name__] += 1
            continue
        s.setblocking(False)
        clients.append(_Client(s, i < n_stuck, buckets))
        time.sleep(_CONNECT_PAUSE_S)
    return clients, errors


def reader_main(
    conn: multiprocessing.connection.Connection,
    *,
    port: int,
    n: int,
    n_stuck: int,
    seconds: float,
    bucket_ms: int,
    fmt: str = "raw",
) -> None:
    """A reader process: holds n clients (the first n_stuck never read)."""
    buckets = int((seconds + _DRAIN_S) * 1000 / bucket_ms) + 2
    clients, errors = _connect(port, n, n_stuck, buckets)
    conn.send(("connected", len(clients), dict(errors)))
    ep = select.epoll()
    st = _ReaderState(clients, {c.sock.fileno(): c for c in clients}, ep, bucket_ms * 1_000_000, fmt=fmt)
    for c in clients:
        # A stuck client only watches for the server hanging up on it.
        ep.register(c.sock.fileno(), select.EPOLLRDHUP if c.stuck else select.EPOLLIN | select.EPOLLRDHUP)
    ep.register(conn.fileno(), select.EPOLLIN)
    phase = "warmup"
    cpu0 = 0.0
    final_seq = 0
    t_end = drain_deadline = 0
    stuck_drain_last = 0
    told_ready = False
    while True:
        for fd, ev in ep.poll(0.05):
            now = time.monotonic_ns()
            if fd == conn.fileno():
                try:
                    msg = conn.recv()
                except EOFError:  # the harness is gone: so are we
                    return
                if msg[0] == "start":
                    phase, st.t0, cpu0 = "run", msg[1], _self_cpu()
                    for c in clients:
                        c.last_rx = st.t0
                elif msg[0] == "stop":
                    phase, final_seq, t_end = "drain", msg[1], msg[2]
                    drain_deadline = now + int(_DRAIN_S * 1e9)
                    stuck_drain_last = now
                    for c in clients:
                        if c.stuck and c.closed_at is None:
                            ep.modify(c.sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
                continue
            c = st.by_fd[fd]
            if c.stuck and phase != "drain":
                st.close(c, "hangup" if ev & select.EPOLLRDHUP else "error", now)  # server let it go
            elif st.read(c, now) and c.stuck:
                stuck_drain_last = now
        now = time.monotonic_ns()
        live = [c for c in clients if not c.stuck and c.closed_at is None]
        if phase == "warmup" and not told_ready and all(c.warm for c in live):
            conn.send(("ready", len(live)))
            told_ready = True
        if phase == "drain":
            done = all(c.expected >= final_seq for c in live)
            stuck_done = now - stuck_drain_last > _STUCK_IDLE_S * 1e9 or all(
                c.closed_at is not None for c in clients if c.stuck
            )
            if (done and stuck_done) or now > drain_deadline:
                break
    cpu = _self_cpu() - cpu0
    wall = (time.monotonic_ns() - st.t0) / 1e9 if st.t0 else 0.0
    for c in clients:
        if not c.stuck and c.closed_at is None and t_end > c.last_rx:
            c.longest_gap = max(c.longest_gap, t_end - c.last_rx)
    conn.send(
        (
            "result",
            {
                "cpu_s": cpu,
                "wall_s": wall,
                "latencies": st.latencies.tobytes(),
                "clients": [
                    {
                        "stuck": c.stuck,
                        "received": c.received,
                        "lost": c.lost,
                        "gaps": c.gaps,
                        "dups": c.dups,
                        "garbled": c.garbled,
                        "events": c.events,
                        "bytes": c.nbytes,
                        "max_seq": c.max_seq,
                        "closed_at": c.closed_at,
                        "close_reason": c.close_reason,
                        "longest_gap_ns": c.longest_gap,
                        "timeline": c.timeline,
                    }
                    for c in clients
                ],
            },
        )
    )
    for c in clients:
        c.sock.close()


def _machine_idle() -> tuple[int, int]:
    """(idle, total) jiffies over all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait


def wait_quiet(min_idle_pct: float = 70.0, max_wait_s: float = 15.0) -> float:
    """Wait (bounded) for a 1-s window in which the cores are mostly idle, so
    a run does not start on top of someone else's burst; returns that idle %."""
    deadline = time.monotonic() + max_wait_s
    while True:
        a = _machine_idle()
        time.sleep(1.0)
        b = _machine_idle()
        idle = 100 * (b[0] - a[0]) / max(b[1] - a[1], 1)
        if idle >= min_idle_pct or time.monotonic() >= deadline:
            return round(idle, 1)


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    rate: int | None  # bytes/s; None = flood
    chunk: int = FRAME_LEN
    stuck: int = 0
    unplug_at: float | None = None
    unplug_for: float = 1.0
    bucket_ms: int = 250


SCENARIOS: dict[str, Scenario] = {
    "fanout": Scenario(BAUD_RATE_BPS),
    "flood": Scenario(None),
    "trickle": Scenario(BAUD_RATE_BPS, chunk=16),
    "stuck": Scenario(10 * BAUD_RATE_BPS, stuck=1),
    "unplug": Scenario(BAUD_RATE_BPS, unplug_at=3.0),
    "writers": Scenario(None),
}


def _percentile(sorted_values: Sequence[int], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(int(q * len(sorted_values)), len(sorted_values) - 1)] / 1e6, 3)


def _wait_all(
    conns: list[multiprocessing.connection.Connection],
    kind: str,
    timeout_s: float,
    tick: Callable[[], None] | None = None,
) -> list[Any]:
    """Collect one `kind` message from each reader, calling tick between polls."""
    got: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < len(conns) and time.monotonic() < deadline:
        for ready in multiprocessing.connection.wait(
            [c for i, c in enumerate(conns) if i not in got], _WARMUP_PERIOD_S
        ):
            assert isinstance(ready, multiprocessing.connection.Connection)
            msg = ready.recv()
            if msg[0] == kind:
                got[conns.index(ready)] = msg
        if tick is not None:
            tick()
    return [got.get(i) for i in range(len(conns))]


def run_stream(
    scn: Scenario, server: Server, device: Device, *, port: int, n: int, seconds: float, fmt: str = "raw"
) -> dict[str, Any]:
    """Fan-out style runs: producer here, clients in reader processes."""
    n_readers = 1 if n <= 100 else 2
    ctx = multiprocessing.get_context("spawn")  # no inherited pty fds: unplug must really close
    shares = [n // n_readers + (1 if i < n % n_readers else 0) for i in range(n_readers)]
    conns, procs = [], []
    out: dict[str, Any] = {"readers": n_readers, "clients_connected": 0}
    errors: Counter[str] = Counter()
    try:
        for i, share in enumerate(shares):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=reader_main,
                args=(child,),
                daemon=True,
                kwargs={
                    "port": port,
                    "n": share,
                    "n_stuck": scn.stuck if i == 0 else 0,
                    "seconds": seconds,
                    "bucket_ms": scn.bucket_ms,
                    "fmt": fmt,
                },
            )
            p.start()
            child.close()
            conns.append(parent)
            procs.append(p)
            # One reader connects at a time: two racing can overflow a small
            # listen backlog (ser2net's is 5) into 1 s SYN retransmits.
            [connected] = _wait_all([parent], "connected", _CONNECT_DEADLINE_S + 10)
            if connected:
                out["clients_connected"] += connected[1]
                errors.update(connected[2])
        out["connect_errors"] = dict(errors)

        warm_seq = iter(range(10**9))

        def warm() -> None:
            device.write_all(make_frame(next(warm_seq), time.monotonic_ns(), b"W"), 1.0)

        ready = _wait_all(conns, "ready", 10.0 + n / 100, warm)
        out["clients_ready"] = sum(m[1] for m in ready if m)
        producer = Producer(device, scn.rate, scn.chunk, server.too_big)
        events: list[tuple[float, Callable[[], None]]] = []
        if scn.unplug_at is not None:
            events = [(scn.unplug_at, device.unplug), (scn.unplug_at + scn.unplug_for, device.plug)]
        server_cpu0, own_cpu0, idle0 = server.cpu_s(), _self_cpu(), _machine_idle()
        t0 = time.monotonic_ns()
        for c in conns:
            c.send(("start", t0))
        out["duration_s"] = round(producer.run(seconds, events), 3)
        own_cpu = _self_cpu() - own_cpu0
        for c in conns:
            c.send(("stop", producer.frames_sent, time.monotonic_ns()))
        replies = _wait_all(conns, "result", _DRAIN_S + 30)
        out["server_cpu_s"] = round(server.cpu_s() - server_cpu0, 3)
        idle1 = _machine_idle()
        # Idle share of all cores over the run: low with little server and
        # harness CPU means something else on the machine was competing.
        out["machine_idle_pct"] = round(100 * (idle1[0] - idle0[0]) / max(idle1[1] - idle0[1], 1), 1)
    finally:
        for c in conns:
            c.close()  # a reader still waiting for orders sees EOF and exits
        for p in procs:
            p.join(5.0)
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGKILL)
                p.join(5.0)
    if not all(replies):
        raise TargetError("a reader process returned no result")
    results: list[dict[str, Any]] = [m[1] for m in replies]
    clients = [c for r in results for c in r["clients"]]
    healthy = [c for c in clients if not c["stuck"]]
    lat = array.array("q")
    for r in results:
        lat.frombytes(r["latencies"])
    lat_sorted = sorted(lat)
    sent = producer.frames_sent
    received = [c["received"] for c in healthy]
    readers_cpu = sum(r["cpu_s"] for r in results)
    out.update(
        {
            "frames_sent": sent,
            "device_overruns": producer.overruns,
            "stopped_by_rss_guard": producer.stopped_by_guard,
            "rate_Bps": scn.rate if scn.rate is not None else round(sent * FRAME_LEN / out["duration_s"]),
            "frames_rx_min": min(received, default=0),
            "frames_rx_median": statistics.median(received) if received else 0,
            "lost": sum(c["lost"] for c in healthy),
            "gaps": sum(c["gaps"] for c in healthy),
            "duplicates": sum(c["dups"] for c in healthy),
            "garbled": sum(c["garbled"] for c in healthy),
            "events": sum(c["events"] for c in healthy),
            "not_received": sum(sent - c["received"] for c in healthy),
            "latency_p50_ms": _percentile(lat_sorted, 0.50),
            "latency_p99_ms": _percentile(lat_sorted, 0.99),
            "latency_max_ms": _percentile(lat_sorted, 1.0),
            "harness_cpu_s": round(own_cpu + readers_cpu, 3),
            "producer_cpu_s": round(own_cpu, 3),
            "readers_cpu_s": round(readers_cpu, 3),
            # Near 1.0 means a reader process was saturated: the harness, not the
            # server, may have been the limit.
            "readers_busy": round(max(r["cpu_s"] / max(r["wall_s"], 1e-9) for r in results), 3),
            "clients_alive_end": sum(1 for c in healthy if c["closed_at"] is None),
            "close_reasons": dict(Counter(c["close_reason"] for c in healthy if c["close_reason"])),
            "longest_gap_ms_max": round(max((c["longest_gap_ns"] for c in healthy), default=0) / 1e6, 1),
        }
    )
    if scn.stuck:
        stuck = [c for c in clients if c["stuck"]]
        out["timeline_ms"] = scn.bucket_ms
        last = int(out["duration_s"] * 1000 / scn.bucket_ms)  # whole buckets only
        out["timeline"] = [[c["timeline"][b] for c in healthy] for b in range(last)]
        out["longest_gap_ms"] = [round(c["longest_gap_ns"] / 1e6, 1) for c in healthy]
        out["stuck"] = [
            {
                "bytes_received": c["bytes"],
                "frames_received": c["received"],
                "last_seq": c["max_seq"],
                "lost": c["lost"],
                "garbled": c["garbled"],
                "disconnected": c["closed_at"] is not None,
                "disconnected_at_s": round(c["closed_at"] / 1e9, 2)
                if c["closed_at"] not in (None, -1)
                else None,
                "how": c["close_reason"],
            }
            for c in stuck
        ]
    if scn.unplug_at is not None:
        out["unplug_at_s"] = scn.unplug_at
        out["unplug_for_s"] = scn.unplug_for
        out["kept_connections"] = out["clients_alive_end"]
    return out


def run_writers(server: Server, device: Device, port: int, n: int) -> dict[str, Any]:
    """3 clients write 20 lines of 200 bytes each, interleaved in 50-byte
    pieces; count the lines that reach the device intact."""
    lines_per_client, line_len, piece = 20, 200, 50
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5.0) for _ in range(n)]
    try:
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one piece, one segment
            s.settimeout(0.05)
        # Warm up: the server is attached once each client sees device output.
        seen = [False] * n
        deadline = time.monotonic() + 10.0
        while not all(seen) and time.monotonic() < deadline:
            device.write_all(make_frame(0, time.monotonic_ns(), b"W"), 1.0)
            for i, s in enumerate(socks):
                with contextlib.suppress(TimeoutError):
                    seen[i] = seen[i] or bool(s.recv(_RECV_SIZE))
        for s in socks:
            s.setblocking(False)
        sent = [
            [
                (b"C%dL%02d:" % (c, i)).ljust(line_len - 1, bytes([97 + c % 26])) + b"\n"
                for i in range(lines_per_client)
            ]
            for c in range(n)
        ]
        streams = [b"".join(ls) for ls in sent]
        got = bytearray()
        cpu0, t0 = server.cpu_s(), time.monotonic()
        for off in range(0, len(streams[0]), piece):
            for s, stream in zip(socks, streams, strict=True):
                s.setblocking(True)
                s.sendall(stream[off : off + piece])
            got += device.read()
            time.sleep(0.001)  # let each round of pieces reach the server apart
        want = sum(len(x) for x in streams)
        deadline = time.monotonic() + 5.0
        while len(got) < want and time.monotonic() < deadline:
            device.wait(select.POLLIN, 0.1)
            got += device.read()
        duration = time.monotonic() - t0
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                alive += s.recv(_RECV_SIZE) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()
    all_sent = {line for ls in sent for line in ls}
    received = [line + b"\n" for line in bytes(got).split(b"\n")[:-1]]
    return {
        "duration_s": round(duration, 3),
        "server_cpu_s": round(server.cpu_s() - cpu0, 3),
        "lines_sent": len(all_sent),
        "lines_received": len(received),
        "lines_intact": len(all_sent.intersection(received)),
        "bytes_sent": want,
        "bytes_received": len(got),
        "clients_alive_end": alive,
    }


def run_once(
    target: str, scenario: str, n: int, seconds: float, python: str, *, fmt: str = "raw"
) -> dict[str, Any]:
    """One target at one setting; always returns a record, errors included."""
    scn = SCENARIOS[scenario]
    record: dict[str, Any] = {"target": target, "scenario": scenario, "n": n, "seconds": seconds}
    if fmt != "raw":
        record["format"] = fmt
    with tempfile.TemporaryDirectory(prefix="muxd-bench-") as wd:
        workdir = Path(wd)
        device = Device(workdir / "tty")
        device.plug()
        port = free_port()
        server = None
        try:
            server = Server(
                target_command(
                    target, link=device.link, port=port, n=n, workdir=workdir, python=python, fmt=fmt
                ),
                port,
                workdir / "server.log",
            )
            record["server_pid"] = server.pid
            if scenario == "writers":
                record.update(run_writers(server, device, port, n))
            else:
                record.update(run_stream(scn, server, device, port=port, n=n, seconds=seconds, fmt=fmt))
            record["server_rss_peak_kib"] = server.status_kib("VmHWM")
            if server.proc.poll() is not None:
                record["error"] = f"server exited with {server.proc.returncode}: {server.log_tail()}"
        except TargetError as e:
            record["error"] = str(e)
        finally:
            if server is not None:
                record["server_exit"] = server.stop()
            device.unplug()
    return record


# ---------------------------------------------------------------- matrix / CLI

# (scenario, n, seconds): about 10 minutes for three targets on 2 cores.
MATRIX: list[tuple[str, int, float]] = [
    *[("fanout", n, 8.0) for n in (1, 10, 100, 300, 1000)],
    ("flood", 10, 8.0),
    ("flood", 100, 8.0),
    ("trickle", 10, 8.0),
    ("stuck", 10, 30.0),
    ("writers", 3, 0.0),
    ("unplug", 10, 10.0),
]


def raise_nofile(n: int) -> None:
    """Servers and readers inherit this: n sockets each side plus slack."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft < want:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard)
        )


def machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def emit(record: dict[str, Any], out: Path | None) -> None:
    """One result as a JSON line on stdout, and appended to `out` (bench.report reads it)."""
    line = json.dumps(record, separators=(",", ":"))
    print(line, flush=True)
    if out is not None:
        with open(out, "a") as f:
            f.write(line + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", choices=TARGETS)
    ap.add_argument("--targets", default=",".join(TARGETS), help="with --all: comma-separated targets")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--all", action="store_true", help="run the full matrix")
    ap.add_argument("--out", type=Path, help="append JSON lines to this file too")
    ap.add_argument("--python", default=sys.executable, help="interpreter for muxd and ser2tcp")
    ap.add_argument(
        "--format",
        default="raw",
        help="muxd only: its TCP listener's format, raw, text or jsonl; a comma-separated list "
        "(raw,jsonl) runs the workload once per format, back to back",
    )
    args = ap.parse_args(argv)
    if not args.all and (args.target is None or args.scenario is None):
        ap.error("give --target and --scenario, or --all")
    formats = args.format.split(",")
    if any(f not in FORMATS for f in formats):
        ap.error(f"--format: each of {', '.join(FORMATS)}")
    if formats != ["raw"] and (args.all or args.target != "muxd" or args.scenario == "writers"):
        ap.error("--format is for --target muxd and a streaming scenario")
    # SIGTERM unwinds like Ctrl-C so every finally stops its processes by PID.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    raise_nofile(max([args.n] + [n for _, n, _ in MATRIX]) if args.all else args.n)
    runs = (
        [(t, s, n, sec, "raw") for s, n, sec in MATRIX for t in args.targets.split(",")]
        if args.all
        else [(args.target, args.scenario, args.n, args.seconds, f) for f in formats]
    )
    versions: dict[str, str] = {}
    command = " ".join(["python -m bench.fanout", *(argv if argv is not None else sys.argv[1:])])
    env = machine()
    t_start = time.monotonic()
    for i, (target, scenario, n, seconds, fmt) in enumerate(runs, 1):
        if target not in versions:
            versions[target] = target_version(target, args.python)
        print(
            f"[{i}/{len(runs)} {time.monotonic() - t_start:5.0f}s] {target} {scenario} n={n}"
            + (f" format={fmt}" if fmt != "raw" else ""),
            file=sys.stderr,
            flush=True,
        )
        idle = wait_quiet()
        record = run_once(target, scenario, n, seconds, args.python, fmt=fmt)
        record.update(version=versions[target], machine=env, command=command, machine_idle_before_pct=idle)
        emit(record, args.out)
        if "error" in record:
            print(f"    error: {record['error']}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
