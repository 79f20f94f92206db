"""Fuzzing the HTTP front: the attack that found issue 15's crafted-path and
Host defects, kept in the suite.

An HttpFront runs in-process on 127.0.0.1 (a Reactor driven with run_once,
port "p" on the simulated device with an rw websocket listener). Hypothesis
builds request heads from the routes' own vocabulary (paths, percent escapes,
long and numeric segments, queries, Host/Content-Length/Transfer-Encoding/
Upgrade/Origin headers, bodies), pipelines up to three, and then mutates the
bytes (flips, inserts, deletions, truncation); some inputs are plain random
bytes. Each input goes on a fresh connection whose write side is then shut, so
every outcome ends: the server must answer (an HTTP/1.1 status line) or, for
an input with nothing but blank lines, close cleanly; never a 500-class status
of its own making, and never an internal error (``reactor.internal_errors``).

``MUXD_FUZZ_EXAMPLES`` sets the number of inputs (200 by default: a few
seconds; ``make fuzz`` runs 10^6). The run's figures are printed when it is set.
"""

from __future__ import annotations

import random
import select
import socket
import string
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from muxd.listeners.http import HttpFront
from muxd.reactor import Reactor
from tests.helpers import drain_front, fuzz_seeds, fuzz_settings, print_fuzz_figures, running_front
from tests.test_http import statuses

FUZZ = fuzz_settings(200)
# Statuses the front may choose: 501 is h11's for a transfer coding it lacks,
# 503 is max_clients. Any other 5xx would be a failure of ours.
SERVER_STATUSES = {501, 503}
# One exchange: the loop answers from memory in milliseconds.
EXCHANGE_TIMEOUT = 5.0
HOST_MARK, PORT_MARK = b"@HOST@", b"@PORT@"


# -- inputs --------------------------------------------------------------------------------
# Built from a seed that Hypothesis draws (and reports when an input fails):
# generating through Hypothesis's own composite strategies cost 12 ms an
# input, four times the exchange itself; a seeded random.Random costs
# microseconds, and the failing input is printed whole by the assertion.

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
SEGMENTS = ["", ".", "..", "api", "v1", "ports", "p", "q", "clients", "disconnect", "ws", "metrics", "vendor",
            "xterm", "xterm.js", "index.html", "console.js", "LICENSE", "[", "]", "%", "%2f", "%2e%2e", "%00",
            "%C2%B2", "%ff%fe", "0", "1", "-1", "\u00b2"]  # fmt: skip
ROUTES = ["/", "/metrics", "/api/v1/ports", "/api/v1/ports/p/clients", "/api/v1/ports/p/clients/1/disconnect",
          "/ws/p", "/ws/q", "/console.js", "//[", "*", "example.com:443"]  # fmt: skip
QUERY_VALUES = ["0", "1", "4096", "json", "binary", "-1", "%C2%B2", "\u00b2", "", "1e3", "0x10"]
SCHEMES = ["http://@HOST@", "http://evil.example", "HTTPS://@HOST@", "http://["]
HOSTS = ["@HOST@", "127.0.0.1:@PORT@", "localhost:@PORT@", "[::1]:@PORT@", "evil.example:@PORT@",
         "evil.example", "127.0.0.1", "[::1", "::1", "\xff", "", "@HOST@:1", "localhost:99999999",
         "a b"]  # fmt: skip
HEADERS = {
    "Content-Length": ["0", "5", "100", "4097", "-1", "1,1", "1, 2", "99999999999999999999999", "x"],
    "Transfer-Encoding": ["chunked", "gzip", "gzip, chunked", "chunked, chunked", "identity"],
    "Connection": ["close", "keep-alive", "Upgrade", "upgrade, close"],
    "Upgrade": ["websocket", "h2c", "WebSocket"],
    "Sec-WebSocket-Key": ["dGhlIHNhbXBsZSBub25jZQ==", "short", ""],
    "Sec-WebSocket-Version": ["13", "8", "x"],
    "Origin": ["http://@HOST@", "http://evil.example", "null", "http://[", "http://@HOST@/x"],
    "Authorization": ["Bearer x", "Bearer " + "a" * 40, "Basic Zm9v"],
}
UPGRADE_HEADERS = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "CONNECT"]
VERSIONS = ["HTTP/1.1"] * 16 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "HTTP/1"]


def text(rng: random.Random, n: int) -> str:
    """n characters: mostly printable ASCII, some Latin-1 and beyond, controls included."""
    return "".join(
        chr(rng.randrange(0x21, 0x7F) if rng.random() < 0.9 else rng.randrange(0x300)) for _ in range(n)
    )


def token(rng: random.Random) -> str:
    return "".join(rng.choice(TOKEN_CHARS) for _ in range(rng.randint(1, 12)))


def quoted(value: str) -> str:
    return urllib.parse.quote(value, safe="/%[]?=&:@!$'()*+,;")


