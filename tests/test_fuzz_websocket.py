"""Fuzzing the WebSocket readers: frames after a valid upgrade, kept in the suite.

An HttpFront runs in-process on 127.0.0.1 (a Reactor driven with run_once;
port "p" on the simulated device, started, with an rw websocket listener, so
input reaches the device and its echo comes back as frames). Each input is a
fresh connection: a valid handshake written by wsproto's client (so the
server's Sec-WebSocket-Accept can be checked), then a frame sequence in one or
more writes, the first in the same segment as the request (h11's trailing
data). Frames are well-formed (wsproto's client FrameProtocol: text, binary,
fragmented, ping, pong, close with any code) or hand-built (any first byte,
masked or not, 7/16/64-bit lengths that may lie), and the whole may then be
damaged byte by byte. Our write side is then shut, so every outcome ends.

Checked for each input: the upgrade is accepted; what the server sends after
it parses as WebSocket frames (wsproto's FrameProtocol, a client's view); the
connection ends with a close or an EOF; its reader leaves the hub; and
``reactor.internal_errors`` stays 0.

``MUXD_FUZZ_EXAMPLES`` sets the number of inputs (200 by default; ``make
fuzz`` runs 10^6); the run's figures are printed when it is set.
"""

from __future__ import annotations

import contextlib
import errno
import random
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.frame_protocol import FrameProtocol, ParseFailed

from muxd.listeners.http import HttpFront
from muxd.reactor import Reactor
from tests.helpers import drain_front, fuzz_seeds, fuzz_settings, print_fuzz_figures, running_front
from tests.test_fuzz_http import mutate

FUZZ = fuzz_settings(200)
# One exchange: the loop answers from memory in milliseconds.
EXCHANGE_TIMEOUT = 5.0
CLOSE_CODES = [
    1000,
    1001,
    1002,
    1003,
    1005,
    1006,
    1007,
    1008,
    1009,
    1010,
    1011,
    1015,
    2999,
    3000,
    4999,
    5000,
    0,
]
QUERIES = ["", "?history=64", "?history=100000", "?format=json", "?format=json&history=16", "?format=binary"]


# -- inputs (from a seed Hypothesis draws: see test_fuzz_http for why) ---------------------


def payload(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return b"help\r" if rng.random() < 0.5 else b"echo " + rng.randbytes(rng.randint(0, 20)) + b"\n"
    if kind == 1:
        return "caf\u00e9 \u2603\n".encode()
    return rng.randbytes(rng.choice((0, 1, 125, 126, 200, rng.randint(0, 2000))))


def good_frames(rng: random.Random) -> bytes:
    """Frames as a client must send them, a message possibly fragmented."""
    fp = FrameProtocol(client=True, extensions=[])
    out = bytearray()
    text: bool | None = None  # the type of the message in progress
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(6)
        if kind <= 2:
            if text is None:
                text = rng.random() < 0.5
            data = payload(rng)
            fin = rng.random() < 0.7
            out += fp.send_data(data.decode("utf-8", "replace") if text else data, fin)
            if fin:
                text = None
        elif kind == 3:
            out += fp.ping(rng.randbytes(rng.randint(0, 125)))
        elif kind == 4:
            out += fp.pong(rng.randbytes(rng.randint(0, 125)))
        else:
            code = rng.choice(CLOSE_CODES) if rng.random() < 0.8 else None
            out += fp.close(code, "bye" if code is not None and rng.random() < 0.5 else None)
            break
    return bytes(out)


def raw_frame(rng: random.Random) -> bytes:
    """A frame by hand: any flags and opcode, any mask bit, a length that may lie."""
    first = (
        rng.randrange(256)
        if rng.random() < 0.5
        else rng.choice((0x81, 0x82, 0x80, 0x01, 0x88, 0x89, 0x8A, 0x8F))
    )
    body = rng.randbytes(rng.randint(0, 200))
    masked = rng.random() < 0.8
    length = (
        len(body)
        if rng.random() < 0.7
        else rng.choice((0, 125, 126, 65535, 65536, 2**31, 2**63 - 1, 2**64 - 1))
    )
    if length < 126:
        head = struct.pack("!BB", first, (0x80 if masked else 0) | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, (0x80 if masked else 0) | 126, length)
    else:
        head = struct.pack("!BBQ", first, (0x80 if masked else 0) | 127, length)
    return head + (rng.randbytes(4) if masked else b"") + body


def ws_input(rng: random.Random) -> tuple[str, list[bytes]]:
    """(the target to upgrade on, the writes after the handshake)."""
    target = "/ws/p" + rng.choice(QUERIES)
    kind = rng.randrange(4)
    if kind == 0:
        stream = bytearray(b"".join(raw_frame(rng) for _ in range(rng.randint(1, 4))))
    elif kind == 1:
        stream = bytearray(good_frames(rng) + raw_frame(rng))
    else:
        stream = bytearray(good_frames(rng))
    data = mutate(rng, stream, rng.randint(1, 3)) if rng.random() < 0.3 else bytes(stream)
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randint(0, 3)))
    writes = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return target, writes


