"""In-band notices: a listener with ``notices: true`` gets one text line per
upstream state change; a listener without it stays byte-exact."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Muxd, connect, free_port, recv_exactly, write_config
from tests.fakes.k2 import FakeK2

StartMuxd = Callable[..., Muxd]


@pytest.fixture
def k2() -> Iterator[FakeK2]:
    fake = FakeK2()
    yield fake
    fake.stop()


def test_notices_on_one_listener_raw_bytes_on_the_other(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    with_notices, raw = free_port(), free_port()
    cfg = write_config(
        tmp_path,
        {
            "ports": [
                {
                    "name": "dut1",
                    "upstream": {"tcp": f"127.0.0.1:{k2.port}", "backoff_max": "500ms"},
                    "listeners": [
                        {"tcp": f"127.0.0.1:{with_notices}", "notices": True},
                        {"tcp": f"127.0.0.1:{raw}"},
                    ],
                }
            ]
        },
    )
    m = muxd("run", "-c", str(cfg), "--log-level", "debug")
    m.wait_log("dut1 upstream up")
    m.wait_port(with_notices)
    m.wait_port(raw)
    a, b = connect(with_notices), connect(raw)
    m.wait_clients(4)  # two wait_port probes and two readers

    k2.feed(b"one\n")
    # A reboot: down, several refused attempts (backing-off, connecting: no
    # notices), then up. Exactly one line for each of the two changes readers see.
    k2.refuse(True)
    k2.reset_all()
    m.wait_log("dut1 upstream backing-off (connection refused)")
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
