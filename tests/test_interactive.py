"""Interactive writing under ``write: lines``: Ctrl-C and lone keys get through.

In process, the hub against a real reactor: a control character passes a
partial line another writer holds; an idle partial line goes out after
``line_timeout`` from one timer per reader, restarted on input and cancelled
at detach (where it must let go of the reader).

End to end, muxd on a pty device with TCP writers: ``\\x03`` reaches the device
within 50 ms (the median of several tries, so one scheduling hiccup on a
loaded machine does not decide) while two other writers send whole lines that
the device receives whole and in order; and a key with no newline arrives once
``line_timeout`` has passed, not before.
"""

from __future__ import annotations

import gc
import os
import select
import socket
import statistics
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from muxd.hub import Hub, PortBounds, Reader, ReaderPolicy
from muxd.reactor import Reactor, Timer
from tests.helpers import AUTO, PtyDevice, StartMuxd, connect, run_until, start_on_pty

# The bound for Ctrl-C, from the writer's send to the device's read.
CTRL_C_BOUND = 0.050
# Tries whose median is held to that bound: enough that one preempted try
# (2 shared cores, a test suite next door) cannot fail the test alone.
TRIES = 10
# Whole lines each line writer sends per try, before its partial line.
LINES_PER_TRY = 3
# A line long enough that a cut inside it would show: several TCP reads' worth
# is not needed, only more than a key.
PAYLOAD = b"0123456789abcdef" * 8
# The idle timeout of the end-to-end test of a lone key, and how much later
# than it the key may arrive before the test calls it lost (generous: this is
# not the timing assertion, the lower bound is).
KEY_TIMEOUT = 0.2
KEY_SLACK = 3.0
# How long the device side waits for anything before failing the test.
READ_TIMEOUT = 10.0


# -- in process: the hub and its timer -------------------------------------------------------------


class Owner:
    """A connection as the hub sees it; weakly referable, so a test can tell
    whether anything (a timer) still holds it."""

    def __init__(self) -> None:
        self.closed: str | None = None

    def on_data(self) -> None:
        """Device output is of no interest here."""

    def on_write_room(self) -> None:
        """Never paused: the fake device takes everything at once."""

    def close(self, reason: str) -> None:
        self.closed = reason


def lines_policy() -> ReaderPolicy:
    return ReaderPolicy("tcp:test", 4096, drop_oldest=True, writable=True, lines=True, notices=False)


def device_hub(reactor: Reactor, line_timeout: float) -> tuple[Hub, list[bytes]]:
    """A hub whose device takes every unit the moment it is queued, in order."""
    hub = Hub("p", PortBounds(4096, 1024, 64, 0, line_timeout=line_timeout), reactor)
    units: list[bytes] = []

    def take() -> None:
        while (unit := hub.writes.queue.peek()) is not None:
            units.append(bytes(unit))
            hub.writes.consumed(len(unit))

    hub.writes.on_ready = take
    return hub, units


def timer_of(reader: Reader) -> Timer | None:
    """The reader's idle timer, read afresh (not narrowed by an earlier assert)."""
    return reader.line_timer


def test_ctrl_c_passes_a_partial_line_another_writer_holds() -> None:
    reactor = Reactor()
    hub, units = device_hub(reactor, line_timeout=5.0)
    a = hub.attach(Owner(), lines_policy(), "a")
    b = hub.attach(Owner(), lines_policy(), "b")
    hub.writes.submit(a, b"ls -l /va")
    hub.writes.submit(b, b"\x03")  # at once, inside submit: no turn of the loop, no timeout
    assert units == [b"\x03"]
    hub.writes.submit(b, b"top\x03")  # b's own partial line goes first, then its Ctrl-C
    hub.writes.submit(a, b"r\n")
    assert units == [b"\x03", b"top", b"\x03", b"ls -l /var\n"]
    assert hub.writes.queue.held == 0


def test_idle_partial_line_goes_out_after_line_timeout_from_one_timer() -> None:
    reactor = Reactor()
    timeout = 0.05
    hub, units = device_hub(reactor, line_timeout=timeout)
    a = hub.attach(Owner(), lines_policy(), "a")
    b = hub.attach(Owner(), lines_policy(), "b")
    hub.writes.submit(a, b"y")
    first = a.line_timer
    assert first is not None
    started = time.monotonic()
    hub.writes.submit(a, b"e")  # input restarts the idle clock: still one timer
    assert first.cancelled and a.line_timer is not None and a.line_timer is not first
    hub.writes.submit(b, b"whole line\n")  # a whole line arms nothing
    assert b.line_timer is None and units == [b"whole line\n"]
    run_until(reactor, lambda: len(units) == 2, "the idle partial line", timeout=5.0)
    assert time.monotonic() - started >= timeout
    assert units == [b"whole line\n", b"ye"]  # one unit, not a key per unit
    assert timer_of(a) is None and hub.writes.queue.held == 0  # the timer that fired is gone too
    hub.writes.submit(a, b"s\n")  # the rest of the line is a unit of its own afterwards
    assert units[-1] == b"s\n" and timer_of(a) is None


def test_line_timeout_zero_holds_until_the_line_ends() -> None:
    reactor = Reactor()
    hub, units = device_hub(reactor, line_timeout=0)
    a = hub.attach(Owner(), lines_policy(), "a")
    hub.writes.submit(a, b"partial")
    assert a.line_timer is None and units == [] and hub.writes.queue.held == 7
    hub.writes.submit(a, b"\r")
    assert units == [b"partial\r"]


