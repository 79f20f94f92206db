"""The shared log and its cursors against a plain model (hypothesis, stateful).

Readers here are in-memory owners that "send" a random number of bytes of
what the hub offers them, so every interleaving of device writes, partial
sends, stuck readers and overflows is explored without sockets. The model is
the whole device stream as a bytes object: each reader's output must be that
stream with only whole skipped ranges removed, in order, nothing twice, and the
hub's dropped counter must equal exactly the bytes skipped. Every chunk a
reader is given is checked against the stream at the reader's cursor, so a
duplicated or stale run fails at once.

Shrinking is off unless MUXD_SHRINK=1: a regression then fails in seconds with
the example as found, instead of looking like a hang while hypothesis shrinks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from muxd.hub import Hub, PortBounds, Reader, ReaderPolicy
from muxd.reactor import Reactor
from muxd.ring import INITIAL_SIZE, Ring
from tests.helpers import IdleOwner

# What a fake kernel accepts in one write: everything (the common case), all
# but the last byte (the edge of a partial write), nothing, or anything between.
ALL, ALL_BUT_ONE = 1 << 30, -1
BUDGETS = st.one_of(st.sampled_from([ALL, ALL_BUT_ONE, 0]), st.integers(1, 7000))


# Device reads: hypothesis favours tiny values, but the hot path matters at a
# frame (64), a tty read (4096) and a read larger than a reader's buffer.
CHUNKS = st.tuples(
    st.one_of(st.sampled_from([64, 4096, 9500]), st.integers(1, 5000)), st.integers(0, 250)
).map(lambda t: bytes((t[1] + i) % 251 for i in range(t[0])))


class FakeOwner:
    """A reader whose sends the test controls; with `budget` set it is also a
    plain Transport, so the hub's fan-out pass writes to it directly."""

    def __init__(self, stream: bytearray) -> None:
        self.stream = stream  # everything the device produced, from offset 0
        self.got = bytearray()
        self.closed: str | None = None
        self.reader: Reader | None = None
        self.budget = 0  # bytes the fake kernel accepts in the next fan-out pass
        self.hub: Hub | None = None

    def on_data(self) -> None:
        """As StreamClient.on_data does for a plain transport; others send in reader_sends."""
        hub, reader = self.hub, self.reader
        if hub is None or reader is None or reader.direct is None:
            return
        hub.drain(reader, self.writev)
        if not hub.caught_up(reader):
            hub.set_blocked(reader, True)

    def take(self, data: bytes) -> None:
        """Bytes given to this reader: exactly the stream at its cursor."""
        assert self.reader is not None
        start = self.reader.cursor
        assert bytes(self.stream[start : start + len(data)]) == data, "a stale or repeated run"
        self.got += data

    def write(self, data: memoryview) -> int:
        return self.writev([data])

    def writev(self, data: list[memoryview]) -> int:
        offered = b"".join(data)
        budget = len(offered) - 1 if self.budget == ALL_BUT_ONE else self.budget
        if budget <= 0:
            raise BlockingIOError
        taken = offered[:budget]
        self.budget -= len(taken)
        self.take(taken)
        return len(taken)

    def blocked(self) -> None:
        assert self.reader is not None and self.hub is not None
        self.hub.set_blocked(self.reader, True)

    def failed(self, exc: OSError) -> None:
        raise AssertionError(f"unexpected {exc!r}")

    def on_write_room(self) -> None:
        pass

    def close(self, reason: str) -> None:
        self.closed = reason


