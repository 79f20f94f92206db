"""The HTTP front: routes, static files, limits, keep-alive, and garbage.

Most tests run muxd as a subprocess and talk to it with http.client or raw
sockets (with h11 as the independent client-side parser). The idle-time
tests run the front in-process on its own reactor, with a short timeout.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import json
import logging
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import pytest

from muxd.listeners import http as httpmod
from muxd.listeners.http import HttpFront, HttpTimeouts
from muxd.listeners.http_connection import request_error
from muxd.reactor import Reactor
from tests.helpers import (
    ROOT,
    PtyDevice,
    StartMuxd,
    connect,
    free_port,
    get_json,
    make_front,
    read_to_eof,
    request,
    start_http,
    stop_front,
    wait_for,
    write_config,
)

# -- helpers for this module and the HTTP-side test modules that import them ---------


def read_responses(sock: socket.socket, n: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """Parse the responses to n GET requests already sent on a raw socket, with h11
    (an independent parser) mirroring those requests so it frames the answers."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    out: list[tuple[int, bytes]] = []
    status, body = 0, b""
    deadline = time.monotonic() + timeout
    while len(out) < n:
        event = client.next_event()
        if event is h11.NEED_DATA:
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(out)} of {n} responses before the deadline"
            sock.settimeout(left)
            client.receive_data(sock.recv(65536))
        elif isinstance(event, h11.Response):
            status, body = event.status_code, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            out.append((status, body))
            if client.our_state is h11.MUST_CLOSE or len(out) == n:
                break
            client.start_next_cycle()
            client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
        else:
            raise AssertionError(f"unexpected {event!r}")
    return out


# -- routes and files ----------------------------------------------------------------


