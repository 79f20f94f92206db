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
from pathlib import Path
from typing import Any

import pytest

from muxd import config as configmod
from muxd.errors import LocalProtocolError
from muxd.port import PortRuntime
from muxd.reactor import Reactor
from muxd.upstream.state import BACKING_OFF, CONNECTING, DOWN, STATES, TRANSITIONS, UP, LinkMonitor
from muxd.upstream.tcp import TcpPort
from tests.fakes.k2 import BANNER_AND_CLOSE, ONE_BYTE_AND_CLOSE, RST, SERVE, FakeK2
from tests.helpers import (
    LOCAL,
    Muxd,
    StartMuxd,
    connect,
    fd_count,
    recv_exactly,
    run_until,
    start_on_k2,
    wait_for,
)
from tests.test_metrics import scrape, value

# Fast backoff so a few seconds show many retries; the bound scales with it.
BACKOFF_MIN = 0.1
BACKOFF_MAX = 1.0
# How long each rate is measured. Shorter than STABLE_UP, so no link in it can
# reset the backoff, and long enough for the backoff to reach its cap.
WINDOW = 4.0


def start(muxd: StartMuxd, tmp_path: Path, k2: FakeK2, nofile: int | None = None, **upstream: Any) -> Muxd:
    """muxd with port dut1 on the K2 with the fast backoff, a rw TCP listener and
    an http server; ready, but not waiting for the link (it may never stay up)."""
    backoff = {"backoff_min": f"{BACKOFF_MIN}s", "backoff_max": f"{BACKOFF_MAX}s"}
    return start_on_k2(
        muxd, tmp_path, k2.port, upstream={**backoff, **upstream}, nofile=nofile, wait_up=False
    )


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


def internal_errors(m: Muxd) -> float:
    """Exactly the sample (a KeyError if muxd stopped exporting it)."""
    return value(scrape(m.http)[1], "muxd_internal_errors_total")


@pytest.mark.parametrize("mode", [BANNER_AND_CLOSE, ONE_BYTE_AND_CLOSE, RST])
def test_a_k2_that_hangs_up_at_once_is_retried_with_growing_backoff(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2, mode: str
) -> None:
    k2.on_connect(mode)
    m = start(muxd, tmp_path, k2)
    bound = max_reconnects(WINDOW)
    n, took = measure_connects(k2, bound)
    print(
        f"\n{mode}: {n} reconnects in {took:.1f}s with backoff {BACKOFF_MIN}-{BACKOFF_MAX}s (at most {bound})"
    )
    assert n <= bound, f"{n} reconnects in {took:.1f}s: the backoff is not growing"
    assert n >= 2, "muxd stopped retrying"
    assert m.proc.poll() is None
    assert internal_errors(m) == 0
    info = m.port_info()
    assert info["state"] in ("up", "down", "backing-off", "connecting")
    if mode != RST:
        # Every link came up and went down: each is a change, and logged as one.
        assert m.log().count("dut1 upstream up (opened)") >= n


def test_a_black_holed_k2_is_retried_once_per_idle_timeout(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2
) -> None:
    idle = 0.5
    k2.black_hole(True)
    m = start(muxd, tmp_path, k2, idle_timeout=f"{idle}s")
    reader = connect(m.port())
    bound = max_reconnects(WINDOW, up_for=idle)
    n, took = measure_connects(k2, bound)
    print(f"\nblack hole: {n} reconnects in {took:.1f}s (at most {bound} allowed)")
    assert 1 <= n <= bound
    assert "dut1 upstream down (idle timeout)" in m.log()
    k2.black_hole(False)
    m.wait_state("up", timeout=5)
    assert k2.wait_for(lambda: k2.active == 1)
    k2.feed(b"awake\n")
    assert recv_exactly(reader, 6) == b"awake\n"  # the same reader, never dropped
    assert internal_errors(m) == 0