def _policies(capacities: list[int], policy: str) -> list[ReaderPolicy]:
    return [
        ReaderPolicy(f"l{i}", cap, policy == "drop-oldest", writable=False, lines=False, notices=False)
        for i, cap in enumerate(capacities)
    ]


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
        plain=st.lists(st.booleans(), min_size=4, max_size=4),
    )
    def setup(self, caps: list[int], policy: str, plain: list[bool]) -> None:
        bounds = PortBounds(log_capacity=max(caps), write_queue=1024, max_line=64, history=0)
        self.hub = Hub("p", bounds, self.reactor)
        for pol, is_plain in zip(_policies(caps, policy), plain, strict=False):
            owner = FakeOwner(self.stream)
            owner.hub = self.hub
            owner.reader = self.hub.attach(owner, pol, "test")
            if is_plain:
                owner.reader.write_directly(owner)
            self.owners.append(owner)
            self.offset_at_attach.append(0)

    @precondition(lambda self: self.hub is not None)
    @rule(budgets=st.lists(BUDGETS, min_size=4, max_size=4))
    def fanout_pass(self, budgets: list[int]) -> None:
        """The hub's own pass, writing to plain transports as much as each takes."""
        assert self.hub is not None
        for owner, budget in zip(self.owners, budgets, strict=False):
            owner.budget = budget
        self.hub._flush()
        for owner in self.owners:
            owner.budget = 0
            reader = owner.reader
            assert reader is not None
            if reader.direct is not None and not reader.blocked:
                # Liveness: a plain reader the pass did not mark blocked was given everything.
                assert reader.cursor == self.hub.head, "a reader was left behind without EPOLLOUT"

    @precondition(lambda self: self.hub is not None)
    @rule(data=CHUNKS)
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
        data = b"".join(views)[:budget]
        if not reader.notices:
            owner.take(data)
        self.hub.advance(reader, len(data))
        self.hub.set_blocked(reader, block and not self.hub.caught_up(reader))

    @precondition(lambda self: self.hub is not None)
    @rule()
    def loop_turn(self) -> None:
        """A turn of the loop: deferred closes run (and the hub's own pass, to a
        kernel that takes nothing)."""
        self.reactor.run_once(0)

    @invariant()
    def output_is_stream_minus_counted_gaps(self) -> None:
        if self.hub is None:
            return
        for owner in self.owners:
            reader = owner.reader
            assert reader is not None
            # delivered + dropped account for every byte up to the cursor
            assert reader.delivered + reader.dropped + reader.purged == reader.cursor - reader.start
            assert reader.delivered == len(owner.got)
            assert reader.cursor <= self.hub.head
            if reader.doomed is not None:  # closed by the policy: never from inside the hub
                assert reader.doomed == "overflow"
                assert owner.closed in (None, "overflow")
                continue
            assert owner.closed is None
            assert self.hub.head - reader.cursor <= reader.policy.capacity or not reader.blocked

    @invariant()
    def ring_holds_the_newest_bytes(self) -> None:
        if self.hub is None:
            return
        ring = self.hub.ring
        assert ring.read(ring.tail) == bytes(self.stream[ring.tail :])


_PHASES = tuple(Phase) if os.environ.get("MUXD_SHRINK") else (Phase.explicit, Phase.reuse, Phase.generate)
HubModel.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None, phases=_PHASES)
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


def test_fanout_pass_edges() -> None:
    """The fast path's edges, pinned: a write short by one byte marks the reader
    blocked, and a reader one byte behind is served."""
    model = HubModel()
    model.setup(caps=[4096, 4096, 4096, 4096], policy="drop-oldest", plain=[True] * 4)
    model.device_writes(bytes(range(64)))
    model.fanout_pass(budgets=[ALL_BUT_ONE, ALL, 0, 1])  # checks liveness itself
    readers = [o.reader for o in model.owners]
    assert [r.blocked for r in readers if r] == [True, False, True, True]
    model.device_writes(b"!")  # the caught-up reader is now exactly one byte behind
    model.fanout_pass(budgets=[0, ALL, 0, 0])
    model.output_is_stream_minus_counted_gaps()


# -- closes the hub starts are deferred --------------------------------------------------------


class SocketOwner(IdleOwner):
    """A raw reader on one end of a socketpair, written by the fan-out pass
    itself. It records, when it is told its peer is gone, what every reader's
    peer had received by then."""

    def __init__(self, hub: Hub, peers: dict[str, socket.socket], name: str) -> None:
        self.hub = hub
        self.peers = peers  # every reader's far end, by name
        self.name = name
        self.sock, peers[name] = socket.socketpair()
        self.sock.setblocking(False)
        self.seen_at_close: list[dict[str, bytes]] = []  # one per close
        policy = ReaderPolicy(name, 4096, True, writable=False, lines=False, notices=False)
        self.reader = hub.attach(self, policy, name)
        self.reader.write_directly(self)

    def write(self, data: memoryview) -> int:
        return self.sock.send(data)

    def writev(self, data: list[memoryview]) -> int:
        return self.sock.sendmsg(data)

    def blocked(self) -> None:
        self.hub.set_blocked(self.reader, True)

    def failed(self, exc: OSError) -> None:
        assert exc.errno in (errno.EPIPE, errno.ECONNRESET), exc
        seen: dict[str, bytes] = {}
        for name, peer in self.peers.items():
            with contextlib.suppress(BlockingIOError, OSError):
                seen[name] = peer.recv(4096, socket.MSG_DONTWAIT)
        self.seen_at_close.append(seen)
        self.hub.detach(self.reader, "reset")


