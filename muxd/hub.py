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
    skipped bytes; ``disconnect`` closes it. A reader that is keeping up is
    never judged on a burst it has not yet been offered; it only loses bytes
    the ring itself has overwritten, which are counted the same way. Nothing a
    slow reader does can slow the device or another reader: the ring never
    waits for anybody.

    With many readers the wake-up pass is deferred by a few milliseconds so
    that several device reads go out in one send per reader: syscalls per byte
    fall as the number of readers grows, for a bounded cost in latency.

In (writers -> device)
    Bytes from rw readers enter a bounded FIFO of units. A unit is one read
    from one client (``write: chunks``) or one whole line (``write: lines``),
    and is never split by another client's bytes. When the queue is full the
    hub stops reading from writers (their EPOLLIN is switched off) until the
    device has drained it below half: backpressure, never a silent drop.
    Input from ro readers is read and discarded, and counted.

The hub owns no fd. Readers are driven through the small ``ReaderOwner``
interface that each connection type implements.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from muxd.config import Listener, Port
from muxd.protocol.framing import LineAssembler
from muxd.reactor import Reactor
from muxd.ring import Ring

log = logging.getLogger("muxd.hub")

# After a fan-out pass that took T seconds, the next one starts no sooner than
# T * FLUSH_GAP later. With 100 readers a pass takes under a millisecond and
# nothing is ever delayed; with thousands it takes milliseconds, device reads
# pile up meanwhile and go out together: syscalls per byte fall as readers
# grow, the pass uses at most about half a core, and the added latency is
# bounded by the pass time itself.
FLUSH_GAP = 1.0
# ...but never more than this: a pass that looked long because the process
# was preempted must not delay the next one by as much again.
FLUSH_GAP_MAX = 0.010
# A reader reads at most this much per wake-up: enough for any burst of typed
# or scripted commands, small enough that one flooding writer cannot starve
# the loop.
READ_CHUNK = 16 * 1024
# Notices queued per reader before older ones are dropped (and counted): state
# changes come seconds apart; more than this pending means the reader is stuck.
MAX_NOTICES = 16

_reader_ids = itertools.count(1)


class ReaderOwner(Protocol):
    """What a connection offers the hub."""

    def on_data(self) -> None:
        """New bytes are pending for this reader and it is not blocked: send now."""

    def on_write_room(self) -> None:
        """The write queue has room again: resume reading input."""

    def close(self, reason: str) -> None:
        """Disconnect this reader (overflow policy, admin action, shutdown)."""


class Transport(Protocol):
    """A plain byte transport the hub may write to directly (see Reader.transport)."""

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
        self.disconnects: dict[str, int] = {}
        self.closed_delivered = 0
        self.closed_dropped = 0
        # Line-settings requests from this listener's clients (muxd.linecontrol).
        self.settings_applied = 0
        self.settings_refused = 0  # by the line_control policy
        self.settings_failed = 0  # the device could not make the change


class Reader:
    """One reader's state in the hub: its cursor, its bound and its counters."""

    __slots__ = (
        "assembler",
        "blocked",
        "capacity",
        "cursor",
        "delivered",
        "drop_oldest",
        "dropped",
        "id",
        "input_paused",
        "listener",
        "notice_pos",
        "notices",
        "owner",
        "peer",
        "since",
        "stats",
        "transport",
    )

    def __init__(self, owner: ReaderOwner, listener: Listener, peer: str, max_line: int) -> None:
        self.id = next(_reader_ids)
        self.owner = owner
        self.listener = listener
        self.peer = peer
        self.since = time.time()
        self.cursor = 0
        self.capacity = listener.buffer
        self.drop_oldest = listener.overflow == "drop-oldest"
        self.delivered = 0
        self.dropped = 0
        self.blocked = False  # waiting for EPOLLOUT; the hub will not wake it
        self.input_paused = False
        self.assembler = LineAssembler(max_line) if listener.writable and listener.write == "lines" else None
        # In-band notices: (ring offset they belong at, text). Only for listeners
        # with notices on, so raw streams stay byte-exact.
        self.notices: deque[tuple[int, bytes]] = deque()
        self.notice_pos = 0  # bytes of notices[0] already sent
        self.stats: ListenerStats | None = None
        # Set by connections whose output is the ring's bytes unchanged (TCP and
        # Unix streams): the fan-out pass then writes to them itself, sharing one
        # set of views among all readers at the same offset. Encoding readers
        # (WebSocket, RFC 2217) leave it None and are woken through on_data().
        self.transport: Transport | None = None


