"""Listener formats (raw, text, jsonl), history on connect and gap markers, end
to end: muxd as a subprocess on a pty device, read by plain sockets, pyserial
(rfc2217:// and the pty listener) and the `websockets` client library.

The device stream is sequence-numbered (``seq 000123\\n``, 11 bytes a line),
so every reader's output can be checked against exactly what was written:
what it got is a slice of the stream (no gap, no duplicate), and where it lost
bytes, a gap record stands at that very offset and says how many.
"""

from __future__ import annotations

import datetime
import json
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import serial
from websockets.sync.client import connect as ws_connect

from muxd.hub import Hub, PortBounds, Reader, ReaderPolicy
from muxd.reactor import Reactor
from muxd.records import Format
from tests.helpers import (
    AUTO,
    IdleOwner,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    start_on_pty,
    stuck_reader,
    wait_for,
)

LINE = 11  # len(b"seq 000123\n")
STAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) ")
MARKER = re.compile(rb"^(?:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z )?-- muxd: (\d+) bytes lost --\r?$")


def seq(i: int) -> bytes:
    return b"seq %06d\n" % i


def seq_stream(a: int, b: int) -> bytes:
    return b"".join(seq(i) for i in range(a, b))


def parse_stamp(text: bytes) -> float:
    when = datetime.datetime.strptime(text.decode(), "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


# -- readers that take a format apart into (device bytes, gaps) ------------------------------------


class Decoded:
    """What a reader got, taken apart: the device bytes in order, and each gap
    as (offset into those bytes where it stands, bytes lost)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.gaps: list[tuple[int, int]] = []
        self.times: list[float] = []


class StreamReader:
    """A socket reader of one format, decoding as bytes come (bounded in time and size)."""

    def __init__(self, sock: socket.socket, fmt: str) -> None:
        self.sock = sock
        self.fmt = fmt
        self.buf = bytearray()
        self.out = Decoded()
        self.records: list[dict[str, Any]] = []

    def _decode(self) -> None:
        if self.fmt == "raw":
            self._decode_raw()
            return
        while (nl := self.buf.find(b"\n")) >= 0:
            line = bytes(self.buf[: nl + 1])
            del self.buf[: nl + 1]
            if self.fmt == "jsonl":
                self._jsonl(line)
            else:
                self._text(line)

    def _jsonl(self, line: bytes) -> None:
        record = json.loads(line.decode("utf-8"))  # every line is one JSON object, in valid UTF-8
        self.records.append(record)
        self.out.times.append(record["t"])
        if record.get("event") == "gap":
            self.out.gaps.append((len(self.out.data), record["bytes"]))
        elif "event" not in record:
            assert record["dir"] == "rx" and record["port"] == "dut", record
            self.out.data += record["data"].encode("utf-8", "surrogateescape")

    def _text(self, line: bytes) -> None:
        marker = MARKER.match(line.rstrip(b"\n"))
        if marker:
            self.out.gaps.append((len(self.out.data), int(marker.group(1))))
            return
        stamped = STAMP.match(line)
        if stamped:
            self.out.times.append(parse_stamp(stamped.group(1)))
            line = line[stamped.end() :]
        else:  # only the very first line may be the rest of a line begun before
            assert not self.out.data and not self.out.gaps, f"a line without a stamp: {line!r}"
        self.out.data += line

    def _decode_raw(self) -> None:
        # Raw with notices: a marker is a line of its own ("-- muxd: N bytes lost --\r\n"),
        # after "\r\n" of muxd's own where the stream stood inside a line (the streams
        # here have no CR, so a CRLF before a marker is always muxd's).
        while True:
            at = self.buf.find(b"-- muxd: ")
            if at < 0:  # hold back only what may begin a marker
                head = b"-- muxd: "
                held = next((k for k in range(len(head) - 1, 0, -1) if self.buf.endswith(head[:k])), 0)
                self.out.data += self.buf[: len(self.buf) - held]
                del self.buf[: len(self.buf) - held]
                return
            end = self.buf.find(b"\r\n", at)
            if end < 0:
                self.out.data += self.buf[:at]
                del self.buf[:at]
                return
            marker = MARKER.match(bytes(self.buf[at:end]))
            assert marker, bytes(self.buf[at : end + 2])
            self.out.data += self.buf[:at]
            if self.out.data.endswith(b"\r\n"):
                del self.out.data[-2:]
            else:
                assert not self.out.data or self.out.data.endswith(b"\n"), (
                    f"a marker inside a line: {bytes(self.out.data[-20:] + self.buf[at : end + 2])!r}"
                )
            self.out.gaps.append((len(self.out.data), int(marker.group(1))))
            del self.buf[: end + 2]

    def read_until(
        self, done: Callable[[Decoded], bool], timeout: float = 10.0, limit: int = 64 << 20
    ) -> Decoded:
        deadline = time.monotonic() + timeout
        received = 0
        while not done(self.out):
            left = deadline - time.monotonic()
            assert left > 0 and received < limit, (
                f"{self.fmt}: timed out; got {len(self.out.data)} bytes ending {bytes(self.out.data[-60:])!r}"
            )
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            assert chunk, f"{self.fmt}: EOF; got {bytes(self.out.data[-60:])!r}"
            received += len(chunk)
            self.buf += chunk
            self._decode()
        return self.out


def ends_with(tail: bytes) -> Callable[[Decoded], bool]:
    return lambda out: out.data.endswith(tail)


def read_serial_until(port: serial.Serial, tail: bytes, timeout: float = 10.0) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        if buf.endswith(tail):
            return bytes(buf)
        assert time.monotonic() < deadline, f"serial: timed out; got {bytes(buf[-60:])!r}"
        buf += port.read(max(1, port.in_waiting))
    raise AssertionError("serial: too many reads")


def device_read(m: Muxd) -> float:
    return m.metric("muxd_device_read_bytes_total")


def write_and_wait(m: Muxd, dev: PtyDevice, data: bytes) -> None:
    """Write to the device and wait until muxd has read it all."""
    before = device_read(m)
    dev.write(data)
    m.wait_metric("muxd_device_read_bytes_total", before + len(data))


# -- formats --------------------------------------------------------------------------------------


def test_jsonl_and_text_readers_give_back_every_byte_with_stamps(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(
        muxd,
        tmp_path,
        pty_device,
        [{"tcp": AUTO, "format": "jsonl"}, {"tcp": AUTO, "format": "text"}],
    )
    jsonl = StreamReader(connect(m.port(0)), "jsonl")
    text = StreamReader(connect(m.port(1)), "text")
    m.wait_connected(2)
    before = time.time()
    parts = [
        b"boot ok\r\n",
        "h\u00e9llo \u00fcn\u00efcode \u2713\n".encode(),
        b"bad \xff\xfe bytes \xc3",  # 0xC3 starts a character the next write ends
        b"\xa9 and \x80 alone\n",
        bytes(range(256)),
        b"\nprompt> ",
    ]
    for part in parts:
        write_and_wait(m, pty_device, part)  # separate device reads: records split mid-line
    jsonl.read_until(ends_with(b"prompt> "))  # a prompt comes at once, before any newline
    pty_device.write(b"end\n")
    written = b"".join(parts) + b"end\n"
    after = time.time()

    out = jsonl.read_until(ends_with(b"end\n"))
    assert bytes(out.data) == written  # exact, non-UTF-8 bytes included
    assert out.times == sorted(out.times) and before - 1 <= out.times[0] and out.times[-1] <= after + 1
    assert all(set(r) == {"t", "port", "dir", "data"} for r in jsonl.records)
    assert len(jsonl.records) >= len(parts)  # a prompt is not held until a newline comes

    out = text.read_until(ends_with(b"end\n"))
    assert bytes(out.data) == written
    assert out.times == sorted(out.times) and before - 1 <= out.times[0] and out.times[-1] <= after + 1
    assert not out.gaps


def test_a_text_line_is_stamped_with_the_arrival_of_its_first_byte(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(muxd, tmp_path, pty_device, [{"tcp": AUTO, "format": "text"}])
    sock = connect(m.port(0))
    m.wait_connected(1)
    write_and_wait(m, pty_device, b"first half, ")
    first = time.time()
    # Some time passes, measured by the clock, not slept: the line's stamp stays the first byte's.
    wait_for(lambda: time.time() - first > 0.05, what="50 ms to pass")
    pty_device.write(b"second half\nnext\n")
    reader = StreamReader(sock, "text")
    reader.read_until(ends_with(b"next\n"))
    assert bytes(reader.out.data) == b"first half, second half\nnext\n"
    t_line, t_next = reader.out.times
    assert t_line <= first + 0.001 and t_next >= first + 0.04


# -- history plus live ----------------------------------------------------------------------------


class SeqWriter(threading.Thread):
    """Writes the sequence-numbered stream to the device, a few lines at a time,
    until told to finish; then writes `tail_lines` more. Bounded in lines and time."""

    def __init__(self, dev: PtyDevice, start: int, tail_lines: int = 300, max_lines: int = 40_000) -> None:
        super().__init__(daemon=True)
        self.dev = dev
        self.next = start
        self.tail_lines = tail_lines
        self.max_lines = max_lines
        self.finish = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 30
        try:
            while not self.finish.is_set() and self.next < self.max_lines and time.monotonic() < deadline:
                self.dev.write(seq_stream(self.next, self.next + 3))
                self.next += 3
                select.select([], [], [], 0.001)  # a pace for the stream, not a synchronisation
            end = self.next + self.tail_lines
            for i in range(self.next, end, 3):
                self.dev.write(seq_stream(i, min(i + 3, end)))
                select.select([], [], [], 0.001)
            self.next = end
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def written(self) -> int:
        """Lines written so far (read from the test thread: an int is read whole)."""
        return self.next


HISTORY_LINES = 40
HISTORY_SIZE = 1500  # not a multiple of a line: the replay starts mid-line


def test_history_then_live_has_no_gap_and_no_duplicate_at_the_seam(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, serial_ports: list[serial.Serial]
) -> None:
    kinds: list[tuple[str, str, dict[str, Any]]] = []
    for fmt in ("raw", "text", "jsonl"):
        kinds.append(("tcp", fmt, {"history_lines": HISTORY_LINES}))
        kinds.append(("tcp", fmt, {"history": HISTORY_SIZE}))
    kinds.append(("rfc2217", "raw", {"history_lines": HISTORY_LINES}))
    kinds.append(("rfc2217", "raw", {"history": HISTORY_SIZE}))
    kinds.append(("pty", "raw", {"history_lines": HISTORY_LINES}))
    kinds.append(("pty", "raw", {"history": HISTORY_SIZE}))
    listeners: list[dict[str, Any]] = []
    for i, (kind, fmt, hist) in enumerate(kinds):
        lst: dict[str, Any] = {"name": f"l{i}", "buffer": "1MiB", **hist}
        if kind == "rfc2217":
            lst["mode"] = "rw"  # pyserial sets the line settings on open: the owner may
        if kind == "pty":
            lst["pty"] = str(tmp_path / f"ttyMUX{i}")
        else:
            lst[kind] = AUTO
        if fmt != "raw":
            lst["format"] = fmt
        listeners.append(lst)
    m = start_on_pty(muxd, tmp_path, pty_device, listeners)
    write_and_wait(m, pty_device, seq_stream(0, 1000))

    writer = SeqWriter(pty_device, 1000)
    writer.start()
    readers: list[tuple[str, str, dict[str, Any], Any, int]] = []
    try:
        for i, (kind, fmt, hist) in enumerate(kinds):
            moved_on = 1000 + 30 * i
            wait_for(lambda: writer.written() > moved_on, what="the stream to move on")  # noqa: B023
            if kind == "tcp":
                handle: Any = StreamReader(connect(m.port(i)), fmt)
            elif kind == "rfc2217":
                handle = serial.serial_for_url(f"rfc2217://127.0.0.1:{m.port(i)}", baudrate=115200, timeout=5)
                serial_ports.append(handle)
            else:
                handle = serial.Serial(listeners[i]["pty"], 115200, timeout=5)
                serial_ports.append(handle)
            m.wait_connected(i + 1)
            # muxd attached the reader at or before this many lines of the stream
            readers.append((kind, fmt, hist, handle, writer.written()))
    finally:
        writer.finish.set()
        writer.join(40)
    assert writer.error is None and not writer.is_alive()
    total = writer.written()
    assert total > readers[-1][4], "the stream went on after the last reader came"
    stream = seq_stream(0, total)
    last = seq(total - 1)

    for kind, fmt, hist, handle, attached_by in readers:
        what = f"{kind} {fmt} {hist}"
        if isinstance(handle, StreamReader):
            out = handle.read_until(ends_with(last))
            assert not out.gaps, what
            got = bytes(out.data)
        else:
            got = read_serial_until(handle, last)
        assert stream.endswith(got), f"{what}: not one slice of the stream (a gap or a duplicate)"
        # History reached at least as far back as asked from where muxd attached it.
        owed = (total - attached_by) * LINE
        if kind == "rfc2217":
            # pyserial's rfc2217:// open ends with reset_input_buffer(): it purges
            # (PURGE-DATA) and drops what it already got, history included.
            assert len(got) >= owed, what
        elif "history" in hist:
            assert len(got) >= owed + HISTORY_SIZE, what
        else:
            assert len(got) >= owed + (HISTORY_LINES - 1) * LINE, what
        # ...and not much further: a record reader starts at a line start at most a line early.
        assert len(got) <= (total - 1000) * LINE + HISTORY_SIZE + HISTORY_LINES * LINE, what
        if kind == "tcp" and fmt != "raw" and "history_lines" in hist:
            assert got[:4] == b"seq ", f"{what}: history in lines starts at a line: {got[:20]!r}"


def test_history_lines_in_every_format_on_a_quiet_stream(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """One device read holds many lines: a record reader asking for 3 gets 3."""
    listeners = [{"tcp": AUTO, "format": fmt, "history_lines": 3} for fmt in ("raw", "text", "jsonl")]
    listeners.append({"tcp": AUTO, "format": "jsonl", "history": 2 * LINE + 4})
    m = start_on_pty(muxd, tmp_path, pty_device, listeners)
    write_and_wait(m, pty_device, seq_stream(0, 100))
    readers = [StreamReader(connect(m.port(i)), str(lst["format"])) for i, lst in enumerate(listeners)]
    m.wait_connected(len(readers))
    pty_device.write(seq(100))
    for reader in readers[:3]:
        out = reader.read_until(ends_with(seq(100)))
        assert bytes(out.data) == seq_stream(97, 101), reader.fmt
    # In bytes, a record reader gets the lines that hold them (whole lines: records are not cut).
    out = readers[3].read_until(ends_with(seq(100)))
    assert bytes(out.data) == seq_stream(97, 101)


# -- gap markers ----------------------------------------------------------------------------------


def check_gaps(out: Decoded, stream: bytes, lead_lf: bool = False) -> int:
    """Every byte the reader got is where it was in the stream, and every jump
    is a gap record of exactly the bytes skipped; return the bytes lost.

    With ``lead_lf`` (text), a marker that comes inside a line is put on a line
    of its own: the LF before it may be muxd's, not the device's (the one case
    where both readings fit, a line cut just before its LF, is settled by
    where the next piece must stand)."""
    data = bytes(out.data)
    bounds = [*out.gaps, (len(data), 0)]
    pieces = [data[(bounds[i - 1][0] if i else 0) : at] for i, (at, _) in enumerate(bounds)]

    def fits(i: int, pos: int) -> bool:
        if i == len(pieces):
            return pos == len(stream)
        piece, n = pieces[i], bounds[i][1]
        if stream[pos : pos + len(piece)] == piece and fits(i + 1, pos + len(piece) + n):
            return True
        cut = piece[:-1]
        return bool(
            lead_lf
            and n
            and piece.endswith(b"\n")
            and stream[pos : pos + len(cut)] == cut
            and fits(i + 1, pos + len(cut) + n)
        )

    assert len(pieces) < 500, "too many gaps to check"
    assert fits(0, 0), f"the pieces and gaps do not make up the stream: gaps {out.gaps[:10]}"
    return sum(n for _, n in out.gaps)


@pytest.mark.parametrize("fmt", ["jsonl", "text", "raw"])
def test_a_gap_marker_stands_exactly_where_a_stuck_reader_lost_bytes(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, fmt: str
) -> None:
    lst: dict[str, Any] = {"tcp": AUTO, "name": "slow", "buffer": "4KiB", "overflow": "drop-oldest"}
    if fmt == "raw":
        lst["notices"] = True
    else:
        lst["format"] = fmt
    m = start_on_pty(muxd, tmp_path, pty_device, [lst, {"tcp": AUTO, "name": "fast"}])
    fast = StreamReader(connect(m.port(1)), "raw")
    slow = stuck_reader(m.port(0), rcvbuf=4096)
    m.wait_connected(2)
    dropped_before = m.metric("muxd_client_dropped_bytes_total", listener="slow")
    # A flood in several bursts, each read fully by muxd, while the slow reader reads nothing.
    lines = 30_000
    for a in range(0, lines, 3000):
        write_and_wait(m, pty_device, seq_stream(a, a + 3000))
        fast.read_until(ends_with(seq(a + 2999)), limit=1 << 30)
    m.wait_metric("muxd_client_dropped_bytes_total", dropped_before + 1, listener="slow")
    # Then it reads, and the stream goes on.
    pty_device.write(seq(lines))
    stream = seq_stream(0, lines + 1)
    out = StreamReader(slow, fmt).read_until(ends_with(seq(lines)), timeout=20)
    slow.close()
    m.wait_connected(1)
    lost = check_gaps(out, stream, lead_lf=fmt == "text")
    assert out.gaps and lost > 0
    dropped = m.metric("muxd_client_dropped_bytes_total", listener="slow") - dropped_before
    assert lost == dropped
    assert m.metric("muxd_client_dropped_bytes_total", listener="fast") == 0
    assert bytes(fast.read_until(ends_with(seq(lines))).data) == stream


# -- WebSocket ------------------------------------------------------------------------------------


def test_a_websocket_reader_gets_jsonl_records_as_text_frames(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(muxd, tmp_path, pty_device, [{"websocket": True}])
    write_and_wait(m, pty_device, seq_stream(0, 50) + b"\xffraw\n")
    with ws_connect(f"ws://{m.http}/ws/dut?format=jsonl&history_lines=3", open_timeout=5) as conn:
        m.wait_connected(1)
        pty_device.write(b"live\n")
        got = bytearray()
        deadline = time.monotonic() + 10
        while not got.endswith(b"live\n"):
            left = deadline - time.monotonic()
            assert left > 0, f"got {bytes(got)!r}"
            msg = conn.recv(timeout=left)
            assert isinstance(msg, str), "jsonl records come as text frames"
            for line in msg.splitlines():
                record = json.loads(line)
                assert record["port"] == "dut" and record["dir"] == "rx", record
                got += record["data"].encode("utf-8", "surrogateescape")
        assert bytes(got) == seq_stream(48, 50) + b"\xffraw\nlive\n"


def test_websocket_text_format_is_binary_frames_of_stamped_lines(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(muxd, tmp_path, pty_device, [{"websocket": True}])
    write_and_wait(m, pty_device, seq_stream(0, 10))
    with ws_connect(f"ws://{m.http}/ws/dut?format=text&history=22", open_timeout=5) as conn:
        m.wait_connected(1)
        buf = bytearray()
        deadline = time.monotonic() + 10
        while buf.count(b"\n") < 2:
            left = deadline - time.monotonic()
            assert left > 0, bytes(buf)
            msg = conn.recv(timeout=left)
            assert isinstance(msg, bytes)
            buf += msg
    lines = bytes(buf).splitlines()
    assert [STAMP.sub(b"", line, count=1) for line in lines] == [b"seq 000008", b"seq 000009"]
    assert all(STAMP.match(line) for line in lines)


# -- in process: the hub's record readers at the edges ---------------------------------------------


class Taker(IdleOwner):
    """A record reader that takes everything it is offered, when asked."""

    def __init__(self) -> None:
        self.got = bytearray()
        self.reader: Reader | None = None

    def take_all(self, hub: Hub) -> None:
        assert self.reader is not None
        for _ in range(10_000):
            views = hub.pending(self.reader)
            if not views:
                return
            data = b"".join(views)
            self.got += data
            hub.advance(self.reader, len(data))
        raise AssertionError("never caught up")


def _hub(formats: tuple[Format, ...] = ("text", "jsonl")) -> Hub:
    return Hub("p", PortBounds(4096, 1024, 64, 4096, formats=formats), Reactor())


def _attach(hub: Hub, fmt: Format, capacity: int = 4096, **history: int) -> tuple[Taker, Reader]:
    taker = Taker()
    policy = ReaderPolicy("l", capacity, True, writable=False, lines=False, notices=False, format=fmt)
    taker.reader = hub.attach(taker, policy, "t", **history)
    return taker, taker.reader


def _unstamped(got: bytes) -> list[bytes]:
    lines = got.split(b"\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert STAMP.match(line), f"a line without its stamp: {line!r}"
    return [STAMP.sub(b"", line, count=1) for line in lines[:-1]]


def test_a_text_gap_inside_a_line_gets_a_line_of_its_own_and_the_line_goes_on_stamped() -> None:
    hub = _hub()
    taker, reader = _attach(hub, "text", capacity=100)
    hub.publish(b"begun ")
    taker.take_all(hub)
    hub.set_blocked(reader, True)
    for _ in range(30):
        hub.publish(b"0123456789")
    hub.publish(b" ended\n")
    hub.set_blocked(reader, False)
    taker.take_all(hub)
    lines = _unstamped(bytes(taker.got))
    assert lines[0] == b"begun "
    assert lines[1] == b"-- muxd: %d bytes lost --" % reader.dropped and reader.dropped > 0
    assert lines[2].endswith(b"0123456789 ended") and len(lines) == 3
    assert reader.delivered + reader.dropped == reader.cursor - reader.start == 6 + 300 + 7


def test_a_text_notice_inside_a_line_gets_a_line_of_its_own() -> None:
    hub = _hub()
    taker, _ = _attach(hub, "text")
    hub.publish(b"prompt> ")
    hub.notice("upstream down", event="upstream", state="down")
    hub.publish(b"typed\n")
    taker.take_all(hub)
    assert _unstamped(bytes(taker.got)) == [b"prompt> ", b"-- muxd: upstream down --", b"typed"]


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
def test_history_lines_from_inside_one_device_read(fmt: Format) -> None:
    hub = _hub()
    hub.publish(seq_stream(0, 10))  # one chunk of ten lines
    taker, reader = _attach(hub, fmt, history_lines=3)
    hub.publish(seq(10))
    taker.take_all(hub)
    if fmt == "text":
        assert b"".join(line + b"\n" for line in _unstamped(bytes(taker.got))) == seq_stream(7, 11)
    else:
        assert [json.loads(x)["data"] for x in taker.got.splitlines()] == [
            f"seq {i:06d}\n" for i in range(7, 11)
        ]
    assert reader.delivered == reader.cursor - reader.start == 4 * LINE


def test_a_text_replay_that_starts_inside_a_line_starts_with_its_stamp() -> None:
    hub = _hub()
    hub.publish(b"one line ")
    hub.publish(b"goes on\n")
    taker, _ = _attach(hub, "text", history=4)  # inside the second chunk, which has no line start
    taker.take_all(hub)
    assert _unstamped(bytes(taker.got)) == [b"goes on"]


def test_a_format_only_a_connection_asked_for_is_encoded_while_it_reads() -> None:
    hub = _hub(formats=("text",))
    hub.publish(b"before\n")
    taker, reader = _attach(hub, "jsonl", history_lines=1)
    taker.take_all(hub)
    assert json.loads(taker.got)["data"] == "before\n"  # the past, replayed for the new format
    assert set(hub.records.logs) == {"text", "jsonl"}
    hub.detach(reader, "peer closed")
    assert set(hub.records.logs) == {"text"}  # the configured one stays


def test_record_times_never_go_back_when_the_clock_is_stepped_back(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = _hub()
    taker, _ = _attach(hub, "jsonl")
    clock = iter([1000.0, 990.0, 995.0, 1001.0])
    monkeypatch.setattr("muxd.hub.time.time", lambda: next(clock))
    for line in (b"a\n", b"b\n", b"c\n", b"d\n"):
        hub.publish(line)
    taker.take_all(hub)
    assert [json.loads(x)["t"] for x in taker.got.splitlines()] == [1000.0, 1000.0, 1000.0, 1001.0]


def test_an_event_for_one_reader_stands_where_it_happened_in_its_stream_only() -> None:
    hub = _hub()
    one, a = _attach(hub, "jsonl")
    other, _ = _attach(hub, "jsonl")
    hub.publish(b"before\n")
    hub.notice_to(a, "trace reopened", event="reopen", reason="reload")
    hub.insert(a, b'{"dir":"tx"}\n')
    hub.publish(b"after\n")
    one.take_all(hub)
    other.take_all(hub)
    records = [json.loads(x) for x in one.got.splitlines()]
    assert [r.get("data") or r.get("event") or r["dir"] for r in records] == [
        "before\n",
        "reopen",
        "tx",
        "after\n",
    ]
    assert records[1]["reason"] == "reload"
    assert [json.loads(x)["data"] for x in other.got.splitlines()] == ["before\n", "after\n"]
