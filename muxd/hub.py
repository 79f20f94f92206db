"""The hub: one port's fan-out of device output and arbitration of writes.

Out (device -> readers)
    The device's bytes are written once into a bounded Ring. Each reader is a
    cursor into it, so a reader's backlog is ``head - cursor`` and costs no
    memory of its own. After a publish the hub wakes every reader that is not
    already waiting for EPOLLOUT; the reader sends straight from memoryviews of
    the ring. A reader's backlog is what the kernel has refused to take: when a
    reader is blocked (its socket buffer is full) and its lag exceeds its
    listener's ``buffer``, the listener's policy applies: ``drop-oldest`` skips
    its cursor forward to the oldest byte it may still have and counts the
    skipped bytes; ``disconnect`` closes it (deferred: see below). A reader that is keeping up is
    never judged on a burst it has not yet been offered; it only loses bytes
    the ring itself has overwritten, which are counted the same way. Nothing a
    slow reader does can slow the device or another reader: the ring never
    waits for anybody, with one exception, asked for by the listener.

Lossless readers (``overflow: block``)
    A raw reader whose policy says ``block`` is never skipped forward: when its
    lag reaches its hold mark (its ``buffer`` less HOLD_SLACK, the most one
    device read can add) the hub *holds* the device: it asks the upstream to
    stop reading (``set_reading(False)``), so the device's own flow control
    applies (a pty writer blocks, a K2's TCP window closes, a UART with
    RTS/CTS holds). Every other reader is slowed with it, the documented price,
    but is still served what the ring holds. Once every holding reader is back
    under half its hold mark, reading resumes. A reader may hold the device for
    at most its ``block_timeout``: then it falls back to drop-oldest for the
    rest of its connection, counted (``ListenerStats.block_fallbacks``), logged,
    and told in-band (a notice, where it has notices on), so a stuck lossless
    reader cannot freeze a port for ever. The check costs the fan-out pass one
    test of an empty set when nobody holds the device.

    With many readers the wake-up pass is deferred by a few milliseconds so
    that several device reads go out in one send per reader: syscalls per byte
    fall as the number of readers grows, for a bounded cost in latency.

In (writers -> device)
    ``hub.writes`` (muxd.writes) arbitrates what rw readers send into one
    bounded queue to the device, with backpressure instead of drops.

Records
    Readers that asked for ``text`` or ``jsonl`` read a FramedLog (muxd.records)
    that encodes each device chunk once for all of them; their cursor stays in
    raw device offsets, so bounds and losses are judged and counted the same.
    Each has a RecordCursor that the hub asks about records; the hub never
    looks inside a FramedLog.

Notices
    In-band notices (an upstream state change, a gap) always begin on a line
    of their own: a raw reader whose last byte was not a newline gets "\r\n"
    first (where that byte is no longer known, it gets one too: an empty line
    at worst, never a notice spliced into a line).

The hub owns no fd and knows no config file: it takes each listener's
ReaderPolicy and the port's PortBounds. Readers are driven through the small
``ReaderOwner`` interface (muxd.connection implements it). Owners that are not
sockets (a trace file, the MQTT feed, an encoding connection) pull what they
are owed with ``take()``. The hub never closes a reader from inside its own
call chain, whatever the cause (an overflow, a failed send): it marks the
reader doomed, stops serving it, and the close runs on the next turn of the
loop.

Why this module is long: a reader's cursor, bound, losses, notices and hold
are one state, changed together on the hot path (publish, the fan-out pass,
advance); split across modules, each change would cross a module boundary
per byte served, and the invariant (delivered + dropped + purged == cursor -
start) would have no single owner.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from muxd.reactor import Reactor, Timer
from muxd.records import Format, FramedLog, RecordCursor, RecordLogs, raw_event
from muxd.ring import Ring
from muxd.writes import WriterState, Writes

# After a fan-out pass that took T seconds, the next one starts no sooner than
# T * FLUSH_GAP later. With 100 readers a pass takes under a millisecond and
# nothing is ever delayed; with thousands it takes milliseconds, device reads
# pile up meanwhile and go out together: syscalls per byte fall as readers
# grow, and the added latency is bounded by the pass time itself.
FLUSH_GAP = 1.0
# ...but never more than this: a pass that looked long because the process
# was preempted must not delay the next one by as much again.
FLUSH_GAP_MAX = 0.010
# Notices queued per reader before older ones are dropped (and counted): state
# changes come seconds apart; more than this pending means the reader is stuck.
MAX_NOTICES = 16
# The reason a reader whose send failed is doomed with; its owner's close
# names the real one (reset, peer closed...), which its stats count.
SEND_FAILED = "send failed"

# A lossless reader holds the device this far short of its buffer: one device
# read (muxd.upstream.base.READ_SIZE, 64 KiB) may still arrive after reading
# stops, and two leave room for an upstream that decodes a read in two
# publishes. The config requires a block reader's buffer to be at least twice
# this (muxd.config.ports), so the hold mark is never below half the buffer.
HOLD_SLACK = 128 * 1024

log = logging.getLogger("muxd.hub")
_reader_ids = itertools.count(1)


@dataclass(frozen=True)
class ReaderPolicy:
    """How the hub treats one listener's readers: the hub's own vocabulary,
    built by the listener layer from its config."""

    listener: str  # the listener's name: per-listener totals are kept under it
    capacity: int  # the most backlog a blocked reader may have, in bytes
    drop_oldest: bool  # on overflow: skip forward and count (True) or disconnect
    writable: bool  # input goes to the device (rw) or is discarded and counted (ro)
    lines: bool  # input is released to the device in whole lines
    notices: bool  # in-band notices (upstream up/down, gaps) go into a raw reader's stream
    format: Format = "raw"  # raw bytes, or text/jsonl records shared through a FramedLog
    # overflow: block: hold the device rather than skip this reader forward
    # (raw readers only; a record reader falls back to drop-oldest), for at
    # most block_timeout seconds at a time.
    block: bool = False
    block_timeout: float = 10.0


@dataclass(frozen=True)
class PortBounds:
    """The port's memory bounds, each explained where the config defines it."""

    log_capacity: int  # the shared ring: the largest backlog any reader may have
    write_queue: int  # bytes on their way to the device
    max_line: int  # a held partial line, at most
    history: int  # replayed to a new reader, at most
    formats: tuple[Format, ...] = ()  # record formats kept from the start, for their history
    line_timeout: float = 0.5  # seconds a partial line may idle before it goes out (0: never)


