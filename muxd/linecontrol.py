"""Who may change a shared port's line settings: the ``line_control`` policy.

Many readers share one device, so one reader's baud change would garble the
stream for all the others. Requests come from RFC 2217 clients and from
programs that set the baud rate on a pty listener's tty. Each one is a whole
``LineSettings`` wanted by one requester, and the answer is always the
settings in force afterwards, which the requester reports back to its peer
(RFC 2217 answers with the value in force; a pty gets its termios set back).

Policies (``Port.line_control``):

``virtual`` (default)
    Every request, from any client (ro included, since nothing is applied),
    is acknowledged as asked and never applied: the device keeps its
    configured settings, and no reader sees a baud change it did not ask
    for. Each client's last request is remembered (``settings_for``) until
    it disconnects, so its later queries answer consistently with what it
    was told; pyserial's ``rfc2217://`` then opens with any ``baudrate=``.
    Each acknowledgement is logged (at info) with who asked, and counted as
    ``acknowledged``.
``ignore``
    Nothing is ever applied: every request is answered with the settings in
    force.
``owner``
    The first rw requester that asks for any setting (even the value already
    in force) becomes the owner; only the owner's requests are applied.
    Claiming on a no-op request matters: pyserial sends its settings when it
    opens, and a client that opened with the right baud rate relies on nobody
    else changing it afterwards. Ownership ends when the owner disconnects,
    or once it has gone ``owner_idle`` (per port) without a settings or
    control request or a write (seen through the hub's write observers): a
    client that opened the port and was forgotten must not hold it for ever.
    When it ends, what the owner left is undone: the port's configured line
    settings are put back on the device, and a DTR or RTS the owner changed
    returns to its configured level, asserted (high), as a serial port opens
    (BREAK off). The end is logged, is the port's last change
    (``changed_by``: the API and ``muxd status`` show it), and is told
    in-band to readers with notices on. Another client may then claim it.
``any``
    Every rw requester's request is applied, last one wins (ser2net's way).

Read-only requesters never change anything, under any policy: ``mode: ro``
means a reader cannot disturb the device. Queries are answered by the caller
from ``settings_for(who)`` without coming here: the settings in force, or,
under ``virtual``, what that client was told.

The settings in force are the upstream's (``upstream.settings``): this module
keeps no copy, so ``settings`` is always what the device has, including a
value a K2 answered with instead of the one asked. The upstream also decides
what it can grant: ``apply_settings()`` returns the settings granted or raises
SettingsRefused (pyserial rejects the value, the K2 cannot be told), and then
the settings in force stay as they were.

Every applied change is logged with who asked; so are refusals. Outcomes are
counted here, per listener (not per peer, whose ephemeral port would make the
count grow without bound): ``applied``, ``refused`` by the policy,
``failed`` when the upstream refused, and ``acknowledged`` under
``virtual``. muxd.metrics reads ``counts``.

Control lines (DTR, RTS, BREAK) follow the same policies, through
``request_control``: ``ignore`` and ``virtual`` acknowledge a request (the
answer is what was asked), log it and apply nothing; ``owner`` applies the
owner's requests (one owner for settings and lines alike: the program that
drives the board, such as esptool); ``any`` applies every rw client's.
Read-only clients never change a line. While a sequence runs
(muxd.sequences sets ``busy``) every client request is refused and answered
with the lines in force: a reset must not be cut into by another pulse. The
lines in force are the upstream's (``upstream.control``, None where unknown);
a request for the level already in force is a no-op. The operator's own
actions (the HTTP API, ``muxd ctl``, the console, a sequence) come through
``apply_control``, which no policy stops: they passed the admin check.
Every applied change is logged with who asked, counted per signal
(``control_changes``), and is the port's last change (``changed_by``,
``changed_at``, as for line settings).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from muxd.config import Port, SimUpstream
from muxd.errors import SettingsRefused
from muxd.hub import Hub, Reader
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Timer
from muxd.upstream.base import ControlLines, ModemLines
from muxd.upstream.state import UP, LinkMonitor

log = logging.getLogger("muxd.linecontrol")


class SettingsOwner(Protocol):
    """What the policy needs of an upstream (muxd.upstream.base.Upstream is one)."""

    @property
    def settings(self) -> LineSettings: ...

    def apply_settings(self, wanted: LineSettings) -> LineSettings: ...


@runtime_checkable
class ControlOwner(Protocol):
    """An upstream with control lines (every real one: muxd.upstream.base.Upstream)."""

    control: ControlLines
    status: LinkMonitor

    def set_control(
        self, dtr: bool | None = None, rts: bool | None = None, brk: bool | None = None
    ) -> ControlLines: ...

    def modem_state(self) -> ModemLines | None: ...


# The signals, as metric labels and API keys.
SIGNALS = ("dtr", "rts", "break")
# The levels DTR and RTS return to when an owner's time ends: asserted, as
# pyserial opens a serial port (muxd.upstream.serial) and the simulator starts.
CONFIGURED_LINES = ControlLines(dtr=True, rts=True, brk=False)


def configured_settings(port: Port) -> LineSettings:
    """The line settings the port's config gives its device."""
    up = port.upstream
    if isinstance(up, SimUpstream):
        return LineSettings(baudrate=up.baudrate)
    return up.settings


