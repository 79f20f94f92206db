"""The built-in simulated device, so muxd runs with no hardware.

It behaves like a small embedded board on a UART: a boot log, then a status
line every ``status_interval`` with a counter and a timestamp, and a shell that
echoes what is typed and answers ``help``, ``status``, ``echo TEXT``,
``uptime`` and ``reboot``. Output is paced to the configured baud rate (10 bit
times per byte, as 8N1 on a wire), so clients see realistic arrival patterns.

Control lines are recorded (``control``, ``control_log``) and shown in the
output as a board's debug header would not, but a demo wants to: ``[DTR low]``,
``[RTS high]``, ``[BREAK on]``. The modem inputs read as a loopback plug
wires them (as pyserial's loop:// does): CTS follows RTS, DSR follows DTR, CD
on, RI off.

Reading paused (``set_reading(False)``, muxd.hub holding the device for a
lossless reader) is a UART with flow control holding: output waits in the
pending buffer, which overruns (counted) past MAX_PENDING as a FIFO would.
"""

from __future__ import annotations

import time

from muxd.config import SimUpstream
from muxd.errors import SettingsRefused
from muxd.hub import Hub
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor, Timer
from muxd.upstream.base import ControlLines, ModemLines
from muxd.upstream.state import DOWN, UP, LinkMonitor

TICK = 0.01  # output is released every 10 ms: smooth at any baud rate, cheap at idle
# Pending output bound: a UART FIFO that overflows loses bytes, and so does this
# one (counted in `overruns`) when a client floods it with input to echo.
MAX_PENDING = 64 * 1024
PROMPT = b"sim> "
# Control-line changes kept in ``control_log``: a few reset sequences' worth.
CONTROL_LOG = 256

BOOT_LOG = [
    "U-Boot 2024.01 (muxd simulated board)",
    "DRAM:  512 MiB",
    "Starting kernel ...",
    "[    0.000000] Booting Linux on physical CPU 0x0",
    "[    0.412000] Serial: 8250/16550 driver, 4 ports",
    "[    1.028000] EXT4-fs (mmcblk0p2): mounted filesystem",
    "[    2.310000] systemd[1]: Reached target Multi-User System.",
    "",
    "muxd-sim login: root (automatic login)",
    "Type 'help' for commands.",
]


