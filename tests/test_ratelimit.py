"""The log limiter: one line per (peer, kind) per interval, counts of what was
held back, and a bounded table. Driven by a fake clock, read through caplog."""

from __future__ import annotations

import logging

import pytest

from muxd.ratelimit import LOG_INTERVAL, MAX_KEYS, LogLimiter, peer_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited(caplog: pytest.LogCaptureFixture) -> tuple[LogLimiter, Clock, pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG, logger="muxd.test.ratelimit")
    clock = Clock()
    return LogLimiter(logging.getLogger("muxd.test.ratelimit"), clock=clock), clock, caplog


def test_one_line_per_interval_then_the_count(
    limited: tuple[LogLimiter, Clock, pytest.LogCaptureFixture],
) -> None:
    limiter, clock, caplog = limited
    assert limiter.warning("10.0.0.1", "max_clients", "refused %s", "10.0.0.1:4000")
    for i in range(999):
        clock.now += 0.01
        assert not limiter.warning("10.0.0.1", "max_clients", "refused %s", f"10.0.0.1:{4001 + i}")
    assert [r.getMessage() for r in caplog.records] == ["refused 10.0.0.1:4000"]
    assert limiter.suppressed_total == 999
    clock.now = 1000.0 + LOG_INTERVAL
    assert limiter.warning("10.0.0.1", "max_clients", "refused %s", "10.0.0.1:5000")
    last = caplog.records[-1]
    assert last.levelno == logging.WARNING
    assert last.getMessage() == "refused 10.0.0.1:5000 (999 more like it from 10.0.0.1 in the last 60s)"
    clock.now += LOG_INTERVAL  # nothing held back this time: no count
    assert limiter.warning("10.0.0.1", "max_clients", "refused")
    assert caplog.records[-1].getMessage() == "refused"


def test_keys_are_peer_host_and_kind(limited: tuple[LogLimiter, Clock, pytest.LogCaptureFixture]) -> None:
    limiter, _, caplog = limited
    assert limiter.info("10.0.0.1:1234", "a", "x")
    assert not limiter.info(("10.0.0.1", 999), "a", "x")  # another port: the same peer
    assert limiter.info("10.0.0.1", "b", "x")  # another kind
    assert limiter.info("10.0.0.2", "a", "x")  # another peer
    assert limiter.info("2001:db8:1:2::1", "a", "x")
    assert not limiter.info("[2001:db8:1:2:ffff::9]:80", "a", "x")  # the same /64
    assert limiter.info("2001:db8:1:3::1", "a", "x")  # another /64
    assert not limiter.info("::ffff:10.0.0.2", "a", "x")  # IPv4-mapped is the IPv4 peer
    assert limiter.info("/run/muxd.sock", "a", "x") and not limiter.info("/run/muxd.sock", "a", "x")
    assert len(caplog.records) == 6


def test_peer_key() -> None:
    assert peer_key("127.0.0.1:80") == peer_key(("127.0.0.1", 5)) == "127.0.0.1"
    assert peer_key("[::1]:8020") == peer_key("::1") == "::/64"
    assert peer_key("fe80::1%eth0") == "fe80::/64"
    assert peer_key("") == "" and peer_key("not an address") == "not an address"


def test_memory_is_bounded_oldest_key_first(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="muxd.test.ratelimit")
    clock = Clock()
    limiter = LogLimiter(logging.getLogger("muxd.test.ratelimit"), max_keys=3, clock=clock)
    limiter.info("10.0.0.1", "k", "first")
    assert not limiter.info("10.0.0.1", "k", "held back")
    for i in range(2, 12):
        clock.now += 0.001
        assert limiter.info(f"10.0.0.{i}", "k", "line")
        assert len(limiter) <= 3
    assert limiter.forgotten == 1  # 10.0.0.1's held-back line, evicted with its key
    assert limiter.info("10.0.0.1", "k", "again")  # forgotten: written at once
    assert MAX_KEYS >= 1024


def test_a_disabled_level_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="muxd.test.ratelimit")
    limiter = LogLimiter(logging.getLogger("muxd.test.ratelimit"), clock=Clock())
    for _ in range(100):
        assert not limiter.debug("10.0.0.1", "k", "x")
    assert len(limiter) == 0 and limiter.suppressed_total == 0 and not caplog.records
    assert limiter.warning("10.0.0.1", "k", "x")
