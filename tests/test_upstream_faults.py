"""A K2 that misbehaves, one way per test: it greets and hangs up, sends one
byte and hangs up, resets every connection, black-holes, or trickles. And a
muxd at its fd limit when the link drops.

What each test checks is the same two things: the connection rate stays
within what the backoff allows (computed from backoff_min/backoff_max, never
"it looked fine"), and no bug was caught on the way (muxd_internal_errors_total
stays 0, read from /metrics). Before the backoff reset waited for a stable
link, a K2 that greets and hangs up was reconnected 378 times a minute.

The measured rates are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from muxd import config as configmod
from muxd.errors import LocalProtocolError
from muxd.port import PortRuntime
from muxd.reactor import Reactor
from muxd.upstream.state import BACKING_OFF, CONNECTING, DOWN, STATES, TRANSITIONS, UP, UpstreamStatus
from muxd.upstream.tcp import TcpPort
from tests.conftest import Muxd, connect, free_port, recv_exactly, wait_for, write_config
from tests.fakes.k2 import BANNER_AND_CLOSE, ONE_BYTE_AND_CLOSE, RST, FakeK2
from tests.test_http import get_json, port_info
from tests.test_metrics import scrape, value

StartMuxd = Callable[..., Muxd]

# Fast backoff so a few seconds show many retries; the bound scales with it.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 1.0
# How long each rate is measured. Shorter than STABLE_UP, so no link in it can
# reset the backoff, and long enough for the backoff to reach its cap.
WINDOW = 4.0


@pytest.fixture
def k2() -> Iterator[FakeK2]:
    fake = FakeK2()
    yield fake
    fake.stop()


def start(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2, nofile: int | None = None, **upstream: Any
) -> tuple[Muxd, int, str]:
    """muxd with port dut1 on the K2, a rw TCP listener and an http server:
    returns it, the listener's port and the http address."""
    lport, hport = free_port(), free_port()
    cfg = write_config(
        tmp_path,
        {
            "ports": [
                {
                    "name": "dut1",
                    "upstream": {
                        "tcp": f"127.0.0.1:{k2.port}",
                        "backoff_min": f"{BACKOFF_MIN}s",
                        "backoff_max": f"{BACKOFF_MAX}s",
                        **upstream,
                    },
                    "listeners": [{"tcp": f"127.0.0.1:{lport}", "mode": "rw"}],
                }
            ],
            "http": {"listen": f"127.0.0.1:{hport}"},
        },
    )
    m = muxd("run", "-c", str(cfg), "--log-level", "debug", nofile=nofile)
    m.wait_port(hport)
    m.wait_port(lport)
    return m, lport, f"127.0.0.1:{hport}"


def max_reconnects(window: float, up_for: float = 0.0) -> int:
    """The most connections muxd may open within ``window`` after the first, if
    every link fails after ``up_for`` seconds: each wait is at least half its
    ceiling (equal jitter), and the ceiling doubles from BACKOFF_MIN to
    BACKOFF_MAX with each failure. Bounded in count whatever the arguments."""
    elapsed = 0.0
    for n in range(10_000):
        elapsed += up_for + min(BACKOFF_MAX, BACKOFF_MIN * 2.0**n) / 2
        if elapsed > window:
            return n
    return 10_000


def measure_connects(k2: FakeK2, bound: int) -> tuple[int, float]:
    """Connections the K2 sees within WINDOW after the first one; returns early
    (so the assertion fails at once) if they pass ``bound``."""
    assert k2.wait_for(lambda: k2.connections_seen >= 1, 10), "muxd never connected"
    first, t0 = k2.connections_seen, time.monotonic()
    # Waiting for the rate to be exceeded; WINDOW passing without it is the pass.
    k2.wait_for(lambda: k2.connections_seen - first > bound, WINDOW)
    return k2.connections_seen - first, time.monotonic() - t0


def internal_errors(addr: str) -> float:
    return value(scrape(addr)[1], "muxd_internal_errors_total")


@pytest.mark.parametrize("mode", [BANNER_AND_CLOSE, ONE_BYTE_AND_CLOSE, RST])
def test_a_k2_that_hangs_up_at_once_is_retried_with_growing_backoff(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2, mode: str
) -> None:
    k2.on_connect(mode)
    m, _, addr = start(muxd, tmp_path, k2)
    bound = max_reconnects(WINDOW)
    n, took = measure_connects(k2, bound)
    print(f"\n{mode}: {n} reconnects in {took:.1f}s (at most {bound} allowed; {60 * n / took:.0f}/min)")
    assert n <= bound, f"{n} reconnects in {took:.1f}s: the backoff is not growing"
    assert n >= 2, "muxd stopped retrying"
    assert m.proc.poll() is None
    assert internal_errors(addr) == 0
    info = port_info(addr)
    assert info["state"] in ("up", "down", "backing-off", "connecting")
    if mode != RST:
        # Every link came up and went down: each is a change, and logged as one.
        assert m.log().count("dut1 upstream up (opened)") >= n


