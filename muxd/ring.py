"""A bounded byte log addressed by absolute offsets.

The device's output is written once into a fixed ``bytearray``. Every byte has
an absolute offset (the count of bytes ever written before it), so a reader is
just an integer cursor and its lag is ``head - cursor``. Only the newest
``capacity`` bytes are held; older offsets have been overwritten.

Readers get ``memoryview`` slices of the buffer, never copies: one slice, or two
when the requested range wraps around the end. A view is only valid until the
next ``write``, which may overwrite it, so callers must hand it to the kernel
(``send``/``sendmsg``) before returning to the event loop.
"""

from __future__ import annotations


class Ring:
    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"ring capacity must be positive, got {capacity}")
        self.capacity = capacity
        self._buf = bytearray(capacity)
        self._view = memoryview(self._buf)
        self.head = 0  # absolute offset one past the newest byte
        self._first = 0  # the oldest offset ever written here (non-zero after a resize)

    @property
    def tail(self) -> int:
        """The oldest absolute offset still held."""
        return max(self._first, self.head - self.capacity)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n == 0:
            return
        cap = self.capacity
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

    def views(self, start: int, end: int | None = None) -> list[memoryview]:
        """Slices covering absolute offsets [start, end); at most two."""
        if end is None:
            end = self.head
        if start < self.tail or end > self.head or start > end:
            raise IndexError(f"range [{start}, {end}) outside held [{self.tail}, {self.head})")
        if start == end:
            return []
        cap = self.capacity
        a = start % cap
        b = a + (end - start)
        if b <= cap:
            return [self._view[a:b]]
        return [self._view[a:], self._view[: b - cap]]

    def read(self, start: int, end: int | None = None) -> bytes:
        """A copy of [start, end); for history replay and tests, not the hot path."""
        return b"".join(self.views(start, end))

    def resized(self, capacity: int) -> Ring:
        """A new ring of another capacity holding as much of the recent log as fits."""
        new = Ring(capacity)
        keep = min(capacity, self.head - self.tail)
        new.head = new._first = self.head - keep
        new.write(self.read(self.head - keep))
        return new