class WriteQueue:
    """Bounded FIFO of write units on their way to the device."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.units: deque[memoryview] = deque()
        self.bytes = 0

    def room(self) -> int:
        return max(0, self.limit - self.bytes)

    def push(self, unit: bytes) -> None:
        if unit:
            self.units.append(memoryview(unit))
            self.bytes += len(unit)

    def peek(self) -> memoryview | None:
        return self.units[0] if self.units else None

    def consume(self, n: int) -> None:
        self.bytes -= n
        while n:
            head = self.units[0]
            if n >= len(head):
                n -= len(head)
                self.units.popleft()
            else:
                self.units[0] = head[n:]
                n = 0


class Hub:
    def __init__(self, port: Port, reactor: Reactor) -> None:
        self.port = port
        self.name = port.name
        self.reactor = reactor
        self.ring = Ring(port.log_capacity)
        self.readers: dict[int, Reader] = {}
        self._blocked: set[Reader] = set()
        self._paused: set[Reader] = set()
        self._flush_pending = False
        self._next_flush = 0.0  # monotonic time before which no fan-out pass starts
        self.queue = WriteQueue(port.write_queue)
        self.listener_stats: dict[str, ListenerStats] = {}
        # Set by the upstream: called when the write queue goes from empty to non-empty.
        self.on_write_ready: Callable[[], None] = lambda: None
        self.bytes_in = 0
        self.bytes_out = 0
        self.input_discarded = 0
        self.notices_dropped = 0

    # -- readers -------------------------------------------------------------

    @property
    def head(self) -> int:
        return self.ring.head

    def stats_for(self, listener: Listener) -> ListenerStats:
        return self.listener_stats.setdefault(listener.name, ListenerStats())

    def attach(self, owner: ReaderOwner, listener: Listener, peer: str, history: int = 0) -> Reader:
        reader = Reader(owner, listener, peer, self.port.max_line)
        history = min(history, self.port.history, self.head - self.ring.tail)
        reader.cursor = self.head - max(0, history)
        reader.stats = self.stats_for(listener)
        reader.stats.connections += 1
        self.readers[reader.id] = reader
        return reader

    def detach(self, reader: Reader, reason: str) -> None:
        if self.readers.pop(reader.id, None) is None:
            return
        self._blocked.discard(reader)
        self._paused.discard(reader)
        if reader.assembler is not None:
            self.queue.push(reader.assembler.flush())  # a partial last line still goes out
            self._queued()
        stats = reader.stats
        if stats is not None:
            stats.disconnects[reason] = stats.disconnects.get(reason, 0) + 1
            stats.closed_delivered += reader.delivered
            stats.closed_dropped += reader.dropped

    def clients_of(self, listener: Listener) -> int:
        return sum(1 for r in self.readers.values() if r.listener.name == listener.name)

    # -- out: device -> readers --------------------------------------------

    def publish(self, data: bytes | memoryview) -> None:
        """Bytes the device produced. Never blocks, whatever the readers do."""
        self.ring.write(data)
        self.bytes_in += len(data)
        if self._blocked:
            head = self.head
            for reader in list(self._blocked):
                if head - reader.cursor > reader.capacity:
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
            if transport is None or reader.notices or cursor < tail:
                if cursor != head or reader.notices:
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
        if reader.drop_oldest:
            skip = lag - (reader.capacity if keep is None else keep)
            reader.cursor += skip
            reader.dropped += skip
        else:
            reader.dropped += lag
            reader.cursor = self.head
            reader.owner.close("overflow")

    def pending(self, reader: Reader, limit: int = 1 << 30) -> list[memoryview]:
        """Views of what the reader is owed next (notices first where due)."""
        if reader.cursor < self.ring.tail:  # overwritten before it could be offered
            self._overflow(reader, keep=self.head - self.ring.tail)
            if reader.id not in self.readers:
                return []
        if reader.notices:
            offset, text = reader.notices[0]
            if offset <= reader.cursor:
                return [memoryview(text)[reader.notice_pos :]]
            end = min(self.head, offset, reader.cursor + limit)
        else:
            end = min(self.head, reader.cursor + limit)
        return self.ring.views(reader.cursor, end)

    def advance(self, reader: Reader, n: int) -> None:
        """The reader has sent n bytes of what pending() gave it."""
        if reader.notices and reader.notices[0][0] <= reader.cursor:
            reader.notice_pos += n
            if reader.notice_pos >= len(reader.notices[0][1]):
                reader.notices.popleft()
                reader.notice_pos = 0
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
        return reader.cursor >= self.head and not reader.notices

    def set_blocked(self, reader: Reader, blocked: bool) -> None:
        """The reader's transport is full (True) or has room again (False)."""
        reader.blocked = blocked
        if blocked:
            self._blocked.add(reader)
            if self.head - reader.cursor > reader.capacity:
                self._overflow(reader)
        else:
            self._blocked.discard(reader)

    def lag(self, reader: Reader) -> int:
        return self.head - reader.cursor

    def max_lag(self) -> int:
        head = self.head
        return max((head - r.cursor for r in self.readers.values()), default=0)

    # -- in: writers -> device ------------------------------------------------

    def input_budget(self, reader: Reader) -> int:
        """How many bytes this reader may read now; 0 means pause its input."""
        if not reader.listener.writable:
            return READ_CHUNK  # read to notice EOF, discard
        room = self.queue.room()
        if room == 0:
            reader.input_paused = True
            self._paused.add(reader)
            return 0
        return min(READ_CHUNK, room)

    def submit(self, reader: Reader, data: bytes) -> None:
        """Bytes a reader sent, already limited by input_budget()."""
        if not reader.listener.writable:
            self.input_discarded += len(data)
            return
        if reader.assembler is None:
            self.queue.push(data)
        else:
            for line in reader.assembler.feed(data):
                self.queue.push(line)
        self._queued()

    def input_ended(self, reader: Reader) -> None:
        """The reader will send no more (it half-closed): release its held partial line."""
        if reader.assembler is not None:
            self.queue.push(reader.assembler.flush())
            self._queued()

    def _queued(self) -> None:
        if self.queue.bytes:
            self.on_write_ready()

    def consumed(self, n: int) -> None:
        """The upstream wrote n bytes of the queue to the device."""
        self.queue.consume(n)
        self.bytes_out += n
        if self._paused and self.queue.bytes <= self.queue.limit // 2:
            paused, self._paused = self._paused, set()
            for reader in paused:
                reader.input_paused = False
                reader.owner.on_write_room()

    # -- notices ----------------------------------------------------------------

    def notice(self, text: bytes) -> None:
        """An in-band line for every reader with notices on, at the current offset."""
        for reader in self.readers.values():
            if reader.listener.notices:
                if len(reader.notices) >= MAX_NOTICES:
                    reader.notices.popleft()
                    reader.notice_pos = 0
                    self.notices_dropped += 1
                reader.notices.append((self.head, text))
        self._schedule_flush()

    # -- lifecycle ---------------------------------------------------------------

    def resize(self, port: Port) -> None:
        """Apply a reloaded port config to the log and queue bounds."""
        self.port = port
        if port.log_capacity != self.ring.capacity:
            self.ring = self.ring.resized(port.log_capacity)
        self.queue.limit = port.write_queue

    def retarget(self, reader: Reader, listener: Listener) -> None:
        """A reloaded listener's options apply to its connected readers at once."""
        reader.listener = listener
        reader.capacity = listener.buffer
        reader.drop_oldest = listener.overflow == "drop-oldest"
        lines = listener.writable and listener.write == "lines"
        if lines and reader.assembler is None:
            reader.assembler = LineAssembler(self.port.max_line)
        elif not lines and reader.assembler is not None:
            self.queue.push(reader.assembler.flush())
            reader.assembler = None
            self._queued()
        if self.head - reader.cursor > reader.capacity:
            self._overflow(reader)
