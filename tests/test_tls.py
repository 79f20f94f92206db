"""TLS on the network listeners (muxd.tls), with real peers.

Byte level: a server TlsTransport over an in-memory wire against a client
ssl.SSLObject, fed whole and one byte at a time, no socket: the handshake,
data both ways, a full socket (ciphertext held, EPOLLOUT owed), input taken
off the socket but not yet read (``buffered``), close_notify, and the peer's
errors (garbage, EOF mid-handshake, no client certificate under mutual TLS).

Daemon level: muxd on a pty device with ``tls:`` listeners, a throwaway CA
from trustme. ``openssl s_client`` and Python's ssl client read the exact
bytes; mutual TLS refuses a client without a certificate and serves one with
a good one; the ``websockets`` client reads over wss://; an RFC 2217 client
over TLS negotiates and reads IAC-escaped data; stalled handshakes (silent,
half a ClientHello) do not delay a good client and are closed after the
configured handshake_timeout, and counted; SIGHUP with a new certificate
keeps connected clients while new ones see the new certificate.

The HTTPS server under test is a second http entry: the harness reads the
API from a plain one on loopback.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from muxd.config import TlsConfig, loads
from muxd.errors import ConfigError
from muxd.tls import TlsTransport
from tests.helpers import (
    LOCAL,
    Muxd,
    PtyDevice,
    StartMuxd,
    auto_address,
    read_to_eof,
    recv_exactly,
    recv_until,
    split_hostport,
    wait_for,
    write_config,
)

trustme = pytest.importorskip("trustme")

PAYLOAD = bytes(range(256)) * 64  # every byte value, 16 KiB: more than one TLS record


# -- certificates -----------------------------------------------------------------------------


class Pki:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, as files."""

    def __init__(self, tmp_path: Path, tag: str = "") -> None:
        self.ca = trustme.CA()
        self.dir = tmp_path
        self.ca_path = tmp_path / f"ca{tag}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.cert_path = tmp_path / "server.pem"
        self.key_path = tmp_path / "server.key"
        self.server = self.issue_server()
        self.client = self.ca.issue_cert("client@muxd.test")
        self.client_path = tmp_path / f"client{tag}.pem"
        self.client.private_key_and_cert_chain_pem.write_to_path(str(self.client_path))

    def issue_server(self) -> Any:
        """A new server certificate (new key, new serial) written over the served files."""
        cert = self.ca.issue_cert("127.0.0.1", "localhost", "::1")
        tmp = self.cert_path.with_suffix(".new")
        tmp.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(self.key_path))
        tmp.replace(self.cert_path)
        self.server = cert
        return cert

    def server_der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.server.cert_chain_pems[0].bytes().decode())

    def tls(self, **extra: Any) -> dict[str, Any]:
        return {"cert": str(self.cert_path), "key": str(self.key_path), **extra}

    def client_context(self, with_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.ca_path))
        if with_cert:
            ctx.load_cert_chain(str(self.client_path))
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def tls_connect(port: int, ctx: ssl.SSLContext, timeout: float = 5.0) -> ssl.SSLSocket:
    raw = socket.create_connection((LOCAL, port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname=LOCAL)


# -- byte level: the transport without a socket ------------------------------------------------


class Wire:
    """The server's side of an in-memory connection: what the client sent
    (``inbox``, handed out ``step`` bytes per recv) and what the server sent
    (``outbox``, taking at most ``room`` bytes, None: any)."""

    def __init__(self, step: int = 1 << 20) -> None:
        self.inbox = bytearray()
        self.outbox = bytearray()
        self.step = step
        self.room: int | None = None
        self.eof = False
        self.closed = False

    def fileno(self) -> int:
        return 1000  # never used as an fd: the transport only keeps it

    def recv(self, n: int, /) -> bytes:
        if not self.inbox:
            if self.eof:
                return b""
            raise BlockingIOError
        chunk = bytes(self.inbox[: min(n, self.step)])
        del self.inbox[: len(chunk)]
        return chunk

    def send(self, data: bytes | bytearray | memoryview, /) -> int:
        n = len(data) if self.room is None else min(len(data), self.room)
        if n == 0 and len(data):
            raise BlockingIOError
        self.outbox += bytes(data[:n])
        if self.room is not None:
            self.room -= n
        return n

    def close(self) -> None:
        self.closed = True


class Client:
    """A TLS client as an SSLObject over memory BIOs, talking to a Wire."""

    def __init__(self, ctx: ssl.SSLContext, wire: Wire) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.wire = wire

    def push(self) -> None:
        """What the client wrote goes on the wire; what the server wrote comes in."""
        self.wire.inbox += self.outgoing.read()
        self.incoming.write(bytes(self.wire.outbox))
        self.wire.outbox.clear()

    def step_handshake(self) -> bool:
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            self.push()
            return False
        self.push()
        return True

    def read_all(self) -> bytes:
        self.push()
        out = bytearray()
        for _ in range(1000):
            try:
                chunk = self.obj.read(1 << 16)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                break
            out += chunk
        return bytes(out)


def handshake(server: TlsTransport, client: Client, rounds: int = 10_000) -> None:
    """Alternate client and server steps until both are done (bounded)."""
    client_done = server_done = False
    for _ in range(rounds):
        if not client_done:
            client_done = client.step_handshake()
        if not server_done:
            server_done = server.handshake()
        client.push()
        if client_done and server_done:
            return
    raise AssertionError("the handshake did not finish")


def server_context(pki: Pki, client_ca: bool = False) -> ssl.SSLContext:
    from muxd.tls import make_context

    spec = TlsConfig(str(pki.cert_path), str(pki.key_path), str(pki.ca_path) if client_ca else None)
    return make_context(spec)


@pytest.mark.parametrize("step", [1 << 20, 1], ids=["whole", "byte-by-byte"])
def test_transport_handshake_and_data_both_ways(pki: Pki, step: int) -> None:
    wire = Wire(step)
    server = TlsTransport(wire, server_context(pki))
    client = Client(pki.client_context(), wire)
    assert server.plain is False
    handshake(server, client)
    assert server.handshake_done and client.obj.version() in ("TLSv1.2", "TLSv1.3")
    # Server -> client: the exact bytes, a record of plaintext at a time.
    sent = 0
    for _ in range(100):
        if sent == len(PAYLOAD):
            break
        sent += server.send(PAYLOAD[sent:])
    assert sent == len(PAYLOAD)
    assert client.read_all() == PAYLOAD
    # Client -> server: cut anywhere, whole only once a record is whole.
    client.obj.write(b"status\r\n")
    client.push()
    got = bytearray()
    for _ in range(10_000):
        try:
            got += server.recv(4096)
        except BlockingIOError:
            if not wire.inbox:
                break
    assert bytes(got) == b"status\r\n"


def test_transport_holds_ciphertext_while_the_socket_is_full(pki: Pki) -> None:
    wire = Wire()
    server = TlsTransport(wire, server_context(pki))
    client = Client(pki.client_context(), wire)
    handshake(server, client)
    wire.room = 100  # the kernel takes 100 bytes, then nothing
    n = server.send(PAYLOAD)
    assert n == 16 * 1024  # one record of plaintext taken...
    assert server.unsent > 0  # ...its ciphertext held, EPOLLOUT owed
    with pytest.raises(BlockingIOError):
        server.send(b"more")  # nothing more is encrypted while records wait
    held = server.unsent
    assert held <= 16 * 1024 + 512  # bounded: one record and its overhead
    wire.room = None
    server.flush()
    assert server.unsent == 0
    assert client.read_all() == PAYLOAD[:n]


def test_transport_reports_input_it_holds_that_epoll_cannot_see(pki: Pki) -> None:
    wire = Wire()
    server = TlsTransport(wire, server_context(pki))
    client = Client(pki.client_context(), wire)
    handshake(server, client)
    client.obj.write(b"first record")
    client.obj.write(b"second record")
    client.push()
    assert server.recv(5) == b"first"  # both records are off the socket now
    assert not wire.inbox and server.buffered  # epoll would not wake us: the core reads on
    rest = bytearray()
    for _ in range(10):
        rest += server.recv(4096)
        if not wire.inbox and not server._ssl.pending() and not server._incoming.pending:
            break
    assert bytes(rest) == b" recordsecond record"
    with pytest.raises(BlockingIOError):
        server.recv(10)
    assert not server.buffered  # an empty BIO: nothing to schedule, no busy loop


def test_transport_partial_record_is_not_buffered_input(pki: Pki) -> None:
    wire = Wire()
    server = TlsTransport(wire, server_context(pki))
    client = Client(pki.client_context(), wire)
    handshake(server, client)
    client.obj.write(b"x" * 100)
    record = client.outgoing.read()
    wire.inbox += record[:10]
    with pytest.raises(BlockingIOError):
        server.recv(100)
    assert not server.buffered  # half a record: wait for epoll, do not spin
    wire.inbox += record[10:]
    assert server.recv(100) == b"x" * 100


def test_transport_close_sends_close_notify_then_ends(pki: Pki) -> None:
    wire = Wire()
    server = TlsTransport(wire, server_context(pki))
    client = Client(pki.client_context(), wire)
    handshake(server, client)
    server.send(b"last words")
    server.close()
    server.close()  # safe twice
    assert wire.closed
    client.push()
    assert client.obj.read(100) == b"last words"
    # b"" before any FIN reached the client's BIO: that is close_notify, not a truncation
    # (which would raise SSLWantReadError now, and SSLEOFError after the FIN).
    assert client.obj.read(100) == b""


def test_transport_peer_close_notify_and_fin_are_eof(pki: Pki) -> None:
    wire = Wire()
    server = TlsTransport(wire, server_context(pki))
    client = Client(pki.client_context(), wire)
    handshake(server, client)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.obj.unwrap()
    client.push()
    assert server.recv(100) == b""
    wire2 = Wire()
    server2 = TlsTransport(wire2, server_context(pki))
    client2 = Client(pki.client_context(), wire2)
    handshake(server2, client2)
    wire2.eof = True  # FIN without close_notify
    assert server2.recv(100) == b""


def test_transport_garbage_and_eof_fail_the_handshake(pki: Pki) -> None:
    wire = Wire()
    server = TlsTransport(wire, server_context(pki))
    wire.inbox += b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    with pytest.raises(ssl.SSLError):
        server.handshake()
    wire = Wire()
    server = TlsTransport(wire, server_context(pki))
    client = Client(pki.client_context(), wire)
    client.step_handshake()
    del wire.inbox[len(wire.inbox) // 2 :]  # half a ClientHello, then FIN
    wire.eof = True
    with pytest.raises(ConnectionResetError):
        for _ in range(10):
            server.handshake()


def test_transport_mutual_tls_refuses_a_client_without_certificate(pki: Pki) -> None:
    wire = Wire()
    server = TlsTransport(wire, server_context(pki, client_ca=True))
    client = Client(pki.client_context(), wire)
    with pytest.raises(ssl.SSLError):
        handshake(server, client)
    wire = Wire()
    server = TlsTransport(wire, server_context(pki, client_ca=True))
    client = Client(pki.client_context(with_cert=True), wire)
    handshake(server, client)
    assert server.handshake_done


# -- config ---------------------------------------------------------------------------------------


def test_config_tls_files_are_checked_with_their_line(pki: Pki, tmp_path: Path) -> None:
    base = f"""\
ports:
  - name: dut
    upstream: {{sim: {{}}}}
    listeners:
      - tcp: 127.0.0.1:0
        tls:
          cert: {pki.cert_path}
          key: {{key}}
"""
    cfg = loads(base.replace("{key}", str(pki.key_path)))
    tls = cfg.ports[0].listeners[0].tls
    assert tls is not None and tls.cert == str(pki.cert_path) and tls.handshake_timeout == 10.0
    with pytest.raises(ConfigError) as err:
        loads(base.replace("{key}", str(tmp_path / "missing.key")))
    assert err.value.line == 8 and "tls.key" in str(err.value) and "no such file" in str(err.value)
    with pytest.raises(ConfigError, match="absolute path"):
        loads(base.replace("{key}", "server.key"))
    if os.geteuid() != 0:  # root reads anything
        unreadable = tmp_path / "unreadable.key"
        unreadable.write_text("x")
        unreadable.chmod(0)
        with pytest.raises(ConfigError, match="permission denied"):
            loads(base.replace("{key}", str(unreadable)))
    with pytest.raises(ConfigError, match="unknown key"):
        loads(
            base.replace("{key}", str(pki.key_path)).replace(
                "      - tcp:", "      - unix: /tmp/x\n        x:"
            )
        )


# -- daemon level ---------------------------------------------------------------------------------


def start_tls(
    muxd: StartMuxd,
    tmp_path: Path,
    dev: PtyDevice,
    listeners: list[dict[str, Any]],
    https: dict[str, Any] | None = None,
) -> Muxd:
    """muxd on the pty, its listeners named l0, l1...; with https, a second http
    server named "https" with these options. The harness's own http server stays plain."""
    named = []
    for i, given in enumerate(listeners):
        lst = {**given, "name": f"l{i}"}
        for kind in ("tcp", "rfc2217"):
            if lst.get(kind) == "auto":
                lst[kind] = auto_address()
        named.append(lst)
    http: list[dict[str, Any]] = [{"listen": auto_address(), "name": "harness"}]
    if https is not None:
        http.append({"listen": auto_address(), "name": "https", **https})
    data = {
        "ports": [{"name": "dut", "upstream": {"serial": dev.path}, "listeners": named}],
        "http": http,
    }
    cfg = write_config(tmp_path, data)
    m = muxd("run", "-c", str(cfg), "--log-level", "debug", ready_file=tmp_path / "ready.json")
    m.config_path, m.data = cfg, data
    m.names = [lst["name"] for lst in named]
    m.addresses = m.wait_ready_file()["listeners"]
    m.http = m.addresses["harness"]
    m.wait_state("up", port="dut")
    return m


def test_python_ssl_client_reads_the_exact_bytes(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "mode": "rw", "tls": pki.tls()}])
    with tls_connect(m.port("l0"), pki.client_context()) as s:
        m.wait_connected(1)
        pty_device.write(PAYLOAD)
        assert recv_exactly(s, len(PAYLOAD)) == PAYLOAD
        s.sendall(b"typed\r")
        assert pty_device.read(6) == b"typed\r"
        [client] = m.clients()
        assert client["delivered"] == len(PAYLOAD)
    assert m.metric("muxd_tls_handshakes_total", listener="l0") >= 1