def segment(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        return "9" * rng.randint(0, 6000)
    if kind == 1:
        return "a" * rng.randint(250, 300)
    if kind == 2:
        return text(rng, rng.randint(0, 24))
    return rng.choice(SEGMENTS)


def target(rng: random.Random) -> str:
    if rng.random() < 0.5:
        base = rng.choice(ROUTES)
    else:
        base = "/" + "/".join(segment(rng) for _ in range(rng.randint(0, 7)))
    if rng.random() < 0.5:
        pairs = []
        for _ in range(rng.choice((1, 2, 3, 20))):
            key = rng.choice(["history", "format", "x", ""]) if rng.random() < 0.8 else text(rng, 8)
            pick = rng.randrange(16)
            value = (
                "7" * rng.randint(0, 6000)
                if pick == 0
                else text(rng, 12)
                if pick == 1
                else rng.choice(QUERY_VALUES)
            )
            pairs.append(f"{key}={value}")
        base += "?" + "&".join(pairs)
    if rng.randrange(10) == 0:
        base = rng.choice(SCHEMES) + base
    return quoted(base) if rng.random() < 0.9 else base


def request(rng: random.Random) -> bytes:
    method = rng.choice(METHODS) if rng.random() < 0.9 else token(rng)
    headers: list[tuple[str, str]] = []
    if rng.randrange(10):
        headers.append(("Host", "@HOST@" if rng.random() < 0.7 else rng.choice(HOSTS)))
    if rng.random() < 0.5:
        headers += UPGRADE_HEADERS
    for _ in range(rng.choice((0, 0, 1, 2, 6))):
        if rng.random() < 0.85:
            name = rng.choice(list(HEADERS))
            headers.append((name, rng.choice(HEADERS[name])))
        else:
            headers.append((token(rng), text(rng, rng.randint(0, 24))))
    if rng.random() < 0.5:
        rng.shuffle(headers)
    head = f"{method} {target(rng)} {rng.choice(VERSIONS)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    body = rng.randbytes(rng.randint(0, 64)) if rng.random() < 0.2 else b""
    return head.encode("utf-8", "surrogateescape") + body


def mutate(rng: random.Random, data: bytearray, rounds: int) -> bytes:
    """Byte-level damage: flips, inserts, deletions, truncation, repeats."""
    for _ in range(rounds):
        kind = rng.randrange(5)
        at = rng.randrange(max(1, len(data)))
        if kind == 0 and data:
            data[at] = rng.randrange(256)
        elif kind == 1:
            data[at:at] = rng.choice((rng.randbytes(rng.randint(1, 8)), b"\r\n", b"\n", b":", b" "))
        elif kind == 2:
            del data[at : at + rng.randint(1, 8)]
        elif kind == 3:
            del data[at:]
        else:
            data[at:at] = data[at : at + rng.randint(1, 64)] * rng.randint(1, 300)
    return bytes(data)


def http_input(seed: int) -> bytes:
    rng = random.Random(seed)
    kind = rng.randrange(8)  # 1/8 random bytes, 1/2 well-formed heads, 3/8 damaged ones
    if kind == 0:
        return rng.randbytes(rng.randint(0, 512))
    pipelined = bytearray(b"".join(request(rng) for _ in range(rng.randint(1, 3))))
    return mutate(rng, pipelined, 0 if kind <= 4 else rng.randint(1, 4))


# -- the check ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Reactor, HttpFront]]:
    yield from running_front()


def exchange(reactor: Reactor, srv: HttpFront, data: bytes) -> bytes:
    """Send data, shut our write side, run the loop until the server's EOF (or
    reset, once it has closed with our bytes unread); return what it sent."""
    buf = bytearray()
    with socket.create_connection((srv.cfg.host, srv.cfg.port)) as s:
        s.sendall(data)  # the kernel's buffers hold it: at most tens of KiB
        s.shutdown(socket.SHUT_WR)
        s.setblocking(False)
        deadline = time.monotonic() + EXCHANGE_TIMEOUT
        for _ in range(int(EXCHANGE_TIMEOUT / 0.001) + 100):
            assert time.monotonic() < deadline, (
                f"no end to the answer to {data[:200]!r}: {bytes(buf[:200])!r}"
            )
            reactor.run_once(0.001)
            if select.select([s], [], [], 0)[0]:
                try:
                    chunk = s.recv(1 << 16)
                except ConnectionResetError:
                    return bytes(buf)
                if not chunk:
                    return bytes(buf)
                buf += chunk
    raise AssertionError("unbounded exchange")


def check(reactor: Reactor, srv: HttpFront, data: bytes) -> None:
    host = srv.bound_address
    assert host is not None
    data = data.replace(HOST_MARK, host.encode()).replace(PORT_MARK, str(srv.cfg.port).encode())
    errors = reactor.internal_errors  # per input, so the one to blame is the one reported
    answer = exchange(reactor, srv, data)
    assert reactor.internal_errors == errors, data[:300]
    if data.strip(b"\r\n"):
        assert answer.startswith(b"HTTP/1.1 "), (data[:300], answer[:300])
    bad = [s for s in statuses(answer) if s >= 500 and s not in SERVER_STATUSES]
    assert not bad, (data[:300], answer[:300])


def test_fuzz_http_requests(served: tuple[Reactor, HttpFront], capsys: pytest.CaptureFixture[str]) -> None:
    reactor, srv = served
    count, elapsed = fuzz_seeds(FUZZ, lambda seed: check(reactor, srv, http_input(seed)))
    assert reactor.internal_errors == 0
    # The front leaked nothing: every connection was closed and forgotten.
    drain_front(reactor, srv)
    assert not srv.connections and not srv.clients
    print_fuzz_figures(capsys, "http", count, elapsed, reactor.internal_errors)