def test_console_files_with_their_content_types(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    web = ROOT / "muxd" / "web"
    cases = {
        "/": ("index.html", "text/html; charset=utf-8"),
        "/console.js": ("console.js", "text/javascript; charset=utf-8"),
        "/console.css": ("console.css", "text/css; charset=utf-8"),
        "/vendor/xterm/xterm.js": ("vendor/xterm/xterm.js", "text/javascript; charset=utf-8"),
        "/vendor/xterm/LICENSE": ("vendor/xterm/LICENSE", "text/plain; charset=utf-8"),
    }
    for path, (file, ctype) in cases.items():
        status, resp, body = request(addr, "GET", path)
        assert status == 200, path
        assert resp.getheader("content-type") == ctype
        assert resp.getheader("x-content-type-options") == "nosniff"
        assert body == (web / file).read_bytes()
    status, resp, body = request(addr, "HEAD", "/console.js")
    assert status == 200 and body == b""
    assert resp.getheader("content-length") == str((web / "console.js").stat().st_size)


def test_no_directory_traversal(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    evil = [
        "/../cli.py",
        "/vendor/../../cli.py",
        "/%2e%2e/cli.py",
        "/vendor/%2e%2e/%2e%2e/cli.py",
        "/vendor%2f..%2f..%2fcli.py",
        "/..%5c..%5ccli.py",
        "/.hidden",
        "/vendor",
        "/vendor/",
        "/missing.js",
        "/index.html%00.js",
        "//etc/passwd",
    ]
    host, port = addr.rsplit(":", 1)
    for path in evil:
        # Raw sockets: http.client would normalise nothing, but be explicit about it.
        with connect(int(port), host) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n".encode())
            [(status, body)] = read_responses(s, 1)
        assert status == 404, (path, body)


def test_methods_and_unknown_paths(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    status, resp, _ = request(addr, "POST", "/")
    assert status == 405 and resp.getheader("allow") == "GET, HEAD"
    status, resp, body = request(addr, "DELETE", "/api/v1/ports")
    assert status == 405
    assert request(addr, "GET", "/api/v2/ports")[0] == 404
    status, _, body = request(addr, "GET", "/api/v1/ports/nope/clients")
    assert status == 404 and "error" in json.loads(body)
    assert request(addr, "GET", "/ws/nope")[0] == 404
    status, resp, body = request(addr, "GET", "/metrics")
    assert status == 200 and b"muxd_upstream_up" in body
    assert resp.getheader("content-type", "").startswith("text/plain; version=0.0.4")


def test_keep_alive_and_pipelining(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        for _ in range(3):  # one TCP connection: http.client reuses it while the server keeps it open
            conn.request("GET", "/api/v1/ports")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["ports"][0]["name"] == "dut"
        first_sock = conn.sock
        conn.request("GET", "/console.css")
        conn.getresponse().read()
        assert conn.sock is first_sock
    finally:
        conn.close()
    with connect(int(port), host) as s:
        reqs = [
            f"GET {p} HTTP/1.1\r\nHost: {addr}\r\n\r\n" for p in ("/api/v1/ports", "/nope", "/console.css")
        ]
        s.sendall("".join(reqs).encode())  # three requests in one segment
        got = read_responses(s, 3)
    assert [status for status, _ in got] == [200, 404, 200]
    assert got[2][1] == (ROOT / "muxd/web/console.css").read_bytes()


def test_limits_and_garbage_close_only_that_peer(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    host, port = addr.rsplit(":", 1)
    bystander = http.client.HTTPConnection(host, int(port), timeout=5)
    bystander.request("GET", "/api/v1/ports")
    assert bystander.getresponse().read()

    def answer(raw: bytes) -> bytes:
        with connect(int(port), host) as s:
            s.sendall(raw)
            return read_to_eof(s)

    big_header = f"GET / HTTP/1.1\r\nHost: {addr}\r\nX-Big: {'a' * 20000}\r\n\r\n".encode()
    assert answer(big_header).startswith(b"HTTP/1.1 431 ")
    big_body = f"POST /api/v1/ports HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 100000\r\n\r\n".encode()
    assert answer(big_body).startswith(b"HTTP/1.1 413 ")
    chunked = (
        f"POST / HTTP/1.1\r\nHost: {addr}\r\nTransfer-Encoding: chunked\r\n\r\n"
        + "1000\r\n" + "x" * 4096 + "\r\n" + "1000\r\n" + "x" * 4096 + "\r\n0\r\n\r\n"
    ).encode()  # fmt: skip
    assert answer(chunked).startswith(b"HTTP/1.1 413 ")
    assert answer(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200) + b"\r\n\r\n").startswith(
        b"HTTP/1.1 400 "
    )  # a TLS ClientHello
    assert answer(b"GET / HTTP/1.1\r\nHost: a\r\nbroken header line\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert answer(b"GET /\r\n\r\n").startswith(b"HTTP/1.1 400 ")  # HTTP/0.9
    # The keep-alive bystander never noticed.
    bystander.request("GET", "/api/v1/ports")
    resp = bystander.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["ports"]
    bystander.close()


SECRET = "SECRET-9f2c41d7e8b3"


def test_a_refused_header_line_never_reaches_the_log_or_the_answer(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """Issue 19: h11 quotes the line it refuses; with a NUL in an Authorization
    header that line is a bearer token. At debug level only the reason is logged."""
    m, addr = start_http(muxd, tmp_path, pty_device)  # start_http logs at debug level
    host, port = addr.rsplit(":", 1)
    raw = f"GET /api/v1/ports HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {SECRET}\x00\r\n\r\n"
    with connect(int(port), host) as s:
        s.sendall(raw.encode())
        answer = read_to_eof(s)
    assert answer.startswith(b"HTTP/1.1 400 ")
    m.wait_log(": 400 illegal header line")  # the refusal is logged, by its reason
    assert SECRET.encode() not in answer
    assert SECRET not in m.log()


@pytest.mark.parametrize(
    "line",
    [
        f"Authorization: Bearer {SECRET}\x00",
        f"Cookie: session={SECRET}\x00",
        f"Sec-WebSocket-Protocol: muxd, bearer.{SECRET}\x00",
        f"X-{SECRET}\x7f: 1",
        f"{SECRET}",  # no colon at all
    ],
)
def test_request_error_quotes_no_byte_of_the_request(line: str) -> None:
    server = h11.Connection(h11.SERVER)
    server.receive_data(f"GET / HTTP/1.1\r\nHost: x\r\n{line}\r\n\r\n".encode("latin-1"))
    with pytest.raises(h11.RemoteProtocolError) as caught:
        server.next_event()
    assert SECRET in str(caught.value)  # what h11 says, quoting the line
    reason = request_error(caught.value)
    assert reason == "illegal header line"


def test_request_error_keeps_h11_reasons_that_quote_nothing() -> None:
    assert request_error(h11.RemoteProtocolError("bad Content-Length")) == ("bad Content-Length")
    assert request_error(h11.RemoteProtocolError("b'x'")) == "malformed request"
    assert request_error(h11.RemoteProtocolError("Can't receive data when peer state is ERROR")) == (
        "Can't receive data when peer state is ERROR"
    )
    assert request_error(h11.RemoteProtocolError(f"bad value '{SECRET}'")) == "bad value"


# -- idle time, in-process with a short timeout ------------------------------------------


@pytest.fixture
def front() -> Iterator[tuple[Reactor, HttpFront]]:
    reactor, srv = make_front(HttpTimeouts(header=0.3, idle=0.3))
    yield reactor, srv
    stop_front(reactor, srv)


def pump_until_eof(reactor: Reactor, sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Run the loop until the peer closes; return what it sent."""
    sock.setblocking(False)
    buf = bytearray()
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.01) + 10):
        assert time.monotonic() < deadline, f"no EOF; got {bytes(buf)!r}"
        reactor.run_once(0.01)
        if select.select([sock], [], [], 0)[0]:
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(buf)
            buf += chunk
    raise AssertionError("no EOF")


def test_idle_connection_closed_quietly(front: tuple[Reactor, HttpFront]) -> None:
    reactor, srv = front
    with socket.create_connection((srv.cfg.host, srv.cfg.port)) as s:
        assert pump_until_eof(reactor, s) == b""
    assert not srv.connections


def test_slow_request_gets_408(front: tuple[Reactor, HttpFront]) -> None:
    reactor, srv = front
    with socket.create_connection((srv.cfg.host, srv.cfg.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
        assert pump_until_eof(reactor, s).startswith(b"HTTP/1.1 408 ")


def test_keep_alive_times_out_after_a_response(front: tuple[Reactor, HttpFront]) -> None:
    reactor, srv = front
    with socket.create_connection((srv.cfg.host, srv.cfg.port)) as s:
        s.sendall(f"GET /api/v1/ports HTTP/1.1\r\nHost: {srv.bound_address}\r\n\r\n".encode())
        got = pump_until_eof(reactor, s)
    assert got.startswith(b"HTTP/1.1 200 ") and b'"name": "p"' in got and b" 408 " not in got


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_socket_activation_by_the_http_servers_name(tmp_path: Path, pty_device: PtyDevice) -> None:
    port = free_port()
    data = {
        "ports": [
            {"name": "dut", "upstream": {"serial": pty_device.path}, "listeners": [{"websocket": True}]}
        ],
        # The configured address is never bound: the passed socket named "web" is served instead.
        "http": {"listen": f"127.0.0.1:{free_port()}", "name": "web"},
    }
    cmd = [sys.executable, "-m", "muxd", "run", "-c", str(write_config(tmp_path, data))]
    proc = subprocess.Popen(
        ["systemd-socket-activate", f"--listen=127.0.0.1:{port}", "--fdname=web", *cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # systemd-socket-activate execs muxd (same PID) on the first connection.
        ports = wait_for(lambda: _try_get_ports(f"127.0.0.1:{port}"), 10.0, "the activated socket")
        assert [p["name"] for p in ports] == ["dut"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def _try_get_ports(addr: str) -> list[dict[str, Any]] | None:
    try:
        ports: list[dict[str, Any]] = get_json(addr, "/api/v1/ports")["ports"]
    except OSError:
        return None
    return ports


# -- hostile input, in-process ----------------------------------------------------------------


def exchange(reactor: Reactor, srv: HttpFront, raw: bytes, source: str | None = None) -> bytes:
    """Send raw bytes and end our side (SHUT_WR), run the loop until the server
    closes; return all it answered."""
    with socket.socket() as s:
        if source is not None:
            s.bind((source, 0))
        s.connect((srv.cfg.host, srv.cfg.port))
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        return pump_until_eof(reactor, s)


def statuses(answer: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"(?:^|\r\n)HTTP/1\.1 (\d{3}) ", answer)]


def get(target: str, host: str | None, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *([f"Host: {host}"] if host is not None else []), *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


UPGRADE = ("Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
           "Sec-WebSocket-Version: 13")  # fmt: skip


def test_host_must_name_the_server(front: tuple[Reactor, HttpFront]) -> None:
    """DNS rebinding: a page on evil.example, rebound to 127.0.0.1, sends its own
    name in Host (and a matching Origin). Every route refuses it."""
    reactor, srv = front
    port = srv.cfg.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LocalHost.:{port}"):
        assert statuses(exchange(reactor, srv, get("/metrics", host))) == [200], host
    evil = f"evil.example:{port}"
    origin = f"Origin: http://{evil}"
    for raw in (
        get("/", evil),
        get("/metrics", evil),
        get("/api/v1/ports", evil),
        get("/ws/p", evil, origin, *UPGRADE),  # same-origin by its own Host: the rebinding case
        get("/api/v1/ports/p/clients/1/disconnect", evil, origin, "Content-Length: 0", method="POST"),
        get("/api/v1/ports/p/clients/1/disconnect", evil, "Content-Length: 0", method="POST"),
        get("/metrics", f"127.0.0.1:{port + 1}"),  # another port is another server
        get("/metrics", "localhost"),  # no port: 80
        get("/metrics", f"127.0.0.2:{port}"),  # a loopback address, but not one it was told
        get(f"http://evil.example:{port}/metrics", f"127.0.0.1:{port}"),  # absolute-form wins over Host
    ):
        answer = exchange(reactor, srv, raw)
        assert statuses(answer) == [421], (raw, answer[:300])
        assert b"101 Switching" not in answer
    for raw in (
        get("/metrics", "\xff"),
        get("/metrics", "[::1"),
        get("/metrics", f"127.0.0.1:{port}x"),
        get("/metrics", f"127.0.0.1:{port}", f"Host: 127.0.0.1:{port}"),  # two Host headers
        b"GET /metrics HTTP/1.0\r\n\r\n",  # HTTP/1.0 without Host
    ):
        assert statuses(exchange(reactor, srv, raw)) == [400], raw
    # An absolute-form target names the server itself: its authority is what counts.
    assert statuses(exchange(reactor, srv, get(f"http://127.0.0.1:{port}/metrics", evil))) == [200]
    assert reactor.internal_errors == 0


def test_server_names_are_accepted_on_any_port() -> None:
    reactor, srv = make_front(server_names=["console.lab", "10.1.2.3"])
    try:
        for host in ("console.lab", "CONSOLE.LAB:8443", "console.lab.", "10.1.2.3:80"):
            assert statuses(exchange(reactor, srv, get("/metrics", host))) == [200], host
        assert statuses(exchange(reactor, srv, get("/metrics", "sub.console.lab"))) == [421]
        # A reload hands the front its new config: the new names apply from the next request.
        srv.cfg = dataclasses.replace(srv.cfg, server_names=("new.lab",))
        assert statuses(exchange(reactor, srv, get("/metrics", "new.lab:8020"))) == [200]
        assert statuses(exchange(reactor, srv, get("/metrics", "console.lab"))) == [421]
    finally:
        stop_front(reactor, srv)


def test_console_pages_refuse_framing(front: tuple[Reactor, HttpFront]) -> None:
    reactor, srv = front
    for path in ("/", "/console.js"):
        answer = exchange(reactor, srv, get(path, srv.bound_address))
        head = answer.partition(b"\r\n\r\n")[0].lower()
        assert statuses(answer) == [200]
        assert b"\r\nx-frame-options: deny" in head
        assert b"\r\ncontent-security-policy: frame-ancestors 'none'" in head


def test_crafted_paths_get_a_4xx(front: tuple[Reactor, HttpFront]) -> None:
    reactor, srv = front
    host = srv.bound_address
    assert host is not None
    crafted = [
        get("//[", host),
        get("//[/x?y", host),
        get("/ws/p?history=%C2%B2", host, *UPGRADE),
        get("/ws/p?history=" + "9" * 5000, host, *UPGRADE),
        get("/ws/p?format=" + "x" * 3000, host, *UPGRADE),
        get("/ws/p?" + "a=1&" * 200, host, *UPGRADE),
        get("/ws/p", host, "Origin: http://[", *UPGRADE),
        get("/ws/" + "p" * 5000, host, *UPGRADE),
        get(
            "/api/v1/ports/p/clients/" + "7" * 5000 + "/disconnect", host, "Content-Length: 0", method="POST"
        ),
        get("/api/v1/ports/p/clients/%C2%B2/disconnect", host, "Content-Length: 0", method="POST"),
        get("/api/v1/ports/" + "q" * 300 + "/clients", host),
        get("/" + "a" * 256, host),
        get("/vendor/" + "b" * 300 + ".js", host),
        get("/" + "/".join(["c" * 255] * 40), host),
        get("/%ff%fe%00", host),
        get("/index.html%00.js", host),
        get("/vendor%2fxterm%2fxterm.js", host),  # not an alias of /vendor/xterm/xterm.js
        get("*", host, method="OPTIONS"),
        get("example.com:443", host, method="CONNECT"),
    ]
    for raw in crafted:
        answer = exchange(reactor, srv, raw)
        got = statuses(answer)
        assert len(got) == 1 and 400 <= got[0] < 500, (raw[:120], answer[:300])
    assert statuses(exchange(reactor, srv, get("/?" + "%" * 3000, host))) == [200]  # a query "/" ignores
    assert reactor.internal_errors == 0


def test_content_length_and_transfer_encoding_is_answered_then_closed(
    front: tuple[Reactor, HttpFront],
) -> None:
    """RFC 9112 section 6.1: a request with both may be smuggling a second one."""
    reactor, srv = front
    host = srv.bound_address
    smuggled = (
        f"POST /api/v1/ports HTTP/1.1\r\nHost: {host}\r\nContent-Length: 6\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ).encode() + get("/metrics", host)
    with socket.create_connection((srv.cfg.host, srv.cfg.port)) as s:
        s.sendall(smuggled)  # our side stays open: the server must be the one to close
        answer = pump_until_eof(reactor, s)
    assert statuses(answer) == [400] and b"connection: close" in answer.lower()
    assert reactor.internal_errors == 0


def test_header_timeout_is_shorter_than_keep_alive_idle(
    front: tuple[Reactor, HttpFront], monkeypatch: pytest.MonkeyPatch
) -> None:
    reactor, srv = front
    srv.timeouts = HttpTimeouts(header=0.2, idle=3.0)
    with socket.create_connection((srv.cfg.host, srv.cfg.port)) as silent:
        started = time.monotonic()
        assert pump_until_eof(reactor, silent) == b""  # never sent a byte: closed quietly
        assert time.monotonic() - started < 2.0  # by the header timeout, not the idle one
    with socket.create_connection((srv.cfg.host, srv.cfg.port)) as kept:
        kept.sendall(get("/api/v1/ports", srv.bound_address))
        kept.setblocking(False)
        answer = b""
        deadline = time.monotonic() + 5
        while b'"name": "p"' not in answer:
            assert time.monotonic() < deadline, answer
            reactor.run_once(0.01)
            if select.select([kept], [], [], 0)[0]:
                chunk = kept.recv(65536)
                assert chunk, "closed after one response"
                answer += chunk
        # Kept alive past several header timeouts (a bounded check for absence).
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            reactor.run_once(0.01)
            assert not select.select([kept], [], [], 0)[0], "closed while idle between requests"
        started = time.monotonic()
        kept.sendall(b"GET /metrics HTTP/1.1\r\n")  # the next request begins and stalls
        answer = pump_until_eof(reactor, kept)
        assert answer.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 2.0
    assert reactor.internal_errors == 0


def hog(
    reactor: Reactor, srv: HttpFront, sources: list[str], each: int, deadline: float
) -> list[socket.socket]:
    """Idle connections, `each` from every source address, opened without
    waiting; returns once the server has taken or refused every one."""
    socks: list[socket.socket] = []
    for source in sources:
        for _ in range(each):
            assert time.monotonic() < deadline
            s = socket.socket()
            socks.append(s)
            s.bind((source, 0))
            s.setblocking(False)
            s.connect_ex((srv.cfg.host, srv.cfg.port))
            reactor.run_once(0)
    for _ in range(2000):  # until every queued connect has been accepted, and kept or closed
        open_ = [s for s in socks if not _closed(s)]
        if len(open_) == len(srv.connections):
            return socks
        assert time.monotonic() < deadline, (len(open_), len(srv.connections))
        reactor.run_once(0.01)
    raise AssertionError("the server did not take the connections")


def fetch_metrics_from(reactor: Reactor, srv: HttpFront, source: str, deadline: float) -> tuple[int, bytes]:
    """GET /metrics with http.client (a real client, in a thread) from `source`,
    while this thread runs the loop."""
    result: list[tuple[int, bytes] | OSError] = []

    def fetch() -> None:
        conn = http.client.HTTPConnection(srv.cfg.host, srv.cfg.port, timeout=10, source_address=(source, 0))
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            result.append((resp.status, resp.read()))
        except OSError as exc:
            result.append(exc)
        finally:
            conn.close()

    other = threading.Thread(target=fetch)
    other.start()
    for _ in range(2000):
        if not other.is_alive():
            break
        assert time.monotonic() < deadline
        reactor.run_once(0.01)
    other.join(5)
    assert not other.is_alive()
    [got] = result
    assert not isinstance(got, OSError), got
    return got


def test_one_peer_cannot_lock_out_others(
    front: tuple[Reactor, HttpFront], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """More idle connections from 127.0.0.1 than the whole server holds; a peer
    at 127.0.0.2 still gets /metrics, and the refusals log one line."""
    reactor, srv = front
    srv.timeouts = HttpTimeouts(header=30.0)  # the idle ones stay for the whole test
    caplog.set_level(logging.WARNING, logger="muxd.http")
    deadline = time.monotonic() + 30
    socks = hog(reactor, srv, ["127.0.0.1"], httpmod.MAX_CONNECTIONS + 8, deadline)
    try:
        assert len(srv.connections) == httpmod.MAX_PER_PEER
        status, body = fetch_metrics_from(reactor, srv, "127.0.0.2", deadline)
        assert status == 200 and b"muxd_internal_errors_total 0.0" in body
    finally:
        for s in socks:
            s.close()
    refusals = [r for r in caplog.records if "refused 127.0.0.1" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]
    assert srv.refusals.suppressed_total == len(socks) - httpmod.MAX_PER_PEER - 1
    assert reactor.internal_errors == 0


def test_many_addresses_of_one_host_cannot_fill_the_server(
    front: tuple[Reactor, HttpFront], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loopback has 16 million addresses: 16 of them fill the server at 32
    connections each. A newcomer still gets in, at the cost of the oldest
    connection of the peer holding the most."""
    reactor, srv = front
    srv.timeouts = HttpTimeouts(header=30.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * httpmod.MAX_CONNECTIONS + 256  # both ends of every connection, and the rest of us
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"needs {need} file descriptors; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        restore_limit = functools.partial(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
    else:
        restore_limit = None
    deadline = time.monotonic() + 30
    sources = [f"127.0.0.{i}" for i in range(1, 17)]
    socks = hog(reactor, srv, sources, httpmod.MAX_PER_PEER, deadline)
    try:
        assert len(srv.connections) == httpmod.MAX_CONNECTIONS == len(sources) * httpmod.MAX_PER_PEER
        status, _ = fetch_metrics_from(reactor, srv, "127.0.0.100", deadline)
        assert status == 200
        assert len(srv.connections) <= httpmod.MAX_CONNECTIONS
        assert sum(_closed(s) for s in socks) == 1  # one hog made room
    finally:
        for s in socks:
            s.close()
        if restore_limit is not None:
            restore_limit()
    assert reactor.internal_errors == 0


def _closed(sock: socket.socket) -> bool:
    """True once the server has closed this (refused) connection."""
    poller = select.poll()  # not select(): these fds go past 1024
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False