def test_a_trickling_k2_keeps_its_one_link(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    m = start(muxd, tmp_path, k2, idle_timeout="2s")
    reader = connect(m.port())
    m.wait_connected(1, timeout=5)
    k2.trickle(0.02)
    data = bytes(range(32, 96))  # 64 bytes, one every 20 ms
    k2.feed(data)
    assert recv_exactly(reader, len(data), timeout=10) == data
    k2.trickle(None)
    assert k2.connections_seen == 1 and k2.max_active_seen == 1
    assert m.port_info()["state"] == "up"
    assert m.proc.poll() is None
    assert internal_errors(m) == 0


# muxd's fd limit in the EMFILE test: the figure, a few dozen above what
# muxd needs idle (interpreter, epoll, signal pipe, listeners, the K2 link).
NOFILE = 64
# The first retry after the link drops waits at least this long (half of it,
# with jitter): well past the acceptor's 0.5 s EMFILE pause, so the fd the
# dropped link freed is taken by a waiting client before the retry needs one.
EMFILE_BACKOFF = 2.0


def test_emfile_on_reconnect_does_not_stop_the_retries(muxd: StartMuxd, tmp_path: Path, k2: FakeK2) -> None:
    m = start(
        muxd, tmp_path, k2, nofile=NOFILE, backoff_min=f"{EMFILE_BACKOFF}s", backoff_max=f"{EMFILE_BACKOFF}s"
    )
    m.wait_state("up", timeout=5)
    lport = m.port()
    clients: list[socket.socket] = []
    try:
        # Fill muxd's fd table; the rest wait in its listen backlog.
        for _ in range(NOFILE + 16):
            clients.append(socket.create_connection((LOCAL, lport), timeout=5))
        wait_for(lambda: fd_count(m.pid) >= NOFILE, 10, "muxd at its fd limit")
        k2.reset_all()
        # At its fd limit muxd cannot accept an API connection: only its log can say how it is doing.
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
    m.wait_state("up", timeout=5)
    reader = connect(lport)
    m.wait_connected(1)
    k2.feed(b"back\n")
    assert recv_exactly(reader, 5) == b"back\n"
    assert m.log().count("too many open files") >= 1
    assert internal_errors(m) == 0


def test_since_stays_at_the_outage_start_while_retries_go_on(
    muxd: StartMuxd, tmp_path: Path, k2: FakeK2
) -> None:
    m = start(muxd, tmp_path, k2)
    m.wait_state("up", timeout=5)
    up = m.port_info()
    assert up["attempts"] == 0 and up["next_attempt_in"] is None
    k2.refuse(True)
    k2.reset_all()
    went_down = time.time()
    # Refused attempts every <= 1 s: `since` must not follow them.
    wait_for(lambda: m.port_info()["attempts"] >= 4, 10, "4 attempts")
    info = m.port_info()
    assert went_down - 1 <= info["since"] <= went_down + 0.5
    assert info["reason"] == "connection refused" and info["state"] in ("backing-off", "connecting")
    if info["state"] == "backing-off":
        assert 0 <= info["next_attempt_in"] <= BACKOFF_MAX
    metrics = scrape(m.http)[1]
    assert value(metrics, "muxd_upstream_last_change_timestamp_seconds", port="dut1") == pytest.approx(
        info["since"]
    )
    assert value(metrics, "muxd_upstream_down_seconds_total", port="dut1") > 0
    k2.refuse(False)
    m.wait_state("up", timeout=5)
    back = m.port_info()
    assert back["since"] > info["since"] and back["attempts"] == 0 and back["next_attempt_in"] is None
    assert m.api("/api/v1/ports")["ports"][0]["name"] == "dut1"


# -- in process: the state table, and attempts that raise ------------------------------------


def test_the_transition_table_refuses_what_it_does_not_list() -> None:
    notices: list[str] = []

    def notify(text: str, **_fields: object) -> None:
        notices.append(text)

    st = LinkMonitor("p", notify)
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


def fast_port(k2: FakeK2) -> configmod.Port:
    """Port dut1 on the K2, with a backoff of milliseconds, for in-process tests."""
    upstream = {"tcp": f"{LOCAL}:{k2.port}", "backoff_min": "10ms", "backoff_max": "50ms"}
    return configmod.from_data({"ports": [{"name": "dut1", "upstream": upstream}]}).ports[0]


def test_an_attempt_that_raises_is_retried_and_logged_once(
    k2: FakeK2, caplog: pytest.LogCaptureFixture
) -> None:
    port = fast_port(k2)
    reactor = Reactor()
    rt = PortRuntime.build(port, reactor)
    assert isinstance(port.upstream, configmod.TcpUpstream)
    raises: list[Exception] = [
        OSError(errno.EMFILE, os.strerror(errno.EMFILE)),
        ValueError("boom"),
        ValueError("boom"),
    ]
    up = FlakyPort(raises, port.upstream, rt.hub, reactor)
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


def test_backoff_resets_only_after_a_link_stayed_up(k2: FakeK2) -> None:
    """Failures count across links that hang up at once, and only a link that
    lasts ``stable_after`` (10 s in service, shortened here) starts them again."""
    k2.on_connect(BANNER_AND_CLOSE)
    reactor = Reactor()
    rt = PortRuntime.build(fast_port(k2), reactor)
    up = rt.upstream
    assert isinstance(up, TcpPort)
    up.stable_after = 0.3
    up.start()
    try:
        run_until(reactor, lambda: k2.connections_seen >= 4)
        assert up.failures >= 3, "a banner reset the backoff"
        k2.on_connect(SERVE)
        run_until(reactor, lambda: up.status.state == UP and k2.active == 1)
        assert up.failures >= 3  # up, but not for long enough yet
        run_until(reactor, lambda: up.failures == 0)
        assert k2.active == 1 and up.status.state == UP
    finally:
        up.stop()
        reactor.close()
