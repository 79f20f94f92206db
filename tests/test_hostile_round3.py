"""The hostile run of round 3, kept in the suite: each finding with the attack
that showed it, against a real muxd.

1. TLS lockout: 8 loopback addresses x 16 silent connections filled every
   handshake slot of a TLS listener (and of the HTTPS server), and no client
   got in until they timed out. Now a silent handshake is closed after
   FIRST_BYTES_TIMEOUT, a full table evicts the oldest silent handshakes of
   the host holding the most (or of anyone, or a stalled one), and 40
   handshakes from another address all succeed while the attacker keeps the
   table full; also against 128 addresses of one silent or stalled socket
   each, and under a listener's max_clients.
2. (tests/test_trace.py) A trace file replaced by a symlink is not written
   through on reopen.
3. A FIFO planted in place of a token file, the config file or a TLS key
   hung the loop on SIGHUP: now refused at once, the previous settings stay.
4. An open WebSocket kept a token that a reload revoked: now it is closed
   with 1008 and nothing it sends afterwards reaches the device.

Figures are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import LOCAL, Muxd, PtyDevice, StartMuxd, read_to_eof, recv_until, wait_for
from tests.test_tls import Pki, start_tls

pytest.importorskip("trustme")

TLS_FAILURES = "muxd_tls_handshake_failures_total"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


# -- 1. TLS handshake slots ------------------------------------------------------------------------

ATTACKERS = [f"127.0.0.{i}" for i in range(2, 10)]  # 8 addresses, none the legitimate client's
PER_ATTACKER = 16  # muxd.tls_handshakes.MAX_HANDSHAKES_PER_PEER: 8 x 16 fill MAX_HANDSHAKES
LEGITIMATE = 40
LEGIT_DEADLINE = 20.0  # for all 40; each one alone takes milliseconds


def silent_from(source: str, port: int) -> socket.socket:
    """A TCP connection that will never send a byte."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(5)
    s.connect((LOCAL, port))
    return s


def lockout_attack(m: Muxd, port: int, legit: object, listener: str) -> None:
    """Fill the table with silent handshakes from 8 addresses, then, before
    each of 40 legitimate handshakes from 127.0.0.1, open one more silent
    connection per attacking address (so the table stays full): every
    legitimate one must get in."""
    held: list[socket.socket] = []
    try:
        for source in ATTACKERS:
            held += [silent_from(source, port) for _ in range(PER_ATTACKER)]
        # Accepted (muxd holds a socket for each) before the first legitimate one.
        # No wait here: the kernel's accept queue is FIFO, so muxd takes every
        # one of these before the first legitimate connection.
        ok = 0
        started = time.monotonic()
        for _ in range(LEGITIMATE):
            held += [silent_from(source, port) for source in ATTACKERS]
            if time.monotonic() - started > LEGIT_DEADLINE:
                break
            try:
                legit(port)  # type: ignore[operator]
            except (OSError, ssl.SSLError) as exc:
                print(f"legitimate handshake failed: {exc!r}")
            else:
                ok += 1
        took = time.monotonic() - started
        print(
            f"\n{listener}: {ok} of {LEGITIMATE} legitimate TLS handshakes from 127.0.0.1 in {took:.2f}s "
            f"against {len(ATTACKERS)} x {PER_ATTACKER} silent connections (topped up before each); "
            f"evicted {m.metric(TLS_FAILURES, listener=listener, reason='evicted'):g}, "
            f"busy {m.metric(TLS_FAILURES, listener=listener, reason='busy'):g}"
        )
        assert ok == LEGITIMATE, f"{ok} of {LEGITIMATE} got in"
        assert took < LEGIT_DEADLINE
        assert m.metric(TLS_FAILURES, listener=listener, reason="evicted") >= 1
        assert m.metric("muxd_internal_errors_total") == 0
    finally:
        for s in held:
            s.close()


