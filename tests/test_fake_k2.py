"""Tests of the fake K2 itself, with plain sockets on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.fakes.k2 import CLIENT_BUFFER, FakeK2
from tests.helpers import recv_exactly  # its deadline is DEADLINE, 5 s

DEADLINE = 5.0

Connect = Callable[[], socket.socket]


@pytest.fixture
def connect(k2: FakeK2) -> Iterator[Connect]:
    """Open client sockets to the fake, each connect waited for in order; all closed afterwards."""
    socks: list[socket.socket] = []

    def _connect() -> socket.socket:
        sock = socket.create_connection(k2.address, timeout=DEADLINE)
        socks.append(sock)
        return sock

    yield _connect
    for sock in socks:
        sock.close()


def connect_accepted(k2: FakeK2, connect: Connect) -> socket.socket:
    """Connect and wait until the fake has accepted, so the order of clients is known."""
    seen = k2.connections_seen
    sock = connect()
    assert k2.wait_for(lambda: k2.connections_seen == seen + 1)
    return sock


def test_broadcast_to_three_clients(k2: FakeK2, connect: Connect) -> None:
    clients = [connect_accepted(k2, connect) for _ in range(3)]
    k2.feed(b"boot ")
    k2.feed(b"done\r\n")
    for sock in clients:
        assert recv_exactly(sock, 11) == b"boot done\r\n"
    assert (k2.active, k2.max_active_seen, k2.lost, k2.dropped) == (3, 3, 0, 0)


def test_full_k2_kicks_the_oldest(k2: FakeK2, connect: Connect) -> None:
    clients = [connect_accepted(k2, connect) for _ in range(4)]
    fifth = connect_accepted(k2, connect)
    assert k2.wait_for(lambda: k2.kicked == 1)
    oldest = clients[0]
    oldest.settimeout(DEADLINE)
    assert oldest.recv(1) == b""
    k2.feed(b"x")
    for sock in [*clients[1:], fifth]:
        assert recv_exactly(sock, 1) == b"x"
    assert (k2.active, k2.connections_seen, k2.max_active_seen) == (4, 5, 4)


def test_max_clients_is_configurable_within_the_k2_range() -> None:
    with FakeK2(max_clients=1) as k2:
        first = socket.create_connection(k2.address, timeout=DEADLINE)
        assert k2.wait_for(lambda: k2.connections_seen == 1)
        second = socket.create_connection(k2.address, timeout=DEADLINE)
        with first, second:
            assert k2.wait_for(lambda: k2.kicked == 1)
            assert first.recv(1) == b""
            assert k2.max_active_seen == 1
    for bad in (0, 17):
        with pytest.raises(ValueError, match="max_clients"):
            FakeK2(max_clients=bad)


def test_reset_all_gives_econnreset(k2: FakeK2, connect: Connect) -> None:
    clients = [connect_accepted(k2, connect) for _ in range(2)]
    k2.reset_all()
    assert k2.active == 0
    for sock in clients:
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    # The listener is untouched: a reconnect works at once.
    again = connect_accepted(k2, connect)
    k2.feed(b"up")
    assert recv_exactly(again, 2) == b"up"


def test_refuse_then_listen_again_on_the_same_port(k2: FakeK2, connect: Connect) -> None:
    port = k2.port
    survivor = connect_accepted(k2, connect)
    k2.refuse(True)
    with pytest.raises(ConnectionRefusedError):
        connect()
    # Connected clients are untouched by refuse.
    k2.feed(b"still here")
    assert recv_exactly(survivor, 10) == b"still here"
    k2.refuse(False)
    assert k2.port == port
    fresh = connect_accepted(k2, connect)
    assert fresh.getpeername() == ("127.0.0.1", port)
    k2.feed(b"!")
    assert recv_exactly(fresh, 1) == b"!"
    assert recv_exactly(survivor, 1) == b"!"


def test_accept_delay_holds_each_connection_in_the_backlog(k2: FakeK2, connect: Connect) -> None:
    delay = 0.3
    k2.accept_delay(delay)

    def seconds_until_accepted(n: int) -> float:
        start = time.monotonic()
        sock = connect()  # the kernel completes the handshake at once
        sock.sendall(b"early%d;" % n)
        assert k2.wait_for(lambda: k2.connections_seen == n)
        return time.monotonic() - start

    assert seconds_until_accepted(1) >= delay
    assert seconds_until_accepted(2) >= delay
    # What was sent while waiting in the backlog reaches the UART once accepted.
    assert k2.wait_uart(b"early1;early2;")
    k2.accept_delay(0)
    connect_accepted(k2, connect)
    with pytest.raises(ValueError, match="accept delay"):
        k2.accept_delay(-1)


def test_black_hole_keeps_connections_but_moves_no_data(k2: FakeK2, connect: Connect) -> None:
    sock = connect_accepted(k2, connect)
    k2.feed(b"before;")
    assert recv_exactly(sock, 7) == b"before;"
    k2.black_hole(True)
    k2.feed(b"swallowed;")
    assert k2.lost == 10
    sock.sendall(b"cmd\n")
    late = connect_accepted(k2, connect)  # accepted even while hung
    assert k2.uart_received() == b""
    k2.black_hole(False)
    k2.feed(b"after;")
    # The stream is ordered, so getting "after;" next proves "swallowed;" never came.
    assert recv_exactly(sock, 6) == b"after;"
    assert recv_exactly(late, 6) == b"after;"
    assert k2.wait_uart(b"cmd\n")
    assert (k2.active, k2.dropped) == (2, 0)


def test_uart_received_collects_in_arrival_order(k2: FakeK2, connect: Connect) -> None:
    first, second = connect_accepted(k2, connect), connect_accepted(k2, connect)
    first.sendall(b"one\n")
    assert k2.wait_uart(b"one\n")
    second.sendall(b"two\n")
    assert k2.wait_uart(lambda log: log.endswith(b"two\n"))
    first.sendall(b"three\n")
    assert k2.wait_uart(b"three\n")
    assert k2.uart_received() == b"one\ntwo\nthree\n"
    assert not k2.wait_uart(b"never", timeout=0.05)


def test_a_stalled_client_overflows_and_every_byte_is_counted(k2: FakeK2) -> None:
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small receive window so the kernel buffers fill, and the fake's with them, quickly.
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with stalled:
        stalled.settimeout(DEADLINE)
        stalled.connect(k2.address)
        assert k2.wait_for(lambda: k2.active == 1)
        chunk = bytes(CLIENT_BUFFER)
        fed = 0
        for _ in range(1000):
            k2.feed(chunk)
            fed += len(chunk)
            if k2.dropped:
                break
        assert k2.dropped > 0
        assert recv_exactly(stalled, fed - k2.dropped) == bytes(fed - k2.dropped)
        # Exactly fed - dropped arrived: the next byte is the next one fed.
        k2.feed(b"end")
        assert recv_exactly(stalled, 3) == b"end"
        assert k2.lost == 0


def test_feed_is_thread_safe_and_each_feed_stays_whole(k2: FakeK2, connect: Connect) -> None:
    sock = connect_accepted(k2, connect)
    pieces = [bytes([65 + n]) * 1000 for n in range(8)]
    threads = [threading.Thread(target=k2.feed, args=(piece,)) for piece in pieces]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)
        assert not thread.is_alive()
    got = recv_exactly(sock, 8000)
    assert sorted(got[i : i + 1000] for i in range(0, 8000, 1000)) == pieces


def test_stop_closes_everything_and_is_idempotent() -> None:
    with FakeK2() as k2:
        sock = socket.create_connection(k2.address, timeout=DEADLINE)
        assert k2.wait_for(lambda: k2.active == 1)
    with sock:
        assert sock.recv(1) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(k2.address, timeout=DEADLINE).close()
    k2.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        k2.feed(b"late")


def test_a_given_port_is_used_and_can_be_reused_at_once() -> None:
    with FakeK2() as first:
        port = first.port
        sock = socket.create_connection(first.address, timeout=DEADLINE)
        assert first.wait_for(lambda: first.active == 1)
    sock.close()
    with FakeK2(port) as second:
        assert second.address == ("127.0.0.1", port)
        with socket.create_connection(second.address, timeout=DEADLINE):
            assert second.wait_for(lambda: second.connections_seen == 1)