def test_openssl_s_client_reads_the_exact_bytes(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": pki.tls()}])
    cmd = ["openssl", "s_client", "-connect", m.address("l0"), "-CAfile", str(pki.ca_path)]
    cmd += ["-verify_return_error", "-quiet", "-servername", "localhost"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        m.wait_connected(1)
        pty_device.write(PAYLOAD)
        assert proc.stdout is not None
        got = bytearray()
        deadline = time.monotonic() + 10
        while len(got) < len(PAYLOAD) and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                got += chunk
        assert bytes(got) == PAYLOAD
    finally:
        proc.kill()  # by PID, the one we started
        proc.wait(10)


def test_mutual_tls_refuses_no_certificate_and_serves_a_good_one(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    tls = pki.tls(client_ca=str(pki.ca_path))
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": tls}])
    port = m.port("l0")
    # Without a certificate: TLS 1.3 lets the client finish first, then the
    # server's alert arrives; no device byte ever does.
    try:
        with tls_connect(port, pki.client_context()) as s:
            s.settimeout(5)
            got = s.recv(100)
    except (ssl.SSLError, ConnectionError) as exc:  # the alert: certificate required
        got = str(exc).encode()
        assert b"CERTIFICATE" in got.upper() or isinstance(exc, ConnectionError), exc
    else:
        assert got == b"", got  # or a plain close: no device byte either way
    m.wait_metric("muxd_tls_handshake_failures_total", 1, listener="l0", reason="error")
    assert m.port_info()["clients"] == 0
    with tls_connect(port, pki.client_context(with_cert=True)) as s:
        m.wait_connected(1)
        pty_device.write(b"for the holder of a certificate\n")
        assert recv_until(s, b"\n") == b"for the holder of a certificate\n"


def test_wss_client_reads_over_tls(muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice) -> None:
    from websockets.sync.client import connect as ws_connect

    m = start_tls(muxd, tmp_path, pty_device, [{"websocket": True, "mode": "rw"}], https={"tls": pki.tls()})
    url = f"wss://{m.addresses['https']}/ws/dut"
    with ws_connect(url, ssl=pki.client_context(), open_timeout=5) as ws:
        m.wait_connected(1)
        pty_device.write(PAYLOAD)
        got = bytearray()
        for _ in range(1000):
            if len(got) >= len(PAYLOAD):
                break
            message = ws.recv(timeout=5)
            assert isinstance(message, bytes)
            got += message
        assert bytes(got) == PAYLOAD
        ws.send(b"ws typed\r")
        assert pty_device.read(9) == b"ws typed\r"
    # Plain HTTP requests over the same TLS server: the API over HTTPS.
    host, port = split_hostport(m.addresses["https"])
    with tls_connect(port, pki.client_context()) as s:
        s.sendall(f"GET /api/v1/ports HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        reply = read_to_eof(s)
    assert reply.startswith(b"HTTP/1.1 200") and b'"dut"' in reply


def test_rfc2217_over_tls(muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice) -> None:
    iac, sb, se, will, com_port = 255, 250, 240, 251, 44
    m = start_tls(muxd, tmp_path, pty_device, [{"rfc2217": "auto", "mode": "rw", "tls": pki.tls()}])
    with tls_connect(m.port("l0"), pki.client_context()) as s:
        first = recv_until(s, bytes([iac]))  # the server opens the telnet negotiation
        assert first[0] == iac
        # Agree to COM-PORT-OPTION, and ask for the server's signature.
        s.sendall(bytes([iac, will, com_port, iac, sb, com_port, 0, iac, se]))
        answer = recv_until(s, b"muxd ")
        assert bytes([iac, sb, com_port, 100]) in answer
        m.wait_connected(1)
        pty_device.write(b"a\xffb\n")
        assert b"a\xff\xffb\n" in recv_until(s, b"b\n")  # IAC doubled, over TLS


def test_stalled_handshakes_do_not_delay_others_and_time_out(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    timeout = 2.0
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": pki.tls(handshake_timeout="2s")}])
    port = m.port("l0")
    silent = socket.create_connection((LOCAL, port), timeout=10)
    hello = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = pki.client_context().wrap_bio(*hello, server_hostname=LOCAL)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    client_hello = hello[1].read()
    half = socket.create_connection((LOCAL, port), timeout=10)
    half.sendall(client_hello[: len(client_hello) // 2])
    stalled_at = time.monotonic()
    try:
        # A good client meanwhile: served at once, not after the stalled ones.
        with tls_connect(port, pki.client_context()) as s:
            m.wait_connected(1)
            served_in = time.monotonic() - stalled_at
            pty_device.write(b"not delayed\n")
            assert recv_until(s, b"\n") == b"not delayed\n"
        assert served_in < timeout / 2, served_in
        # The stalled ones are closed after the handshake timeout, and counted.
        for sock in (silent, half):
            read_to_eof(sock, timeout=timeout + 8)
        closed_after = time.monotonic() - stalled_at
        assert closed_after >= timeout * 0.9, closed_after
        m.wait_metric("muxd_tls_handshake_failures_total", 2, listener="l0", reason="timeout")
        assert "TLS handshake failed: no TLS handshake within 2s" in m.log()
    finally:
        silent.close()
        half.close()


def test_sighup_reloads_the_certificate_and_keeps_clients(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    import signal

    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": pki.tls()}])
    port = m.port("l0")
    old_der = pki.server_der()
    with tls_connect(port, pki.client_context()) as before:
        assert before.getpeercert(binary_form=True) == old_der
        m.wait_connected(1)
        pki.issue_server()  # a new key and certificate at the same paths
        new_der = pki.server_der()
        assert new_der != old_der
        m.signal(signal.SIGHUP)
        m.wait_log("TLS certificate reloaded")
        with tls_connect(port, pki.client_context()) as after:
            assert after.getpeercert(binary_form=True) == new_der
            m.wait_connected(2)
            pty_device.write(b"both\n")
            assert recv_until(after, b"\n") == b"both\n"
            assert recv_until(before, b"\n") == b"both\n"  # the old session carries on


def test_handshakes_per_second(muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice) -> None:
    """A figure, printed (pytest -s): full handshakes (no resumption) per second,
    client and server on this host, one at a time."""
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": pki.tls()}])
    port = m.port("l0")
    ctx = pki.client_context()
    n = 100
    started = time.monotonic()
    for _ in range(n):
        with tls_connect(port, ctx) as s:
            s.do_handshake()
    rate = n / (time.monotonic() - started)
    print(f"\nTLS handshakes per second (sequential, client and muxd on one host): {rate:.0f}")
    wait_for(lambda: m.metric("muxd_tls_handshakes_total", listener="l0") >= n, 10, "handshakes counted")
    assert rate > 5


def test_chromium_loads_the_console_over_https(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    from tests.test_web_console import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, terminal_has

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the test extra)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed (Debian package chromium)")
    m = start_tls(muxd, tmp_path, pty_device, [{"websocket": True}], https={"tls": pki.tls()})
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            # The throwaway CA is not in the browser's store: accept its certificate.
            page = browser.new_context(ignore_https_errors=True).new_page()
            response = page.goto(f"https://{m.addresses['https']}/", timeout=TIMEOUT_MS)
            assert response is not None and response.status == 200
            page.wait_for_selector("[data-testid=ws-status]:has-text('connected')", timeout=TIMEOUT_MS)
            m.wait_connected(1)  # the console's WebSocket, over WSS
            pty_device.write(b"hello over https\r\n")
            terminal_has(page, "hello over https")
        finally:
            browser.close()
    assert m.metric("muxd_tls_handshakes_total", listener="https") >= 2  # the page, and more


def test_a_stuck_tls_reader_is_bounded_and_counted_like_a_plain_one(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    lst = {"tcp": "auto", "tls": pki.tls(), "buffer": "16KiB", "overflow": "drop-oldest"}
    m = start_tls(muxd, tmp_path, pty_device, [lst])
    port = m.port("l0")
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(5)
    raw.connect((LOCAL, port))
    stuck = pki.client_context().wrap_socket(raw, server_hostname=LOCAL)  # handshakes, then never reads
    with stuck, tls_connect(port, pki.client_context()) as fast:
        m.wait_connected(2)
        chunk = bytes(range(256)) * 256  # 64 KiB
        total = 0
        got = bytearray()
        for _ in range(16):  # 1 MiB through, read by the fast client as it comes
            pty_device.write(chunk)
            total += len(chunk)
            got += recv_exactly(fast, len(chunk))
        assert bytes(got) == chunk * 16  # the stuck reader slowed nobody

        def stuck_view() -> dict[str, Any] | None:
            views = [c for c in m.clients() if c["dropped"] > 0]
            return views[0] if views else None

        view = wait_for(stuck_view, 10, "the stuck TLS reader's drops counted")
        assert view["lag"] <= 16 * 1024  # its backlog stays within the listener's buffer
        assert view["delivered"] + view["dropped"] + view["lag"] <= total
        assert m.metric("muxd_client_dropped_bytes_total", listener="l0") > 0


def test_unusable_certificate_fails_the_start_naming_the_listener(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    pki.cert_path.write_text("not a certificate\n")  # exists and is readable: the config loads
    data = {
        "ports": [
            {
                "name": "dut",
                "upstream": {"serial": pty_device.path},
                "listeners": [{"tcp": auto_address(), "name": "secure", "tls": pki.tls()}],
            }
        ]
    }
    m = muxd("run", "-c", str(write_config(tmp_path, data)))
    assert m.wait_exit(20) != 0
    assert "secure: cannot use TLS certificate" in m.log()


def test_a_tls_writer_is_held_back_by_the_write_queue_and_loses_nothing(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "mode": "rw", "tls": pki.tls()}])
    data = bytes(range(256)) * 1024  # 256 KiB: four times the write queue, in full TLS records
    with tls_connect(m.port("l0"), pki.client_context()) as s:
        m.wait_connected(1)
        s.sendall(data)  # muxd stops reading while the queue is full, then reads on
        assert pty_device.read(len(data), timeout=20) == data


def finished_with_data(
    port: int, ctx: ssl.SSLContext, payload: bytes
) -> tuple[socket.socket, ssl.SSLObject, ssl.MemoryBIO]:
    """A client whose first bytes of data leave in the same segment as its
    handshake's last flight (as browsers do): the server has them in its TLS
    buffers at the end of the handshake, where epoll cannot see them."""
    sock = socket.create_connection((LOCAL, port), timeout=5)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=LOCAL)
    for _ in range(50):
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            chunk = sock.recv(65536)
            assert chunk, "the server closed during the handshake"
            incoming.write(chunk)
    else:
        raise AssertionError("no handshake")
    obj.write(payload)
    sock.sendall(outgoing.read())  # the client Finished and the data, together
    return sock, obj, incoming


def read_plain(sock: socket.socket, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, marker: bytes) -> bytes:
    got = bytearray()
    deadline = time.monotonic() + 5
    while marker not in got:
        assert time.monotonic() < deadline, f"no {marker!r}; got {bytes(got)!r}"
        try:
            got += obj.read(65536)
            continue
        except ssl.SSLWantReadError:
            pass
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, f"EOF; got {bytes(got)!r}"
        incoming.write(chunk)
    return bytes(got)


def test_data_sent_with_the_last_handshake_flight_is_read_at_once(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    m = start_tls(
        muxd,
        tmp_path,
        pty_device,
        [{"tcp": "auto", "mode": "rw", "tls": pki.tls()}, {"websocket": True}],
        https={"tls": pki.tls()},
    )
    sock, obj, incoming = finished_with_data(m.port("l0"), pki.client_context(), b"early\r")
    with sock:
        assert pty_device.read(6) == b"early\r"
    host, port = split_hostport(m.addresses["https"])
    request = f"GET /api/v1/ports HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    started = time.monotonic()
    sock, obj, incoming = finished_with_data(port, pki.client_context(), request)
    with sock:
        assert read_plain(sock, obj, incoming, b'"dut"').startswith(b"HTTP/1.1 200")
    assert time.monotonic() - started < 2  # answered at once, not after the 5 s request timeout


def test_handshakes_in_flight_are_limited_per_host_and_others_still_get_in(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    """One host that opens many connections and never completes a handshake
    holds at most MAX_HANDSHAKES_PER_PEER of them: each one more replaces its
    own oldest silent one (counted as evicted), and a client on another
    address is served meanwhile."""
    from muxd.tls_handshakes import MAX_HANDSHAKES_PER_PEER

    m = start_tls(muxd, tmp_path, pty_device, [{"tcp": "auto", "tls": pki.tls(handshake_timeout="30s")}])
    host, port = "127.0.0.1", m.port("l0")
    silent = [socket.create_connection((host, port)) for _ in range(MAX_HANDSHAKES_PER_PEER + 4)]
    try:
        m.wait_metric("muxd_tls_handshake_failures_total", 4, listener="l0", reason="evicted")
        for oldest in silent[:4]:
            assert read_to_eof(oldest, timeout=5) == b""
        outsider = socket.create_connection((host, port), source_address=("127.0.0.2", 0))
        with pki.client_context().wrap_socket(outsider, server_hostname="localhost") as s:
            m.wait_connected(1)
            pty_device.write(b"served\n")
            assert recv_until(s, b"\n") == b"served\n"
        assert m.metric("muxd_tls_handshake_failures_total", listener="l0", reason="busy") == 0
    finally:
        for sock in silent:
            sock.close()


def test_https_with_a_client_ca_serves_only_certificate_holders(
    muxd: StartMuxd, tmp_path: Path, pki: Pki, pty_device: PtyDevice
) -> None:
    import urllib.error
    import urllib.request

    tls = pki.tls(client_ca=str(pki.ca_path))
    m = start_tls(muxd, tmp_path, pty_device, [{"websocket": True}], https={"tls": tls})
    url = f"https://{m.addresses['https']}/api/v1/ports"

    def fetch(ctx: ssl.SSLContext) -> int:
        with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
            return int(resp.status)

    assert fetch(pki.client_context(with_cert=True)) == 200
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        fetch(pki.client_context())