def test_silent_connections_from_8_addresses_do_not_lock_out_a_tls_listener(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": pki.tls()}])
    ctx = pki.client_context()

    def legit(port: int) -> None:
        raw = socket.create_connection((LOCAL, port), timeout=5)
        with ctx.wrap_socket(raw, server_hostname=LOCAL) as s:
            assert s.version() is not None

    lockout_attack(m, m.port("l0"), legit, "l0")
    # Served, not only handshaken: a client still reads the device.
    raw = socket.create_connection((LOCAL, m.port("l0")), timeout=5)
    with ctx.wrap_socket(raw, server_hostname=LOCAL) as s:
        m.wait_connected(1)
        pty_device.write(b"served\n")
        assert recv_until(s, b"\n") == b"served\n"


def test_silent_connections_from_8_addresses_do_not_lock_out_the_https_server(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    m = start_tls(muxd, tmp_path, pty_device, [{"websocket": True}], https={"tls": pki.tls()})
    port = int(m.addresses["https"].rpartition(":")[2])
    ctx = pki.client_context()

    def legit(port: int) -> None:
        raw = socket.create_connection((LOCAL, port), timeout=5)
        with ctx.wrap_socket(raw, server_hostname=LOCAL) as s:
            s.sendall(
                f"GET /api/v1/ports HTTP/1.1\r\nHost: {LOCAL}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            answer = read_to_eof(s, timeout=5)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:80]

    lockout_attack(m, port, legit, "https")


def test_a_silent_tls_connection_is_closed_after_the_first_bytes_timeout(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    """Not after the whole handshake_timeout (10 s by default): a client that
    says nothing holds its slot for muxd.tls_handshakes.FIRST_BYTES_TIMEOUT (3 s) only,
    counted as silent."""
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": pki.tls()}])
    started = time.monotonic()
    with silent_from("127.0.0.2", m.port("l0")) as s:
        assert read_to_eof(s, timeout=9) == b""
    took = time.monotonic() - started
    print(f"\nsilent connection closed after {took:.2f}s (handshake_timeout 10s)")
    assert 2.7 <= took < 6, took
    m.wait_metric(TLS_FAILURES, 1, listener="l0", reason="silent")
    assert "nothing sent within 3s of connecting" in m.log()


def test_silent_handshakes_do_not_hold_max_clients(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    """Handshakes in flight count against a listener's max_clients: silent
    ones there are evicted for a client that speaks, as in a full table."""
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "max_clients": 4, "tls": pki.tls()}])
    port = m.port("l0")
    held = [silent_from("127.0.0.2", port) for _ in range(4)]
    try:
        raw = socket.create_connection((LOCAL, port), timeout=5)
        with pki.client_context().wrap_socket(raw, server_hostname=LOCAL) as client:
            m.wait_connected(1)
            pty_device.write(b"in\n")
            assert recv_until(client, b"\n") == b"in\n"
        assert m.metric(TLS_FAILURES, listener="l0", reason="evicted") >= 1
    finally:
        for s in held:
            s.close()


MANY = [f"127.0.1.{i}" for i in range(1, 129)]  # 128 addresses, one socket each: fills the table


def legit_tls(port: int, ctx: ssl.SSLContext) -> None:
    raw = socket.create_connection((LOCAL, port), timeout=5)
    with ctx.wrap_socket(raw, server_hostname=LOCAL) as s:
        assert s.version() is not None


def test_silent_connections_from_128_addresses_do_not_lock_out_a_tls_listener(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    """One silent socket per address: no address holds more than another, so
    the oldest silent handshake makes room."""
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": pki.tls()}])
    port, ctx = m.port("l0"), pki.client_context()
    held = [silent_from(source, port) for source in MANY]
    try:
        started = time.monotonic()
        for _ in range(10):
            legit_tls(port, ctx)
        print(f"\n10 handshakes in {time.monotonic() - started:.2f}s against 128 addresses x 1 silent socket")
        assert m.metric(TLS_FAILURES, listener="l0", reason="evicted") >= 1
    finally:
        for s in held:
            s.close()


def test_stalled_handshakes_from_128_addresses_give_way_after_the_first_bytes_timeout(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    """Each of 128 addresses sends one byte of a ClientHello and stalls (not
    silent, evenly shared): a legitimate client gets in once the oldest has
    been in flight past FIRST_BYTES_TIMEOUT (3 s), not after the whole
    handshake_timeout (10 s)."""
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": pki.tls()}])
    port, ctx = m.port("l0"), pki.client_context()
    held = [silent_from(source, port) for source in MANY]
    for s in held:
        s.sendall(b"\x16")  # the first byte of a TLS record: a handshake
    started = time.monotonic()
    # A barrier: answering a request takes muxd's loop several turns, by which
    # it has read the byte of each (ready before the request was sent).
    m.api("/api/v1/ports")
    try:

        def gets_in() -> bool:
            try:
                legit_tls(port, ctx)
            except (OSError, ssl.SSLError):
                return False
            return True

        wait_for(gets_in, 9, "a legitimate handshake among 128 stalled ones")
        took = time.monotonic() - started
        print(f"\nin after {took:.2f}s against 128 addresses x 1 stalled handshake (handshake_timeout 10s)")
        assert took < 8, took
        assert m.metric(TLS_FAILURES, listener="l0", reason="evicted") >= 1
    finally:
        for s in held:
            s.close()


# -- 3. files read in the loop on reload: a FIFO planted there ----------------------------------------

SECRET = "engineer-secret-0123456789abcd"


def token_file(tmp_path: Path, secret: str = SECRET) -> Path:
    path = tmp_path / "engineer.token"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def start_with_token(muxd: StartMuxd, tmp_path: Path, dev: PtyDevice, token: Path) -> tuple[Muxd, str]:
    """muxd on the pty with a rw websocket and a tcp listener (l1); the http
    server "web" has one write-scoped token (the harness reads the API from
    its own plain server)."""
    tokens = [{"name": "engineer", "file": str(token), "scope": "write"}]
    # start_tls's second http entry: with no tls: in it, a plain server with tokens.
    m = start_tls(
        muxd, tmp_path, dev, [{"websocket": True, "mode": "rw"}, {"tcp": "auto"}], https={"tokens": tokens}
    )
    return m, m.addresses["https"]


def api_status(web: str, secret: str) -> int:
    host, _, port = web.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/api/v1/ports", headers={"Authorization": f"Bearer {secret}"})
        return conn.getresponse().status
    finally:
        conn.close()


def still_serving(m: Muxd, dev: PtyDevice, reader: socket.socket, marker: bytes) -> None:
    dev.write(marker)
    assert recv_until(reader, marker, timeout=5).endswith(marker)
    assert m.proc.poll() is None


def test_a_token_file_replaced_by_a_fifo_does_not_hang_the_reload(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    token = token_file(tmp_path)
    m, web = start_with_token(muxd, tmp_path, pty_device, token)
    with socket.create_connection((LOCAL, m.port("l1")), timeout=5) as reader:
        m.wait_connected(1)
        token.unlink()
        os.mkfifo(token, 0o600)
        m.signal(signal.SIGHUP)
        m.wait_log(f"cannot read token file {token}: it is a FIFO, not a regular file", timeout=10)
        assert "its previous settings stay" in m.log()
        still_serving(m, pty_device, reader, b"after the reload\n")
        assert api_status(web, SECRET) == 200  # the previous tokens stay
        # A symlink is refused too (not followed), the same way.
        token.unlink()
        real = tmp_path / "real.token"
        real.write_text("other-secret-0123456789abcdef\n")
        real.chmod(0o600)
        token.symlink_to(real)
        m.signal(signal.SIGHUP)
        m.wait_log(f"cannot read token file {token}: it is a symbolic link", timeout=10)
        still_serving(m, pty_device, reader, b"after the second reload\n")
        assert api_status(web, SECRET) == 200


def test_a_config_file_replaced_by_a_fifo_does_not_hang_the_reload(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto"}])
    assert m.config_path is not None
    with socket.create_connection((LOCAL, m.port("l0")), timeout=5) as reader:
        m.wait_connected(1)
        m.config_path.unlink()
        os.mkfifo(m.config_path, 0o600)
        m.signal(signal.SIGHUP)
        m.wait_log("reload rejected, the running config stays", timeout=10)
        assert "it is a FIFO, not a regular file" in m.log()
        still_serving(m, pty_device, reader, b"after the reload\n")


def bounded(call: Callable[[], object], unblock: Path, seconds: float = 5.0) -> BaseException | None:
    """Run call in a thread; what it raised (None if it returned). If it is
    still blocked after ``seconds`` (in open() of the FIFO at ``unblock``),
    a writer opens that FIFO to free it, and the test fails."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            raised.append(exc)
        else:
            raised.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fd = os.open(unblock, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(seconds)
        raise AssertionError(f"blocked for {seconds}s opening the FIFO {unblock}")
    return raised[0]


def test_tls_files_replaced_by_a_fifo_are_refused_without_blocking(pki: Pki, tmp_path: Path) -> None:
    """ssl opens files by name: make_context checks them first, so a FIFO
    swapped in after the config's check refuses the reload instead of
    blocking the loop in OpenSSL's fopen()."""
    from muxd.config import TlsConfig
    from muxd.tls import make_context

    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo, 0o600)
    spec = TlsConfig(cert=str(pki.cert_path), key=str(fifo))
    exc = bounded(lambda: make_context(spec), fifo)
    assert isinstance(exc, OSError) and "it is a FIFO, not a regular file" in str(exc), exc
    make_context(TlsConfig(cert=str(pki.cert_path), key=str(pki.key_path)))  # the real files still load


def test_a_token_file_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    from muxd.access import AccessError, read_token_file

    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo, 0o600)
    exc = bounded(lambda: read_token_file(str(fifo)), fifo)
    assert isinstance(exc, AccessError) and "it is a FIFO, not a regular file" in str(exc), exc


# -- 4. a revoked token ends the WebSockets that used it ------------------------------------------------


def device_until(dev: PtyDevice, marker: bytes, timeout: float = 10.0) -> bytes:
    """What the device received, up to and including marker."""
    got = b""
    deadline = time.monotonic() + timeout
    while not got.endswith(marker):  # bounded: each read waits at most what is left
        got += dev.read(1, timeout=max(0.01, deadline - time.monotonic()))
    return got


@pytest.mark.parametrize("presented", ["header", "subprotocol"])
def test_a_revoked_token_closes_the_websockets_that_used_it(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, presented: str
) -> None:
    """A write-scoped session is open; the token file is rotated and SIGHUP
    sent: the session is closed with 1008 and a reason, and nothing it sends
    afterwards reaches the device, while a session with the new token writes."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect

    from muxd.access import ws_offer

    token = token_file(tmp_path)
    m, web = start_with_token(muxd, tmp_path, pty_device, token)

    def session(secret: str) -> Any:
        if presented == "header":
            return ws_connect(
                f"ws://{web}/ws/dut", additional_headers={"Authorization": f"Bearer {secret}"}, open_timeout=5
            )
        return ws_connect(f"ws://{web}/ws/dut", subprotocols=ws_offer(secret), open_timeout=5)  # type: ignore[arg-type]

    with session(SECRET) as old:
        old.send(b"before\r")
        assert device_until(pty_device, b"before\r") == b"before\r"

        fresh = "rotated-secret-0123456789abcdef"
        token_file(tmp_path, fresh)  # the rotation, then the signal
        m.signal(signal.SIGHUP)
        m.wait_log("reloaded", timeout=10)
        with contextlib.suppress(ConnectionClosed):
            old.send(b"after revocation\r")
        with pytest.raises(ConnectionClosed) as closed:
            old.recv(timeout=5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008 and closed.value.rcvd.reason == "token revoked"
    assert "WebSocket closed after a reload: token revoked" in m.log()

    # The new token writes; the old session's line never reached the device.
    with session(fresh) as new:
        new.send(b"marker\r")
        assert device_until(pty_device, b"marker\r") == b"marker\r"
    assert api_status(web, SECRET) == 401
    assert m.metric("muxd_internal_errors_total") == 0