class SimDevice:
    def __init__(self, cfg: SimUpstream, hub: Hub, reactor: Reactor) -> None:
        self.cfg = cfg
        self.hub = hub
        self.reactor = reactor
        self.settings = LineSettings(baudrate=cfg.baudrate)
        self.rate = cfg.baudrate / 10.0  # bytes per second
        self._out = bytearray()
        self._line = bytearray()
        self._credit = 0.0
        self._boot_time = time.monotonic()
        self.counter = 0
        self.overruns = 0
        self._last_was_cr = False
        self._timers: list[Timer] = []
        self._running = False
        self._reading = not hub.holding  # False while the hub holds the device
        self.status = LinkMonitor(hub.name, hub.notice)
        self.bytes_unacked_lost = 0  # a simulated UART takes every byte
        self.control = ControlLines(dtr=True, rts=True)
        # (monotonic time, line, level) of every change: what a test asserts on.
        # Bounded: the newest CONTROL_LOG entries.
        self.control_log: list[tuple[float, str, bool]] = []
        hub.writes.on_ready = self._on_input
        hub.set_reading = self.set_reading

    def set_reading(self, on: bool) -> None:
        """Release output (True) or hold it in the pending buffer (False)."""
        self._reading = on

    def describe(self) -> str:
        return self.cfg.describe()

    def apply_settings(self, wanted: LineSettings) -> LineSettings:
        """A line-settings change: put in force, and the output pacing follows the
        baud rate. A simulated UART takes any framing, but not a speed of 0."""
        if wanted.baudrate <= 0:
            raise SettingsRefused(f"baud rate {wanted.baudrate} is not a speed")
        self.settings = wanted
        self.rate = wanted.baudrate / 10.0
        return wanted

    def set_control(
        self, dtr: bool | None = None, rts: bool | None = None, brk: bool | None = None
    ) -> ControlLines:
        """Record the lines given and say so in the output; a simulated UART takes any."""
        now = time.monotonic()
        for line, level, shown in (("dtr", dtr, "DTR"), ("rts", rts, "RTS"), ("brk", brk, "BREAK")):
            if level is None:
                continue
            self.control_log.append((now, line, level))
            del self.control_log[:-CONTROL_LOG]
            word = ("on" if level else "off") if line == "brk" else ("high" if level else "low")
            self._emit(f"[{shown} {word}]\r\n".encode())
        current = self.control
        self.control = ControlLines(
            current.dtr if dtr is None else dtr,
            current.rts if rts is None else rts,
            current.brk if brk is None else brk,
        )
        return self.control

    def modem_state(self) -> ModemLines:
        """As through a loopback plug: CTS follows RTS, DSR follows DTR."""
        return ModemLines(cts=bool(self.control.rts), dsr=bool(self.control.dtr), ri=False, cd=True)

    def start(self) -> None:
        self._running = True
        self.status.set(UP, "simulated device")
        self._boot()
        self._timers = [
            self.reactor.call_later(TICK, self._tick),
            self.reactor.call_later(self.cfg.status_interval, self._status),
        ]

    def stop(self) -> None:
        self._running = False
        for t in self._timers:
            t.cancel()
        self.status.set(DOWN, "stopped")

    def _boot(self) -> None:
        self._boot_time = time.monotonic()
        if self.cfg.boot:
            for line in BOOT_LOG:
                self._emit(line.encode() + b"\r\n")
        self._emit(PROMPT)

    def _emit(self, data: bytes) -> None:
        room = MAX_PENDING - len(self._out)
        if len(data) > room:
            self.overruns += len(data) - room
            data = data[:room]
        self._out += data

    def _tick(self) -> None:
        if not self._running:
            return
        self._credit = min(self._credit + self.rate * TICK, max(self.rate * TICK * 4, 1.0))
        n = min(int(self._credit), len(self._out)) if self._reading else 0
        if n:
            self._credit -= n
            chunk = bytes(self._out[:n])
            del self._out[:n]
            self.hub.publish(chunk)
        self._timers[0] = self.reactor.call_later(TICK, self._tick)

    def _status(self) -> None:
        if not self._running:
            return
        self.counter += 1
        up = time.monotonic() - self._boot_time
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        self._emit(f"[{up:12.6f}] status: counter={self.counter} time={stamp} temp=41.5C\r\n".encode())
        self._timers[1] = self.reactor.call_later(self.cfg.status_interval, self._status)

    def _on_input(self) -> None:
        """Clients wrote to the device: take everything (a UART is always ready)."""
        queue = self.hub.writes.queue
        while (unit := queue.peek()) is not None:
            data = bytes(unit)
            self.hub.writes.consumed(len(data))
            for byte in data:
                self._key(byte)

    def _key(self, byte: int) -> None:
        if byte in (0x0D, 0x0A):
            if byte == 0x0A and not self._line and self._last_was_cr:
                self._last_was_cr = False
                return  # the LF of a CR LF pair
            self._last_was_cr = byte == 0x0D
            self._emit(b"\r\n")
            self._command(self._line.decode("utf-8", "replace").strip())
            self._line.clear()
            self._emit(PROMPT)
            return
        self._last_was_cr = False
        if byte in (0x08, 0x7F):
            if self._line:
                self._line.pop()
                self._emit(b"\b \b")
            return
        if len(self._line) < 256:  # a real shell's line buffer is bounded too
            self._line.append(byte)
            self._emit(bytes([byte]))

    def _command(self, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        if not cmd:
            return
        if cmd == "help":
            self._say("commands: help, status, echo TEXT, uptime, reboot")
        elif cmd == "status":
            up = time.monotonic() - self._boot_time
            self._say(f"ok counter={self.counter} uptime={up:.1f}s baud={self.settings.baudrate}")
        elif cmd == "echo":
            self._say(arg)
        elif cmd == "uptime":
            self._say(f"{time.monotonic() - self._boot_time:.3f}")
        elif cmd == "reboot":
            self._say("rebooting...")
            self.counter = 0
            self._boot()
            self._out = self._out[: -len(PROMPT)]  # _command's caller prints the prompt
        else:
            self._say(f"unknown command: {cmd} (try 'help')")

    def _say(self, text: str) -> None:
        self._emit(text.encode() + b"\r\n")
