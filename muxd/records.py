"""Stamped records: the ``text`` and ``jsonl`` formats, encoded once per device chunk.

A reader (a TCP, Unix or WebSocket client, a trace file) may ask for the
device's bytes as records instead of raw:

``text``
    Each line gets an ISO 8601 UTC prefix with milliseconds, the arrival time
    at muxd of the line's first byte: ``2026-12-01T17:10:00.123Z boot ok``.
    A line ends at LF; a lone CR (a progress bar) does not start a new line.

``jsonl``
    One JSON object per line: ``{"t": 1764609000.123, "port": "dut",
    "dir": "rx", "data": "boot ok\\n"}``. ``t`` is Unix seconds, the arrival
    time of the record's first byte. A device chunk that ends inside a line
    gives a record for that part at once (a prompt must not wait for a
    newline), and the line continues in the next record, which carries no
    newline of its own until the line ends: joining the ``data`` fields
    gives back the stream. Bytes that are not UTF-8 are decoded with Python's
    ``surrogateescape`` (PEP 383): byte 0xNN becomes the escape ``\\udcNN``,
    and ``data.encode("utf-8", "surrogateescape")`` gives back the exact
    bytes. A multi-byte character split between two chunks is held (at most
    3 bytes) until complete.

    Events are records too: ``{"t": ..., "port": ..., "event": "gap",
    "bytes": N}`` where a reader lost N device bytes, and ``{"event":
    "upstream", "state": "down", "reason": "..."}`` on a state change.

In text, events are lines of their own: ``<stamp> -- muxd: 1687553 bytes
lost --``. ``text`` readers, ``jsonl`` readers and raw readers with
``notices: true`` all see them where they happened in their stream.

Sharing. The hub keeps one FramedLog per format in use: each device chunk is
encoded once, appended to that format's bounded ring, and every reader of the
format sends the same bytes (muxd.hub). Each record reader has a RecordCursor:
where its replay starts inside the first chunk, which records it was last
given, whether its stream stands inside a line; the hub asks it, and never
looks inside a FramedLog. The encoders here are sans-I/O: bytes and a time
in, bytes out; they hold only the state of the line in progress.

Cost. A format nobody asked for costs nothing: its FramedLog exists only
while a reader (or the config: a listener's, a trace's or the MQTT bridge's
``format``) uses it. A format that only connections asked for (a WebSocket's
``?format=``) is released as soon as its last reader leaves: its records are
never needed for history, since the next reader's log is made again from
the raw ring (which holds the history) with the original arrival times. That
replay covers only the port's history bound, so opening a format costs an
encode of at most ``history`` bytes, never of the whole ring. A FramedLog's
ring, like every Ring, holds only what its readers still need (RecordLogs
says what), up to its bound.

Why this module is long: the encoders, the framed log, the record cursor and
the arrival times are one contract (records addressed by raw device
offsets); split apart, each would reach into the others' internals.
"""

from __future__ import annotations

import codecs
import json
import re
import time
from array import array
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from muxd.ring import Ring

Format = Literal["raw", "text", "jsonl"]
FORMATS: tuple[Format, ...] = ("raw", "text", "jsonl")

# A framed log holds this many times the raw ring's bytes: a jsonl record
# costs about 60 bytes besides its data, so lines of 10 bytes and up fit; a
# device that sends single bytes one chunk at a time can outrun it, and then
# its readers see a counted gap rather than memory without bound.
FRAMED_EXPANSION = 8
# Chunk boundaries kept per framed log, at most: far more than the chunks a
# ring of any configured size holds at serial rates (a 256 KiB ring of
# 64-byte chunks is 4096); older ones go with the bytes they index.
MAX_INDEX = 64 * 1024


def stamp(t: float) -> str:
    """ISO 8601 UTC with milliseconds: 2026-12-01T17:10:00.123Z."""
    whole = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((t - whole) * 1000):03d}Z"


