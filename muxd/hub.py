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
    waits for anybody.

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

The hub owns no fd and knows no config file: it takes each listener's
ReaderPolicy and the port's PortBounds. Readers are driven through the small
``ReaderOwner`` interface (muxd.connection implements it). The hub never
closes a reader from inside its own call chain: it marks the reader doomed,
stops serving it, and the close runs on the next turn of the loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from muxd.protocol.framing import LineAssembler
from muxd.reactor import Reactor, Timer
from muxd.records import Format, FramedLog, RecordLogs, raw_event, stamp
from muxd.ring import Ring
from muxd.writes import Writes

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
    """What the fan-out pass writes ring views to directly (see Reader.transport):
    a raw reader's connection over a plain transport (muxd.connection), not
    a transport itself (muxd.transport.Transport)."""

    def write(self, data: memoryview) -> int:
        """Write some of data; raise BlockingIOError when full."""

    def writev(self, data: list[memoryview]) -> int:
        """The same for two views (the ring wrapped)."""

    def blocked(self) -> None:
        """A write was partial: wait for room (EPOLLOUT), then carry on via on_data()."""

    def failed(self, exc: OSError) -> None:
        """A write failed: the peer is gone."""


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


class Reader:
    """One reader's state in the hub: its cursor, its bound and its counters.

    Invariant: ``delivered + dropped + purged == cursor - start``.
    """

    __slots__ = (
        "assembler",
        "blocked",
        "cursor",
        "delivered",
        "doomed",
        "dropped",
        "frame_skip",
        "gap_mid_line",
        "id",
        "input_paused",
        "line_timer",
        "log",
        "notice_pos",
        "notices",
        "owner",
        "peer",
        "pending_end",
        "policy",
        "purged",
        "since",
        "start",
        "stats",
        "transport",
        "unannounced",
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
        self.input_paused = False
        self.doomed: str | None = None  # the hub decided to close it, for this reason
        # A record reader's shared log; its cursor stays in raw device offsets,
        # at chunk boundaries, and pending() says where the records it gave end.
        self.log: FramedLog | None = None
        self.pending_end = 0
        # A record reader whose replay starts inside its first chunk, at a line:
        # (that chunk's raw offset, framed bytes to skip, raw bytes they carry).
        self.frame_skip: tuple[int, int, int] | None = None
        # Where a stretch of losses began, the reader's text stood inside a line.
        self.gap_mid_line = True
        self.assembler: LineAssembler | None = None  # write: lines (muxd.writes)
        # Releases the assembler's partial line once it has idled for the port's
        # line_timeout; cancelled whenever the partial line goes out another way.
        self.line_timer: Timer | None = None
        # In-band notices: (ring offset they belong at, text). Only for readers
        # with notices on, so raw streams stay byte-exact.
        self.notices: deque[tuple[int, bytes]] = deque()
        self.notice_pos = 0  # bytes of notices[0] already sent
        self.stats = ListenerStats()  # replaced by the listener's shared one on attach
        # Set by connections whose output is the ring's bytes unchanged (TCP and
        # Unix streams): the fan-out pass then writes to them itself, sharing one
        # set of views among all readers at the same offset. Encoding readers
        # (WebSocket, RFC 2217) leave it None and are woken through on_data().
        self.transport: DirectWriter | None = None

    @property
    def held(self) -> int:
        """Input bytes accepted but not yet queued (a partial line)."""
        return self.assembler.held if self.assembler is not None else 0


class Hub:
    def __init__(self, name: str, bounds: PortBounds, reactor: Reactor) -> None:
        self.name = name
        self.bounds = bounds
        self.reactor = reactor
        self.ring = Ring(bounds.log_capacity)
        self.readers: dict[int, Reader] = {}
        self._blocked: set[Reader] = set()
        self._flush_pending = False
        self._next_flush = 0.0  # monotonic time before which no fan-out pass starts
        self.writes = Writes(bounds.write_queue, bounds.max_line, bounds.line_timeout, reactor)
        self.records = RecordLogs(name, bounds.log_capacity, bounds.formats, self.ring)
        self.listener_stats: dict[str, ListenerStats] = {}
        self.bytes_in = 0
        self.notices_dropped = 0

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
        reader.assembler = self.writes.assembler_for(policy)
        tail = max(self.ring.tail, self.head - self.bounds.history)
        start = max(tail, self.head - max(0, history))
        if history_lines > 0:
            start = min(start, self._lines_back(history_lines, tail))
        reader.cursor = reader.start = start
        if policy.format != "raw":
            reader.log = self.records.log(policy.format)
            self._record_start(reader, reader.log, start)
        reader.stats = self.stats_for(policy.listener)
        reader.stats.connections += 1
        self.readers[reader.id] = reader
        return reader

    def _record_start(self, reader: Reader, log: FramedLog, start: int) -> None:
        """Where a record reader's replay begins. Its cursor is a chunk boundary
        (records are whole chunks): the chunk that holds `start`. Within that
        chunk it skips the records of the lines that end before `start`, so it
        starts at the line that holds `start`: N lines asked, N lines given.
        A replay that must begin inside a text line gets that line's stamp."""
        boundary = max(log.raw_tail, log.boundary_before(start))
        reader.cursor = reader.start = boundary
        if self.ring.tail <= boundary < start:
            before = self.ring.read(boundary, start)
            lines = before.count(b"\n")
            framed_skip = log.line_skip(boundary, lines) if lines else 0
            if framed_skip:
                raw_skip = before.rfind(b"\n") + 1
                reader.frame_skip = (boundary, framed_skip, raw_skip)
                reader.start = boundary + raw_skip
                return
        state = log.state_at(boundary)
        if state is not None and not state[0] and state[1] is not None:
            reader.notices.append((boundary, f"{stamp(state[1])} ".encode()))

    def _skipped(self, reader: Reader) -> int:
        """Raw bytes at the reader's cursor that its replay skips (not owed to it)."""
        skip = reader.frame_skip
        return skip[2] if skip is not None and skip[0] == reader.cursor else 0

    def detach(self, reader: Reader, reason: str) -> None:
        """The reader is gone; a close the hub decided keeps the hub's reason."""
        if self.readers.pop(reader.id, None) is None:
            return
        self._blocked.discard(reader)
        self.writes.leave(reader)  # a partial last line still goes out
        stats = reader.stats
        reason = reader.doomed or reason
        stats.disconnects[reason] = stats.disconnects.get(reason, 0) + 1
        stats.closed_delivered += reader.delivered
        stats.closed_dropped += reader.dropped
        stats.closed_purged += reader.purged
        log = reader.log
        if log is not None and not any(r.log is log for r in self.readers.values()):
            self.records.unused(log)

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

    def _doom(self, reader: Reader, reason: str) -> None:
        """Close the reader, but not from inside this call chain (asyncio's
        _force_close does the same with call_soon): the hub stops serving it
        now (nothing pending, never woken), its owner closes on the next turn
        and nobody has to re-check whether it is still attached."""
        if reader.doomed is not None:
            return
        reader.doomed = reason
        reader.blocked = True  # the fan-out pass skips it
        self._blocked.discard(reader)
        reader.notices.clear()
        owner = reader.owner
        self.reactor.call_soon(lambda: owner.close(reason))

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
        (notices due, bytes already overwritten, no plain transport) goes the
        general way through the owner's on_data().
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
            transport = reader.transport
            if transport is None or reader.notices or cursor < tail or reader.unannounced:
                if cursor != head or reader.notices or reader.unannounced:
                    reader.owner.on_data()
                continue
            if cursor == head:
                continue
            if cursor != start:
                start, views, total = cursor, ring.views(cursor, head), head - cursor
            try:
                n = transport.write(views[0]) if len(views) == 1 else transport.writev(views)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                transport.failed(exc)
                continue
            reader.cursor = cursor + n
            reader.delivered += n
            if n < total:
                transport.blocked()
        now = time.monotonic()
        self._next_flush = now + min((now - started) * FLUSH_GAP, FLUSH_GAP_MAX)

    def _overflow(self, reader: Reader, keep: int | None = None) -> None:
        """Apply the policy: keep at most `keep` bytes of backlog (default: its bound)."""
        lag = self.head - reader.cursor
        if reader.policy.drop_oldest:
            target = self.head - (reader.policy.capacity if keep is None else keep)
            skip = target - reader.cursor
            if reader.log is not None:  # records are skipped whole
                target = reader.log.boundary_after(target)
                if not reader.unannounced:  # a new stretch of losses: where its text stood
                    state = reader.log.state_at(reader.cursor)
                    reader.gap_mid_line = reader.delivered > 0 and (state is None or not state[0])
                skip = target - reader.cursor - self._skipped(reader)
                reader.frame_skip = None
            reader.cursor = target
            reader.dropped += skip
            self._gap(reader, skip)
        else:
            reader.dropped += lag - self._skipped(reader)
            reader.frame_skip = None
            reader.cursor = self.head
            self._doom(reader, "overflow")

    def _gap(self, reader: Reader, lost: int) -> None:
        """Bytes a reader lost: marked in its stream (a record reader always, a
        raw one with notices on) when it is next served, so that the losses of
        many publishes while it was stuck make one marker."""
        if lost > 0 and (reader.log is not None or reader.policy.notices):
            reader.unannounced += lost

    def _announce_gap(self, reader: Reader) -> None:
        lost, reader.unannounced = reader.unannounced, 0
        text = f"{lost} bytes lost"
        log = reader.log
        if log is not None:
            # A line that goes on after the marker is stamped again (text).
            now = self.records.clock()
            state = log.state_at(reader.cursor)
            resume = None if state is None or state[0] else (state[1] or now)
            marker = log.encoder.event(
                now, text, mid_line=reader.gap_mid_line, resume=resume, event="gap", bytes=lost
            )
        else:
            marker = raw_event(text)
        reader.notices.appendleft((reader.cursor, marker))

    def pending(self, reader: Reader, limit: int = 1 << 30) -> list[memoryview]:
        """Views of what the reader is owed next (notices first where due)."""
        log = reader.log
        tail = self.ring.tail if log is None else log.raw_tail
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
        if log is not None:
            views, reader.pending_end = log.views(reader.cursor, stop, limit)
            skip = reader.frame_skip
            if skip is not None and skip[0] == reader.cursor and views:
                views = _drop_front(views, skip[1])
            return views
        return self.ring.views(reader.cursor, min(stop, reader.cursor + limit))

    def advance(self, reader: Reader, n: int) -> None:
        """The reader has sent n bytes of what pending() gave it (a record
        reader: all of it, since it takes records whole)."""
        if reader.notices and reader.notices[0][0] <= reader.cursor:
            reader.notice_pos += n
            if reader.notice_pos >= len(reader.notices[0][1]):
                reader.notices.popleft()
                reader.notice_pos = 0
            return
        if reader.log is not None:
            # The device bytes those records carry (less any its replay skipped).
            n = reader.pending_end - reader.cursor - self._skipped(reader)
            reader.cursor = reader.pending_end
            reader.delivered += n
            reader.frame_skip = None
            return
        reader.cursor += n
        reader.delivered += n

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
        skipped = self.head - reader.cursor - self._skipped(reader)
        reader.frame_skip = None
        reader.cursor = self.head
        reader.purged += skipped

    def lag(self, reader: Reader) -> int:
        return self.head - reader.cursor

    # -- notices ----------------------------------------------------------------

    def notice(self, text: str, **fields: Any) -> None:
        """An event (an upstream state change), in-band at the current offset:
        a record for every record reader, a line for raw readers with notices on."""
        now = self.records.clock()
        for reader in self.readers.values():
            if reader.doomed is not None:
                continue
            if reader.log is not None:
                # At the head; a line that goes on after it is stamped again (text).
                resume = None if reader.log.encoder.at_line_start else now
                marker = reader.log.encoder.event(now, text, resume=resume, **fields)
            elif reader.policy.notices:
                marker = raw_event(text)
            else:
                continue
            if len(reader.notices) >= MAX_NOTICES:
                reader.notices.popleft()
                reader.notice_pos = 0
                self.notices_dropped += 1
            reader.notices.append((self.head, marker))
        self._schedule_flush()

    # -- lifecycle ---------------------------------------------------------------

    def resize(self, bounds: PortBounds) -> None:
        """Apply a reloaded port's bounds to the log and queue."""
        self.bounds = bounds
        if bounds.log_capacity != self.ring.capacity:
            self.ring = self.records.ring = self.ring.resized(bounds.log_capacity)
        self.writes.resize(bounds.write_queue, bounds.max_line, bounds.line_timeout)

    def retarget(self, reader: Reader, policy: ReaderPolicy) -> None:
        """A reloaded listener's options apply to its connected readers at once,
        but for the format, which the connection was made for: new readers get it."""
        policy = dataclasses.replace(policy, format=reader.policy.format)
        reader.policy = policy
        self.writes.retarget(reader, policy)
        if self.head - reader.cursor > policy.capacity:
            self._overflow(reader)


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
