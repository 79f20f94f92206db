"""A bounded byte log addressed by absolute offsets.

The device's output is written once into a ``bytearray``. Every byte has an
absolute offset (the count of bytes ever written before it), so a reader is
just an integer cursor and its lag is ``head - cursor``. Only the newest
``capacity`` bytes are held; older offsets have been overwritten.

The capacity is a ceiling, not a reservation: the buffer starts at
INITIAL_SIZE (or the capacity, if smaller) and doubles whenever what it must
hold outgrows it, up to the capacity, so its memory follows what has been
written. A port configured with a large ``buffer`` that sees little traffic
costs little, and creating a ring never zero-fills (touches) the whole bound.
Each doubling copies what is held once: amortised, less than one extra copy
per byte, and never more than the capacity in one go.

The owner may say what must be held (``low``: the oldest offset anyone still
needs, the readers' cursors and the history bound): before a write would grow
the buffer, what is older than that is let go instead, so a ring grows to
what its readers lag and its history, not to the capacity, whatever the
traffic. Without ``low`` every byte up to the capacity is kept.

Readers get ``memoryview`` slices of the buffer, never copies: one slice, or two
when the requested range wraps around the end. A view is only valid until the
next ``write``, which may overwrite it (or move the log to a bigger buffer), so
callers must hand it to the kernel (``send``/``sendmsg``) before returning to
the event loop.
"""

from __future__ import annotations

from collections.abc import Callable

# The buffer a ring starts with: a page, a few device reads, so that a
# quiet port costs little (128 of them, two rings each: 1 MiB, not 16).
INITIAL_SIZE = 4 * 1024


class Ring:
    def __init__(self, capacity: int, initial: int = INITIAL_SIZE) -> None:
        if capacity <= 0 or initial <= 0:
            raise ValueError(f"ring capacity and initial size must be positive, got {capacity}, {initial}")
        self.capacity = capacity
        self._size = min(capacity, initial)  # the buffer's size now: offsets map modulo it
        self._buf = bytearray(self._size)
        self._view = memoryview(self._buf)
        self.head = 0  # absolute offset one past the newest byte
        self._first = 0  # the oldest offset held here (non-zero after a resize or a let-go)
        self.low: Callable[[], int] | None = None  # the oldest offset still needed (see above)

    @property
    def tail(self) -> int:
        """The oldest absolute offset still held."""
        return max(self._first, self.head - self.capacity)

    @property
    def allocated(self) -> int:
        """Bytes of buffer in use now (at most the capacity)."""
        return self._size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n == 0:
            return
        if self._size < self.capacity and self.head + n - self._first > self._size:
            if self.low is not None:  # asked once per buffer's worth of writes, at most
                self._first = max(self._first, min(self.low(), self.head))
            if self.head + n - self._first > self._size:
                self._grow(self.head + n - self._first)
        cap = self._size
        if n >= cap:
            # Only the newest `cap` bytes can survive; place them as if written in order.
            data = memoryview(data)[n - cap :]
            start = (self.head + n - cap) % cap
            first = cap - start
            self._view[start:] = data[:first]
            self._view[:start] = data[first:]
        else:
            start = self.head % cap
            first = min(n, cap - start)
            self._view[start : start + first] = data[:first] if first < n else data
            if first < n:
                self._view[: n - first] = memoryview(data)[first:]
        self.head += n

    def _grow(self, needed: int) -> None:
        """Move to a buffer of at least `needed` bytes (doubling, up to the
        capacity); what is held keeps its offsets."""
        # Doubling amortises the copies of a ring that only grows; one that lets
        # go (low) grows only when its readers lag more, so a quarter over
        # the need (in whole pages) is enough: a port with a 64 KiB history
        # holds about 80 KiB, not 128.
        grown = 2 * self._size if self.low is None else -(-(needed + needed // 4) // 4096) * 4096
        size = min(self.capacity, max(needed, grown))
        held = self.read(self.tail)
        self._size = size
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        head, self.head = self.head, self.head - len(held)
        self.write(held)  # fits: len(held) <= the old size < size
        assert self.head == head

    def views(self, start: int, end: int | None = None) -> list[memoryview]:
        """Slices covering absolute offsets [start, end); at most two."""
        if end is None:
            end = self.head
        if start < self.tail or end > self.head or start > end:
            raise IndexError(f"range [{start}, {end}) outside held [{self.tail}, {self.head})")
        if start == end:
            return []
        cap = self._size
        a = start % cap
        b = a + (end - start)
        if b <= cap:
            return [self._view[a:b]]
        return [self._view[a:], self._view[: b - cap]]

    def read(self, start: int, end: int | None = None) -> bytes:
        """A copy of [start, end); for history replay and tests, not the hot path."""
        return b"".join(self.views(start, end))

    def ends_line(self, offset: int) -> bool | None:
        """Whether the byte just before `offset` is a newline (True at offset 0,
        where nothing came before); None when that byte is no longer held."""
        if offset == 0:
            return True
        if offset - 1 < self.tail or offset > self.head:
            return None
        return self.read(offset - 1, offset) == b"\n"

    def resized(self, capacity: int) -> Ring:
        """A new ring of another capacity holding as much of the recent log as fits."""
        new = Ring(capacity)
        keep = min(capacity, self.head - self.tail)
        new.head = new._first = self.head - keep
        new.write(self.read(self.head - keep))
        return new
