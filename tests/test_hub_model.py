"""The shared log and its cursors against a plain model (hypothesis, stateful).

Readers here are in-memory owners that "send" a random number of bytes of
what the hub offers them, so every interleaving of device writes, partial
sends, stuck readers and overflows is explored without sockets. The model is
the whole device stream as a bytes object: each reader's output must be that
stream with only whole skipped ranges removed, in order, nothing twice, and the
hub's dropped counter must equal exactly the bytes skipped.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from muxd.config import Listener, Port, SimUpstream
from muxd.hub import Hub, Reader
from muxd.reactor import Reactor
from muxd.ring import Ring


class FakeOwner:
    def __init__(self) -> None:
        self.got = bytearray()
        self.closed: str | None = None
        self.reader: Reader | None = None

    def on_data(self) -> None:
        pass  # the test decides when to "send"

    def on_write_room(self) -> None:
        pass

    def close(self, reason: str) -> None:
        self.closed = reason


def _port(capacities: list[int], policy: str) -> Port:
    listeners = tuple(
        Listener("tcp", f"l{i}", host="127.0.0.1", port=1000 + i, buffer=cap, overflow=policy)
        for i, cap in enumerate(capacities)
    )
    return Port("p", SimUpstream(), listeners, history=0)


class HubModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.reactor = Reactor()
        self.stream = bytearray()
        self.owners: list[FakeOwner] = []
        self.hub: Hub | None = None
        self.offset_at_attach: list[int] = []

    @precondition(lambda self: self.hub is None)
    @rule(
        caps=st.lists(st.integers(4096, 9000), min_size=1, max_size=4),
        policy=st.sampled_from(["drop-oldest", "disconnect"]),
    )
    def setup(self, caps: list[int], policy: str) -> None:
        self.hub = Hub(_port(caps, policy), self.reactor)
        for lst in self.hub.port.listeners:
            owner = FakeOwner()
            owner.reader = self.hub.attach(owner, lst, "test")
            self.owners.append(owner)
            self.offset_at_attach.append(0)

    @precondition(lambda self: self.hub is not None)
    @rule(data=st.binary(min_size=1, max_size=5000))
    def device_writes(self, data: bytes) -> None:
        assert self.hub is not None
        self.stream += data
        self.hub.publish(data)

    @precondition(lambda self: self.hub is not None)
    @rule(i=st.integers(0, 3), budget=st.integers(0, 7000), block=st.booleans())
    def reader_sends(self, i: int, budget: int, block: bool) -> None:
        assert self.hub is not None
        owner = self.owners[i % len(self.owners)]
        reader = owner.reader
        assert reader is not None
        if owner.closed:
            return
        views = self.hub.pending(reader)
        if reader.id not in self.hub.readers:
            return
        sent = 0
        for v in views:
            take = min(len(v), budget - sent)
            owner.got += v[:take]
            sent += take
        self.hub.advance(reader, sent)
        self.hub.set_blocked(reader, block and not self.hub.caught_up(reader))

    @invariant()
    def output_is_stream_minus_counted_gaps(self) -> None:
        if self.hub is None:
            return
        for owner in self.owners:
            reader = owner.reader
            assert reader is not None
            # delivered + dropped account for every byte up to the cursor
            assert reader.delivered + reader.dropped == reader.cursor
            assert reader.delivered == len(owner.got)
            assert reader.cursor <= self.hub.head
            if owner.closed:
                assert owner.closed == "overflow"
                continue
            assert self.hub.head - reader.cursor <= reader.capacity or not reader.blocked
            # What it got is a subsequence of the stream made of whole runs, in order:
            # check by matching the got bytes against the stream positions it skipped.
            assert _is_ordered_subsequence(bytes(owner.got), bytes(self.stream))

    @invariant()
    def ring_holds_the_newest_bytes(self) -> None:
        if self.hub is None:
            return
        ring = self.hub.ring
        assert ring.read(ring.tail) == bytes(self.stream[ring.tail :])


def _is_ordered_subsequence(got: bytes, stream: bytes) -> bool:
    it = iter(stream)
    return all(any(b == s for s in it) for b in got)


HubModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestHubModel = HubModel.TestCase


def test_ring_wraps_and_resizes() -> None:
    ring = Ring(8)
    ring.write(b"abcdef")
    ring.write(b"ghij")
    assert ring.tail == 2 and ring.head == 10
    assert [bytes(v) for v in ring.views(2)] == [b"cdefgh", b"ij"]
    ring.write(b"0123456789ABC")  # longer than the ring: only the newest 8 survive
    assert ring.read(ring.tail) == b"56789ABC"
    bigger = ring.resized(16)
    assert bigger.head == ring.head and bigger.read(bigger.tail) == b"56789ABC"
    smaller = ring.resized(4)
    assert smaller.read(smaller.tail) == b"9ABC"