class Encoder:
    """Device chunks in, records out, for one format and one port."""

    # Whether the next byte starts a line (text stamps it); records of other
    # formats stand alone, so for them it is always true.
    at_line_start = True

    def __init__(self, port: str) -> None:
        self.port = port

    def data(self, chunk: bytes, t: float) -> bytes:
        raise NotImplementedError

    def event(
        self,
        t: float,
        text: str,
        *,
        mid_line: bool | None = None,
        resume: float | None = None,
        **fields: object,
    ) -> bytes:
        """An event record: ``text`` is the human line, ``fields`` the JSON.

        Text only: ``mid_line`` says whether the reader's stream stands inside
        a line where the event goes (None: where this encoder is, at the head);
        ``resume``, the stamp for the rest of a line that goes on after it."""
        raise NotImplementedError


class TextEncoder(Encoder):
    def __init__(self, port: str) -> None:
        super().__init__(port)
        self.at_line_start = True

    def data(self, chunk: bytes, t: float) -> bytes:
        prefix = (stamp(t) + " ").encode()
        out = bytearray()
        start, n = 0, len(chunk)
        while start < n:
            if self.at_line_start:
                out += prefix
                self.at_line_start = False
            nl = chunk.find(b"\n", start)
            if nl < 0:
                out += chunk[start:]
                break
            out += chunk[start : nl + 1]
            self.at_line_start = True
            start = nl + 1
        return bytes(out)

    def event(
        self,
        t: float,
        text: str,
        *,
        mid_line: bool | None = None,
        resume: float | None = None,
        **fields: object,
    ) -> bytes:
        # On a line of its own; a line that goes on after it gets a stamp again,
        # so that every line a reader gets starts with one.
        if mid_line is None:
            mid_line = not self.at_line_start
        lead = b"\n" if mid_line else b""
        tail = f"{stamp(resume)} ".encode() if resume is not None else b""
        return lead + f"{stamp(t)} -- muxd: {text} --\n".encode() + tail


class JsonlEncoder(Encoder):
    """Records built from parts: every record of a chunk shares its lead
    (``{"t":...,"port":...,"dir":"rx","data":``), and only each line's string
    goes through the JSON string encoder (C), which is what json.dumps with
    ensure_ascii=False would write for it: the same bytes, about four times
    less CPU than a json.dumps per record (the cost of a jsonl trace)."""

    def __init__(self, port: str) -> None:
        super().__init__(port)
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._port = _json_string(port)

    def data(self, chunk: bytes, t: float) -> bytes:
        text = self._decoder.decode(chunk)
        if not text:
            return b""
        lead = f'{{"t":{round(t, 6)!r},"port":{self._port},"dir":"rx","data":'
        out = "".join([f"{lead}{_json_string(line)}}}\n" for line in _lines(text)])
        if text.isascii():
            return out.encode()
        # Text stays readable UTF-8; only the escaped stray bytes become \udcNN.
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", out).encode()

    def event(
        self,
        t: float,
        text: str,
        *,
        mid_line: bool | None = None,
        resume: float | None = None,
        **fields: object,
    ) -> bytes:
        record = {"t": round(t, 6), "port": self.port, **fields}
        return (json.dumps(record, separators=(",", ":")) + "\n").encode()


_SURROGATE = re.compile("[\udc80-\udcff]")
# json.dumps(str, ensure_ascii=False) without the call's set-up: the C string encoder.
_json_string: Callable[[str], str] = json.encoder.encode_basestring