# -- the check ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Reactor, HttpFront]]:
    yield from running_front()


def check(reactor: Reactor, srv: HttpFront, target: str, writes: list[bytes]) -> None:
    host = srv.bound_address
    assert host is not None
    client = WSConnection(ConnectionType.CLIENT)
    handshake = client.send(Request(host=host, target=target))
    received = bytearray()
    errors = reactor.internal_errors  # per input, so the one to blame is the one reported
    with socket.create_connection((srv.cfg.host, srv.cfg.port)) as s:
        s.setblocking(False)
        deadline = time.monotonic() + EXCHANGE_TIMEOUT
        try:
            for chunk in [handshake + writes[0], *writes[1:]] if writes else [handshake]:
                view = memoryview(chunk)
                while view:  # the server may stop reading (backpressure) or close first
                    assert time.monotonic() < deadline, "the server never read our frames"
                    with contextlib.suppress(BlockingIOError):
                        view = view[s.send(view) :]
                    reactor.run_once(0)  # each write its own read, where the server still reads
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            # It closed on what it has read so far (a protocol error, say): fine.
            assert isinstance(exc, BrokenPipeError | ConnectionResetError) or exc.errno == errno.ENOTCONN, exc
        for _ in range(int(EXCHANGE_TIMEOUT / 0.001) + 100):
            assert time.monotonic() < deadline, f"no end after {writes!r}: {bytes(received[:300])!r}"
            reactor.run_once(0.001)
            if select.select([s], [], [], 0)[0]:
                try:
                    got = s.recv(1 << 16)
                except ConnectionResetError:
                    break
                if not got:
                    break
                received += got
    assert reactor.internal_errors == errors, (target, writes)
    head, sep, frames = bytes(received).partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 101 "), (target, writes, bytes(received[:300]))
    client.receive_data(head + sep)
    assert isinstance(next(client.events()), AcceptConnection)  # wsproto checked Sec-WebSocket-Accept
    parser = FrameProtocol(client=True, extensions=[])
    parser.receive_bytes(frames)
    try:
        for _ in parser.received_frames():
            pass
    except ParseFailed as exc:
        raise AssertionError(f"the server sent a malformed frame ({exc}) after {writes!r}") from None
    hub = srv.ports()["p"].hub
    for _ in range(100):  # the server closed the socket: its reader is gone, or about to be
        if not hub.readers:
            break
        reactor.run_once(0.001)
    assert not hub.readers, (target, writes)


def test_fuzz_websocket_frames(served: tuple[Reactor, HttpFront], capsys: pytest.CaptureFixture[str]) -> None:
    reactor, srv = served
    count, elapsed = fuzz_seeds(FUZZ, lambda seed: check(reactor, srv, *ws_input(random.Random(seed))))
    assert reactor.internal_errors == 0
    drain_front(reactor, srv)
    assert not srv.connections and not srv.clients
    print_fuzz_figures(capsys, "websocket", count, elapsed, reactor.internal_errors)
