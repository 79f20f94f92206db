"""The way back to the device: what writers send, arbitrated into one bounded queue.

Bytes from rw readers enter a bounded FIFO of units. A unit is one read from
one client (``write: chunks``) or one whole line (``write: lines``), and is
never split by another client's bytes. Under ``write: lines`` a control
character (Ctrl-C) or a key's escape sequence is a unit of its own, released
at once after the writer's partial line (muxd.protocol.framing), and a partial
line idle for ``line_timeout`` is released as a unit by a timer, one per
reader at most, so a lone key reaches the device without a newline.

When the queue is full, writers are not read (the connection core switches
their EPOLLIN off) until the device has drained it below half: backpressure,
never a silent drop. Input from ro readers is read and discarded, and counted.
The bound counts the partial lines readers hold, so the queue never exceeds it,
even when many writers leave at once; and when held lines alone fill it they
are released, so the device drains them and the writers resume.

The upstream takes units with ``queue.peek()`` and reports what the device
took with ``consumed(n)``; ``on_ready`` tells it the queue became non-empty.
Observers (traces with ``input: true``) see each writer's bytes as accepted.

Each reader's write side (its assembler, its line timer, whether its input is
paused) is a WriterState that only this module changes; the reader shows it.
A writer of whole messages (the MQTT feed) uses ``offer()``: a message goes in
whole or is refused, and a refusal pauses nothing.

The write lock. Before any rw writer's bytes are accepted, the port's
WriteLock (muxd.writelock, ``write_lock: first``) is asked; input it refuses
is counted (``lock.refused_bytes``) and answered in-band to that writer once
per refused burst, naming the holder: never queued, never silently lost.
Every change of holder is told in-band to whoever it concerns (the holder
forced out, the one forcing, a holder idled out) and reported to the
``events`` observers, as are the port's other control events (a client
attaching or leaving, a BREAK, a sequence): traces with ``events: true``
record them. A timer releases an idle holder (``lock_idle``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from muxd.protocol.framing import LineAssembler
from muxd.reactor import Reactor, Timer
from muxd.writelock import Holder, WriteLock

if TYPE_CHECKING:
    from muxd.hub import Reader, ReaderPolicy

# A reader reads at most this much per wake-up: enough for any burst of typed
# or scripted commands, small enough that one flooding writer cannot starve
# the loop.
READ_CHUNK = 16 * 1024


class Commands(Protocol):
    """What runs a client's escape commands (muxd.sharing.PortActions)."""

    def command(self, reader: Reader, letter: str, escape: int, close: Callable[[str], None]) -> None: ...


class WriterState:
    """One reader's write side, changed by Writes alone."""

    __slots__ = ("assembler", "line_timer", "paused")

    def __init__(self, assembler: LineAssembler | None = None) -> None:
        self.assembler = assembler  # write: lines
        # Releases the assembler's partial line once it has idled for the port's
        # line_timeout; cancelled whenever the partial line goes out another way.
        self.line_timer: Timer | None = None
        self.paused = False  # not read until the queue drains

    @property
    def held(self) -> int:
        """Input bytes accepted but not yet queued (a partial line)."""
        return self.assembler.held if self.assembler is not None else 0


