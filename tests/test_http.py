"""The HTTP front: routes, static files, limits, keep-alive, and garbage.

Most tests run muxd as a subprocess and talk to it with http.client or raw
sockets (with h11 as the independent client-side parser). The idle-time
tests run the front in-process on its own reactor, with a short timeout.
"""

from __future__ import annotations

import http.client
import json
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h11
import pytest

from muxd import config as configmod
from muxd.listeners import http as httpmod
from muxd.listeners.http import HttpFront
from muxd.port import PortRuntime
from muxd.reactor import Reactor
from tests.conftest import Muxd, PtyDevice, connect, free_port, wait_for, write_config

StartMuxd = Callable[..., Muxd]
ROOT = Path(__file__).resolve().parent.parent


# -- helpers shared by the HTTP-side test modules --------------------------------


def start_http(
    muxd: StartMuxd,
    tmp_path: Path,
    dev: PtyDevice,
    listeners: list[dict[str, Any]] | None = None,
    http: dict[str, Any] | None = None,
    **port_opts: Any,
) -> tuple[Muxd, str]:
    """muxd on the pty as port "dut", with an http server; returns (muxd, "host:port")."""
    port = free_port()
    data = {
        "ports": [
            {
                "name": "dut",
                "upstream": {"serial": dev.path},
                "listeners": listeners if listeners is not None else [{"websocket": True, "mode": "rw"}],
                **port_opts,
            }
        ],
        "http": {"listen": f"127.0.0.1:{port}", **(http or {})},
    }
    m = muxd("run", "-c", str(write_config(tmp_path, data)), "--log-level", "debug")
    m.wait_log("dut upstream up")
    m.wait_port(port)
    return m, f"127.0.0.1:{port}"


def request(
    addr: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, http.client.HTTPResponse, bytes]:
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp, resp.read()
    finally:
        conn.close()


def get_json(addr: str, path: str) -> Any:
    status, _, body = request(addr, "GET", path)
    assert status == 200, body
    return json.loads(body)


def port_info(addr: str) -> dict[str, Any]:
    ports: list[dict[str, Any]] = get_json(addr, "/api/v1/ports")["ports"]
    return ports[0]


def wait_clients(addr: str, n: int, timeout: float = 10.0) -> None:
    wait_for(lambda: port_info(addr)["clients"] == n, timeout, f"{n} clients in the API")


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


def read_to_eof(sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 20) -> bytes:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < limit:
        left = deadline - time.monotonic()
        assert left > 0, f"no EOF before the deadline; got {bytes(buf[:200])!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


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


# -- idle time, in-process with a short timeout ------------------------------------------


@pytest.fixture
def front(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Reactor, HttpFront]]:
    monkeypatch.setattr(httpmod, "IDLE_TIMEOUT", 0.3)
    cfg = configmod.from_data(
        {"ports": [{"name": "p", "upstream": {"sim": True}}], "http": {"listen": f"127.0.0.1:{free_port()}"}}
    )
    reactor = Reactor()
    ports = {p.name: PortRuntime.build(p, reactor) for p in cfg.ports}
    srv = HttpFront(cfg.http[0], lambda: ports, reactor)
    srv.start()
    yield reactor, srv
    srv.stop()
    reactor.close()


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
        s.sendall(b"GET /api/v1/ports HTTP/1.1\r\nHost: x\r\n\r\n")
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
