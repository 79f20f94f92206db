"""An upstream's connection state: what it is doing now, and since when.

A ``LinkMonitor`` holds it. The upstream (or the MQTT bridge, for its broker
link) owns that object and is the only code that changes it (through
``set``); the API, the metrics and the systemd status line read it.

The state is an ``UpstreamState`` and every change is checked against
``TRANSITIONS``, the one table of what may follow what:

    DOWN --> CONNECTING --> UP --> DOWN --> BACKING_OFF --> CONNECTING ...
                 |                               ^
                 +---------(attempt failed)------+

plus DOWN -> UP for a device with no connect step (the simulator) and any
state -> DOWN for a stop. Anything else is a bug of ours (two attempts at once,
a retry while up) and raises LocalProtocolError rather than quietly reporting
a state that is not true.

Two clocks are kept apart, because an operator asks "how long has this board
been gone?" and a retry every 0.2 s must not reset the answer:
- ``since`` (wall clock) is the moment the port last went up or down (or was
  created). Retries inside an outage never move it.
- ``state``/``reason`` are the current attempt's, ``attempts`` counts the
  attempts made in this outage, ``next_attempt_in()`` says when the next one
  is due (None when none is scheduled).

A change between up and down is also news for readers with ``notices: true``:
the ``notify`` callback (the hub's in-band notice) gets one line for it.

Logging is throttled per outage: each failure reason is logged once (the
outage's first at WARNING), retries at DEBUG, and the state is logged at INFO
again when the device comes back. ``first_in_outage`` offers the same
once-per-outage rule to the upstream for its own messages (tracebacks).

The MQTT bridge's broker link (muxd.mqtt.bridge) has the same life, so it
uses the same enum, table and status (with its own ``subject`` in the logs),
and the same ``backoff_delay``.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable

from muxd.errors import LocalProtocolError

log = logging.getLogger("muxd.hub")


class UpstreamState(str, enum.Enum):
    """The values are label values (metrics) and API strings: never rename them."""

    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    BACKING_OFF = "backing-off"

    def __str__(self) -> str:  # f-strings and logs show "up", not "UpstreamState.UP"
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


UP, DOWN, CONNECTING, BACKING_OFF = (
    UpstreamState.UP,
    UpstreamState.DOWN,
    UpstreamState.CONNECTING,
    UpstreamState.BACKING_OFF,
)
STATES = tuple(UpstreamState)

# The one table of allowed changes. A state may follow itself only where the
# reason can change without anything else happening (DOWN: "not started" ->
# "stopped"). Every state may go DOWN, because stop() may come at any time.
TRANSITIONS: dict[UpstreamState, frozenset[UpstreamState]] = {
    DOWN: frozenset({CONNECTING, UP, BACKING_OFF, DOWN}),
    CONNECTING: frozenset({UP, BACKING_OFF, DOWN}),
    UP: frozenset({DOWN}),
    BACKING_OFF: frozenset({CONNECTING, DOWN}),
}


def backoff_delay(failures: int, backoff_min: float, backoff_max: float) -> float:
    """The wait before the next attempt after ``failures`` failed ones: exponential
    from backoff_min, capped at backoff_max, with "equal jitter" (half fixed,
    half random) so that a lab full of muxd instances does not reconnect in
    lockstep after a switch or a broker restarts."""
    ceiling = min(backoff_max, backoff_min * 2.0 ** min(failures, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class LinkMonitor:
    """The one owner of a link's UpstreamState (an upstream's, or the MQTT
    bridge's broker link): the state and its reason now, since when, the
    attempts and the counters, and the once-per-outage logging."""

    def __init__(
        self,
        port: str,
        notify: Callable[..., None],
        subject: str | None = None,
        logger: logging.Logger = log,
    ) -> None:
        self.port = port
        self.notify = notify
        # What the log lines and errors call it: "<port> upstream" by default.
        self.subject = subject if subject is not None else f"{port} upstream"
        self.log = logger
        self.state = DOWN
        self.reason = "not started"
        self.since = time.time()  # wall clock of the last up/down change
        self._since_mono = time.monotonic()  # the same moment, for durations
        self.attempts = 0  # attempts in the current outage (0 while up)
        self.next_attempt_at: float | None = None  # monotonic; None: none scheduled
        self.connects = 0
        self.disconnects: dict[str, int] = {}
        # Exceptions raised by connection attempts (EMFILE, a library's error):
        # each one was followed by a scheduled retry, never by a stuck port.
        self.attempt_errors = 0
        self.down_seconds = 0.0  # completed periods not up
        # Failure reasons logged since the upstream was last up: a handful of
        # distinct strings per outage, cleared when it comes back.
        self._failures_logged: set[str] = set()
        self._once: set[str] = set()  # first_in_outage's keys, cleared likewise

    def seconds_down(self) -> float:
        current = time.monotonic() - self._since_mono if self.state != UP else 0.0
        return self.down_seconds + current

    def next_attempt_in(self) -> float | None:
        """Seconds until the next attempt (0 if it is overdue), or None if none is scheduled."""
        if self.next_attempt_at is None:
            return None
        return max(0.0, self.next_attempt_at - time.monotonic())

    def first_in_outage(self, key: str) -> bool:
        """True the first time key is seen in this outage: for messages worth one line per outage."""
        if key in self._once:
            return False
        self._once.add(key)
        return True

    def set(self, state: UpstreamState, reason: str, retry_in: float | None = None) -> None:
        """Change state; ``retry_in`` (with BACKING_OFF) is when the next attempt is due.

        Raises LocalProtocolError for a change TRANSITIONS does not allow.
        """
        if self.state == state and self.reason == reason:
            return
        if state not in TRANSITIONS[self.state]:
            raise LocalProtocolError(f"{self.subject} cannot go from {self.state} to {state} ({reason})")
        now = time.monotonic()
        self.next_attempt_at = now + retry_in if state == BACKING_OFF and retry_in is not None else None
        if state == CONNECTING:
            self.attempts += 1
        if (state == UP) != (self.state == UP):  # up <-> not up: the outage clock moves
            if state == UP:
                self.connects += 1
                self.down_seconds += now - self._since_mono
            else:
                self.disconnects[reason] = self.disconnects.get(reason, 0) + 1
            self.since, self._since_mono = time.time(), now
            self.attempts = 0
        self.state, self.reason = state, reason
        if state == UP or reason == "stopped":
            level = logging.INFO
            self._failures_logged.clear()
            self._once.clear()
        elif state == CONNECTING or reason in self._failures_logged:
            level = logging.DEBUG  # every retry is news only when debugging
        else:
            # Each failure reason is news once per outage, the outage's first loudly.
            level = logging.INFO if self._failures_logged else logging.WARNING
            self._failures_logged.add(reason)
        self.log.log(
            level,
            "%s %s (%s)",
            self.subject,
            state,
            reason,
            extra={"MUXD_PORT": self.port} if self.port else None,
        )
        if state in (UP, DOWN):
            self.notify(
                f"{self.port} upstream {state.value} ({reason})",
                event="upstream",
                state=state.value,
                reason=reason,
            )
