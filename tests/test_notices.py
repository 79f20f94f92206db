"""In-band notices: a listener with ``notices: true`` gets one text line per
upstream state change, and one per stretch of lost bytes, each on a line of
its own; a listener without it stays byte-exact."""

from __future__ import annotations

from pathlib import Path

import pytest

from muxd.hub import Hub, PortBounds, Reader, ReaderPolicy
from muxd.reactor import Reactor
from tests.fakes.k2 import FakeK2
from tests.helpers import AUTO, IdleOwner, StartMuxd, connect, recv_exactly, start_muxd


def test_notices_on_one_listener_raw_bytes_on_the_other(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    m = start_muxd(
        muxd,
        tmp_path,
        {"tcp": f"127.0.0.1:{k2.port}", "backoff_max": "500ms"},
        [{"tcp": AUTO, "notices": True}, {"tcp": AUTO}],
        name="dut1",
    )
    a, b = connect(m.port(0)), connect(m.port(1))
    m.wait_connected(2)

    k2.feed(b"one\n")
    # A reboot: down, several refused attempts (backing-off, connecting: no
    # notices), then up. Exactly one line for each of the two changes readers see.
    k2.refuse(True)
    k2.reset_all()
    m.wait_state("backing-off", "connection refused")
    k2.refuse(False)
    assert k2.wait_for(lambda: k2.connections_seen == 2)
    k2.feed(b"two\n")
    k2.feed(b"three\n")  # anything extra would arrive ahead of this

    expected_a = (
        b"one\n"
        b"-- muxd: dut1 upstream down (connection reset) --\r\n"
        b"-- muxd: dut1 upstream up (opened) --\r\n"
        b"two\nthree\n"
    )
    assert recv_exactly(a, len(expected_a)) == expected_a
    assert recv_exactly(b, 14) == b"one\ntwo\nthree\n"


# -- in process, byte-exact: a raw notice begins on a line of its own -------------------------------


class Taker(IdleOwner):
    def __init__(self) -> None:
        self.got = bytearray()


def _raw_reader(hub: Hub, capacity: int = 100) -> tuple[Taker, Reader]:
    taker = Taker()
    policy = ReaderPolicy("l", capacity, True, writable=False, lines=False, notices=True)
    return taker, hub.attach(taker, policy, "t")


def _take_all(hub: Hub, taker: Taker, reader: Reader) -> bytes:
    for _ in range(1000):
        data = hub.take(reader, 1 << 20)
        if not data:
            return bytes(taker.got)
        taker.got += data
    raise AssertionError("never caught up")


def _hub() -> Hub:
    return Hub("p", PortBounds(log_capacity=4096, write_queue=1024, max_line=64, history=0), Reactor())


@pytest.mark.parametrize(("before", "lead"), [(b"ok\r\nxxx", b"\r\n"), (b"ok\r\n", b""), (b"", b"")])
def test_a_raw_gap_notice_begins_on_a_line_of_its_own(before: bytes, lead: bytes) -> None:
    hub = _hub()
    taker, reader = _raw_reader(hub)
    hub.publish(before)
    _take_all(hub, taker, reader)
    hub.set_blocked(reader, True)  # stuck: what follows overflows its 100 bytes
    flood = b"0123456789" * 30
    hub.publish(flood)
    hub.set_blocked(reader, False)
    got = _take_all(hub, taker, reader)
    assert reader.dropped == 200
    assert got == before + lead + b"-- muxd: 200 bytes lost --\r\n" + flood[200:]


def test_an_upstream_notice_after_a_prompt_begins_on_a_line_of_its_own() -> None:
    hub = _hub()
    taker, reader = _raw_reader(hub)
    hub.publish(b"login: ")
    hub.notice("p upstream down (reset)")
    hub.notice("p upstream up (opened)")  # after a notice, already at a line start
    hub.publish(b"\r\nlogin: ")
    assert _take_all(hub, taker, reader) == (
        b"login: \r\n-- muxd: p upstream down (reset) --\r\n-- muxd: p upstream up (opened) --\r\n\r\nlogin: "
    )