class ReaderOwner(Protocol):
    """What a connection offers the hub."""

    def on_data(self) -> None:
        """New bytes are pending for this reader and it is not blocked: send now."""

    def on_write_room(self) -> None:
        """The write queue has room again: resume reading input."""

    def close(self, reason: str) -> None:
        """Disconnect this reader. The hub only ever calls it from a fresh turn
        of the loop (call_soon), never from inside one of its own methods."""


class DirectWriter(Protocol):
    """What the fan-out pass writes ring views to directly (see Reader.direct):
    a raw reader's connection over a plain transport (muxd.connection), not
    a transport itself (muxd.transport.Transport)."""

    def write(self, data: memoryview) -> int:
        """Write some of data; raise BlockingIOError when full."""

    def writev(self, data: list[memoryview]) -> int:
        """The same for two views (the ring wrapped)."""

    def blocked(self) -> None:
        """A write was partial: wait for room (EPOLLOUT), then carry on via on_data()."""

    def failed(self, exc: OSError) -> None:
        """A write failed: the peer is gone. Called on a fresh turn of the loop
        (call_soon), never from inside the fan-out pass."""


class ListenerStats:
    """Per-listener totals that outlive the readers they count."""

    def __init__(self) -> None:
        self.connections = 0
        self.rejected = 0  # refused at max_clients
        self.rejected_address = 0  # refused by the listener's allow-list (muxd.access)
        self.disconnects: dict[str, int] = {}
        self.closed_delivered = 0
        self.closed_dropped = 0
        self.closed_purged = 0
        self.block_fallbacks = 0  # lossless readers that held the device past block_timeout


