"""Control-line sequences: a board's reset or bootloader entry, run on the reactor's timers.

A sequence is a list of steps, written in the config as short strings::

    sequences:
      reset: ["dtr=0", "rts=1", "100ms", "rts=0"]
      bootloader: ["dtr=0", "rts=1", "100ms", "dtr=1", "rts=0", "50ms", "dtr=0"]
      sysrq: ["break=250ms"]

Each step is a level (``dtr=0|1``, ``rts=0|1``), a BREAK held for a duration
(``break=DURATION``), or a delay (``DURATION``: ``100ms``, ``0.5s``). Levels
take effect at once, one after the other, each on its own (a step is one
SET-CONTROL or one ioctl, so the device sees them in the written order).

Theory of operation. ``run()`` applies the steps up to the first wait, then
schedules the rest with ``Reactor.call_later``: nothing here sleeps, so the
loop goes on serving every reader while a sequence runs. Deadlines are kept
on one schedule from the start (each wait ends at start + the sum of the
waits before it), so timer lateness does not add up over a long sequence.
A BREAK step is BREAK on, a wait, BREAK off.

While a sequence runs, ``LineControl.busy`` names it: clients' requests for
lines are refused (answered with the lines in force), and a second sequence,
or a signal from the API, is refused with ``Busy`` (HTTP 409). A step the
upstream refuses (SettingsRefused: a K2 without ``control: rfc2217``), or a
device that is not up (``LineControl.unavailable``: nothing is kept for the
next open), ends the sequence there, with a warning; a BREAK left on
is turned off on the way out if the upstream still can.

Parsing is here too (``parse_step``), with the duration grammar every
duration of muxd shares (muxd.config.values, which loads no YAML); the config
schema calls it for located errors.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from muxd.config.values import parse_duration
from muxd.errors import MuxdError, SettingsRefused

if TYPE_CHECKING:
    from muxd.linecontrol import LineControl
    from muxd.reactor import Reactor, Timer

log = logging.getLogger("muxd.linecontrol")

StepKind = Literal["dtr", "rts", "break", "wait"]

# A reset pulse is tens of milliseconds; a bootloader's strap hold, a second
# at most. 60 s bounds a typo ("100s" for "100ms") to something one notices,
# not a port stuck busy for hours.
MAX_WAIT = 60.0
# A BREAK long enough for any SysRq or bootloader (they want 100-500 ms).
MAX_BREAK = 10.0
# Steps in one sequence: the longest real ones have a dozen.
MAX_STEPS = 64

_LEVEL_RE = re.compile(r"\s*(dtr|rts)\s*=\s*([01])\s*", re.IGNORECASE)
_BREAK_RE = re.compile(r"\s*break\s*=\s*(.+)", re.IGNORECASE)


class Busy(MuxdError):
    """A sequence is already running on this port."""


@dataclass(frozen=True)
class Step:
    """One step: a level for ``dtr``/``rts``, BREAK for ``seconds``, or a wait."""

    kind: StepKind
    level: bool = False
    seconds: float = 0.0

    def __str__(self) -> str:
        if self.kind in ("dtr", "rts"):
            return f"{self.kind}={int(self.level)}"
        ms = f"{self.seconds * 1000:g}ms"
        return f"break={ms}" if self.kind == "break" else ms


def parse_step(value: object) -> Step:
    """A step as written in the config; raises ValueError saying what is expected."""
    if not isinstance(value, str):
        raise ValueError(f"a step is a string such as dtr=0, rts=1, break=250ms or 100ms; got {value!r}")
    if m := _LEVEL_RE.fullmatch(value):
        return Step(m.group(1).lower(), level=m.group(2) == "1")  # type: ignore[arg-type]
    if m := _BREAK_RE.fullmatch(value):
        seconds = parse_duration(m.group(1))
        if seconds is None or not 0.001 <= seconds <= MAX_BREAK:
            raise ValueError(f"break=DURATION needs a duration of 1ms..{MAX_BREAK:g}s, got {value!r}")
        return Step("break", seconds=seconds)
    seconds = parse_duration(value)
    if seconds is None:
        raise ValueError(
            f"a step is dtr=0|1, rts=0|1, break=DURATION or a DURATION such as 100ms; got {value!r}"
        )
    if seconds > MAX_WAIT:
        raise ValueError(f"a wait is at most {MAX_WAIT:g}s, got {value!r}")
    return Step("wait", seconds=seconds)


def duration(steps: Sequence[Step]) -> float:
    """How long the sequence takes, in seconds (its waits and BREAKs)."""
    return sum(s.seconds for s in steps)


class Run:
    """One running sequence. Created and started by ``run()``."""

    def __init__(
        self,
        lc: LineControl,
        reactor: Reactor,
        name: str,
        steps: Sequence[Step],
        *,
        by: str,
        on_done: Callable[[Run], None] | None = None,
    ) -> None:
        self.lc = lc
        self.reactor = reactor
        self.name = name
        self.steps = list(steps)
        self.by = by
        self.on_done = on_done
        self.error: str | None = None  # why it stopped early, if it did
        self.done = False
        self._next = 0  # the index of the next step
        self._deadline = reactor.now()  # when the next step is due, on the one schedule
        self._timer: Timer | None = None
        self._break_on = False

    def _apply(self, dtr: bool | None = None, rts: bool | None = None, brk: bool | None = None) -> None:
        # A device gone mid-sequence ends it: the rest of a reset kept for
        # the next open would be a pulse nobody asked for then.
        if (why := self.lc.unavailable()) is not None:
            raise SettingsRefused(why)
        self.lc.apply_control(f"sequence {self.name} ({self.by})", dtr, rts, brk)

    def _advance(self) -> None:
        """Apply steps until one needs a wait (then schedule the rest) or the end."""
        self._timer = None
        try:
            while self._next < len(self.steps):
                step = self.steps[self._next]
                self._next += 1
                if self._break_on:  # the wait of a break=DURATION step has ended
                    self._break_on = False
                    self._apply(brk=False)
                if step.kind == "dtr":
                    self._apply(dtr=step.level)
                elif step.kind == "rts":
                    self._apply(rts=step.level)
                else:
                    if step.kind == "break":
                        self._apply(brk=True)
                        self._break_on = True
                    self._deadline += step.seconds
                    self._timer = self.reactor.call_later(self._deadline - self.reactor.now(), self._advance)
                    return
            if self._break_on:
                self._break_on = False
                self._apply(brk=False)
        except SettingsRefused as exc:
            self.error = str(exc)
            log.warning("%s: sequence %s stopped at step %d: %s", self.lc.port, self.name, self._next, exc)
            if self._break_on:
                self._break_on = False
                with contextlib.suppress(SettingsRefused):  # a device gone took its BREAK along
                    self._apply(brk=False)
        self._finish()

    def _finish(self) -> None:
        self.done = True
        if self.lc.busy == self.name:
            self.lc.busy = None
        if self.error is None:
            log.info("%s: sequence %s done (%s)", self.lc.port, self.name, self.by)
        if self.on_done is not None:
            self.on_done(self)

    def cancel(self) -> None:
        """Stop where it is (a reload, a shutdown); the lines stay as they are."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.done:
            self.error = "cancelled"
            self._finish()


def run(
    lc: LineControl,
    reactor: Reactor,
    name: str,
    steps: Sequence[Step],
    *,
    by: str,
    on_done: Callable[[Run], None] | None = None,
) -> Run:
    """Start a sequence on the port of ``lc``; its steps up to the first wait
    are applied before this returns. Raises Busy if one is already running."""
    if lc.busy is not None:
        raise Busy(f"sequence {lc.busy} is running on {lc.port}")
    lc.busy = name
    log.info(
        "%s: sequence %s started by %s: %s", lc.port, name, by, " ".join(str(s) for s in steps) or "(empty)"
    )
    r = Run(lc, reactor, name, steps, by=by, on_done=on_done)
    r._advance()
    return r
