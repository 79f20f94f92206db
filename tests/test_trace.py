"""Trace files end to end: muxd as a subprocess on a pty, its trace files read back.

Each test drives the device through the pty master and synchronises on what a
TCP reader received, on the API's per-trace counters (``traces`` in
/api/v1/ports) or on the file's content, never on time.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import signal
import socket
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    AUTO,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    recv_exactly,
    request,
    start_on_pty,
    wait_for,
)

STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
KiB = 1024
DROPPED = "muxd_trace_dropped_bytes_total"
WRITTEN = "muxd_trace_written_bytes_total"


def start_traced(
    muxd: StartMuxd,
    tmp_path: Path,
    dev: PtyDevice,
    *traces: dict[str, Any],
    listener: dict[str, Any] | None = None,
    **opts: Any,
) -> tuple[Muxd, socket.socket]:
    """muxd on the pty with these traces and one TCP listener (plain by default),
    and a client of that listener, connected."""
    m = start_on_pty(muxd, tmp_path, dev, [listener or {"tcp": AUTO}], trace=list(traces), **opts)
    client = connect(m.port())
    m.wait_connected(1)
    return m, client


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def wait_file(path: Path, cond: Any, what: str, timeout: float = 10.0) -> bytes:
    """Wait until cond(content of path) holds; return the content."""

    def content() -> bytes | None:
        data = read(path)
        return data if cond(data) else None

    found: bytes = wait_for(content, timeout, what)
    return found


def wait_contains(path: Path, needle: bytes, timeout: float = 10.0) -> bytes:
    return wait_file(path, lambda b: needle in b, f"{needle!r} in {path.name}", timeout)


def trace_info(m: Muxd, path: Path) -> dict[str, Any]:
    [t] = [t for t in m.port_info()["traces"] if t["path"] == str(path)]
    info: dict[str, Any] = t
    return info


def wait_caught_up(m: Muxd, path: Path, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until the trace has written everything the device sent so far."""
    bytes_in = m.port_info()["bytes_in"]

    def done() -> dict[str, Any] | None:
        info = m.port_info()
        [t] = [t for t in info["traces"] if t["path"] == str(path)]
        return t if t["lag"] == 0 and info["bytes_in"] >= bytes_in else None

    found: dict[str, Any] = wait_for(done, timeout, f"trace {path.name} caught up")
    return found


def send(dev: PtyDevice, reader: socket.socket, data: bytes) -> None:
    """Device output, and wait until a reader of the port got all of it."""
    dev.write(data)
    assert recv_exactly(reader, len(data), timeout=10) == data


def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")


def jsonl(data: bytes) -> list[dict[str, Any]]:
    assert data.endswith(b"\n"), data[-200:]
    return [json.loads(line) for line in data.decode("utf-8").split("\n")[:-1]]


def rx_data(records: list[dict[str, Any]]) -> bytes:
    return b"".join(r["data"].encode("utf-8", "surrogateescape") for r in records if r.get("dir") == "rx")


def reopen(m: Muxd) -> None:
    """Reopen the port's traces through the API: done when it answers."""
    status, _, body = request(m.http, "POST", "/api/v1/ports/dut/trace/reopen")
    assert status == 200, body


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# -- formats ------------------------------------------------------------------------------------