class Reader:
    """One reader's state in the hub: its cursor, its bound and its counters.

    Invariant: ``delivered + dropped + purged == cursor - start``.
    """

    __slots__ = (
        "blocked",
        "cursor",
        "delivered",
        "direct",
        "doomed",
        "dropped",
        "gap_mid_line",
        "hold_timer",
        "id",
        "line_mark",
        "lossless",
        "notice_pos",
        "notices",
        "owner",
        "peer",
        "policy",
        "purged",
        "record_cursor",
        "since",
        "start",
        "stats",
        "token",
        "unannounced",
        "writer",
    )

    def __init__(self, owner: ReaderOwner, policy: ReaderPolicy, peer: str) -> None:
        self.id = next(_reader_ids)
        self.owner = owner
        self.policy = policy
        self.peer = peer
        self.since = time.time()
        self.cursor = self.start = 0
        self.delivered = 0
        self.dropped = 0  # lost to the overflow policy or to the ring
        self.purged = 0  # skipped at the reader's own request (RFC 2217 PURGE-DATA)
        self.unannounced = 0  # dropped bytes not yet marked in its stream
        self.blocked = False  # waiting for EPOLLOUT; the hub will not wake it
        self.doomed: str | None = None  # the hub decided to close it, for this reason
        # A record reader's place in its format's shared log; its cursor stays
        # in raw device offsets, at chunk boundaries.
        self.record_cursor: RecordCursor | None = None
        # Where a stretch of losses began, the reader's stream stood inside a line.
        self.gap_mid_line = True
        # A raw reader's stream at a discontinuity (a notice sent, a purge):
        # (cursor, whether the last byte it got there ended a line).
        self.line_mark = (0, True)
        self.writer = WriterState()  # its write side, changed by muxd.writes alone
        self.token: str | None = None  # the name of the token it connected with (a WebSocket's)
        # In-band notices: (ring offset they belong at, text). Only for readers
        # with notices on, so raw streams stay byte-exact.
        self.notices: deque[tuple[int, bytes]] = deque()
        self.notice_pos = 0  # bytes of notices[0] already sent
        self.stats = ListenerStats()  # replaced by the listener's shared one on attach
        # Set by connections whose output is the ring's bytes unchanged (TCP and
        # Unix streams): the fan-out pass then writes to them itself, sharing one
        # set of views among all readers at the same offset. Encoding readers
        # (WebSocket, RFC 2217) leave it None and are woken through on_data().
        self.direct: DirectWriter | None = None
        # overflow: block in force (cleared for good when it falls back), and
        # while it holds the device, the timer of its block_timeout.
        self.lossless = False
        self.hold_timer: Timer | None = None

    @property
    def hold_mark(self) -> int:
        """The lag at which this lossless reader holds the device."""
        capacity = self.policy.capacity
        return max(capacity - HOLD_SLACK, capacity // 2)

    @property
    def held(self) -> int:
        """Input bytes accepted but not yet queued (a partial line)."""
        return self.writer.held

    @property
    def line_timer(self) -> Timer | None:
        return self.writer.line_timer

    @property
    def input_paused(self) -> bool:
        """The write queue is full: its input is not read until it drains."""
        return self.writer.paused

    @property
    def log(self) -> FramedLog | None:
        """A record reader's shared log (its format's encoder and ring)."""
        return self.record_cursor.log if self.record_cursor is not None else None

    def write_directly(self, writer: DirectWriter | None) -> None:
        """The fan-out pass writes the ring's bytes to `writer` itself (a plain
        transport of raw bytes); None: the owner sends, woken by on_data()."""
        self.direct = writer

    def add_notice(self, marker: bytes, at: int) -> bool:
        """An in-band notice (bytes of the reader's format) due at ring offset
        `at`, after what the reader already has pending. Beyond MAX_NOTICES
        the oldest is dropped: False then (the caller counts it)."""
        notices = self.notices
        dropped = len(notices) >= MAX_NOTICES
        if dropped:
            notices.popleft()
            self.notice_pos = 0
        notices.append((at, marker))
        return not dropped


class Hub:
    def __init__(self, name: str, bounds: PortBounds, reactor: Reactor) -> None:
        self.name = name
        self.bounds = bounds
        self.reactor = reactor
        self.ring = Ring(bounds.log_capacity)
        self.ring.low = self._needed
        self.readers: dict[int, Reader] = {}
        self._blocked: set[Reader] = set()
        self._flush_pending = False
        self._next_flush = 0.0  # monotonic time before which no fan-out pass starts
        self.writes = Writes(bounds.write_queue, bounds.max_line, bounds.line_timeout, reactor)
        self.records = RecordLogs(name, bounds.log_capacity, bounds.history, bounds.formats, self.ring)
        self.listener_stats: dict[str, ListenerStats] = {}
        self.bytes_in = 0
        self.notices_dropped = 0
        # Lossless readers (overflow: block), and those holding the device now.
        self._lossless: set[Reader] = set()
        self._holding: set[Reader] = set()
        # Set by the upstream: stop (False) or resume (True) reading the device.
        self.set_reading: Callable[[bool], None] = lambda _on: None
        self.holds = 0  # times the device was held for a lossless reader
        self.held_seconds = 0.0  # total time it was held, closed holds only
        self._held_since = 0.0

    @property
    def holding(self) -> bool:
        """Whether the device is held (not read) for a lossless reader."""
        return bool(self._holding)

    def held_total(self) -> float:
        """Seconds the device was held, the current hold included."""
        now = time.monotonic() - self._held_since if self._holding else 0.0
        return self.held_seconds + now

    # -- readers -------------------------------------------------------------

    @property
    def head(self) -> int:
        return self.ring.head

    def stats_for(self, listener: str) -> ListenerStats:
        return self.listener_stats.setdefault(listener, ListenerStats())

    def attach(
        self, owner: ReaderOwner, policy: ReaderPolicy, peer: str, history: int = 0, history_lines: int = 0
    ) -> Reader:
        """A new reader, starting `history` bytes or `history_lines` lines back
        (whichever reaches further, within the port's history bound), then live."""
        reader = Reader(owner, policy, peer)
        reader.writer = self.writes.writer_for(policy)
        tail = max(self.ring.tail, self.head - self.bounds.history)
        start = max(tail, self.head - max(0, history))
        if history_lines > 0:
            start = min(start, self._lines_back(history_lines, tail))
        reader.cursor = reader.start = start
        if policy.format != "raw":
            rc = reader.record_cursor = self.records.cursor(policy.format)
            reader.cursor, reader.start, lead = rc.begin(start, self.ring)
            if lead is not None:
                reader.notices.append((reader.cursor, lead))
        reader.line_mark = (reader.start, True)  # nothing given yet: a clean line
        reader.stats = self.stats_for(policy.listener)
        reader.stats.connections += 1
        self.readers[reader.id] = reader
        self._set_lossless(reader, policy.block and policy.format == "raw")
        return reader

    def detach(self, reader: Reader, reason: str) -> None:
        """The reader is gone; a close the hub decided keeps the hub's reason."""
        if self.readers.pop(reader.id, None) is None:
            return
        self._blocked.discard(reader)
        self._set_lossless(reader, False)
        self.writes.leave(reader)  # a partial last line still goes out
        stats = reader.stats
        if reader.doomed is not None and reader.doomed != SEND_FAILED:
            reason = reader.doomed
        stats.disconnects[reason] = stats.disconnects.get(reason, 0) + 1
        stats.closed_delivered += reader.delivered
        stats.closed_dropped += reader.dropped
        stats.closed_purged += reader.purged
        rc, reader.record_cursor = reader.record_cursor, None
        if rc is not None:
            # The reader (in a cycle with its owner) no longer holds the log:
            # a released format's memory goes now, not at the next GC.
            log = rc.log
            self.records.release(rc, sum(1 for r in self.readers.values() if r.log is log))

    def _lines_back(self, n: int, tail: int) -> int:
        """The offset where the last n lines begin (a partial last line counts),
        no further back than tail."""
        data = self.ring.read(tail)
        end = len(data) - 1 if data.endswith(b"\n") else len(data)
        for _ in range(n):
            end = data.rfind(b"\n", 0, end)
            if end < 0:
                return tail
        return tail + end + 1

    def clients_of(self, listener: str) -> int:
        return sum(1 for r in self.readers.values() if r.policy.listener == listener)

    def _doom(self, reader: Reader, reason: str, close: Callable[[], None] | None = None) -> None:
        """Close the reader, but not from inside this call chain (asyncio's
        _force_close does the same with call_soon): the hub stops serving it
        now (nothing pending, never woken), its owner closes on the next turn
        (``close``, by default ``owner.close(reason)``) and nobody has to
        re-check whether it is still attached."""
        if reader.doomed is not None:
            return
        reader.doomed = reason
        reader.blocked = True  # the fan-out pass skips it
        self._blocked.discard(reader)
        self._set_lossless(reader, False)  # a doomed reader holds nothing
        reader.notices.clear()
        if close is None:
            owner = reader.owner
            close = lambda: owner.close(reason)  # noqa: E731 - one deferred call
        self.reactor.call_soon(close)

    # -- out: device -> readers --------------------------------------------

    def publish(self, data: bytes | memoryview) -> None:
        """Bytes the device produced. Never blocks, whatever the readers do."""
        start = self.ring.head
        self.ring.write(data)
        self.bytes_in += len(data)
        self.records.published(start, data)
        if self._blocked:
            head = self.head
            for reader in list(self._blocked):
                if head - reader.cursor > reader.policy.capacity:
                    self._overflow(reader)
        if self._lossless:
            self._hold_check()
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_pending:
            return
        self._flush_pending = True
        wait = self._next_flush - time.monotonic()
        if wait <= 0:
            self.reactor.call_soon(self._flush)
        else:
            self.reactor.call_later(wait, self._flush)

    def _flush(self) -> None:
        """The fan-out pass: the hot path, so it is written for the common case.

        Most readers are caught up to the same offset before each publish, so
        they share one list of views and cost one write call each, made
        through a C-level callable the transport supplies. Anything unusual
        (notices due, bytes already overwritten, no direct writer) goes the
        general way through the owner's on_data(). A write that fails dooms
        its reader: it is closed on the next turn, after the pass has served
        everyone else.
        """
        self._flush_pending = False
        started = time.monotonic()
        ring = self.ring
        head, tail = ring.head, ring.tail
        start, views, total = -1, [], 0
        for reader in list(self.readers.values()):
            if reader.blocked:
                continue
            cursor = reader.cursor
            direct = reader.direct
            if direct is None or reader.notices or cursor < tail or reader.unannounced:
                if cursor != head or reader.notices or reader.unannounced:
                    reader.owner.on_data()
                continue
            if cursor == head:
                continue
            if cursor != start:
                start, views, total = cursor, ring.views(cursor, head), head - cursor
            try:
                n = direct.write(views[0]) if len(views) == 1 else direct.writev(views)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._send_failed(reader, direct, exc)
                continue
            reader.cursor = cursor + n
            reader.delivered += n
            if n < total:
                direct.blocked()
        if self._holding:
            self._release_check()
        now = time.monotonic()
        self._next_flush = now + min((now - started) * FLUSH_GAP, FLUSH_GAP_MAX)

    def _send_failed(self, reader: Reader, direct: DirectWriter, exc: OSError) -> None:
        """The peer is gone; its owner learns it on the next turn (and names the reason)."""
        self._doom(reader, SEND_FAILED, lambda: direct.failed(exc))

    def _overflow(self, reader: Reader, keep: int | None = None) -> None:
        """Apply the policy: keep at most `keep` bytes of backlog (default: its bound)."""
        rc = reader.record_cursor
        if not reader.policy.drop_oldest:
            unowed = rc.forget(reader.cursor) if rc is not None else 0
            reader.dropped += self.head - reader.cursor - unowed
            reader.cursor = self.head
            self._doom(reader, "overflow")
            return
        if not reader.unannounced:  # a new stretch of losses: where the reader's stream stood
            reader.gap_mid_line = not self._at_line_start(reader)
        target = self.head - (reader.policy.capacity if keep is None else keep)
        if rc is not None:  # records are skipped whole
            target, skip = rc.skip_to(reader.cursor, target)
        else:
            skip = target - reader.cursor
        reader.cursor = target
        reader.dropped += skip
        self._gap(reader, skip)

    def _at_line_start(self, reader: Reader) -> bool:
        """Whether the last byte the reader got ended a line (False where that
        is no longer known: a notice then gets a line of its own regardless)."""
        rc = reader.record_cursor
        if rc is not None:
            return reader.delivered == 0 or rc.at_line_start(reader.cursor)
        at, ended = reader.line_mark
        if reader.cursor == at:
            return ended
        return self.ring.ends_line(reader.cursor) is True

    def _gap(self, reader: Reader, lost: int) -> None:
        """Bytes a reader lost: marked in its stream (a record reader always, a
        raw one with notices on) when it is next served, so that the losses of
        many publishes while it was stuck make one marker."""
        if lost > 0 and (reader.record_cursor is not None or reader.policy.notices):
            reader.unannounced += lost

    def _announce_gap(self, reader: Reader) -> None:
        lost, reader.unannounced = reader.unannounced, 0
        rc = reader.record_cursor
        if rc is not None:
            marker = rc.gap(reader.cursor, lost, self.records.clock(), reader.gap_mid_line)
        else:
            marker = raw_event(f"{lost} bytes lost", mid_line=reader.gap_mid_line)
        reader.notices.appendleft((reader.cursor, marker))

    def pending(self, reader: Reader, limit: int = 1 << 30) -> list[memoryview]:
        """Views of what the reader is owed next (notices first where due)."""
        rc = reader.record_cursor
        tail = self.ring.tail if rc is None else rc.tail
        if reader.cursor < tail:  # overwritten before it could be offered
            self._overflow(reader, keep=self.head - tail)
        if reader.unannounced and not reader.notice_pos:
            self._announce_gap(reader)
        stop = self.head
        if reader.notices:
            offset, text = reader.notices[0]
            if offset <= reader.cursor:
                return [memoryview(text)[reader.notice_pos :]]
            stop = min(stop, offset)
        if rc is not None:
            return rc.views(reader.cursor, stop, limit)
        return self.ring.views(reader.cursor, min(stop, reader.cursor + limit))

    def advance(self, reader: Reader, n: int) -> None:
        """The reader has sent n bytes of what pending() gave it (a record
        reader: all of it, since it takes records whole)."""
        if reader.notices and reader.notices[0][0] <= reader.cursor:
            reader.notice_pos += n
            if reader.notice_pos >= len(reader.notices[0][1]):
                reader.notices.popleft()
                reader.notice_pos = 0
                reader.line_mark = (reader.cursor, True)  # every notice ends its line
            return
        rc = reader.record_cursor
        if rc is not None:
            reader.cursor, n = rc.taken(reader.cursor)
        else:
            reader.cursor += n
        reader.delivered += n
        if reader.hold_timer is not None:
            self._release_check()

    def take(self, reader: Reader, limit: int) -> bytes:
        """What the reader is owed next, at most about `limit` bytes (records
        whole), as one copy, already counted as sent: for owners that are not
        sockets (a trace file, the MQTT feed, an encoding connection). b""
        when it is caught up."""
        views = self.pending(reader, limit)
        if not views:
            return b""
        data = views[0].tobytes() if len(views) == 1 else b"".join(views)
        self.advance(reader, len(data))
        return data

    def drain(self, reader: Reader, writev: Callable[[list[memoryview]], int]) -> None:
        """Write what the reader is owed through `writev` until it is caught up or
        the transport takes less than offered. OSError from `writev` propagates."""
        while views := self.pending(reader):
            try:
                n = writev(views)
            except BlockingIOError:
                n = 0
            self.advance(reader, n)
            if n < sum(map(len, views)):
                return

    def caught_up(self, reader: Reader) -> bool:
        return reader.cursor >= self.head and not reader.notices and not reader.unannounced

    def set_blocked(self, reader: Reader, blocked: bool) -> None:
        """The reader's transport is full (True) or has room again (False)."""
        if reader.doomed is not None or blocked == reader.blocked:
            return
        reader.blocked = blocked
        if blocked:
            self._blocked.add(reader)
            if self.head - reader.cursor > reader.policy.capacity:
                self._overflow(reader)
        else:
            self._blocked.discard(reader)

    def purge(self, reader: Reader) -> None:
        """The reader asked to skip its backlog (RFC 2217 PURGE-DATA): counted."""
        rc = reader.record_cursor
        unowed = rc.forget(reader.cursor) if rc is not None else 0
        reader.line_mark = (self.head, self._at_line_start(reader))
        reader.purged += self.head - reader.cursor - unowed
        reader.cursor = self.head

    def lag(self, reader: Reader) -> int:
        return self.head - reader.cursor

    def behind(self, reader: Reader, raw: int) -> bool:
        """Whether the reader's backlog nears what the port holds for it: at
        least `raw` bytes or a quarter of the ring behind, or (a record reader)
        a quarter of its format's records. An owner that writes on a timer
        (a trace) writes at once then, before its bytes can be overwritten."""
        if self.lag(reader) >= min(raw, self.ring.capacity // 4):
            return True
        rc = reader.record_cursor
        return rc is not None and rc.backlog(reader.cursor) >= rc.capacity // 4

    # -- notices ----------------------------------------------------------------

    def notice(self, text: str, **fields: Any) -> None:
        """An event (an upstream state change), in-band at the current offset:
        a record for every record reader, a line for raw readers with notices on."""
        now = self.records.clock()
        for reader in self.readers.values():
            self._notice(reader, now, text, fields)
        self._schedule_flush()

    def notice_to(self, reader: Reader, text: str, **fields: Any) -> None:
        """An event for one reader only (a trace file reopened), as notice() makes it."""
        self._notice(reader, self.records.clock(), text, fields)
        self._schedule_flush()

    def tell(self, reader: Reader, text: str, **fields: Any) -> None:
        """An answer for one client only (its refused input, an escape
        command's reply): in-band whatever its ``notices``, since it asked."""
        self._notice(reader, self.records.clock(), text, fields, always=True)
        self._schedule_flush()

    def insert(self, reader: Reader, marker: bytes) -> None:
        """Bytes of the reader's own format, in-band at the current offset (a
        trace's record of what a client wrote); bounded as notices are."""
        if reader.doomed is None and not reader.add_notice(marker, self.head):
            self.notices_dropped += 1
        self._schedule_flush()

    def _notice(
        self, reader: Reader, now: float, text: str, fields: dict[str, Any], always: bool = False
    ) -> None:
        if reader.doomed is not None:
            return
        head = self.head
        if reader.record_cursor is not None:
            marker = reader.record_cursor.event(now, text, **fields)
        elif reader.policy.notices or always:
            # On a line of its own: after the device's last byte, unless that
            # ended a line or a notice of its own stands here already.
            follows_notice = bool(reader.notices) and reader.notices[-1][0] == head
            line_ends = follows_notice or self.ring.ends_line(head) is not False
            marker = raw_event(text, mid_line=not line_ends)
        else:
            return
        if not reader.add_notice(marker, head):
            self.notices_dropped += 1

    # -- lifecycle ---------------------------------------------------------------

    def resize(self, bounds: PortBounds) -> None:
        """Apply a reloaded port's bounds to the log and queue."""
        self.bounds = bounds
        if bounds.log_capacity != self.ring.capacity:
            self.ring = self.ring.resized(bounds.log_capacity)
            self.ring.low = self._needed
        self.records.resize(self.ring, bounds.log_capacity, bounds.history, bounds.formats)
        self.writes.resize(bounds.write_queue, bounds.max_line, bounds.line_timeout)

    def _needed(self) -> int:
        """The oldest offset the ring must still hold (muxd.ring: Ring.low): the
        history bound, and each reader's cursor (and the byte before it, for ends_line)."""
        low = self.head - self.bounds.history
        for reader in self.readers.values():
            low = min(low, reader.cursor - 1)
        return low

    def retarget(self, reader: Reader, policy: ReaderPolicy) -> None:
        """A reloaded listener's options apply to its connected readers at once,
        but for the format, which the connection was made for: new readers get it."""
        policy = dataclasses.replace(policy, format=reader.policy.format)
        was_block, reader.policy = reader.policy.block, policy
        if policy.block != was_block:  # a fallen-back reader stays fallen back otherwise
            self._set_lossless(reader, policy.block and policy.format == "raw")
        self.writes.retarget(reader, policy)
        if self.head - reader.cursor > policy.capacity:
            self._overflow(reader)

    # -- lossless readers (overflow: block) ----------------------------------------

    def _set_lossless(self, reader: Reader, on: bool) -> None:
        reader.lossless = on
        if on:
            self._lossless.add(reader)
            self._hold_check()
        else:
            self._lossless.discard(reader)
            self._unhold(reader)

    def _hold_check(self) -> None:
        """After a publish: a lossless reader at its hold mark holds the device."""
        head = self.head
        for reader in self._lossless:
            if reader.hold_timer is None and head - reader.cursor >= reader.hold_mark:
                self._hold(reader)

    def _hold(self, reader: Reader) -> None:
        timeout = reader.policy.block_timeout
        reader.hold_timer = self.reactor.call_later(timeout, lambda: self._block_expired(reader))
        if not self._holding:
            self.holds += 1
            self._held_since = time.monotonic()
            who = f"{reader.policy.listener} {reader.peer}"
            log.debug("%s: device held for lossless reader %s", self.name, who)
            self.set_reading(False)
        self._holding.add(reader)

    def _unhold(self, reader: Reader) -> None:
        timer, reader.hold_timer = reader.hold_timer, None
        if timer is None:
            return
        timer.cancel()
        self._holding.discard(reader)
        if not self._holding:
            self.held_seconds += time.monotonic() - self._held_since
            self.set_reading(True)

    def _release_check(self) -> None:
        """A holding reader that is back under half its hold mark lets go."""
        head = self.head
        for reader in list(self._holding):
            if head - reader.cursor <= reader.hold_mark // 2:
                self._unhold(reader)

    def _block_expired(self, reader: Reader) -> None:
        """The reader held the device for its block_timeout: drop-oldest from now on."""
        self._set_lossless(reader, False)  # lets go of the device (cancelling a fired timer is safe)
        reader.stats.block_fallbacks += 1
        timeout = reader.policy.block_timeout
        log.warning(
            "%s: lossless reader %s %s held the device for %gs (block_timeout): it falls back to drop-oldest",
            self.name,
            reader.policy.listener,
            reader.peer,
            timeout,
        )
        self.notice_to(reader, f"lossless reader held the device for {timeout:g}s: now drop-oldest")
        if reader.blocked and self.head - reader.cursor > reader.policy.capacity:
            self._overflow(reader)