def test_detach_cancels_the_timer_and_lets_go_of_the_reader() -> None:
    reactor = Reactor()
    hub, units = device_hub(reactor, line_timeout=30.0)  # due long after the test
    owner = Owner()
    reader: Reader | None = hub.attach(owner, lines_policy(), "a")
    assert reader is not None
    hub.writes.submit(reader, b"half a com")
    timer = reader.line_timer
    assert timer is not None
    gone = weakref.ref(owner)
    hub.detach(reader, "eof")
    assert units == [b"half a com"]  # the partial line still goes out, once
    assert timer.cancelled and timer.callback is None
    del owner, reader
    gc.collect()
    assert gone() is None, "something (the timer?) still holds the detached reader"
    reactor.run_once(0)
    assert units == [b"half a com"]


# -- end to end: muxd on a pty ----------------------------------------------------------------------


class DeviceLog:
    """Everything the device (the pty master) received, read as it comes."""

    def __init__(self, dev: PtyDevice) -> None:
        self.fd = dev.master
        self.data = bytearray()

    def until(self, done: Callable[[bytearray], bool], what: str) -> float:
        """Read until done(data); return the monotonic time of the read that did it."""
        deadline = time.monotonic() + READ_TIMEOUT
        while not done(self.data):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"device: no {what}; got {bytes(self.data[-300:])!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.data += os.read(self.fd, 65536)
                except BlockingIOError:
                    continue
        return time.monotonic()


def has_all(parts: list[bytes]) -> Callable[[bytearray], bool]:
    return lambda data: all(part in data for part in parts)


def has_count(part: bytes, n: int) -> Callable[[bytearray], bool]:
    return lambda data: data.count(part) == n


def line(writer: bytes, attempt: int, j: int) -> bytes:
    return b"%s%02d.%d " % (writer, attempt, j) + PAYLOAD


def lines_writers(
    muxd: StartMuxd, tmp_path: Path, dev: PtyDevice, n: int, timeout: str
) -> list[socket.socket]:
    m = start_on_pty(
        muxd, tmp_path, dev, [{"tcp": AUTO, "mode": "rw", "write": "lines"}], line_timeout=timeout
    )
    socks = [connect(m.port(0)) for _ in range(n)]
    m.wait_connected(n)
    return socks


def test_ctrl_c_reaches_the_device_within_50ms_while_lines_stay_whole(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    # A long line_timeout: the partial lines held across a Ctrl-C must stay
    # held, so that any cut in them could only be the Ctrl-C's doing.
    a, c, b = lines_writers(muxd, tmp_path, pty_device, 3, "10s")
    log = DeviceLog(pty_device)
    sent: dict[bytes, list[bytes]] = {b"A": [], b"C": []}
    latencies = []
    for attempt in range(TRIES):
        for sock, name in ((a, b"A"), (c, b"C")):
            whole = [line(name, attempt, j) for j in range(LINES_PER_TRY)]
            partial = line(name, attempt, LINES_PER_TRY)
            sent[name] += [*whole, partial]
            sock.sendall(b"".join(x + b"\n" for x in whole) + partial[:-5])
        last = [line(name, attempt, LINES_PER_TRY - 1) + b"\n" for name in (b"A", b"C")]
        # The whole lines are at the device, so muxd has read the partial lines
        # that followed them: both are held while the Ctrl-C passes.
        log.until(has_all(last), "whole lines of this try")
        started = time.monotonic()
        b.sendall(b"\x03")
        arrived = log.until(has_count(b"\x03", attempt + 1), "Ctrl-C")
        latencies.append(arrived - started)
        for sock, name in ((a, b"A"), (c, b"C")):
            sock.sendall(line(name, attempt, LINES_PER_TRY)[-5:] + b"\n")
    expected = sum(len(x) + 1 for lines in sent.values() for x in lines) + TRIES
    log.until(lambda d: len(d) >= expected, "every line")
    data = bytes(log.data)
    assert len(data) == expected, "the device got bytes nobody sent"

    median = statistics.median(latencies)
    assert median < CTRL_C_BOUND, f"Ctrl-C took {median * 1000:.1f} ms (median); tries: {latencies}"
    # Each Ctrl-C landed between lines, never inside one...
    for i, byte in enumerate(data):
        if byte == 0x03:
            assert i == 0 or data[i - 1] in b"\n\x03", (
                f"a Ctrl-C inside a line: {data[max(0, i - 40) : i + 5]!r}"
            )
    # ...and every line arrived whole and in its writer's order.
    got = data.replace(b"\x03", b"").split(b"\n")
    assert got[-1] == b""
    for name, lines in sent.items():
        assert [x for x in got[:-1] if x.startswith(name)] == lines
    assert len(got) - 1 == sum(len(x) for x in sent.values())


def test_a_key_with_no_newline_arrives_after_line_timeout(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    [w] = lines_writers(muxd, tmp_path, pty_device, 1, f"{int(KEY_TIMEOUT * 1000)}ms")
    log = DeviceLog(pty_device)
    started = time.monotonic()
    w.sendall(b"y")  # "Continue? [y/n]": no Enter follows
    arrived = log.until(lambda d: d == b"y", "the lone key")
    # Not before: the timer starts when muxd reads the key, after this send.
    assert KEY_TIMEOUT <= arrived - started < KEY_TIMEOUT + KEY_SLACK
    w.sendall(b"es\n")  # what follows is a unit of its own, as a line
    log.until(lambda d: d == b"yes\n", "the rest of the line")
