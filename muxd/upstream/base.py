"""What every fd-based upstream shares: one fd, reads into the hub, drains the
hub's write queue, and reopens with capped, jittered exponential backoff.

The state machine is small: ``connecting`` -> ``up`` -> (loss) ``down`` ->
``backing-off`` -> ``connecting`` (the table is muxd.upstream.state's). There
is never more than one fd: a new one is opened only after the old one is
closed, so a K2 never sees two of us.

Every attempt ends in a scheduled next attempt, whatever it raised. An
attempt that raises (EMFILE from socket(), anything from pyserial's open(),
a bug inside a retry timer) is logged once per outage (with its traceback
only if it is not an OSError, i.e. not the environment), counted in
``status.attempt_errors``, and followed by a retry with backoff like any other
failure. Nothing leaves a port in ``connecting``: the retry is scheduled before
the state is reported, so even a bug in the reporting cannot stop it.

The backoff grows with each failure and resets only once a link has stayed up
for ``STABLE_UP``: a peer that accepts, sends a banner (or one byte) and
closes is retried with growing waits, not hundreds of times a minute.

Writes queued while the device is down stay queued in the hub (bounded, with
backpressure on the writers) and go out in order once it is back up.

Reading can be paused (``set_reading(False)``, which the hub calls while a
lossless reader holds the device, see muxd.hub): the fd stays registered for
output and errors, but not for input, so the device's own flow control
applies (a pty writer blocks, a TCP peer's window closes, a UART with
RTS/CTS holds). An error or hang-up while paused is still read: the device is
going away and what it had is owed to the readers.

Every upstream also owns what is in force on the line, as the one copy muxd
keeps: the line settings (``settings``) and the control lines (``control``:
DTR, RTS, BREAK; ``set_control`` changes them or raises SettingsRefused), and
it reads the modem inputs when asked (``modem_state``); ``control_lines``
says whether it has DTR and RTS at all. muxd.linecontrol
decides who may change them; the listeners, the API and the metrics read them
here and keep no copy.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from muxd.hub import Hub
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import ERRMASK, IN, OUT, Reactor, Timer
from muxd.upstream.state import BACKING_OFF, CONNECTING, DOWN, UP, LinkMonitor, backoff_delay

log = logging.getLogger("muxd.upstream")

# One read per wake-up takes this much: a 4 Mbaud device produces ~400 KB/s,
# so 64 KiB keeps wake-ups rare under flood and costs one buffer, not one per reader.
READ_SIZE = 64 * 1024
# Reads taken from the device at stop: 16 x 64 KiB covers any tty or socket
# buffer, and bounds the stop against a device that never pauses.
FINAL_READS = 16
# A link must stay up this long before the backoff starts again from
# backoff_min. Long enough that a peer which accepts, greets and closes (a
# K2 kicking us for another client, a server that sends a banner and hangs up)
# counts as a failure and is retried with growing waits; short enough that a
# device that was healthy for ten seconds and then drops is retried at once.
STABLE_UP = 10.0


@dataclass(frozen=True)
class ControlLines:
    """The output control lines in force, as the upstream last set (or was told) them.

    None is "not known": a K2 whose lines nobody set since muxd started keeps
    whatever it had, and muxd does not pretend to know. ``brk`` is True while
    a BREAK is being sent (TX held low).
    """

    dtr: bool | None = None
    rts: bool | None = None
    brk: bool = False


@dataclass(frozen=True)
class ModemLines:
    """The modem status inputs (read, never set): what the device side says."""

    cts: bool
    dsr: bool
    ri: bool
    cd: bool


class Upstream(Protocol):
    """What the daemon, the line control, the API and the metrics see of a device."""

    status: LinkMonitor
    # The line settings in force: the one copy muxd keeps (muxd.linecontrol and
    # the listeners read it here). Only apply_settings() and the device's own
    # answers change it.
    settings: LineSettings
    bytes_unacked_lost: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def describe(self) -> str: ...
    def apply_settings(self, wanted: LineSettings) -> LineSettings:
        """Put ``wanted`` in force; return the settings really granted.

        Raises muxd.errors.SettingsRefused, saying why, when the device or the
        link cannot take them; ``settings`` is then unchanged.
        """
        ...

    # The control lines in force: the one copy, as for ``settings``. Only
    # set_control() and the device's own answers (a K2's RFC 2217 reply) change it.
    control: ControlLines

    def set_control(
        self, dtr: bool | None = None, rts: bool | None = None, brk: bool | None = None
    ) -> ControlLines:
        """Set the lines given (None: leave that one as it is); return the lines in force.

        Raises muxd.errors.SettingsRefused, saying why, when the device or the
        link cannot set them (a pty has no modem lines, a K2 with ``control:
        usr`` has no command for them); ``control`` is then unchanged.
        """
        ...

    def modem_state(self) -> ModemLines | None:
        """CTS, DSR, RI and CD now, or None where the upstream cannot tell."""
        ...


class FdUpstream(ABC):
    def __init__(self, hub: Hub, reactor: Reactor, backoff_min: float, backoff_max: float) -> None:
        self.hub = hub
        self.reactor = reactor
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.fd: int | None = None
        # Failures since a link last stayed up for STABLE_UP: the backoff's exponent.
        self.failures = 0
        self.open_attempts = 0  # total, for tests and metrics
        self._retry: Timer | None = None
        self.stable_after = STABLE_UP  # an attribute so that tests can shorten it
        self._stable: Timer | None = None  # fires when the current link has lasted stable_after
        self._stopped = False
        self.status = LinkMonitor(hub.name, hub.notice)
        # Bytes handed to the device that it may never have got (a TCP link that
        # died with them unacknowledged: muxd.upstream.tcp); counted, never silent.
        self.bytes_unacked_lost = 0
        # Whether the device has DTR and RTS at all: a subclass says False where
        # it has none (a pty, found at open; a K2 that cannot be told), so no
        # view shows a level nobody can set (muxd.linecontrol.control_lines).
        self.control_lines = True
        # False while the hub holds the device (muxd.hub); an upstream replaced
        # by a reload while a lossless reader holds it starts held.
        self._reading = not hub.holding
        hub.writes.on_ready = self._on_write_ready
        hub.set_reading = self.set_reading

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
        try:
            self._open()
        except Exception as exc:  # noqa: BLE001 - any failure must end in a retry, see _attempt_raised
            self._attempt_raised(exc)

    def _attempt_raised(self, exc: Exception) -> None:
        """An attempt (or a timer of one) raised: say so once per outage, count it, retry."""
        self.status.attempt_errors += 1
        if isinstance(exc, OSError):  # the environment (EMFILE, ENOMEM): the reason says it all
            reason = (exc.strerror or str(exc)).lower()
        else:
            # Not the environment: a library's or our own bug. Its traceback is worth
            # one entry per outage, and it counts with the errors the reactor catches.
            reason = f"{type(exc).__name__}: {exc}"
            self.reactor.internal_errors += 1
            if self.status.first_in_outage(f"traceback {reason}"):
                log.error("%s: connection attempt raised; retrying with backoff", self.hub.name, exc_info=exc)
        self._lost(reason)

    def _guarded(self, fn: Callable[[], None]) -> Callable[[], None]:
        """fn for a timer of the connect cycle: whatever it raises ends in a retry."""

        def run() -> None:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - a retry timer must never die silently
                self._attempt_raised(exc)

        return run

    def _opened(self, fd: int) -> None:
        self.fd = fd
        self.reactor.add(fd, self._in_mask() | self._out_mask(), self._on_events, self._on_internal_error)
        self._stable = self.reactor.call_later(self.stable_after, self._on_stable)
        self.status.set(UP, "opened")
        self._on_up()

    def _on_stable(self) -> None:
        self._stable = None
        self.failures = 0

    def _failed(self, reason: str, delay: float | None = None) -> None:
        """Opening failed (or the device was lost): close and schedule a retry."""
        try:
            self._drop_fd()
        finally:
            # Scheduled first, reported second: a retry must follow whatever happens.
            if not self._stopped:
                if delay is None:
                    delay = self._loss_delay()
                if delay is None:
                    delay = self.backoff_delay()
                    self.failures += 1
                if self._retry is not None:  # never two attempts in flight
                    self._retry.cancel()
                self._retry = self.reactor.call_later(delay, self._guarded(self._connect))
        if not self._stopped:
            self.status.set(BACKING_OFF, reason, retry_in=delay)

    def _loss_delay(self) -> float | None:
        """A fixed wait before the next attempt instead of the backoff (None: back off)."""
        return None

    def _lost(self, reason: str) -> None:
        """The link is gone (or the attempt, if it never came up): close and retry."""
        if self.status.state == UP:  # only an up link can go down; an attempt just fails
            self.status.set(DOWN, reason)
        self._failed(reason)

    def backoff_delay(self) -> float:
        """Capped, jittered exponential backoff (muxd.upstream.state.backoff_delay)."""
        return backoff_delay(self.failures, self.backoff_min, self.backoff_max)

    def _drop_fd(self) -> None:
        if self._stable is not None:
            self._stable.cancel()
            self._stable = None
        if self.fd is not None:
            self.reactor.remove(self.fd)
            self.fd = None
            with contextlib.suppress(OSError):
                self._close_fd()

    def _on_internal_error(self, exc: BaseException) -> None:
        # The reactor has logged and counted it; what is left is to end this
        # attempt or link cleanly, and to try again.
        self._lost(f"internal error: {exc!r}")

    # -- data -------------------------------------------------------------------

    def _out_mask(self) -> int:
        return OUT if self.hub.writes.queue.bytes else 0

    def _in_mask(self) -> int:
        return IN if self._reading else 0

    def set_reading(self, on: bool) -> None:
        """Read the device (True) or leave its bytes where they are (False)."""
        self._reading = on
        if self.fd is not None:
            self.reactor.modify(self.fd, self._in_mask() | self._out_mask())

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
            # No success yet: the backoff resets only once the link has lasted
            # STABLE_UP (_on_stable), so a peer that greets and hangs up backs off.
            self._received(data)

    def _on_write_ready(self) -> None:
        if self.fd is not None and not (self.reactor.mask(self.fd) & OUT):
            self._drain()  # try at once; EPOLLOUT only if the device is slower

    def _drain(self) -> None:
        queue = self.hub.writes.queue
        while self.fd is not None and (unit := queue.peek()) is not None:
            try:
                n = self._write(unit)
            except BlockingIOError:
                break
            except OSError as exc:
                self._lost(self._loss_reason(exc))
                return
            self.hub.writes.consumed(n)
            if n < len(unit):
                break
        if self.fd is not None:
            self.reactor.modify(self.fd, self._in_mask() | self._out_mask())