class WriteQueue:
    """Bounded FIFO of write units on their way to the device.

    The bound counts what writers have sent and muxd has accepted: the queued
    units and the partial lines readers hold (``held``), which join the queue
    when their line ends or their writer leaves. A writer is read only while
    there is room for everything it may send in one read, so the queue never
    holds more than ``limit`` bytes, even when many writers leave at once and
    their partial lines are released together.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.units: deque[memoryview] = deque()
        self.bytes = 0
        self.held = 0  # partial lines held by readers' assemblers

    def room(self) -> int:
        return max(0, self.limit - self.bytes - self.held)

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


class Writes:
    """One port's writers and its device write queue."""

    def __init__(self, limit: int, max_line: int, line_timeout: float, reactor: Reactor) -> None:
        self.queue = WriteQueue(limit)
        self.max_line = max_line
        self.line_timeout = line_timeout  # seconds; 0: a partial line waits for its end
        self.reactor = reactor
        self._paused: set[Reader] = set()  # writers not read until the queue drains
        self._holding: set[Reader] = set()  # writers with a partial line held
        # Called with what a writer's input put on the way to the device.
        self.observers: list[Callable[[Reader, bytes], None]] = []
        # Set by the upstream: called when the queue goes from empty to non-empty.
        self.on_ready: Callable[[], None] = lambda: None
        self.bytes_out = 0
        self.discarded = 0  # bytes from ro readers
        self.lock = WriteLock(clock=reactor.now)
        self.lock.on_change = self._lock_changed
        self._lock_timer: Timer | None = None
        # Set with the hub (muxd.port): an in-band answer to one reader (Hub.tell).
        self.tell: Callable[..., None] = lambda reader, text, **fields: None
        # Control events of the port (attach, detach, lock, break, sequence):
        # called with (event, text, fields); traces with events: true listen.
        self.events: list[Callable[[str, str, dict[str, Any]], None]] = []
        self.commands: Commands | None = None  # set with the port (muxd.port)

    def writer_for(self, policy: ReaderPolicy) -> WriterState:
        """A new reader's write side."""
        return WriterState(LineAssembler(self.max_line) if policy.writable and policy.lines else None)

    def budget(self, reader: Reader) -> int:
        """How many bytes this reader may read now; 0 means pause its input."""
        if not reader.policy.writable:
            return READ_CHUNK  # read to notice EOF, discard
        room = self.queue.room()
        if room == 0:
            if not self.queue.bytes:
                # Held partial lines alone fill the bound: nothing would ever
                # drain and resume anyone. They go out as they are (each still
                # one unit), so the device drains them and consumed() resumes
                # the writers.
                for held in list(self._holding):
                    self.release(held)
            reader.writer.paused = True
            self._paused.add(reader)
            return 0
        return min(READ_CHUNK, room)

    def submit(self, reader: Reader, data: bytes) -> None:
        """Bytes a reader sent, already limited by budget()."""
        if not reader.policy.writable:
            self.discarded += len(data)
            return
        if self.lock.enabled and not self._admitted(reader, len(data)):
            return
        self._accept(reader, data)

    def _accept(self, reader: Reader, data: bytes) -> None:
        for observe in self.observers:
            observe(reader, data)
        assembler = reader.writer.assembler
        if assembler is None:
            self.queue.push(data)
        else:
            self.queue.held -= assembler.held
            for line in assembler.feed(data):
                self.queue.push(line)
            self.queue.held += assembler.held
            self._restart_line_timer(reader)
        self._queued()

    def offer(self, reader: Reader, message: bytes) -> bool:
        """A whole message from a reader that writes messages (MQTT): queued
        whole (its last partial line too) if there is room for all of it,
        else refused (False) and nothing is paused: the next one is judged anew."""
        if not reader.policy.writable or len(message) > min(READ_CHUNK, self.queue.room()):
            return False
        if self.lock.enabled and not self._admitted(reader, len(message)):
            return False
        self._accept(reader, message)
        self.release(reader)
        return True

    def input_ended(self, reader: Reader) -> None:
        """The reader will send no more (it half-closed): release its held
        partial line, and the write lock (it lingers only to read the answer)."""
        self.release(reader)
        self.lock.leave(reader)

    def leave(self, reader: Reader) -> None:
        """The reader is gone: a partial last line still goes out, and it
        holds the write lock no more."""
        self._paused.discard(reader)
        self.release(reader)
        self.lock.leave(reader)

    # -- the write lock ------------------------------------------------------------

    def _admitted(self, reader: Reader, n: int) -> bool:
        """Whether the lock lets this writer's n bytes in; a refused burst is
        answered once, naming the holder."""
        allowed, tell = self.lock.admit(reader, n)
        if allowed:
            self._arm_lock_timer()
        elif tell and (holder := self.lock.holder) is not None:
            refused = f"input refused: {self.describe_holder(holder)}"
            self.tell(reader, refused, **self._lock_fields("refused"))
        return allowed

    def may_write(self, reader: Reader) -> str | None:
        """Why this reader may not act on the device now (read-only, or another
        holds the write lock), or None; a free lock is taken, as typing would."""
        if not reader.policy.writable:
            return "this session is read-only"
        if self.lock.enabled and not self._admitted(reader, 0):
            holder = self.lock.holder
            return self.describe_holder(holder) if holder is not None else "the write lock is held"
        return None

    def force(self, reader: Reader) -> str | None:
        """The reader takes the write lock over; why not, or None. Read-only never can."""
        if not reader.policy.writable:
            return "this session is read-only: it can never hold the write lock"
        if not self.lock.enabled:
            return "this port has no write lock (write_lock: none): everyone may write"
        self.lock.force(reader)
        self._arm_lock_timer()
        return None

    def describe_holder(self, holder: Holder) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(holder.since))
        return f"{holder.who} holds the write lock (since {since})"

    def _lock_fields(self, why: str) -> dict[str, Any]:
        holder = self.lock.holder
        fields: dict[str, Any] = {"event": "write_lock", "why": why}
        if holder is not None:
            r = holder.reader
            fields.update(holder=r.id, peer=r.peer, listener=r.policy.listener)
        return fields

    def _lock_changed(self, old: Reader | None, new: Reader | None, why: str) -> None:
        """The lock changed hands: tell those it concerns, and the observers."""
        fields = self._lock_fields(why)
        if old is not None:
            fields["previous"] = old.id
        old_name = f"{old.policy.listener} {old.peer}" if old is not None else ""
        new_name = f"{new.policy.listener} {new.peer}" if new is not None else ""
        if new is not None:
            text = f"write lock taken by {new_name} ({why})"
        else:
            text = f"write lock released by {old_name} ({why})"
        if why == "forced" and old is not None and new is not None:
            self.tell(old, f"the write lock was taken over by {new_name}", **fields)
            self.tell(new, f"you hold the write lock now, taken from {old_name}", **fields)
        elif why == "idle" and old is not None:
            self.tell(old, "write lock released: idle for too long", **fields)
        if new is None and self._lock_timer is not None:
            self._lock_timer.cancel()
            self._lock_timer = None
        self.event("lock", text, **fields)

    def event(self, name: str, text: str, **fields: Any) -> None:
        """A control event of the port, for the observers (traces with events: true)."""
        for observe in self.events:
            observe(name, text, fields)

    def _arm_lock_timer(self) -> None:
        """One timer per port releases an idle holder: armed at the deadline,
        and on firing re-armed for what is left when the holder wrote since
        (cheaper than moving a timer at every keystroke)."""
        due = self.lock.deadline()
        if due is None or self._lock_timer is not None:
            return
        self._lock_timer = self.reactor.call_later(max(0.0, due - self.reactor.now()), self._lock_due)

    def _lock_due(self) -> None:
        self._lock_timer = None
        if not self.lock.expire(self.reactor.now()):
            self._arm_lock_timer()

    def retarget(self, reader: Reader, policy: ReaderPolicy) -> None:
        """A reloaded listener's write mode applies to a connected reader
        (one made read-only lets go of the write lock)."""
        if not policy.writable:
            self.lock.leave(reader)
        lines = policy.writable and policy.lines
        writer = reader.writer
        if lines and writer.assembler is None:
            writer.assembler = LineAssembler(self.max_line)
        elif not lines and writer.assembler is not None:
            self.release(reader)
            writer.assembler = None

    def _restart_line_timer(self, reader: Reader) -> None:
        """Input arrived: the idle clock of the reader's partial line starts again.
        Cancel and re-arm rather than keep one timer and move its deadline: the
        reactor's heap has no "move", and its sweep keeps cancelled timers cheap."""
        writer = reader.writer
        if writer.line_timer is not None:
            writer.line_timer.cancel()
            writer.line_timer = None
        if writer.held:
            self._holding.add(reader)
            if self.line_timeout > 0:
                writer.line_timer = self.reactor.call_later(
                    self.line_timeout, lambda: self._line_idle(reader)
                )
        else:
            self._holding.discard(reader)

    def _line_idle(self, reader: Reader) -> None:
        """The partial line idled for line_timeout: it goes out as a unit of its
        own (a lone key, a prompt's answer typed without Enter)."""
        reader.writer.line_timer = None
        self.release(reader)

    def release(self, reader: Reader) -> None:
        """The reader's held partial line goes into the queue as one unit."""
        # The timer holds the reader through its callback: cancelling drops that
        # reference, so a detached reader is not kept alive until the deadline.
        writer = reader.writer
        if writer.line_timer is not None:
            writer.line_timer.cancel()
            writer.line_timer = None
        self._holding.discard(reader)
        if writer.assembler is not None:
            self.queue.held -= writer.assembler.held
            self.queue.push(writer.assembler.flush())
            self._queued()

    def _queued(self) -> None:
        if self.queue.bytes:
            self.on_ready()

    def consumed(self, n: int) -> None:
        """The upstream wrote n bytes of the queue to the device."""
        self.queue.consume(n)
        self.bytes_out += n
        if self._paused and self.queue.bytes <= self.queue.limit // 2:
            paused, self._paused = self._paused, set()
            for reader in paused:
                reader.writer.paused = False
                reader.owner.on_write_room()

    def resize(self, limit: int, max_line: int, line_timeout: float) -> None:
        """A reloaded port's bounds; held lines keep their assemblers."""
        self.queue.limit = limit
        self.max_line = max_line
        self.line_timeout = line_timeout
