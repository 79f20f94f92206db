"""The fd-connection core (muxd.fdconn) on its own: no daemon, no hub.

In the style of h11's state tests: the lifecycle table is checked pair by
pair (every legal transition is taken, every other one raises
LocalProtocolError), then each way through it is driven by real events on a
socketpair: the peer's EOF and reset, a deferred close, timers at the end,
the graceful close (everything queued, then FIN), parking, the hand-over,
and input a transport holds that epoll cannot see.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from collections.abc import Iterator

import pytest

from muxd.errors import LocalProtocolError
from muxd.fdconn import TERMINAL, TRANSITIONS, FdConnection, State, check_transition
from muxd.reactor import Reactor
from muxd.transport import SocketTransport
from tests.helpers import read_to_eof, recv_exactly, run_until


class CountingTransport(SocketTransport):
    """A socket transport that counts its closes."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.closes = 0

    def close(self) -> None:
        self.closes += 1
        super().close()


class Echo(FdConnection):
    """The smallest connection: echoes what it reads, and records its end."""

    def __init__(self, transport: SocketTransport, reactor: Reactor) -> None:
        super().__init__(transport, reactor, "test", "peer")
        self.paused = False  # stop reading (as backpressure would)
        self.received = bytearray()
        self.ends: list[str] = []  # _ended's reasons
        self.closed_hooks: list[str] = []  # _closed's reasons
        self.half_close = False  # EOF enters INPUT_ENDED instead of closing
        self.goodbye = b""  # last words

    def _reading(self) -> bool:
        return super()._reading() and not self.paused

    def _received(self, data: bytes) -> None:
        self.received += data
        self._out += data
        self.pump()

    def _end_of_input(self) -> None:
        if self.half_close:
            self._enter(State.INPUT_ENDED)
            self._watch()
        else:
            super()._end_of_input()

    def _ended(self, reason: str) -> None:
        self.ends.append(reason)

    def _last_words(self, reason: str) -> bytes:
        return self.goodbye

    def _closed(self, reason: str) -> None:
        self.closed_hooks.append(reason)


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


