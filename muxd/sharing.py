"""A shared console's commands: what a terminal user's escape letters do.

After the listener's escape byte (muxd.protocol.escape), one letter, as
conserver's ``^Ec`` commands::

    b  send a BREAK (250 ms)            conserver ^Ecl1
    r  run the port's sequence "reset"  (none in conserver; Opengear ~b is a break)
    w  who is attached, who writes      ^Ecw
    h  replay the last 20 lines         ^Ecr
    f  take the write lock over         ^Ecf
    ?  this help                        ^Ec?
    .  close this session               ^Ec.

Every answer goes in-band to that client only (Hub.tell), never to the
device. ``b``, ``r`` and ``f`` need a rw session and, under ``write_lock:
first``, the lock (``b`` and ``r`` take a free one, as typing does; ``f``
takes it over); a device that is not up is answered with the reason, as the
API answers 503 (``LineControl.unavailable``, the same check). A BREAK and
a sequence are control events of the port (Writes.event), so traces with
``events: true`` record who sent them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from muxd import sequences
from muxd.protocol.escape import caret
from muxd.sequences import Step

if TYPE_CHECKING:
    from muxd.hub import Reader
    from muxd.port import PortRuntime
    from muxd.reactor import Reactor

# conserver's ^Ecl1 BREAK: long enough for any SysRq or bootloader.
BREAK_SECONDS = 0.25
# conserver's ^Ecr replays 20 lines.
REPLAY_LINES = 20
# The sequence ``r`` runs.
RESET = "reset"


def who(reader: Reader) -> str:
    """``tcp:dut1 127.0.0.1:5321``: how a client is named in answers, logs and traces."""
    return f"{reader.policy.listener} {reader.peer}"


def help_lines(escape: int) -> list[str]:
    e = caret(escape)
    return [
        f"escape commands: {e} then a letter",
        "b  send a BREAK",
        f"r  run the sequence {RESET!r}",
        "w  who is attached, who holds the write lock",
        f"h  replay the last {REPLAY_LINES} lines",
        "f  take the write lock over",
        "?  this help",
        ".  close this session",
        f"{e}{e} sends one {e} to the device",
    ]


class PortActions:
    """The escape commands of one port's clients (see the module doc)."""

    def __init__(self, rt: PortRuntime, reactor: Reactor) -> None:
        self.rt = rt
        self.reactor = reactor

    def command(self, reader: Reader, letter: str, escape: int, close: Callable[[str], None]) -> None:
        hub = self.rt.hub
        tell = hub.tell
        if letter == ".":
            close("escape")
        elif letter == "?":
            for line in help_lines(escape):
                tell(reader, line, event="escape", command="?")
        elif letter == "w":
            self._who(reader)
        elif letter == "h":
            self._replay(reader)
        elif letter == "f":
            holder = hub.writes.lock.holder
            before = holder.reader if holder is not None else None
            why = hub.writes.force(reader)
            if why is not None:
                tell(reader, f"cannot take the write lock: {why}", event="escape", command="f")
            elif before is None or before is reader:  # else the hand-over told it already
                tell(reader, "you hold the write lock", event="escape", command="f")
        elif letter in ("b", "r"):
            self._control(reader, letter)
        else:
            shown = letter if letter.isprintable() else f"\\x{ord(letter):02x}"
            tell(reader, f"unknown command {shown!r}: {caret(escape)}? for help", event="escape")

    def _control(self, reader: Reader, letter: str) -> None:
        """``b`` (a BREAK) or ``r`` (the reset sequence), with the API's checks."""
        hub, lc = self.rt.hub, self.rt.line_control
        what = "BREAK" if letter == "b" else f"sequence {RESET}"
        why = hub.writes.may_write(reader)
        if why is None and letter == "r" and RESET not in dict(self.rt.config.sequences):
            why = f"port {self.rt.name} has no sequence {RESET!r}"
        if why is None and lc.busy is not None:
            why = f"sequence {lc.busy} is running"
        if why is None:
            why = lc.unavailable()  # as the API's 503: done now or refused, never kept
        if why is not None:
            hub.tell(reader, f"{what} not sent: {why}", event="escape", command=letter)
            return
        by = f"escape {who(reader)}"
        steps: tuple[Step, ...]
        if letter == "b":
            name, steps = "break", (Step("break", seconds=BREAK_SECONDS),)
        else:
            name, steps = RESET, dict(self.rt.config.sequences)[RESET]
        run = sequences.run(lc, self.reactor, name, steps, by=by)
        if run.error is not None:
            hub.tell(reader, f"{what} stopped: {run.error}", event="escape", command=letter)
            return
        hub.tell(reader, f"{what} sent", event="escape", command=letter)
        event = "break" if letter == "b" else "sequence"
        fields = {"client": reader.id, "peer": reader.peer, "listener": reader.policy.listener}
        if letter == "r":
            fields["sequence"] = name
        hub.writes.event(event, f"{what} by {who(reader)}", **fields)

    def _who(self, reader: Reader) -> None:
        hub = self.rt.hub
        holder = hub.writes.lock.holder
        lines = []
        for r in self.rt.clients():
            mode = "rw" if r.policy.writable else "ro"
            since = time.strftime("%H:%M:%S", time.localtime(r.since))
            marks = (" [writing]" if holder is not None and holder.reader is r else "") + (
                " (you)" if r is reader else ""
            )
            lines.append(f"client {r.id} {who(r)} {mode} since {since}{marks}")
        if not hub.writes.lock.enabled:
            lines.append("write lock: none (every rw client writes)")
        elif holder is None:
            lines.append("write lock: free")
        else:
            lines.append(f"write lock: {hub.writes.describe_holder(holder)}")
        for line in lines:
            hub.tell(reader, line, event="escape", command="w")

    def _replay(self, reader: Reader) -> None:
        """The last REPLAY_LINES lines the device sent, within the port's history."""
        hub = self.rt.hub
        ring = hub.ring
        data = ring.read(max(ring.tail, hub.head - hub.bounds.history))
        lines = data.splitlines()[-REPLAY_LINES:]
        hub.tell(reader, f"last {len(lines)} lines", event="escape", command="h")
        if reader.record_cursor is None:
            body = b"".join(line.rstrip(b"\r") + b"\r\n" for line in lines)
            if body:
                hub.insert(reader, body)
        else:
            for line in lines:
                text = line.rstrip(b"\r").decode("utf-8", "surrogateescape")
                hub.tell(reader, text, event="escape", command="h", data=text)
        hub.tell(reader, "end of replay", event="escape", command="h")