def test_a_failed_send_closes_its_reader_on_the_next_turn_after_the_pass_served_everyone() -> None:
    reactor = Reactor()
    hub = Hub("p", PortBounds(log_capacity=4096, write_queue=1024, max_line=64, history=0), reactor)
    peers: dict[str, socket.socket] = {}
    owners = [SocketOwner(hub, peers, name) for name in ("gone", "b", "c", "d")]
    gone = owners[0]
    peers.pop("gone").close()  # its peer reset: its send fails with EPIPE
    try:
        hub.publish(b"chunk\n")
        hub._flush()  # the fan-out pass, as the loop runs it
        assert not gone.seen_at_close, "closed from inside the fan-out pass"
        assert gone.reader.doomed is not None and gone.reader.id in hub.readers
        reactor.run_once(0)  # the next turn: the deferred close runs
        assert gone.seen_at_close == [{"b": b"chunk\n", "c": b"chunk\n", "d": b"chunk\n"}]
        assert gone.reader.id not in hub.readers
        assert gone.reader.stats.disconnects == {"reset": 1}  # the owner's reason, not the hub's mark
        assert all(o.reader.delivered == 6 for o in owners[1:])
    finally:
        for o in owners:
            o.sock.close()
        for peer in peers.values():
            peer.close()
        reactor.close()


# -- memory follows what is written ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 600),
    initial=st.integers(1, 64),
    writes=st.lists(st.integers(0, 700), max_size=30),
)
def test_a_growing_ring_holds_exactly_the_newest_bytes(
    capacity: int, initial: int, writes: list[int]
) -> None:
    ring = Ring(capacity, initial=initial)
    stream = bytearray()
    for n in writes:
        data = bytes((len(stream) + i) % 251 for i in range(n))
        stream += data
        ring.write(data)
        assert ring.head == len(stream) and ring.tail == max(0, len(stream) - capacity)
        assert ring.read(ring.tail) == bytes(stream[ring.tail :])
        # Never more buffer than the bound, nor than twice what it holds (or its start).
        assert ring.allocated <= capacity
        assert ring.allocated <= max(min(initial, capacity), 2 * (ring.head - ring.tail))


def test_a_big_ring_costs_what_is_written_not_its_bound() -> None:
    ring = Ring(64 << 20)
    assert ring.allocated <= INITIAL_SIZE
    ring.write(b"x" * 100_000)
    assert ring.allocated < 256 * 1024 and ring.read(ring.tail) == b"x" * 100_000


def test_a_format_nobody_reads_costs_nothing_and_is_released_with_its_last_reader() -> None:
    """buffer: 64MiB on the port: opening a jsonl reader neither reserves its
    8x bound nor replays the whole ring, and the log goes with its last reader."""
    big = 64 << 20
    hub = Hub("p", PortBounds(log_capacity=big, write_queue=1024, max_line=64, history=4096), Reactor())
    for i in range(300):
        hub.publish(b"line %06d\n" % i)
    policy = ReaderPolicy("ws", big, True, writable=False, lines=False, notices=False, format="jsonl")
    assert not hub.records.logs
    reader = hub.attach(IdleOwner(), policy, "a", history_lines=2)
    log = hub.records.logs["jsonl"]
    assert log.ring.allocated <= 64 * 1024  # what the 4 KiB history replay needs, not 8 x 64 MiB
    assert log.raw_tail >= hub.head - 4096  # the replay covers the history bound only
    assert hub.take(reader, 1 << 20).count(b"\n") == 2
    hub.detach(reader, "peer closed")
    assert not hub.records.logs and reader.log is None  # nothing holds it: freed now
