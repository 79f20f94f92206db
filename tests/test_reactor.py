"""The reactor's timers: a heap that forgets cancelled timers, and a cancel that
lets go of the callback at once. In process, no sockets: only the heap and
references are looked at."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from functools import partial

import pytest

from muxd.reactor import MIN_SWEEP, Reactor, Timer

STORM = 100_000


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


def test_heap_stays_bounded_through_call_later_and_cancel(reactor: Reactor) -> None:
    keep = [reactor.call_later(60, lambda: None) for _ in range(10)]  # live timers survive sweeps
    peak = 0
    for _ in range(STORM):
        reactor.call_later(30, lambda: None).cancel()
        peak = max(peak, reactor.timer_count)
    print(f"\nheap after {STORM} call_later+cancel: {reactor.timer_count} timers (peak {peak})")
    assert peak <= 2 * MIN_SWEEP + len(keep)
    assert not any(t.cancelled for t in keep)
    assert reactor._next_timeout() > 0  # the live ones are still scheduled


def test_sweep_keeps_the_order_of_live_timers(reactor: Reactor) -> None:
    fired: list[int] = []
    timers = [reactor.call_later(0, partial(fired.append, i)) for i in range(3 * MIN_SWEEP)]
    for i, t in enumerate(timers):
        if i % 3:  # two in three: more than half, so the heap is swept
            t.cancel()
    assert reactor.timer_count < len(timers)
    reactor.run_once(max_wait=0)
    assert fired == list(range(0, 3 * MIN_SWEEP, 3))


def test_cancelled_timer_releases_its_callback(reactor: Reactor) -> None:
    class Connection:
        def on_timeout(self) -> None:
            raise AssertionError("a cancelled timer fired")

    conn = Connection()
    ref = weakref.ref(conn)
    timer = reactor.call_later(30, conn.on_timeout)  # as the HTTP idle timeout does
    timer.cancel()
    del conn
    gc.collect()
    assert ref() is None, "a cancelled timer keeps its connection alive until its deadline"
    assert timer in reactor._timers  # still waiting for its deadline, but empty
    timer.cancel()  # twice is harmless


def test_cancel_after_firing_and_from_a_callback(reactor: Reactor) -> None:
    fired: list[str] = []
    others: list[Timer] = []

    def cancel_the_other() -> None:
        fired.append("first")
        others[0].cancel()

    # Equal deadlines run in the order they were scheduled, so `first` runs first.
    first = reactor.call_later(0, cancel_the_other)
    others.append(reactor.call_later(0, lambda: fired.append("later")))
    reactor.run_once(max_wait=0)
    assert fired == ["first"]
    first.cancel()  # already fired: nothing to count
    assert reactor._cancelled == 0
    assert reactor.timer_count == 0