def test_text_jsonl_and_raw_traces_of_one_port(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    text, jl, raw = tmp_path / "dut.log", tmp_path / "dut.jsonl", tmp_path / "dut.raw"
    m, reader = start_traced(
        muxd,
        tmp_path,
        pty_device,
        {"path": str(text), "format": "text"},
        {"path": str(jl), "format": "jsonl"},
        {"path": str(raw), "format": "raw"},
    )
    before = time.time()
    chunks = [
        b"U-Boot 2024.01\r\n",
        b"boot ok\nsecond line\nhalf a ",
        b"line\n",
        b"prompt# ",  # no newline yet: a record at once
        b"caf\xc3",  # a character split between two chunks
        b"\xa9 \xff\xfe binary\n",  # and bytes that are not UTF-8
        bytes(range(256)) + b"\n",
    ]
    sent = b""
    for chunk in chunks:
        send(pty_device, reader, chunk)
        sent += chunk
    for path in (text, jl, raw):
        wait_caught_up(m, path)
    after = time.time()

    # raw: byte-exact.
    assert raw.read_bytes() == sent

    # text: every line starts with its stamp, and without the stamps it is the stream.
    # The record begins when muxd opened the device: a marked line, then the data.
    body = text.read_bytes()
    lines = lines_of(body)
    assert all(STAMP.match(line) for line in lines), lines
    assert re.fullmatch(rb"-- muxd: dut upstream up \(.+\) --", lines[0][25:]), lines[0]
    unstamped = b""
    for line in lines[1:]:
        stamp = line[:24].decode()
        t = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + int(stamp[20:23]) / 1000
        assert before - 1 <= t <= after + 1, stamp
        unstamped += line[25:] + b"\n"
    assert unstamped == sent
    assert len(lines) - 1 == sent.count(b"\n")

    # jsonl: parses line by line, t never goes back, the data fields join to the stream.
    records = jsonl(jl.read_bytes())
    assert records[0]["event"] == "upstream" and records[0]["state"] == "up", records[0]
    records = records[1:]
    ts = [r["t"] for r in records]
    assert ts == sorted(ts)
    assert before - 1 <= ts[0] and ts[-1] <= after + 1
    assert all(r["port"] == "dut" and r["dir"] == "rx" for r in records)
    assert rx_data(records) == sent
    # A record per line; a chunk that ends inside a line gives its part at once.
    assert {"prompt# "} <= {r["data"] for r in records}

    # The API and the metrics count the same bytes.
    for path in (text, jl, raw):
        info = trace_info(m, path)
        assert info["written"] == path.stat().st_size
        assert info["dropped_disk"] == 0 and info["dropped_backlog"] == 0
        assert m.metric(WRITTEN, port="dut", trace=str(path)) == path.stat().st_size


def test_a_burst_bigger_than_the_ring_is_traced_whole(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """The device outruns a quarter-second timer: the trace keeps up anyway."""
    raw, jl = tmp_path / "dut.raw", tmp_path / "dut.jsonl"
    m, reader = start_traced(
        muxd,
        tmp_path,
        pty_device,
        {"path": str(raw), "format": "raw"},
        {"path": str(jl), "format": "jsonl"},
        listener={"tcp": AUTO, "buffer": "16MiB"},
        history="64KiB",
    )
    burst = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % i for i in range(40_000))
    assert len(burst) > 2 * 1024 * KiB
    pty_device.write(burst, timeout=30)
    assert recv_exactly(reader, len(burst), timeout=30) == burst
    wait_caught_up(m, raw, timeout=20)
    wait_caught_up(m, jl, timeout=20)
    assert trace_info(m, raw)["dropped_backlog"] == 0
    assert raw.read_bytes() == burst
    assert rx_data(jsonl(jl.read_bytes())) == burst


# -- notices and input --------------------------------------------------------------------------


def test_upstream_down_and_up_are_marked(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    text, jl = tmp_path / "dut.log", tmp_path / "dut.jsonl"
    m = start_on_pty(
        muxd,
        tmp_path,
        pty_device,
        [],
        trace=[{"path": str(text), "format": "text"}, {"path": str(jl), "format": "jsonl"}],
    )
    pty_device.write(b"before\n")
    wait_contains(jl, b"before")
    pty_device.unplug()
    m.wait_state("backing-off")
    pty_device.plug()
    m.wait_state("up")
    pty_device.write(b"after\n")
    wait_contains(text, b"after")
    wait_contains(jl, b"after")

    lines = lines_of(text.read_bytes())
    assert all(STAMP.match(line) for line in lines), lines
    content = [line[25:] for line in lines[1:]]  # after the mark of the first open
    assert content[0] == b"before"
    assert content[-1] == b"after"
    marks = content[1:-1]
    assert len(marks) == 2, content
    assert re.fullmatch(rb"-- muxd: dut upstream down \(.+\) --", marks[0]), marks
    assert re.fullmatch(rb"-- muxd: dut upstream up \(.+\) --", marks[1]), marks

    records = jsonl(jl.read_bytes())
    kinds = [r.get("event") or r["data"] for r in records]
    assert kinds == ["upstream", "before\n", "upstream", "upstream", "after\n"], records
    assert [records[0]["state"], records[2]["state"], records[3]["state"]] == ["up", "down", "up"]
    assert all(r["port"] == "dut" for r in records)
    ts = [r["t"] for r in records]
    assert ts == sorted(ts)


def test_input_is_recorded_with_its_writer(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    text, jl = tmp_path / "dut.log", tmp_path / "dut.jsonl"
    m, writer = start_traced(
        muxd,
        tmp_path,
        pty_device,
        {"path": str(text), "format": "text", "input": True},
        {"path": str(jl), "format": "jsonl", "input": True},
        listener={"tcp": AUTO, "mode": "rw"},
    )
    [client] = m.clients()
    send(pty_device, writer, b"login: ")
    writer.sendall(b"root\n")
    assert pty_device.read(5) == b"root\n"
    send(pty_device, writer, b"root\r\n# ")
    writer.sendall(b"uname -a\necho hi\n")  # two lines in one write
    assert pty_device.read(17) == b"uname -a\necho hi\n"
    send(pty_device, writer, b"Linux\r\nhi\r\n")
    wait_caught_up(m, text)
    wait_caught_up(m, jl)

    records = jsonl(jl.read_bytes())
    assert records[0]["event"] == "upstream"
    records = records[1:]
    tx = [r for r in records if r.get("dir") == "tx"]
    assert "".join(r["data"] for r in tx) == "root\nuname -a\necho hi\n"
    assert all(r["client"] == client["id"] and r["port"] == "dut" for r in tx), tx
    assert rx_data(records) == b"login: root\r\n# Linux\r\nhi\r\n"
    # In the stream where it happened: after the prompt that asked for it.
    order = [(r["dir"], r["data"]) for r in records]
    assert order.index(("tx", tx[0]["data"])) > order.index(("rx", "login: "))
    ts = [r["t"] for r in records]
    assert ts == sorted(ts)

    lines = lines_of(text.read_bytes())
    tag = f">> [client {client['id']} {client['peer']}] ".encode()
    # Input goes on lines of its own; a device line it interrupted (the prompt
    # before the echo) goes on after it, stamped again, as after any notice:
    # every line of a text trace starts with a stamp.
    assert all(STAMP.match(line) for line in lines), lines
    assert any(line[25:] == b"root\r" for line in lines), lines
    typed = [line[25 + len(tag) :] for line in lines if line[25:].startswith(tag)]
    assert typed == [b"root", b"uname -a", b"echo hi"], lines


# -- rotation and reopening ---------------------------------------------------------------------


def test_rotation_keeps_n_files_and_loses_nothing(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    path = tmp_path / "dut.log"
    keep, size = 3, 64 * KiB
    m, reader = start_traced(
        muxd, tmp_path, pty_device, {"path": str(path), "format": "raw", "rotate": "64KiB", "keep": keep}
    )
    sent = b""
    for i in range(9000):  # about 6 rotations' worth, in bursts
        sent += b"line %06d of the sequence-numbered stream\n" % i
    for start in range(0, len(sent), 24 * KiB):
        send(pty_device, reader, sent[start : start + 24 * KiB])
    info = wait_caught_up(m, path)
    assert info["rotations"] >= keep + 1, info
    files = [path.with_name(f"{path.name}.{i}") for i in range(keep, 0, -1)] + [path]
    assert all(f.exists() for f in files)
    assert not path.with_name(f"{path.name}.{keep + 1}").exists()
    assert all(f.stat().st_size <= size for f in files), [f.stat().st_size for f in files]
    joined = b"".join(f.read_bytes() for f in files)
    # The newest files hold a tail of the stream: nothing lost, nothing twice.
    assert len(joined) > keep * size * 3 // 4
    assert sent.endswith(joined)
    assert info["written"] == len(sent)


def test_rotation_of_text_cuts_between_lines(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    path = tmp_path / "dut.log"
    m, reader = start_traced(
        muxd, tmp_path, pty_device, {"path": str(path), "format": "text", "rotate": "64KiB", "keep": 2}
    )
    sent = b"".join(b"line %06d\n" % i for i in range(12_000))
    send(pty_device, reader, sent)
    info = wait_caught_up(m, path)
    assert info["rotations"] >= 2, info
    files = [path.with_name(f"{path.name}.2"), path.with_name(f"{path.name}.1"), path]
    for f in files:
        data = f.read_bytes()
        assert len(data) <= 64 * KiB and data.endswith(b"\n")
        assert all(STAMP.match(line) for line in lines_of(data))
    joined = b"".join(line[25:] + b"\n" for f in files for line in lines_of(f.read_bytes()))
    assert sent.endswith(joined)
    assert sum(f.stat().st_size for f in files) > 2 * 60 * KiB


def test_reopen_after_logrotate_on_sighup_and_through_the_api(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    path, jl = tmp_path / "dut.log", tmp_path / "dut.jsonl"
    m, reader = start_traced(
        muxd, tmp_path, pty_device, {"path": str(path), "format": "raw"}, {"path": str(jl), "format": "jsonl"}
    )
    send(pty_device, reader, b"one\n")
    wait_file(path, lambda b: b == b"one\n", "one in the trace")
    wait_contains(jl, b"one")
    jl.rename(tmp_path / "dut.jsonl.1")

    # logrotate: move the file away, then signal.
    path.rename(tmp_path / "dut.log.1")
    m.signal(signal.SIGHUP)
    wait_for(path.exists, 10, "a new trace file after SIGHUP")
    send(pty_device, reader, b"two\n")
    wait_file(path, lambda b: b == b"two\n", "two in the new file")
    assert (tmp_path / "dut.log.1").read_bytes() == b"one\n"

    # The same through the API (a loopback peer needs no token).
    path.rename(tmp_path / "dut.log.2")
    status, _, body = request(m.http, "POST", "/api/v1/ports/dut/trace/reopen")
    assert status == 200, body
    assert json.loads(body)["reopened"] == 2
    assert path.exists()  # reopened before the answer
    send(pty_device, reader, b"three\n")
    wait_file(path, lambda b: b == b"three\n", "three in the newest file")
    assert (tmp_path / "dut.log.2").read_bytes() == b"two\n"
    assert trace_info(m, path)["dropped_disk"] == 0

    # A text or jsonl file says where it was reopened, and why.
    wait_contains(jl, b"three")
    first = jsonl((tmp_path / "dut.jsonl.1").read_bytes())
    assert [r.get("event") or r["data"] for r in first] == ["upstream", "one\n"], first
    records = jsonl(jl.read_bytes())
    marks = [(r.get("event"), r.get("reason")) for r in records if "event" in r]
    assert marks == [("reopen", "reload"), ("reopen", "admin request")], records
    assert rx_data(records) == b"two\nthree\n"


@pytest.mark.parametrize("how", ["sighup", "api"])
def test_a_trace_replaced_by_a_symlink_is_not_followed_on_reopen(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, how: str
) -> None:
    """Someone replaces the trace file by a symlink to another file, then the
    trace is reopened (SIGHUP, or the API): muxd must not append the console
    to the link's target. It traces nothing (logged once, bytes counted as
    dropped) until PATH is a file again, and readers are unaffected."""
    path, victim = tmp_path / "dut.log", tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    m, reader = start_traced(muxd, tmp_path, pty_device, {"path": str(path), "format": "raw"})
    send(pty_device, reader, b"one\n")
    wait_file(path, lambda b: b == b"one\n", "one in the trace")

    path.unlink()
    path.symlink_to(victim)
    if how == "sighup":
        m.signal(signal.SIGHUP)
        m.wait_log("reloaded", timeout=10)
    else:
        reopen(m)
    send(pty_device, reader, b"secret console line\n")  # the reader still gets it (send checks)
    wait_for(
        lambda: (
            m.metric(DROPPED, port="dut", trace=str(path), reason="disk") >= 20
            or victim.read_bytes() != b"precious\n"
        ),
        10,
        "the line dropped, or written through the link",
    )
    assert victim.read_bytes() == b"precious\n"
    assert path.is_symlink()
    assert f"trace {path}: it is a symbolic link, which is not followed" in m.log()

    # A file again at PATH: tracing resumes by itself.
    path.unlink()
    path.write_bytes(b"")
    send(pty_device, reader, b"two\n")
    wait_file(path, lambda b: b == b"two\n", "two in the file that came back")
    assert victim.read_bytes() == b"precious\n"


# -- failing disks ------------------------------------------------------------------------------


def test_a_full_disk_costs_trace_bytes_only(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    full = Path("/dev/full")
    m, reader = start_traced(muxd, tmp_path, pty_device, {"path": str(full), "format": "raw"})
    total = 0
    for i in range(3):
        data = b"%d" % i * (16 * KiB)
        send(pty_device, reader, data)  # the reader sees every byte
        total += len(data)
        m.wait_metric(DROPPED, total, port="dut", trace=str(full), reason="disk")
    assert m.metric(DROPPED, port="dut", trace=str(full), reason="disk") == total
    assert m.metric(DROPPED, port="dut", trace=str(full), reason="backlog") == 0
    info = trace_info(m, full)
    assert info["written"] == 0 and info["dropped_disk"] == total and info["lag"] == 0
    errors = [line for line in m.log().splitlines() if "trace /dev/full" in line]
    assert len(errors) == 1, errors
    assert "No space left on device" in errors[0]
    assert m.port_info()["state"] == "up"


def test_writing_recovers_when_the_directory_returns(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "dut.log"
    m, reader = start_traced(muxd, tmp_path, pty_device, {"path": str(path), "format": "raw"})
    send(pty_device, reader, b"before\n")
    wait_file(path, lambda b: b == b"before\n", "before in the trace")

    # The log volume goes away (unmounted, moved): the reopen cannot create PATH.
    away = tmp_path / "logs.away"
    logs.rename(away)
    reopen(m)
    lost = b"while away %d\n"
    total = 0
    for i in range(3):
        send(pty_device, reader, lost % i)  # readers of the device are unaffected
        total += len(lost % i)
        m.wait_metric(DROPPED, total, port="dut", trace=str(path), reason="disk")
    assert not path.exists()

    # It comes back: the trace writes again by itself, without a signal, to the
    # same file (what was sent meanwhile is the counted hole).
    away.rename(logs)
    send(pty_device, reader, b"back\n")
    wait_file(path, lambda b: b == b"before\nback\n", "back in the trace file")
    assert m.metric(DROPPED, port="dut", trace=str(path), reason="disk") == total
    info = trace_info(m, path)
    assert info["dropped_disk"] == total and info["dropped_backlog"] == 0
    log = m.log()
    assert sum("its bytes are dropped" in line for line in log.splitlines()) == 1, log
    assert "writes again" in log
    # And a second failure is logged again, once.
    logs.rename(away)
    reopen(m)
    send(pty_device, reader, b"gone again\n")
    m.wait_metric(DROPPED, total + 11, port="dut", trace=str(path), reason="disk")
    wait_for(lambda: m.log().count("its bytes are dropped") == 2, 5, "the second failure logged")


def test_a_fifo_with_no_reader_neither_blocks_nor_stops_the_trace(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """A trace whose open would block (a FIFO nobody reads yet): muxd starts,
    counts the loss, and writes once a reader comes."""
    path = tmp_path / "dut.fifo"
    os.mkfifo(path)
    m, reader = start_traced(muxd, tmp_path, pty_device, {"path": str(path), "format": "raw"})
    send(pty_device, reader, b"nobody reads\n")
    m.wait_metric(DROPPED, 13, port="dut", trace=str(path), reason="disk")

    fifo = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        send(pty_device, reader, b"now somebody does\n")
        got = bytearray()

        def more() -> bool:
            with suppress(BlockingIOError):
                got.extend(os.read(fifo, 4096))
            return got.endswith(b"now somebody does\n")

        wait_for(more, 10, "the trace through the FIFO")
        assert bytes(got) == b"now somebody does\n"
    finally:
        os.close(fifo)
    assert m.port_info()["state"] == "up"


# -- file modes ---------------------------------------------------------------------------------


# A group the trace may hand its file to: any gid as root, else one of ours.
OTHER_GID = 4321 if os.geteuid() == 0 else max(os.getgroups() or [os.getegid()])


def test_new_files_get_the_configured_mode(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    default, private = tmp_path / "default.log", tmp_path / "private.log"
    rotated = tmp_path / "rotated.log"
    with umask(0o077):  # the mode is the config's, whatever the umask muxd inherits
        m, reader = start_traced(
            muxd,
            tmp_path,
            pty_device,
            {"path": str(default)},
            {"path": str(private), "mode": 0o600, "group": OTHER_GID},
            {"path": str(rotated), "format": "raw", "rotate": "64KiB", "keep": 1, "mode": "0644"},
        )
    send(pty_device, reader, b"x" * (80 * KiB))
    wait_caught_up(m, rotated)
    assert trace_info(m, rotated)["rotations"] >= 1
    assert stat.S_IMODE(default.stat().st_mode) == 0o640
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.stat().st_gid == OTHER_GID
    assert default.stat().st_gid == os.getegid()
    assert stat.S_IMODE(rotated.stat().st_mode) == 0o644
    assert stat.S_IMODE(rotated.with_name("rotated.log.1").stat().st_mode) == 0o644


def test_an_existing_file_is_appended_to(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    path = tmp_path / "dut.log"
    path.write_bytes(b"from the last run\n")
    path.chmod(0o600)
    _, reader = start_traced(muxd, tmp_path, pty_device, {"path": str(path), "format": "raw"})
    send(pty_device, reader, b"this run\n")
    wait_file(path, lambda b: b == b"from the last run\nthis run\n", "appended")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # an operator's chmod stays


# -- the daemon's life: stop and reload -------------------------------------------------------------


def test_what_came_before_a_stop_is_in_the_trace(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    path = tmp_path / "dut.jsonl"
    m, reader = start_traced(muxd, tmp_path, pty_device, {"path": str(path), "format": "jsonl"})
    send(pty_device, reader, b"last words\n")  # muxd has it: a reader got it
    m.signal(signal.SIGTERM)  # sooner than the trace's timer
    assert m.wait_exit() == 0
    records = jsonl(path.read_bytes())
    assert rx_data(records) == b"last words\n"
    assert records[-1]["event"] == "upstream" and records[-1]["state"] == "down", records


def test_a_reload_adds_and_removes_traces(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    m, reader = start_traced(muxd, tmp_path, pty_device, {"path": str(first), "format": "raw"})
    send(pty_device, reader, b"one\n")
    port = dict(m.data["ports"][0])
    port["trace"] = [{"path": str(second), "format": "raw"}]
    m.rewrite([port])
    m.signal(signal.SIGHUP)
    wait_for(lambda: [t["path"] for t in m.port_info()["traces"]] == [str(second)], 10, "the new trace")
    send(pty_device, reader, b"two\n")
    wait_file(second, lambda b: b == b"two\n", "two in the new trace")
    assert first.read_bytes() == b"one\n"  # written whole before it closed
    assert m.port_info()["clients"] == 1  # a trace is no client


def test_a_quiet_port_arms_no_trace_timer(tmp_path: Path) -> None:
    """Idle is free: a trace's flush timer is armed only while bytes wait, so
    128 quiet ports cost no wake-ups (in process: the reactor's timer heap)."""
    from muxd.config import TraceFile
    from muxd.hub import Hub, PortBounds
    from muxd.reactor import Reactor
    from muxd.trace import Trace

    reactor = Reactor()
    bounds = PortBounds(
        log_capacity=64 * 1024, write_queue=4096, max_line=4096, history=4096, formats=("jsonl",)
    )
    hub = Hub("quiet", bounds, reactor)
    path = tmp_path / "quiet.jsonl"
    trace = Trace(TraceFile(str(path), format="jsonl"), hub, reactor)
    trace.start()
    try:
        assert reactor.timer_count == 0  # nothing pending: no timer
        hub.publish(b"boot ok\n")
        deadline = time.monotonic() + 5
        while b"boot ok" not in path.read_bytes():
            assert time.monotonic() < deadline, "the trace never wrote the line"
            reactor.run_once(0.05)
        while reactor.timer_count and time.monotonic() < deadline:
            reactor.run_once(0.05)  # the written-out timer pops; none is armed again
        assert reactor.timer_count == 0
    finally:
        trace.stop()
