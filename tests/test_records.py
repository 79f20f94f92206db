"""Stamped records (text, jsonl), the shared framed log, history and gap markers,
in-process: the encoders fed whole, byte by byte and split anywhere; the hub
with record readers that take what they are given."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muxd.hub import Hub, PortBounds, Reader, ReaderPolicy
from muxd.reactor import Reactor
from muxd.records import Arrivals, Format, FramedLog, JsonlEncoder, TextEncoder, stamp

STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


def test_stamp_is_iso8601_utc_with_milliseconds() -> None:
    assert stamp(0.5) == "1970-01-01T00:00:00.500Z"
    assert stamp(1764609000.1239) == "2025-12-01T17:10:00.123Z"


def test_text_stamps_each_line_with_the_arrival_of_its_first_byte() -> None:
    enc = TextEncoder("p")
    out = enc.data(b"one\ntw", 1.0) + enc.data(b"o\nthree\n", 2.0) + enc.data(b"four", 3.0)
    assert out.split(b"\n") == [
        b"1970-01-01T00:00:01.000Z one",
        b"1970-01-01T00:00:01.000Z two",
        b"1970-01-01T00:00:02.000Z three",
        b"1970-01-01T00:00:03.000Z four",
    ]


def test_text_event_starts_a_line_of_its_own() -> None:
    enc = TextEncoder("p")
    assert enc.data(b"partial", 1.0).endswith(b"partial")
    assert enc.event(2.0, "7 bytes lost") == b"\n1970-01-01T00:00:02.000Z -- muxd: 7 bytes lost --\n"


def _joined(records: bytes) -> bytes:
    lines = records.splitlines()
    return b"".join(json.loads(line)["data"].encode("utf-8", "surrogateescape") for line in lines)


@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=20))
def test_jsonl_gives_back_the_exact_bytes_however_they_are_split(data: bytes, cuts: list[int]) -> None:
    enc = JsonlEncoder("p")
    out, pos = bytearray(), 0
    for n in [*cuts, len(data)]:
        out += enc.data(data[pos : pos + n], 5.0)
        pos += n
        if pos >= len(data):
            break
    out += enc.data(data[pos:], 5.0)
    for line in out.splitlines():
        record = json.loads(line)  # every line parses; valid UTF-8 (bytes.decode above)
        assert set(record) == {"t", "port", "dir", "data"} and record["dir"] == "rx"
    out.decode("utf-8")
    # A multi-byte character split at the very end is held, so compare what was released.
    assert data.startswith(_joined(bytes(out)))
    assert len(data) - len(_joined(bytes(out))) <= 3


def test_jsonl_one_record_per_line_and_the_partial_line_at_once() -> None:
    enc = JsonlEncoder("p")
    lines = enc.data(b"a\r\nb\nprompt> ", 7.25).splitlines()
    assert [json.loads(x)["data"] for x in lines] == ["a\r\n", "b\n", "prompt> "]
    assert all(json.loads(x)["t"] == 7.25 for x in lines)


def test_framed_log_indexes_whole_chunks() -> None:
    log = FramedLog("jsonl", "p", raw_capacity=1024)
    log.append(0, b"x\n", 1.0)
    log.append(2, b"yy\n", 2.0)
    log.append(5, b"z\n", 3.0)
    views, end = log.views(2, 8, limit=1)  # at least one chunk
    assert end == 5 and json.loads(b"".join(views))["data"] == "yy\n"
    views, end = log.views(0, 5, limit=1 << 20)  # stops at a notice's offset
    assert end == 5 and len(b"".join(views).splitlines()) == 2
    assert log.boundary_after(1) == 2 and log.boundary_before(4) == 2 and log.boundary_before(5) == 5


class Taker:
    """A record reader that takes everything it is offered, when asked."""

    def __init__(self) -> None:
        self.got = bytearray()
        self.reader: Reader | None = None
        self.closed: str | None = None

    def take_all(self, hub: Hub) -> None:
        assert self.reader is not None
        while views := hub.pending(self.reader):
            data = b"".join(views)
            self.got += data
            hub.advance(self.reader, len(data))

    def on_data(self) -> None:
        pass

    def on_write_room(self) -> None:
        pass

    def close(self, reason: str) -> None:
        self.closed = reason


def _hub(history: int = 4096, capacity: int = 4096) -> Hub:
    return Hub("p", PortBounds(capacity, 1024, 64, history, formats=("jsonl",)), Reactor())


def _policy(fmt: Format = "jsonl", capacity: int = 4096) -> ReaderPolicy:
    return ReaderPolicy("l", capacity, True, writable=False, lines=False, notices=False, format=fmt)


def test_history_then_live_has_no_gap_and_no_duplicate_at_the_seam() -> None:
    hub = _hub()
    for i in range(40):
        hub.publish(f"line {i:03d}\n".encode())
    late = Taker()
    late.reader = hub.attach(late, _policy(), "t", history_lines=10)
    for i in range(40, 50):
        hub.publish(f"line {i:03d}\n".encode())
    late.take_all(hub)
    data = [json.loads(x)["data"] for x in late.got.splitlines()]
    assert data == [f"line {i:03d}\n" for i in range(30, 50)]
    ts = [json.loads(x)["t"] for x in late.got.splitlines()]
    assert ts == sorted(ts)  # replayed records keep their original times


def test_raw_history_lines() -> None:
    hub = _hub()
    hub.publish(b"a\nb\nc\npartial")
    t = Taker()
    t.reader = hub.attach(t, _policy("raw"), "t", history_lines=2)
    t.take_all(hub)
    assert bytes(t.got) == b"c\npartial"


def test_a_gap_marker_stands_where_a_stuck_jsonl_reader_lost_bytes() -> None:
    hub = _hub(capacity=2048)
    stuck = Taker()
    stuck.reader = hub.attach(stuck, _policy(capacity=200), "t")
    hub.set_blocked(stuck.reader, True)
    for i in range(100):
        hub.publish(f"{i:03d}\n".encode())
    hub.set_blocked(stuck.reader, False)
    stuck.take_all(hub)
    records = [json.loads(x) for x in stuck.got.splitlines()]
    gaps = [r for r in records if r.get("event") == "gap"]
    assert len(gaps) == 1 and records[0] == gaps[0]  # it lost the oldest, then goes on
    assert gaps[0]["bytes"] == stuck.reader.dropped > 0
    first = int(records[1]["data"])
    assert [int(r["data"]) for r in records[1:]] == list(range(first, 100))
    assert stuck.reader.dropped == first * 4  # device bytes, not record bytes


def test_a_format_first_asked_for_later_replays_the_past_with_its_times() -> None:
    hub = Hub("p", PortBounds(4096, 1024, 64, 4096), Reactor())  # no format kept from the start
    hub.publish(b"one\n")
    hub.publish(b"two\n")
    late = Taker()
    late.reader = hub.attach(late, _policy("jsonl"), "t", history_lines=2)
    hub.publish(b"three\n")
    late.take_all(hub)
    records = [json.loads(x) for x in late.got.splitlines()]
    assert [r["data"] for r in records] == ["one\n", "two\n", "three\n"]
    assert records[0]["t"] <= records[1]["t"] <= records[2]["t"]


@pytest.mark.parametrize(
    "chunk",
    [
        b"boot ok\n",
        b'a"b\\c\td\x00\x1f\n\xff\xfeok\r\npartial',
        "é€😀\n".encode(),
        b"\n\n",
        bytes(range(256)),
    ],
)
def test_jsonl_records_are_what_json_dumps_writes(chunk: bytes) -> None:
    """The encoder builds records from parts (for speed): each must be the
    json.dumps of its dict, strays as \\udcNN, and parse back to the bytes."""
    t = 1764609000.123456789
    got = JsonlEncoder('d"u\\t').data(chunk, t).decode()
    text = chunk.decode("utf-8", "surrogateescape")
    want = "".join(
        json.dumps({"t": round(t, 6), "port": 'd"u\\t', "dir": "rx", "data": line}, separators=(",", ":"))
        + "\n"
        for line in re.findall(r"[^\n]*\n|[^\n]+$", text)
    )
    assert [json.loads(x) for x in got.splitlines()] == [json.loads(x) for x in want.splitlines()]
    assert (
        "".join(json.loads(x)["data"] for x in got.splitlines()).encode("utf-8", "surrogateescape") == chunk
    )


def test_rings_follow_what_readers_lag_not_the_capacity() -> None:
    """A bound is a ceiling: with readers that keep up, a port's raw ring holds
    its history and a trace-only jsonl log (not kept: no listener asks it)
    only what its reader has yet to take, however much passes and however
    large the capacity; a stuck reader still gets its whole backlog."""
    capacity = 1 << 20
    hub = Hub("p", PortBounds(capacity, 1024, 64, 4096), Reactor())
    trace = Taker()
    trace.reader = hub.attach(trace, _policy("jsonl", capacity), "t")
    raw = Taker()
    raw.reader = hub.attach(raw, _policy("raw", capacity), "t")
    line = b"." * 63 + b"\n"
    for _ in range(8192):  # 512 KiB of device bytes, over a MiB of records
        hub.publish(line)
        trace.take_all(hub)
        raw.take_all(hub)
    assert len(raw.got) == 8192 * 64 and trace.got.count(b"\n") == 8192
    assert hub.ring.allocated <= 64 * 1024
    assert trace.reader.log is not None and trace.reader.log.ring.allocated <= 64 * 1024
    stuck = Taker()
    stuck.reader = hub.attach(stuck, _policy("raw", capacity), "t")
    for _ in range(4096):  # 256 KiB it does not take
        hub.publish(line)
    stuck.take_all(hub)
    assert len(stuck.got) == 4096 * 64 and stuck.reader.dropped == 0


def test_arrivals_keep_order_through_compaction() -> None:
    arrivals = Arrivals()
    for i in range(3000):
        arrivals.append(i * 10, i / 8)
    for _ in range(2500):
        arrivals.popleft()  # compacts in bulk on the way
    assert len(arrivals) == 500 and arrivals.offset(1) == 25010
    assert arrivals.items()[0] == (25000, 2500 / 8) and arrivals.items()[-1] == (29990, 2999 / 8)


def test_a_format_first_asked_for_later_replays_more_than_a_ring_page() -> None:
    """The replay that makes a log for a late reader keeps all the history it
    encodes, however much more than the log's first buffer that is."""
    hub = Hub("p", PortBounds(1 << 20, 1024, 64, 64 * 1024), Reactor())  # no format kept
    for i in range(1000):
        hub.publish(b"%063d\n" % i)  # 64,000 bytes
    late = Taker()
    late.reader = hub.attach(late, _policy("jsonl", 1 << 20), "t", history=64 * 1024)
    late.take_all(hub)
    assert [int(json.loads(x)["data"]) for x in late.got.splitlines()] == list(range(1000))