def describe_lines(dtr: bool | None = None, rts: bool | None = None, brk: bool | None = None) -> str:
    """``DTR low, RTS high``: the lines given, as a log line says them."""
    parts = [f"DTR {'high' if dtr else 'low'}"] if dtr is not None else []
    parts += [f"RTS {'high' if rts else 'low'}"] if rts is not None else []
    parts += [f"BREAK {'on' if brk else 'off'}"] if brk is not None else []
    return ", ".join(parts) or "nothing"


@dataclass
class SettingsCounts:
    """One listener's line-settings requests, by outcome."""

    applied: int = 0
    refused: int = 0  # by the line_control policy
    failed: int = 0  # the upstream could not make the change
    acknowledged: int = 0  # line_control: virtual: answered as asked, not applied


class LineControl:
    def __init__(self, port: Port, upstream: SettingsOwner, hub: Hub | None = None) -> None:
        self.port = port.name
        self.policy = port.line_control
        self.upstream = upstream
        self.owner: Reader | None = None
        # The owner's idle clock (monotonic): its last request or write, and
        # the timer that ends its ownership owner_idle after (re-armed lazily:
        # activity only moves _active, the timer looks at it when it fires).
        self.owner_idle = port.owner_idle
        self.configured = configured_settings(port)
        self._active = 0.0
        self._idle_timer: Timer | None = None
        self._owner_lines: set[str] = set()  # the lines the owner changed: undone when it ends
        # The hub: its reactor for the idle timer, its write observers for the
        # owner's writes, its notices to tell readers. None in unit tests of the policy alone.
        self.hub = hub
        if hub is not None:
            hub.writes.observers.append(self._wrote)
        # line_control: virtual: what each client asked for last (and was told
        # is in force); bounded by the connected clients, dropped in release().
        self.virtual: dict[Reader, LineSettings] = {}
        # By listener name: bounded by the config, and kept across a reload so
        # that the counters, which metrics export as totals, never go down.
        self.counts: dict[str, SettingsCounts] = {}
        # Control lines: applied changes by signal (SIGNALS), and client
        # requests not applied, by outcome (refused, failed, acknowledged).
        self.control_changes: dict[str, int] = dict.fromkeys(SIGNALS, 0)
        self.control_requests: dict[str, int] = dict.fromkeys(("refused", "failed", "acknowledged"), 0)
        # The last applied change of settings or lines: who asked, and when (wall clock).
        self.changed_by: str | None = None
        self.changed_at: float | None = None
        # The name of the sequence running now (muxd.sequences), or None.
        self.busy: str | None = None

    @property
    def settings(self) -> LineSettings:
        """The settings in force, read from the upstream each time."""
        return self.upstream.settings

    def settings_for(self, who: Reader) -> LineSettings:
        """The settings to report to ``who``: under ``virtual``, those it was
        told are in force (its last request), else the upstream's."""
        return self.virtual.get(who, self.upstream.settings)

    def request(self, who: Reader, wanted: LineSettings) -> LineSettings:
        """Apply ``wanted`` if the policy allows; return the settings in force
        after (under ``virtual``: ``wanted``, acknowledged and not applied)."""
        if self.policy == "virtual":
            if wanted != self.settings_for(who):
                self.virtual[who] = wanted
                self._counts(who).acknowledged += 1
                log.info(
                    "%s: line settings %s acknowledged for %s %s, not applied (line_control: virtual); "
                    "the device stays at %s",
                    self.port,
                    wanted,
                    who.policy.listener,
                    who.peer,
                    self.settings,
                )
            return wanted
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
        self._touch(who)
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
        self._changed(f"{who.policy.listener} {who.peer}")
        return granted

    # -- control lines ----------------------------------------------------------

    @property
    def control(self) -> ControlLines | None:
        """The lines in force, read from the upstream; None if it has none."""
        up = self.upstream
        return up.control if isinstance(up, ControlOwner) else None

    @property
    def control_lines(self) -> bool:
        """Whether the upstream has DTR and RTS to set: False for a pty (known
        once opened) or a K2 that cannot be told (muxd.upstream.base)."""
        up = self.upstream
        # An upstream that does not say (the simulator) has them.
        return isinstance(up, ControlOwner) and bool(getattr(up, "control_lines", True))

    def unavailable(self) -> str | None:
        """Why an operator's action cannot reach the device now (it is not up), or None."""
        up = self.upstream
        if not isinstance(up, ControlOwner) or up.status.state is UP:
            return None
        st = up.status
        return f"the device is not up ({st.state.value}: {st.reason})"

    def modem_state(self) -> ModemLines | None:
        up = self.upstream
        return up.modem_state() if isinstance(up, ControlOwner) else None

    def request_control(
        self, who: Reader, dtr: bool | None = None, rts: bool | None = None, brk: bool | None = None
    ) -> ControlLines:
        """A client's request for lines; returns the lines to answer with: those
        in force, or under ``ignore``/``virtual`` the lines as asked (acknowledged)."""
        current = self.control or ControlLines()
        asked = ControlLines(
            current.dtr if dtr is None else dtr,
            current.rts if rts is None else rts,
            current.brk if brk is None else brk,
        )
        what = describe_lines(dtr, rts, brk)
        by = f"{who.policy.listener} {who.peer}"
        if self.policy in ("ignore", "virtual"):
            if asked != current:
                self.control_requests["acknowledged"] += 1
                log.info(
                    "%s: %s acknowledged for %s, not applied (line_control: %s)",
                    self.port,
                    what,
                    by,
                    self.policy,
                )
            return asked
        why = None
        if not who.policy.writable:
            why = "read-only"
        elif self.busy is not None:
            why = f"sequence {self.busy} is running"
        elif not self._may_change(who):
            why = f"line_control: {self.policy}, not the owner"
        if why is not None:
            if asked != current:
                self.control_requests["refused"] += 1
                log.info("%s: %s refused for %s (%s)", self.port, what, by, why)
            return current
        self._touch(who)
        if asked == current:
            return current
        changed = {
            k: v
            for k, v in (("dtr", dtr), ("rts", rts), ("brk", brk))
            if v is not None and v != getattr(current, k)
        }
        if who is self.owner:
            self._owner_lines.update(changed)
        try:
            return self.apply_control(by, **changed)
        except SettingsRefused:  # apply_control has logged it
            self.control_requests["failed"] += 1
            return self.control or current

    def apply_control(
        self, by: str, dtr: bool | None = None, rts: bool | None = None, brk: bool | None = None
    ) -> ControlLines:
        """Set the lines given, whatever the policy (the caller decided): log,
        count, and note who changed them. Raises SettingsRefused from the
        upstream, logged here with who asked (every caller's refusal reads alike)."""
        up = self.upstream
        try:
            if not isinstance(up, ControlOwner):
                raise SettingsRefused("this upstream has no control lines")
            granted = up.set_control(dtr, rts, brk)
        except SettingsRefused as exc:
            what = describe_lines(dtr, rts, brk)
            log.warning("%s: %s asked by %s could not be applied: %s", self.port, what, by, exc)
            raise
        for signal, level in (("dtr", dtr), ("rts", rts), ("break", brk)):
            if level is not None:
                self.control_changes[signal] += 1
        self._changed(by)
        log.info("%s: %s, asked by %s", self.port, describe_lines(dtr, rts, brk), by)
        return granted

    def _changed(self, by: str) -> None:
        self.changed_by, self.changed_at = by, time.time()

    def release(self, who: Reader) -> None:
        """``who`` disconnected: it owns nothing any more."""
        self.virtual.pop(who, None)
        if self.owner is who:
            self._end_ownership("disconnected")

    def reload(self, port: Port, upstream: SettingsOwner | None) -> None:
        """A reloaded port config; ``upstream`` is given when it was reopened (a
        new one, which brings back the configured settings)."""
        self.policy = port.line_control
        self.owner_idle = port.owner_idle
        self.configured = configured_settings(port)
        if upstream is not None:
            self.upstream = upstream
        if self.policy != "owner":
            self._end_ownership("line_control is no longer owner", restore=False)
        elif self.owner is not None:
            self._arm_idle()  # owner_idle may have changed
        if self.policy != "virtual":
            self.virtual.clear()  # clients are told the settings in force from now on

    # -- the owner's time ------------------------------------------------------------

    def _touch(self, who: Reader) -> None:
        if who is self.owner and self.hub is not None:
            self._active = self.hub.reactor.now()

    def _wrote(self, who: Reader, _data: bytes) -> None:
        """The hub's write observer: the owner's writes keep it the owner."""
        if who is self.owner:
            self._touch(who)

    def _arm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.hub is None or self.owner is None or self.owner_idle <= 0:
            return
        left = self._active + self.owner_idle - self.hub.reactor.now()
        self._idle_timer = self.hub.reactor.call_later(max(0.0, left), self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.owner is None or self.hub is None:
            return
        if self.hub.reactor.now() - self._active < self.owner_idle:
            self._arm_idle()  # it was active meanwhile
            return
        self._end_ownership(f"idle for {self.owner_idle:g}s (owner_idle)")

    def _end_ownership(self, why: str, restore: bool = True) -> None:
        """The owner's time is over: undo what it left on the device (the
        configured settings, DTR/RTS it changed back to their configured
        level), log it, and tell readers with notices on."""
        owner, self.owner = self.owner, None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        lines, self._owner_lines = self._owner_lines, set()
        if owner is None:
            return
        who = f"{owner.policy.listener} {owner.peer}"
        undone = self._restore(who, why, lines) if restore else []
        back = f"; put back: {', '.join(undone)}" if undone else ""
        log.info("%s: %s no longer owns the line settings (%s)%s", self.port, who, why, back)
        if undone:
            self._changed(f"muxd (owner {who} {why})")
        if self.hub is not None:
            self.hub.notice(f"line settings owner {who} {why}{back}")

    def _restore(self, who: str, why: str, lines: set[str]) -> list[str]:
        """Put the configured settings and lines back; what was put back, for the log and notice."""
        undone = []
        if self.settings != self.configured:
            try:
                self.upstream.apply_settings(self.configured)
                undone.append(f"line settings {self.configured}")
            except SettingsRefused as exc:
                log.warning(
                    "%s: the configured line settings %s could not be put back after owner %s (%s): %s",
                    self.port,
                    self.configured,
                    who,
                    why,
                    exc,
                )
        current = self.control
        if current is None or not self.control_lines or self.busy is not None:
            return undone  # no lines; or a sequence runs, and ends with levels of its own
        want = {
            k: getattr(CONFIGURED_LINES, k)
            for k in ("dtr", "rts", "brk")
            if (k in lines or k == "brk") and getattr(current, k) != getattr(CONFIGURED_LINES, k)
        }
        if want:
            try:
                self.apply_control(f"muxd (owner {who} {why})", **want)
            except SettingsRefused:
                return undone  # apply_control has logged it, with who asked
            undone.append(describe_lines(**want))
        return undone

    def _may_change(self, who: Reader) -> bool:
        if self.policy == "ignore" or not who.policy.writable:
            return False
        if self.policy == "any":
            return True
        if self.owner is None:
            self.owner = who
            self._owner_lines = set()
            idle = f" (until it leaves or idles for {self.owner_idle:g}s)" if self.owner_idle > 0 else ""
            log.info("%s: %s %s now owns the line settings%s", self.port, who.policy.listener, who.peer, idle)
            if self.hub is not None:
                self._active = self.hub.reactor.now()
                self._arm_idle()
        return self.owner is who

    def _counts(self, who: Reader) -> SettingsCounts:
        return self.counts.setdefault(who.policy.listener, SettingsCounts())
