"""In-band notices: a listener with ``notices: true`` gets one text line per
upstream state change; a listener without it stays byte-exact."""

from __future__ import annotations

from pathlib import Path

from tests.fakes.k2 import FakeK2
from tests.helpers import AUTO, StartMuxd, connect, recv_exactly, start_muxd


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