def _lines(text: str) -> list[str]:
    """Split after each LF only (a CR, a form feed... stays inside its line)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def make_encoder(fmt: Format, port: str) -> Encoder:
    return TextEncoder(port) if fmt == "text" else JsonlEncoder(port)


def raw_event(text: str, mid_line: bool = False) -> bytes:
    """The in-band notice a raw reader with ``notices: true`` gets, on a line
    of its own: ``mid_line`` (the reader's last byte did not end a line) ends
    that line first."""
    lead = "\r\n" if mid_line else ""
    return f"{lead}-- muxd: {text} --\r\n".encode()


class FramedLog:
    """One format's shared encoding of the device stream: a bounded ring of
    records, and where each device chunk's records start.

    Readers of the format keep their cursor in raw device offsets, always at a
    chunk boundary, so backlog, overflow and loss are judged and counted in
    device bytes exactly as for raw readers; they send the records of whole
    chunks, so a record is never cut by a skip.
    """

    def __init__(self, fmt: Format, port: str, raw_capacity: int, history: int = 0) -> None:
        self.format = fmt
        self.encoder = make_encoder(fmt, port)
        self.ring = Ring(raw_capacity * FRAMED_EXPANSION)
        self.ring.low = self._needed
        # The raw history its records must keep for readers to come (0: only
        # what its readers have yet to take), and those readers.
        self.history = history
        self.cursors: set[RecordCursor] = set()
        # (raw offset, framed offset, whether it starts a line, arrival time) at
        # the start of each chunk still held.
        self.index: deque[tuple[int, int, bool, float]] = deque()
        self.raw_head = 0

    def append(self, raw_start: int, chunk: bytes, t: float) -> None:
        self.index.append((raw_start, self.ring.head, self.encoder.at_line_start, t))
        self.ring.write(self.encoder.data(chunk, t))
        self.raw_head = raw_start + len(chunk)
        tail = self.ring.tail
        while self.index and (self.index[0][1] < tail or len(self.index) > MAX_INDEX):
            self.index.popleft()

    def _needed(self) -> int:
        """The oldest framed offset still needed (muxd.ring: Ring.low): the
        records of the chunk each reader stands in, and of the history kept."""
        raw = self.raw_head - self.history if self.history else self.raw_head
        for cursor in self.cursors:
            raw = min(raw, cursor.at)
        i = self._find(raw)
        if i < len(self.index) and self.index[i][0] == raw:
            return self.index[i][1]
        return self.index[i - 1][1] if i > 0 else self.ring.tail

    def _find(self, raw: int) -> int:
        """The index position of the first chunk starting at or after raw."""
        index = self.index
        lo, hi = 0, len(index)
        while lo < hi:
            mid = (lo + hi) // 2
            if index[mid][0] < raw:
                lo = mid + 1
            else:
                hi = mid
        return lo

    @property
    def raw_tail(self) -> int:
        """The oldest raw offset whose records are still held."""
        return self.index[0][0] if self.index else self.raw_head

    def boundary_after(self, raw: int) -> int:
        """The first chunk boundary still held at or after a raw offset."""
        i = self._find(raw)
        return self.index[i][0] if i < len(self.index) else self.raw_head

    def boundary_before(self, raw: int) -> int:
        """The last chunk boundary still held at or before a raw offset."""
        i = self._find(raw)
        if i < len(self.index) and self.index[i][0] == raw:
            return raw
        return self.index[i - 1][0] if i > 0 else self.raw_tail

    def views(self, raw_from: int, raw_stop: int, limit: int) -> tuple[list[memoryview], int]:
        """Records of whole chunks from the boundary raw_from up to raw_stop: at
        most about ``limit`` framed bytes (at least one chunk), and the raw
        offset they end at."""
        index = self.index
        lo = self._find(raw_from)
        if lo == len(index) or index[lo][0] != raw_from or raw_from >= raw_stop:
            return [], raw_from
        start = index[lo][1]
        end_raw, end = self.raw_head, self.ring.head
        for j in range(lo + 1, len(index)):
            if index[j][1] - start >= limit or index[j][0] >= raw_stop:
                end_raw, end = index[j][0], index[j][1]
                break
        return self.ring.views(start, end), end_raw

    def framed_at(self, raw: int) -> int:
        """The framed offset of the records from the chunk boundary at or
        after raw on (the ring's head if none is held)."""
        i = self._find(raw)
        return self.index[i][1] if i < len(self.index) else self.ring.head

    def state_at(self, raw: int) -> tuple[bool, float | None] | None:
        """At a chunk boundary still held: whether the stream stands at a line
        start there, and when that chunk arrived (None at the head: the next
        chunk has yet to come). None if the boundary is no longer known."""
        if raw == self.raw_head:
            return self.encoder.at_line_start, None
        i = self._find(raw)
        if i < len(self.index) and self.index[i][0] == raw:
            return self.index[i][2], self.index[i][3]
        return None

    def line_skip(self, boundary: int, lines: int) -> int:
        """The framed bytes of the chunk at `boundary` that carry its first
        `lines` line ends: a reader that starts after them starts at a line.
        Every LF of the chunk ends exactly one line of its records (text:
        the stamped line; jsonl: the record), and nothing else does. 0 (the
        whole chunk) should the chunk hold fewer."""
        i = self._find(boundary)
        if i == len(self.index) or self.index[i][0] != boundary:
            return 0
        start = self.index[i][1]
        end = self.index[i + 1][1] if i + 1 < len(self.index) else self.ring.head
        framed = self.ring.read(start, end)
        at = -1
        for _ in range(lines):
            at = framed.find(b"\n", at + 1)
            if at < 0:
                return 0
        return at + 1


class RecordCursor:
    """One record reader's place in its format's FramedLog, in the hub's
    terms: the hub keeps the reader's cursor in raw device offsets (always a
    chunk boundary) and asks this object everything about records.

    A replay that starts inside its first chunk, at a line, skips the records
    of the lines before it: ``_skip`` is (that chunk's raw offset, framed
    bytes to skip, raw bytes they carry), until the reader moves past it.
    """

    def __init__(self, log: FramedLog, history: int = 0) -> None:
        self.log = log
        self._history = history  # the port's bound: kept by the log once a reader replays any
        self._skip: tuple[int, int, int] | None = None
        self._end = 0  # the raw offset the records last given end at
        # The reader's cursor as last seen here (begin, taken, skip_to: every
        # move forward but a purge, which only makes it later): what the log must hold.
        self.at = log.raw_tail

    @property
    def tail(self) -> int:
        """The oldest raw offset whose records are still held."""
        return self.log.raw_tail

    def begin(self, start: int, ring: Ring) -> tuple[int, int, bytes | None]:
        """Where a reader's replay that should begin at raw `start` begins:
        (its cursor, the raw offset its first byte stands for, the lead to
        send first, if any). The cursor is a chunk boundary (records are
        whole chunks): the chunk that holds `start`. Within that chunk it
        skips the records of the lines that end before `start`, so it starts
        at the line that holds `start`: N lines asked, N lines given. A
        replay that must begin inside a text line gets that line's stamp."""
        log = self.log
        if start < log.raw_head:  # a reader that replays: readers to come may too
            log.history = max(log.history, self._history)
        boundary = self.at = max(log.raw_tail, log.boundary_before(start))
        if ring.tail <= boundary < start:
            before = ring.read(boundary, start)
            lines = before.count(b"\n")
            framed_skip = log.line_skip(boundary, lines) if lines else 0
            if framed_skip:
                raw_skip = before.rfind(b"\n") + 1
                self._skip = (boundary, framed_skip, raw_skip)
                return boundary, boundary + raw_skip, None
        state = log.state_at(boundary)
        if state is not None and not state[0] and state[1] is not None:
            return boundary, boundary, f"{stamp(state[1])} ".encode()
        return boundary, boundary, None

    @property
    def capacity(self) -> int:
        """The most framed bytes the format's log holds."""
        return self.log.ring.capacity

    def backlog(self, cursor: int) -> int:
        """Framed bytes held from the reader's cursor to the head."""
        return self.log.ring.head - self.log.framed_at(cursor)

    def unowed(self, cursor: int) -> int:
        """Raw bytes at the reader's cursor that its replay skips (not owed to it)."""
        skip = self._skip
        return skip[2] if skip is not None and skip[0] == cursor else 0

    def skip_to(self, cursor: int, raw: int) -> tuple[int, int]:
        """The reader skips forward to the first chunk boundary at or after
        raw: (its new cursor, the raw bytes it loses by that)."""
        target = self.at = self.log.boundary_after(raw)
        lost = target - cursor - self.unowed(cursor)
        self._skip = None
        return target, lost

    def forget(self, cursor: int) -> int:
        """The reader leaves its cursor for another place (a purge, a close):
        the raw bytes from its cursor on that it was not owed."""
        unowed = self.unowed(cursor)
        self._skip = None
        return unowed

    def at_line_start(self, cursor: int) -> bool:
        """Whether the reader's text stands at a line start at its cursor
        (False where that is no longer known)."""
        state = self.log.state_at(cursor)
        return state is not None and state[0]

    def views(self, cursor: int, stop: int, limit: int) -> list[memoryview]:
        """The records of whole chunks from the cursor up to raw `stop`, at
        most about `limit` framed bytes (at least one chunk)."""
        views, self._end = self.log.views(cursor, stop, limit)
        skip = self._skip
        if skip is not None and skip[0] == cursor and views:
            views = _drop_front(views, skip[1])
        return views

    def taken(self, cursor: int) -> tuple[int, int]:
        """The reader sent everything views() gave it (records are taken
        whole): (its new cursor, the device bytes those records carried)."""
        delivered = self._end - cursor - self.unowed(cursor)
        self._skip = None
        self.at = self._end
        return self._end, delivered

    def gap(self, cursor: int, lost: int, now: float, mid_line: bool) -> bytes:
        """The marker of `lost` bytes, for a reader about to go on at cursor;
        mid_line: its text stood inside a line where the losses began. A line
        that goes on after the marker is stamped again (text)."""
        state = self.log.state_at(cursor)
        resume = None if state is None or state[0] else (state[1] or now)
        return self.log.encoder.event(
            now, f"{lost} bytes lost", mid_line=mid_line, resume=resume, event="gap", bytes=lost
        )

    def event(self, now: float, text: str, **fields: Any) -> bytes:
        """An event record at the head; a line that goes on after it is stamped again (text)."""
        encoder = self.log.encoder
        resume = None if encoder.at_line_start else now
        return encoder.event(now, text, resume=resume, **fields)


def _drop_front(views: list[memoryview], n: int) -> list[memoryview]:
    """The views without their first n bytes."""
    out = []
    for view in views:
        if n >= len(view):
            n -= len(view)
            continue
        out.append(view[n:])
        n = 0
    return out


# Arrival times kept, at most: one per device read still in the ring. A ring
# of the default 256 KiB holds 4096 reads of 64 bytes; beyond, the oldest
# chunks' times are merged into their successors' (a later stamp, never lost bytes).
MAX_ARRIVALS = 16 * 1024


class Arrivals:
    """(raw offset, arrival time) of each chunk still held, oldest first, in
    two flat arrays: 16 bytes a chunk where a deque of tuples costs about
    120 (a few hundred chunks a port: 38 KiB each on a rack of 128)."""

    def __init__(self) -> None:
        self._offsets = array("q")
        self._times = array("d")
        self._first = 0  # entries before it are gone (compacted away in bulk)

    def __len__(self) -> int:
        return len(self._offsets) - self._first

    def append(self, offset: int, t: float) -> None:
        self._offsets.append(offset)
        self._times.append(t)

    def offset(self, i: int) -> int:
        return self._offsets[self._first + i]

    def popleft(self) -> None:
        self._first += 1
        if self._first >= 1024 and 2 * self._first >= len(self._offsets):
            del self._offsets[: self._first]
            del self._times[: self._first]
            self._first = 0

    def items(self) -> list[tuple[int, float]]:
        return list(zip(self._offsets[self._first :], self._times[self._first :], strict=True))


class RecordLogs:
    """A port's FramedLogs, one per record format in use, and the arrival times
    of the chunks its ring holds.

    Formats the config names for listeners (``kept``) are encoded from the
    start, so their history is there for the first reader. A format only some
    connections ask for (a WebSocket's query) or only traces use is created
    for the first of them by replaying the last ``history`` bytes of the ring
    (all a reader may replay) with the original arrival times, and released
    when the last one leaves.

    Memory follows need: a log holds the records its readers have yet to
    take, and the history only for a kept format or once a reader has
    replayed some (a trace never does: its file is its history), so a jsonl
    trace of a busy port costs the records of a quarter second, not
    FRAMED_EXPANSION times the ring. The first reader to replay from a log
    that held no history gets what it still holds (at least the trace's
    unwritten part); readers after it get the whole bound.
    """

    def __init__(self, port: str, capacity: int, history: int, kept: tuple[Format, ...], ring: Ring) -> None:
        self.port = port
        self.capacity = capacity
        self.history = history
        self.kept = kept
        self.ring = ring  # the hub's; replaced with it on a resize
        self.logs: dict[Format, FramedLog] = {}
        self._arrivals = Arrivals()
        self._last_time = 0.0  # the latest time given to a record (see clock)
        for fmt in kept:
            self.log(fmt)

    def clock(self) -> float:
        """The wall-clock time for a record: never earlier than the last one,
        so that a stream's (and a trace's) times never go back when the clock
        is stepped back; they stand still until it catches up."""
        now = time.time()
        if now < self._last_time:
            return self._last_time
        self._last_time = now
        return now

    def published(self, start: int, data: bytes | memoryview) -> None:
        """The device's chunk at raw offset `start` is in the ring: stamp it,
        and encode it once into every log in use."""
        now = self.clock()
        arrivals = self._arrivals
        arrivals.append(start, now)
        tail = self.ring.tail
        while len(arrivals) > MAX_ARRIVALS or (len(arrivals) > 1 and arrivals.offset(1) <= tail):
            arrivals.popleft()
        if self.logs:
            chunk = bytes(data)
            for log in self.logs.values():
                log.append(start, chunk, now)

    def log(self, fmt: Format) -> FramedLog:
        log = self.logs.get(fmt)
        if log is None:
            # The replay's records are all kept (the reader it is made for may
            # want them); then the history stays only for a kept format, or
            # once a reader replays (RecordCursor.begin).
            log = self.logs[fmt] = FramedLog(fmt, self.port, self.capacity, self.history)
            self._replay(log)
            log.history = self.history if fmt in self.kept else 0
        return log

    def cursor(self, fmt: Format) -> RecordCursor:
        """A new reader's cursor in the format's log (made now if need be)."""
        log = self.log(fmt)
        cursor = RecordCursor(log, self.history)
        log.cursors.add(cursor)
        return cursor

    def release(self, cursor: RecordCursor, readers: int) -> None:
        """A reader of the cursor's log left, `readers` remain: with none left,
        the log goes, unless the config keeps it."""
        log = cursor.log
        log.cursors.discard(cursor)
        if not readers and log.format not in self.kept and self.logs.get(log.format) is log:
            del self.logs[log.format]

    def resize(self, ring: Ring, capacity: int, history: int, kept: tuple[Format, ...]) -> None:
        """A reloaded port's ring and bounds: logs made from now on follow them."""
        self.ring, self.capacity, self.history, self.kept = ring, capacity, history, kept
        for fmt, log in self.logs.items():
            if log.history or fmt in kept:
                log.history = history

    def _replay(self, log: FramedLog) -> None:
        """Encode the ring's history into a new framed log, chunk by chunk,
        with the times the chunks arrived."""
        ring = self.ring
        tail, head = max(ring.tail, ring.head - self.history), ring.head
        arrivals = self._arrivals.items()
        if arrivals and arrivals[0][0] > tail:  # older times were merged away
            arrivals[0] = (tail, arrivals[0][1])
        for i, (off, t) in enumerate(arrivals):
            start = max(off, tail)
            end = arrivals[i + 1][0] if i + 1 < len(arrivals) else head
            if end > start:
                log.append(start, ring.read(start, end), t)
        log.raw_head = head
