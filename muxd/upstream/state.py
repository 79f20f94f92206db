"""An upstream's connection state: what it is doing now, and since when.

The upstream owns this object and is the only code that changes it (through
``set``); the API, the metrics and the systemd status line read it. A change
between up and down is also news for readers with ``notices: true``: the
``notify`` callback (the hub's in-band notice) gets one line for it.

Logging is throttled per outage: each failure reason is logged once (the
outage's first at WARNING), retries at DEBUG, and the state is logged at INFO
again when the device comes back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("muxd.hub")

UP, DOWN, CONNECTING, BACKING_OFF = "up", "down", "connecting", "backing-off"
STATES = (CONNECTING, UP, DOWN, BACKING_OFF)


class UpstreamStatus:
    def __init__(self, port: str, notify: Callable[[bytes], None]) -> None:
        self.port = port
        self.notify = notify
        self.state = DOWN
        self.reason = "not started"
        self.since = time.time()
        self.changed = time.monotonic()
        self.connects = 0
        self.disconnects: dict[str, int] = {}
        self.down_seconds = 0.0  # completed periods not up
        # Failure reasons logged since the upstream was last up: a handful of
        # distinct strings per outage, cleared when it comes back.
        self._failures_logged: set[str] = set()

    def seconds_down(self) -> float:
        current = time.monotonic() - self.changed if self.state != UP else 0.0
        return self.down_seconds + current

    def set(self, state: str, reason: str) -> None:
        if self.state == state and self.reason == reason:
            return
        now = time.monotonic()
        if self.state != UP:
            self.down_seconds += now - self.changed
        if state == UP:
            self.connects += 1
        elif self.state == UP:
            self.disconnects[reason] = self.disconnects.get(reason, 0) + 1
        self.state, self.reason, self.since, self.changed = state, reason, time.time(), now
        if state == UP or reason == "stopped":
            level = logging.INFO
            self._failures_logged.clear()
        elif state == CONNECTING or reason in self._failures_logged:
            level = logging.DEBUG  # every retry is news only when debugging
        else:
            # Each failure reason is news once per outage, the outage's first loudly.
            level = logging.INFO if self._failures_logged else logging.WARNING
            self._failures_logged.add(reason)
        log.log(level, "%s upstream %s (%s)", self.port, state, reason, extra={"MUXD_PORT": self.port})
        if state in (UP, DOWN):
            self.notify(f"-- muxd: {self.port} upstream {state} ({reason}) --\r\n".encode())
