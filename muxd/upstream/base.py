"""What every fd-based upstream shares: one fd, reads into the hub, drains the
hub's write queue, and reopens with capped, jittered exponential backoff.

The state machine is small: ``connecting`` -> ``up`` -> (loss) ``down`` ->
``backing-off`` -> ``connecting``. There is never more than one fd: a new one
is opened only after the old one is closed, so a K2 never sees two of us.

Writes queued while the device is down stay queued in the hub (bounded, with
backpressure on the writers) and go out in order once it is back up.
"""

from __future__ import annotations

import contextlib
import logging
import random
from abc import ABC, abstractmethod
from typing import Protocol

from muxd.hub import Hub
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import ERRMASK, IN, OUT, Reactor, Timer
from muxd.upstream.state import BACKING_OFF, CONNECTING, DOWN, UP, UpstreamStatus

log = logging.getLogger("muxd.upstream")

# One read per wake-up takes this much: a 4 Mbaud device produces ~400 KB/s,
# so 64 KiB keeps wake-ups rare under flood and costs one buffer, not one per reader.
READ_SIZE = 64 * 1024
# Reads taken from the device at stop: 16 x 64 KiB covers any tty or socket
# buffer, and bounds the stop against a device that never pauses.
FINAL_READS = 16


class Upstream(Protocol):
    """What the daemon, the line control, the API and the metrics see of a device."""

    status: UpstreamStatus
    settings: LineSettings  # the line settings in force
    bytes_unacked_lost: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def describe(self) -> str: ...
    def apply_settings(self, settings: LineSettings) -> None: ...


class FdUpstream(ABC):
    def __init__(self, hub: Hub, reactor: Reactor, backoff_min: float, backoff_max: float) -> None:
        self.hub = hub
        self.reactor = reactor
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.fd: int | None = None
        self.attempts = 0  # failures since the device last sent a byte, for the backoff
        self.open_attempts = 0  # total, for tests and metrics
        self._retry: Timer | None = None
        self._stopped = False
        self.status = UpstreamStatus(hub.name, hub.notice)
        # Bytes handed to the device that it may never have got (a TCP link that
        # died with them unacknowledged: muxd.upstream.tcp); counted, never silent.
        self.bytes_unacked_lost = 0
        hub.on_write_ready = self._on_write_ready

    # -- subclass hooks -------------------------------------------------------

    @abstractmethod
    def _open(self) -> None:
        """Try to open the device: call _opened(fd) or _failed(reason), now or later."""

    @abstractmethod
    def _read(self) -> bytes:
        """Read up to READ_SIZE; b"" means the device is gone. May raise OSError."""

    @abstractmethod
    def _write(self, data: memoryview) -> int:
        """Write some of data; may raise BlockingIOError or OSError."""

    @abstractmethod
    def _close_fd(self) -> None:
        """Close the fd (and whatever object owns it)."""

    def _on_up(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """The device is open: a hook for subclasses (e.g. to push line settings)."""

    def _received(self, data: bytes) -> None:
        """Bytes read from the fd; a hook for upstreams with a protocol on the wire."""
        self.hub.publish(data)

    def _loss_reason(self, exc: OSError | None) -> str:
        """The state reason for a failed read or write; None means EOF."""
        return "device closed" if exc is None else exc.strerror or str(exc)

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self._connect()

    def stop(self) -> None:
        """Close the device, first taking what it has already sent (readers are owed it)."""
        self._stopped = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        for _ in range(FINAL_READS):
            if self.fd is None:
                break
            try:
                data = self._read()
            except OSError:
                break
            if not data:
                break
            self._received(data)
        self._drop_fd()
        self.status.set(DOWN, "stopped")

    def _connect(self) -> None:
        self._retry = None
        if self._stopped:
            return
        self.open_attempts += 1
        self.status.set(CONNECTING, "opening")
        self._open()

    def _opened(self, fd: int) -> None:
        self.fd = fd
        self.reactor.add(fd, IN | self._out_mask(), self._on_events, self._on_internal_error)
        self.status.set(UP, "opened")
        self._on_up()

    def _failed(self, reason: str, delay: float | None = None) -> None:
        """Opening failed (or the device was lost): close and schedule a retry."""
        self._drop_fd()
        if self._stopped:
            return
        if delay is None:
            delay = self.backoff_delay()
            self.attempts += 1
        self.status.set(BACKING_OFF, reason)
        self._retry = self.reactor.call_later(delay, self._connect)

    def _lost(self, reason: str) -> None:
        self.status.set(DOWN, reason)
        self._failed(reason)

    def backoff_delay(self) -> float:
        """Exponential from backoff_min, capped at backoff_max, with "equal jitter"
        so that a lab full of muxd instances does not reconnect in lockstep."""
        ceiling = min(self.backoff_max, self.backoff_min * 2.0 ** min(self.attempts, 30))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _drop_fd(self) -> None:
        if self.fd is not None:
            self.reactor.remove(self.fd)
            self.fd = None
            with contextlib.suppress(OSError):
                self._close_fd()

    def _on_internal_error(self, exc: BaseException) -> None:
        self._lost(f"internal error: {exc!r}")

    # -- data -------------------------------------------------------------------

    def _out_mask(self) -> int:
        return OUT if self.hub.queue.bytes else 0

    def _on_events(self, mask: int) -> None:
        if mask & OUT:
            self._drain()
        if self.fd is not None and mask & (IN | ERRMASK):
            try:
                data = self._read()
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(self._loss_reason(exc))
                return
            if not data:
                self._lost(self._loss_reason(None))
                return
            # Success is the first byte, not the open: a peer that accepts and
            # drops at once (a K2 kicking us for another client) must still back off.
            self.attempts = 0
            self._received(data)

    def _on_write_ready(self) -> None:
        if self.fd is not None and not (self.reactor.mask(self.fd) & OUT):
            self._drain()  # try at once; EPOLLOUT only if the device is slower

    def _drain(self) -> None:
        queue = self.hub.queue
        while self.fd is not None and (unit := queue.peek()) is not None:
            try:
                n = self._write(unit)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(self._loss_reason(exc))
                return
            self.hub.consumed(n)
            if n < len(unit):
                break
        if self.fd is not None:
            self.reactor.modify(self.fd, IN | self._out_mask())