@pytest.fixture
def pair(reactor: Reactor) -> Iterator[tuple[Echo, socket.socket]]:
    """(a started connection, the peer's socket)."""
    ours, peer = socket.socketpair()
    conn = Echo(CountingTransport(ours), reactor)
    conn.start()
    yield conn, peer
    conn.close("test over")
    peer.close()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets on loopback: (ours, the peer's)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    return ours, peer


def state(conn: FdConnection) -> State:
    """The state now (read through a call: an assert on the attribute would
    narrow its type for mypy across the calls that change it)."""
    return conn.state


def reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- the table ---------------------------------------------------------------------------


PAIRS = list(itertools.product(State, State))


@pytest.mark.parametrize(("old", "new"), PAIRS, ids=[f"{a.name}->{b.name}" for a, b in PAIRS])
def test_every_transition_is_legal_or_raises(
    old: State, new: State, pair: tuple[Echo, socket.socket]
) -> None:
    conn, _peer = pair
    conn.state = old  # placed there directly: the table alone is under test
    if new in TRANSITIONS[old]:
        conn._enter(new)
        assert conn.state is new
    else:
        with pytest.raises(LocalProtocolError):
            conn._enter(new)
        assert conn.state is old
    conn.state = State.OPEN  # so the fixture's close runs its whole path


def test_the_table_covers_every_state_and_only_terminal_states_are_dead_ends() -> None:
    assert set(TRANSITIONS) == set(State)
    assert {s for s, nexts in TRANSITIONS.items() if not nexts} == TERMINAL
    # Every state that is not terminal can reach both ends.
    for state in set(State) - TERMINAL:
        assert {State.CLOSED, State.ERROR} <= TRANSITIONS[state]
    with pytest.raises(LocalProtocolError):
        check_transition(State.CLOSED, State.OPEN)


# -- the ways through it, by real events ------------------------------------------------------------


def test_open_echoes_then_the_peers_eof_closes(reactor: Reactor, pair: tuple[Echo, socket.socket]) -> None:
    conn, peer = pair
    peer.sendall(b"ping")
    run_until(reactor, lambda: conn.received == b"ping", "the bytes read")
    assert recv_exactly(peer, 4) == b"ping"
    peer.shutdown(socket.SHUT_WR)
    run_until(reactor, lambda: conn.closed, "the close")
    assert state(conn) is State.CLOSED
    assert conn.ends == ["peer closed"] and conn.closed_hooks == ["peer closed"]
    assert read_to_eof(peer) == b""


def test_a_reset_ends_in_error_and_sends_nothing_more(reactor: Reactor) -> None:
    ours, peer = tcp_pair()
    conn = Echo(CountingTransport(ours), reactor)
    conn.goodbye = b"bye"
    conn.start()
    conn._out += b"x" * 1024
    reset(peer)
    run_until(reactor, lambda: conn.closed, "the end")
    assert state(conn) is State.ERROR
    assert conn.ends == ["reset"]
    assert conn.transport.closes == 1  # type: ignore[attr-defined]
    conn.close("again")  # harmless


def test_hup_while_not_reading_ends_it_instead_of_spinning(
    reactor: Reactor, pair: tuple[Echo, socket.socket]
) -> None:
    conn, peer = pair
    conn.paused = True
    conn._watch()
    peer.close()
    run_until(reactor, lambda: conn.closed, "the close on HUP")
    assert state(conn) is State.CLOSED and conn.ends == ["peer closed"]


def test_after_a_half_close_a_failure_is_how_the_peer_closed(reactor: Reactor) -> None:
    ours, peer = socket.socketpair()
    conn = Echo(CountingTransport(ours), reactor)
    conn.half_close = True
    conn.start()
    peer.shutdown(socket.SHUT_WR)
    run_until(reactor, lambda: conn.state is State.INPUT_ENDED, "input ended")
    conn._gone(OSError(errno.ECONNRESET, "reset"))
    assert state(conn) is State.CLOSED and conn.ends == ["peer closed"]
    peer.close()


def test_close_twice_and_every_other_way_out_after_it_is_harmless(
    pair: tuple[Echo, socket.socket],
) -> None:
    conn, peer = pair
    calls: list[str] = []
    conn.on_close.append(lambda: calls.append("closed"))
    conn.goodbye = b"bye"
    conn.close("first")
    conn.close("second")
    conn.abort("third")
    conn._switch()
    conn.finish()
    conn.close_after_flush("fifth", 1.0)
    conn.pump()
    assert state(conn) is State.CLOSED
    assert calls == ["closed"] and conn.ends == ["first"] and conn.closed_hooks == ["first"]
    assert conn.transport.closes == 1  # type: ignore[attr-defined]
    assert read_to_eof(peer) == b"bye"  # the last words, then FIN


def test_a_deferred_close_after_the_end_does_nothing(
    reactor: Reactor, pair: tuple[Echo, socket.socket]
) -> None:
    """As the hub defers a close with call_soon: by the time it runs the peer
    may have closed; the close must not need to know."""
    conn, _peer = pair
    reactor.call_soon(lambda: conn.close("overflow"))
    conn.close("peer closed")
    reactor.run_once(0)
    assert conn.ends == ["peer closed"]
    assert reactor.internal_errors == 0


def test_a_close_from_inside_its_own_handler_is_safe(reactor: Reactor) -> None:
    class ClosesOnInput(Echo):
        def _received(self, data: bytes) -> None:
            self.close("refused")

    ours, peer = socket.socketpair()
    conn = ClosesOnInput(CountingTransport(ours), reactor)
    conn.start()
    peer.sendall(b"x")
    run_until(reactor, lambda: conn.closed, "the close")
    assert conn.ends == ["refused"] and reactor.internal_errors == 0
    peer.close()


def test_timers_are_cancelled_at_the_end(reactor: Reactor, pair: tuple[Echo, socket.socket]) -> None:
    conn, _peer = pair
    fired: list[str] = []
    conn._set_timer("a", 0.01, lambda: fired.append("a"))
    conn._set_timer("b", 60, lambda: fired.append("b"))
    timers = list(conn._timers.values())
    conn.close("done")
    assert all(t.cancelled and t.callback is None for t in timers)  # the connection is let go at once
    later: list[str] = []
    reactor.call_later(0.03, lambda: later.append("past the first deadline"))
    run_until(reactor, lambda: later, "a timer due after the first one")
    assert fired == [] and not conn._timers


def test_a_replaced_timer_does_not_fire(reactor: Reactor, pair: tuple[Echo, socket.socket]) -> None:
    conn, _peer = pair
    fired: list[str] = []
    conn._set_timer("t", 0.01, lambda: fired.append("old"))
    conn._set_timer("t", 0.02, lambda: fired.append("new"))
    run_until(reactor, lambda: fired, "the timer")
    assert fired == ["new"]


def test_graceful_close_sends_everything_queued_then_fin(reactor: Reactor) -> None:
    """FIN after the last byte, even with the peer's input unread: a bare
    close() would answer that input with RST, and the peer could lose the tail."""
    ours, peer = tcp_pair()
    conn = Echo(CountingTransport(ours), reactor)
    conn.paused = True  # the peer's next bytes stay unread
    conn.start()
    peer.sendall(b"unread input")
    payload = bytes(range(256)) * 4096  # 1 MiB: far more than the socket buffers hold
    conn._out += payload
    conn.close_after_flush("done", 10.0)
    assert state(conn) is State.CLOSING  # the socket cannot take it all at once
    got = bytearray()
    peer.setblocking(False)

    def read() -> bool:
        try:
            chunk = peer.recv(65536)
        except BlockingIOError:
            return False
        got.extend(chunk)
        return not chunk

    run_until(reactor, read, "EOF after the payload")
    assert bytes(got) == payload  # all of it, then EOF (an RST would raise ECONNRESET)
    assert state(conn) is State.CLOSED and conn.ends == ["done"]
    peer.close()


def test_closing_that_cannot_flush_closes_at_its_deadline(reactor: Reactor) -> None:
    ours, peer = socket.socketpair()
    conn = Echo(CountingTransport(ours), reactor)
    conn.start()
    conn._out += b"x" * (4 << 20)  # the peer never reads
    conn.close_after_flush("stuck", 0.05)
    run_until(reactor, lambda: conn.closed, "the deadline")
    assert state(conn) is State.CLOSED and conn.ends == ["stuck"]
    peer.close()


def test_finish_sends_what_is_owed_then_closes(reactor: Reactor) -> None:
    ours, peer = socket.socketpair()
    conn = Echo(CountingTransport(ours), reactor)
    conn.start()
    conn._out += b"last"
    conn.finish()
    assert conn.closed and conn.ends == ["shutdown"]
    assert read_to_eof(peer) == b"last"
    peer.close()


def test_finishing_may_say_goodbye_through_closing(reactor: Reactor) -> None:
    class Polite(Echo):
        def _finished(self) -> None:
            self._out += b"goodbye"
            self.close_after_flush("shutdown", 1.0)

    ours, peer = socket.socketpair()
    conn = Polite(CountingTransport(ours), reactor)
    conn.start()
    conn.finish()
    run_until(reactor, lambda: conn.closed, "the close")
    assert read_to_eof(peer) == b"goodbye"
    peer.close()


def test_parked_is_out_of_the_reactor_until_unparked(
    reactor: Reactor, pair: tuple[Echo, socket.socket]
) -> None:
    conn, peer = pair
    conn._park()
    assert state(conn) is State.PARKED
    with pytest.raises(KeyError):
        reactor.mask(conn.fd)
    peer.sendall(b"held")
    reactor.run_once(0.02)
    assert conn.received == b""  # not read while parked
    conn._unpark()
    assert state(conn) is State.OPEN
    run_until(reactor, lambda: conn.received == b"held", "the held bytes")
    conn._park()
    with pytest.raises(LocalProtocolError):
        conn.close_after_flush("no", 1.0)  # PARKED -> CLOSING is not in the table
    conn.finish()  # nobody is there to send to: the end
    assert state(conn) is State.CLOSED and conn.ends == ["shutdown"]


def test_switched_hands_over_the_fd_open(reactor: Reactor, pair: tuple[Echo, socket.socket]) -> None:
    conn, peer = pair
    calls: list[str] = []
    conn.on_close.append(lambda: calls.append("gone"))
    transport = conn.transport
    conn._switch()
    assert state(conn) is State.SWITCHED and calls == ["gone"] and conn.closed_hooks == []
    assert transport.closes == 0  # type: ignore[attr-defined]
    successor = Echo(transport, reactor)  # type: ignore[arg-type]
    successor.start()  # registers the same fd again
    peer.sendall(b"hi")
    run_until(reactor, lambda: successor.received == b"hi", "the successor reading")
    successor.close("done")


def test_input_a_transport_holds_is_read_without_a_wakeup(reactor: Reactor) -> None:
    """A TLS transport may hold decrypted input epoll cannot see: the core
    reads it on the next turn of the loop (the shape, not TLS, is tested)."""

    class Holding(CountingTransport):
        def __init__(self, sock: socket.socket, held: bytes) -> None:
            super().__init__(sock)
            self.held = held
            self.recv = self._recv_held  # type: ignore[assignment]

        @property
        def buffered(self) -> bool:  # type: ignore[override]
            return bool(self.held)

        def _recv_held(self, n: int) -> bytes:
            if not self.held:
                return self.sock.recv(n)
            data, self.held = self.held[:n], self.held[n:]
            return data

    ours, peer = socket.socketpair()
    conn = Echo(Holding(ours, b"already here"), reactor)
    conn.start()
    run_until(reactor, lambda: conn.received == b"already here", "the held input")
    assert recv_exactly(peer, 12) == b"already here"
    conn.close("done")
    peer.close()


def test_an_internal_error_closes_that_connection_only(reactor: Reactor) -> None:
    class Buggy(Echo):
        def _received(self, data: bytes) -> None:
            raise KeyError("a bug of ours")

    ours, peer = socket.socketpair()
    conn = Buggy(CountingTransport(ours), reactor)
    conn.start()
    peer.sendall(b"x")
    run_until(reactor, lambda: conn.closed, "the close")
    assert conn.ends == ["internal error"] and reactor.internal_errors == 1
    peer.close()
