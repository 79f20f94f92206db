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

The settings in force are the upstream's (``upstream.settings``): this module
keeps no copy, so ``settings`` is always what the device has, including a
value a K2 answered with instead of the one asked. The upstream also decides
what it can grant: ``apply_settings()`` returns the settings granted or raises
SettingsRefused (pyserial rejects the value, the K2 cannot be told), and then
the settings in force stay as they were.

Every applied change is logged with who asked; so are refusals. Outcomes are
counted here, per listener (not per peer, whose ephemeral port would make the
count grow without bound): ``applied``, ``refused`` by the policy, and
``failed`` when the upstream refused. muxd.metrics reads ``counts``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from muxd.config import Port
from muxd.errors import SettingsRefused
from muxd.hub import Reader
from muxd.protocol.line_settings import LineSettings

log = logging.getLogger("muxd.linecontrol")


class SettingsOwner(Protocol):
    """What the policy needs of an upstream (muxd.upstream.base.Upstream is one)."""

    @property
    def settings(self) -> LineSettings: ...

    def apply_settings(self, wanted: LineSettings) -> LineSettings: ...


@dataclass
class SettingsCounts:
    """One listener's line-settings requests, by outcome."""

    applied: int = 0
    refused: int = 0  # by the line_control policy
    failed: int = 0  # the upstream could not make the change


class LineControl:
    def __init__(self, port: Port, upstream: SettingsOwner) -> None:
        self.port = port.name
        self.policy = port.line_control
        self.upstream = upstream
        self.owner: Reader | None = None
        # By listener name: bounded by the config, and kept across a reload so
        # that the counters, which metrics export as totals, never go down.
        self.counts: dict[str, SettingsCounts] = {}

    @property
    def settings(self) -> LineSettings:
        """The settings in force, read from the upstream each time."""
        return self.upstream.settings

    def request(self, who: Reader, wanted: LineSettings) -> LineSettings:
        """Apply ``wanted`` if the policy allows; return the settings in force after."""
        current = self.settings
        if not self._may_change(who):
            if wanted != current:
                self._counts(who).refused += 1
                log.info(
                    "%s: line settings %s refused for %s %s (line_control: %s%s); %s stays",
                    self.port,
                    wanted,
                    who.policy.listener,
                    who.peer,
                    self.policy,
                    ", read-only" if not who.policy.writable else "",
                    current,
                )
            return current
        if wanted == current:
            return current
        try:
            granted = self.upstream.apply_settings(wanted)
        except SettingsRefused as exc:
            self._counts(who).failed += 1
            log.warning(
                "%s: line settings %s asked by %s %s could not be applied: %s; %s stays",
                self.port,
                wanted,
                who.policy.listener,
                who.peer,
                exc,
                current,
            )
            return self.settings
        log.info(
            "%s: line settings %s -> %s, asked by %s %s%s",
            self.port,
            current,
            granted,
            who.policy.listener,
            who.peer,
            "" if granted == wanted else f" (who asked for {wanted})",
        )
        self._counts(who).applied += 1
        return granted

    def release(self, who: Reader) -> None:
        """``who`` disconnected: it owns nothing any more."""
        if self.owner is who:
            self.owner = None
            log.info("%s: %s %s no longer owns the line settings", self.port, who.policy.listener, who.peer)

    def reload(self, port: Port, upstream: SettingsOwner | None) -> None:
        """A reloaded port config; ``upstream`` is given when it was reopened (a
        new one, which brings back the configured settings)."""
        self.policy = port.line_control
        if self.policy != "owner":
            self.owner = None
        if upstream is not None:
            self.upstream = upstream

    def _may_change(self, who: Reader) -> bool:
        if self.policy == "ignore" or not who.policy.writable:
            return False
        if self.policy == "any":
            return True
        if self.owner is None:
            self.owner = who
            log.info("%s: %s %s now owns the line settings", self.port, who.policy.listener, who.peer)
        return self.owner is who

    def _counts(self, who: Reader) -> SettingsCounts:
        return self.counts.setdefault(who.policy.listener, SettingsCounts())