def test_a_black_holed_k2_is_retried_once_per_idle_timeout(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2
) -> None:
    idle = 0.5
    k2.black_hole(True)
    m, lport, addr = start(muxd, tmp_path, k2, idle_timeout=f"{idle}s")
    reader = connect(lport)
    bound = max_reconnects(WINDOW, up_for=idle)
    n, took = measure_connects(k2, bound)
    print(f"\nblack hole: {n} reconnects in {took:.1f}s (at most {bound} allowed)")
    assert 1 <= n <= bound
    assert "dut1 upstream down (idle timeout)" in m.log()
    k2.black_hole(False)
    wait_for(lambda: port_info(addr)["state"] == "up", 5, "up again")
    assert k2.wait_for(lambda: k2.active == 1)
    k2.feed(b"awake\n")
    assert recv_exactly(reader, 6) == b"awake\n"  # the same reader, never dropped
    assert internal_errors(addr) == 0


def test_a_trickling_k2_keeps_its_one_link(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    m, lport, addr = start(muxd, tmp_path, k2, idle_timeout="2s")
    reader = connect(lport)
    wait_for(lambda: port_info(addr)["clients"] == 1, 5, "the reader")
    k2.trickle(0.02)
    data = bytes(range(32, 96))  # 64 bytes, one every 20 ms
    k2.feed(data)
    assert recv_exactly(reader, len(data), timeout=10) == data
    k2.trickle(None)
    assert k2.connections_seen == 1 and k2.max_active_seen == 1
    assert port_info(addr)["state"] == "up"
    assert m.proc.poll() is None
    assert internal_errors(addr) == 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# muxd's fd limit in the EMFILE test: the figure, a few dozen above what
# muxd needs idle (interpreter, epoll, signal pipe, listeners, the K2 link).
NOFILE = 64
# The first retry after the link drops waits at least this long (half of it,
# with jitter): well past the acceptor's 0.5 s EMFILE pause, so the fd the
# dropped link freed is taken by a waiting client before the retry needs one.
EMFILE_BACKOFF = 2.0


def test_emfile_on_reconnect_does_not_stop_the_retries(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    m, lport, addr = start(
        muxd, tmp_path, k2, nofile=NOFILE, backoff_min=f"{EMFILE_BACKOFF}s", backoff_max=f"{EMFILE_BACKOFF}s"
    )
    wait_for(lambda: port_info(addr)["state"] == "up", 5, "up")
    clients: list[socket.socket] = []
    try:
        # Fill muxd's fd table; the rest wait in its listen backlog.
        for _ in range(NOFILE + 16):
            clients.append(socket.create_connection(("127.0.0.1", lport), timeout=5))
        wait_for(lambda: fd_count(m.pid) >= NOFILE, 10, "muxd at its fd limit")
        k2.reset_all()
        m.wait_log("dut1 upstream backing-off (too many open files)", timeout=10)
        # Still failing, and still retrying: more attempts follow the first EMFILE.
        attempts = m.log().count("dut1 upstream connecting")
        wait_for(
            lambda: m.log().count("dut1 upstream connecting") > attempts, 2 * EMFILE_BACKOFF + 1, "a retry"
        )
    finally:
        for c in clients:
            c.close()
    assert k2.wait_for(lambda: k2.connections_seen == 2, 2 * EMFILE_BACKOFF + 5), "never reconnected"
    wait_for(lambda: port_info(addr)["state"] == "up", 5, "up again")
    reader = connect(lport)
    wait_for(lambda: port_info(addr)["clients"] == 1, 10, "a new reader")
    k2.feed(b"back\n")
    assert recv_exactly(reader, 5) == b"back\n"
    assert m.log().count("too many open files") >= 1
    assert internal_errors(addr) == 0


def test_since_stays_at_the_outage_start_while_retries_go_on(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2
) -> None:
    _, _, addr = start(muxd, tmp_path, k2)
    wait_for(lambda: port_info(addr)["state"] == "up", 5, "up")
    up = port_info(addr)
    assert up["attempts"] == 0 and up["next_attempt_in"] is None
    k2.refuse(True)
    k2.reset_all()
    went_down = time.time()
    # Refused attempts every <= 1 s: `since` must not follow them.
    wait_for(lambda: port_info(addr)["attempts"] >= 4, 10, "4 attempts")
    info = port_info(addr)
    assert went_down - 1 <= info["since"] <= went_down + 0.5
    assert info["reason"] == "connection refused" and info["state"] in ("backing-off", "connecting")
    if info["state"] == "backing-off":
        assert 0 <= info["next_attempt_in"] <= BACKOFF_MAX
    metrics = scrape(addr)[1]
    assert value(metrics, "muxd_upstream_last_change_timestamp_seconds", port="dut1") == pytest.approx(
        info["since"]
    )
    assert value(metrics, "muxd_upstream_down_seconds_total", port="dut1") > 0
    k2.refuse(False)
    wait_for(lambda: port_info(addr)["state"] == "up", 5, "up again")
    back = port_info(addr)
    assert back["since"] > info["since"] and back["attempts"] == 0 and back["next_attempt_in"] is None
    assert get_json(addr, "/api/v1/ports")["ports"][0]["name"] == "dut1"


# -- in process: the state table, and attempts that raise ------------------------------------


def test_the_transition_table_refuses_what_it_does_not_list() -> None:
    notices: list[str] = []

    def notify(text: str, **_fields: object) -> None:
        notices.append(text)

    st = UpstreamStatus("p", notify)
    born = st.since
    st.set(CONNECTING, "opening")
    st.set(CONNECTING, "opening")  # the same state and reason: no change at all
    with pytest.raises(LocalProtocolError, match="from connecting to connecting"):
        st.set(CONNECTING, "a second attempt at once")
    for state in STATES:
        assert state in TRANSITIONS and str(state) == state.value
    st.set(BACKING_OFF, "connection refused", retry_in=1.5)
    in_ = st.next_attempt_in()
    assert in_ is not None and 1.0 < in_ <= 1.5
    for _ in range(5):  # retries inside the outage: `since` stays, attempts grow
        st.set(CONNECTING, "opening")
        st.set(BACKING_OFF, "connection refused", retry_in=0.5)
    assert st.since == born and st.attempts == 6 and notices == []
    st.set(CONNECTING, "opening")
    st.set(UP, "opened")
    assert st.since > born and st.attempts == 0 and st.next_attempt_in() is None
    with pytest.raises(LocalProtocolError, match="from up to backing-off"):
        st.set(BACKING_OFF, "a retry while up")
    with pytest.raises(LocalProtocolError, match="from up to connecting"):
        st.set(CONNECTING, "a second link")
    st.set(DOWN, "closed by peer")
    assert notices == ["p upstream up (opened)", "p upstream down (closed by peer)"]
    assert st.connects == 1 and st.disconnects == {"closed by peer": 1}


class FlakyPort(TcpPort):
    """A TcpPort whose first attempts raise, as socket() at the fd limit or a library bug would."""

    def __init__(self, raises: list[Exception], *args: Any) -> None:
        super().__init__(*args)
        self.raises = raises

    def _open(self) -> None:
        if self.raises:
            raise self.raises.pop(0)
        super()._open()


def test_an_attempt_that_raises_is_retried_and_logged_once(
    k2: FakeK2, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = configmod.from_data(
        {
            "ports": [
                {
                    "name": "dut1",
                    "upstream": {"tcp": f"127.0.0.1:{k2.port}", "backoff_min": "10ms", "backoff_max": "50ms"},
                }
            ]
        }
    )
    reactor = Reactor()
    rt = PortRuntime.build(cfg.ports[0], reactor)
    assert isinstance(cfg.ports[0].upstream, configmod.TcpUpstream)
    raises: list[Exception] = [
        OSError(errno.EMFILE, os.strerror(errno.EMFILE)),
        ValueError("boom"),
        ValueError("boom"),
    ]
    up = FlakyPort(raises, cfg.ports[0].upstream, rt.hub, reactor)
    caplog.set_level(logging.DEBUG)
    try:
        up.start()
        deadline = time.monotonic() + 5
        for _ in range(1000):
            if up.status.state == UP or time.monotonic() > deadline:
                break
            assert up.status.state != CONNECTING or up.fd is None  # never stuck: a retry is due
            reactor.run_once(max_wait=0.01)
        assert up.status.state == UP, up.status.reason
        assert up.status.attempt_errors == 3
        assert reactor.internal_errors == 2  # the ValueErrors: not the environment
        tracebacks = [r for r in caplog.records if r.exc_info is not None]
        assert len(tracebacks) == 1, "a traceback per retry"
        assert any("backing-off (too many open files)" in r.getMessage() for r in caplog.records)
        assert k2.wait_for(lambda: k2.connections_seen == 1)
    finally:
        up.stop()
        reactor.close()
