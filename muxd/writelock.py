"""The write lock: one keyboard per port under ``write_lock: first``.

A shared console is read by many and typed at by one. Under ``write_lock:
first`` (a port-level key, so it spans every rw writer of the port: tcp,
unix, pty, rfc2217 and WebSocket clients, and the MQTT ``/tx`` feed) the
first rw writer to send holds the lock; the input of every other writer is
refused (counted in ``refused_bytes``, and answered in-band by the caller
once per refused burst, naming the holder). The holder keeps the lock until
it leaves or has sent nothing for ``lock_idle`` seconds; any rw writer may
take it over (``force``), and the previous holder is told. Read-only
writers never reach this object (muxd.writes discards their input first),
so ``mode: ro`` and a read-scoped token can never take the lock.
``write_lock: none`` (the default) admits everyone, as before.

This is a policy object with no I/O: muxd.writes asks ``admit()`` before a
writer's bytes enter the write queue, calls ``leave()`` when a reader goes,
and arms a reactor timer at ``deadline()`` that calls ``expire()``. The clock
is injected, so the tests drive it without sockets or sleeps. Every change of
holder is reported to ``on_change(old, new, why)``: muxd.writes turns that
into in-band notices and trace events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from muxd.hub import Reader

WriteLockPolicy = Literal["none", "first"]
# A refused writer is told again only after this much quiet: a pasted
# paragraph or a held-down key is one burst and gets one notice, a new
# attempt a few seconds later gets another.
BURST_GAP = 2.0


@dataclass(frozen=True)
class Holder:
    """Who holds the lock, as the API, ``muxd status`` and the metrics show it."""

    reader: Reader
    since: float  # wall clock, when it took the lock

    @property
    def who(self) -> str:
        """``tcp:dut1-tcp 127.0.0.1:5321``: how notices name the holder."""
        r = self.reader
        token = r.token
        return f"{r.policy.listener} {r.peer}" + (f" (token {token})" if token else "")


class WriteLock:
    """One port's write lock (see the module doc)."""

    def __init__(
        self,
        policy: WriteLockPolicy = "none",
        idle: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.policy: WriteLockPolicy = policy
        self.idle = idle  # seconds; 0: never idles out
        self.clock = clock
        self.wall = wall
        self.holder: Holder | None = None
        self._last_input = 0.0  # clock(), the holder's last accepted input
        # Per refused writer, when it was last refused and whom it was told
        # of: bounded by the connected writers, dropped in leave().
        self._refused: dict[Reader, tuple[float, Reader]] = {}
        self.refused_bytes = 0
        self.refusals = 0  # refused bursts (notices owed)
        self.changes = 0  # times the lock changed hands
        self.on_change: Callable[[Reader | None, Reader | None, str], None] = lambda old, new, why: None

    @property
    def enabled(self) -> bool:
        return self.policy == "first"

    def admit(self, reader: Reader, n: int) -> tuple[bool, bool]:
        """A writer wants to send n bytes: (allowed, tell it who holds the
        lock). The first writer takes a free lock; the holder's input moves
        its idle clock."""
        if not self.enabled:
            return True, False
        now = self.clock()
        self.expire(now)
        holder = self.holder
        if holder is None:
            self._take(reader, "first to write")
            holder = self.holder
            assert holder is not None
        if holder.reader is reader:
            self._last_input = now
            return True, False
        self.refused_bytes += n
        last = self._refused.get(reader)
        tell = last is None or now - last[0] >= BURST_GAP or last[1] is not holder.reader
        self._refused[reader] = (now, holder.reader)
        if tell:
            self.refusals += 1
        return False, tell

    def force(self, reader: Reader) -> Reader | None:
        """``reader`` takes the lock over; the previous holder (to be told),
        or None. Only rw writers may: the caller checks the mode."""
        if not self.enabled:
            return None
        self.expire(self.clock())
        old = self.holder.reader if self.holder is not None else None
        if old is not reader:
            self._take(reader, "forced")
        self._last_input = self.clock()
        return old if old is not reader else None

    def leave(self, reader: Reader) -> None:
        """The reader is gone: it holds nothing, and is forgotten."""
        self._refused.pop(reader, None)
        if self.holder is not None and self.holder.reader is reader:
            self._release("left")

    def deadline(self) -> float | None:
        """clock() time at which the holder idles out, or None."""
        if self.holder is None or self.idle <= 0:
            return None
        return self._last_input + self.idle

    def expire(self, now: float) -> bool:
        """Release the lock if its holder has idled for ``idle``; True if it did."""
        due = self.deadline()
        if due is None or now < due:
            return False
        self._release("idle")
        return True

    def reload(self, policy: WriteLockPolicy, idle: float) -> None:
        self.policy, self.idle = policy, idle
        if not self.enabled and self.holder is not None:
            self._release("write_lock: none")

    def _take(self, reader: Reader, why: str) -> None:
        old = self.holder.reader if self.holder is not None else None
        self.holder = Holder(reader, self.wall())
        self._last_input = self.clock()
        self.changes += 1
        self.on_change(old, reader, why)

    def _release(self, why: str) -> None:
        assert self.holder is not None
        old = self.holder.reader
        self.holder = None
        self.changes += 1
        self.on_change(old, None, why)
