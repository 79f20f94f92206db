"""Who may change a shared port's line settings: the ``line_control`` policy.

Many readers share one device, so one reader's baud change would garble the
stream for all the others. Requests come from RFC 2217 clients and from
programs that set the baud rate on a pty listener's tty. Each one is a whole
``LineSettings`` wanted by one requester, and the answer is always the
settings in force afterwards, which the requester reports back to its peer
(RFC 2217 answers with the value in force; a pty gets its termios set back).

Policies (``Port.line_control``):

``ignore``
    Nothing is ever applied: every request is answered with the settings in
    force.
``owner`` (default)
    The first rw requester that asks for any setting (even the value already
    in force) becomes the owner until it disconnects; only the owner's
    requests are applied. Claiming on a no-op request matters: pyserial sends
    its settings when it opens, and a client that opened with the right baud
    rate relies on nobody else changing it afterwards.
``any``
    Every rw requester's request is applied, last one wins (ser2net's way).

Read-only requesters never change anything, under any policy: ``mode: ro``
means a reader cannot disturb the device. Queries are answered by the caller
from ``settings`` without coming here.

Every applied change is logged with who asked and counted in its listener's
ListenerStats (not per peer, whose ephemeral port would make the count grow
without bound); so are refusals. A change the upstream cannot make (pyserial
rejects the value, the device is gone) is logged, counted as failed and
leaves the settings in force as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from muxd.config import Port, SimUpstream
from muxd.hub import ListenerStats, Reader
from muxd.protocol.line_settings import LineSettings

log = logging.getLogger("muxd.linecontrol")

ApplySettings = Callable[[LineSettings], None]


def configured_settings(port: Port) -> LineSettings:
    """The settings the port's upstream opens with."""
    upstream = port.upstream
    if isinstance(upstream, SimUpstream):
        return LineSettings(baudrate=upstream.baudrate)
    return upstream.settings


class LineControl:
    def __init__(self, port: Port, apply: ApplySettings) -> None:
        self.port = port.name
        self.policy = port.line_control
        self.apply = apply
        self.settings = configured_settings(port)
        self.owner: Reader | None = None

    def request(self, who: Reader, wanted: LineSettings) -> LineSettings:
        """Apply ``wanted`` if the policy allows; return the settings in force after."""
        if not self._may_change(who):
            if wanted != self.settings:
                _stats(who).settings_refused += 1
                log.info(
                    "%s: line settings %s refused for %s %s (line_control: %s%s); %s stays",
                    self.port,
                    wanted,
                    who.listener.name,
                    who.peer,
                    self.policy,
                    ", read-only" if not who.listener.writable else "",
                    self.settings,
                )
            return self.settings
        if wanted == self.settings:
            return self.settings
        try:
            self.apply(wanted)
        except (OSError, ValueError) as exc:  # pyserial's SerialException is an OSError
            _stats(who).settings_failed += 1
            log.warning(
                "%s: line settings %s asked by %s %s could not be applied: %s",
                self.port,
                wanted,
                who.listener.name,
                who.peer,
                exc,
            )
            return self.settings
        log.info(
            "%s: line settings %s -> %s, asked by %s %s",
            self.port,
            self.settings,
            wanted,
            who.listener.name,
            who.peer,
        )
        self.settings = wanted
        _stats(who).settings_applied += 1
        return wanted

    def release(self, who: Reader) -> None:
        """``who`` disconnected: it owns nothing any more."""
        if self.owner is who:
            self.owner = None
            log.info("%s: %s %s no longer owns the line settings", self.port, who.listener.name, who.peer)

    def reload(self, port: Port, apply: ApplySettings | None) -> None:
        """A reloaded port config; ``apply`` is given when the upstream was reopened,
        which also brings back the configured settings."""
        self.policy = port.line_control
        if self.policy != "owner":
            self.owner = None
        if apply is not None:
            self.apply = apply
            self.settings = configured_settings(port)

    def _may_change(self, who: Reader) -> bool:
        if self.policy == "ignore" or not who.listener.writable:
            return False
        if self.policy == "any":
            return True
        if self.owner is None:
            self.owner = who
            log.info("%s: %s %s now owns the line settings", self.port, who.listener.name, who.peer)
        return self.owner is who


def _stats(who: Reader) -> ListenerStats:
    assert who.stats is not None, "a reader attached to a hub has its listener's stats"
    return who.stats
