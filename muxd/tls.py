"""TLS for the network listeners (tcp, rfc2217, http), inside the one reactor.

Design: ``ssl.SSLObject`` over two ``ssl.MemoryBIO``, not a non-blocking
``SSLSocket``. With memory BIOs OpenSSL never touches the fd: this module
moves ciphertext between the socket and the BIOs itself, so

- every byte on the wire goes through code we own, with our bounds (a record
  of plaintext per send, a bounded number of socket reads per call), and the
  reactor's readiness events drive everything: nothing can block the loop;
- the TLS state machine is sans-I/O: tests drive a server TlsTransport and a
  client SSLObject against each other byte by byte, without a socket;
- a non-blocking SSLSocket would hide its own buffers (a record decrypted
  but unread is invisible to epoll, and SSL_write retries must repeat the
  same buffer), with WANT_READ on a write and WANT_WRITE on a read to get
  right in every caller. Here the same two facts are explicit: ``unsent``
  (ciphertext the socket has not taken) and ``buffered`` (input already off
  the socket that a recv() can return), and the connection core watches
  EPOLLOUT, or schedules a read, on them.

A TlsTransport is a Transport (muxd.transport) with ``plain = False``: the
hub never writes ring bytes to it directly, so a TLS raw reader goes through
the connection core's small ``_out`` buffer and this transport encrypts it.
Plain readers keep their zero-copy path untouched.

Handshakes (a server's side: deadlines, slots, eviction) are muxd.tls_handshakes.

Close. ``close()`` queues close_notify (``unwrap``, without waiting for the
peer's), offers it to the socket, then does the transport's graceful close:
FIN after the last byte, a bounded drain, close (muxd.transport).

Errors. A TLS protocol error of the peer is an ``ssl.SSLError``, an OSError:
the connection core treats it as that peer going away, nobody else notices.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from muxd.config import TlsConfig
from muxd.files import checked_paths
from muxd.transport import graceful_close

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("muxd.tls")

# Certificate, key and CA files, at most: a chain is a few KiB and the whole
# Mozilla CA bundle about 220 KB; more is not a PEM file, and the loop reads it.
MAX_PEM_BYTES = 1024 * 1024
# Plaintext encrypted per send(): one TLS record's worth (RFC 8446: 2^14), so
# the ciphertext held back when the socket is full is at most one record.
RECORD = 16 * 1024
# Ciphertext taken from the socket per read: one full record plus overhead.
READ_CHUNK = RECORD + 512
# Socket reads per recv()/handshake step: bounded so one flooding peer shares
# the loop (epoll is level-triggered: what is left wakes us again).
MAX_READS = 4


class Wire(Protocol):
    """What a TlsTransport needs of its socket (a fake in byte-level tests)."""

    def fileno(self) -> int: ...
    def recv(self, n: int, /) -> bytes: ...
    def send(self, data: bytes | bytearray | memoryview, /) -> int: ...
    def close(self) -> None: ...


def make_context(spec: TlsConfig, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A server context from the config's files; ssl.SSLError/OSError if they are bad."""
    import ssl  # memory: libssl only with a tls: config (docs/benchmarks.md)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.0 and 1.1 are deprecated (RFC 8996) and no client of ours needs them.
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Client-initiated renegotiation is a CPU lever for a peer and no client needs it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # Opened by us first (muxd.files): a FIFO or a device planted at a path
    # would otherwise block OpenSSL's fopen(), and the loop with it, on reload.
    paths = [spec.cert, spec.key] + ([spec.client_ca] if spec.client_ca is not None else [])
    with checked_paths(paths, MAX_PEM_BYTES) as checked:
        ctx.load_cert_chain(checked[0], checked[1])
        if spec.client_ca is not None:
            ctx.load_verify_locations(cafile=checked[2])
            ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


@dataclass
class TlsStats:
    """Counters of one listener's TLS, exported by muxd.metrics."""

    handshakes: int = 0  # completed
    failures: dict[str, int] = field(default_factory=dict)  # reason -> count

    def failed(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


# By listener name, for /metrics. Keyed by name (names are unique in a
# config), so the counters outlive a listener that a reload rebinds; bounded
# by the names configs have used.
TLS_STATS: dict[str, TlsStats] = {}


class TlsTransport:
    """A Transport over TLS: plaintext in recv()/send(), ciphertext on the wire."""

    plain = False

    def __init__(
        self, raw: Wire, context: ssl.SSLContext, server_side: bool = True, server_hostname: str | None = None
    ) -> None:
        import ssl  # memory: libssl loaded by the context's maker (docs/benchmarks.md)

        self.raw = raw
        self.fd = raw.fileno()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        # A client (the MQTT bridge, muxd.mqtt.wire) names the server whose certificate it checks.
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        # Ciphertext the socket has not taken yet: at most a handshake flight,
        # or one record (send() encrypts only when this is empty), plus alerts.
        self._cipher = bytearray()
        self._eof = False  # the socket said EOF
        self._starved = False  # the incoming BIO holds only part of a record
        self._closed = False
        self.handshake_done = False

    # -- the handshake --------------------------------------------------------

    def handshake(self) -> bool:
        """Advance the handshake with what the socket has: True once done.
        BlockingIOError never escapes: False means wait for readiness.
        ssl.SSLError: the peer's TLS is bad; ConnectionError: it left."""
        import ssl  # memory: libssl only with a tls: config (docs/benchmarks.md)

        for _ in range(MAX_READS):
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLEOFError:  # a FIN before the handshake's end: the peer left
                raise ConnectionResetError(
                    errno.ECONNRESET, "the peer closed during the TLS handshake"
                ) from None
            except ssl.SSLError:
                self._take_output()  # the alert that says why, for the peer
                with contextlib.suppress(OSError):
                    self.flush()
                raise
            else:
                self.handshake_done = True
                self._take_output()  # the last flight (TLS 1.3 session tickets)
                self.flush()
                return True
            self._take_output()
            self.flush()
            if self._eof:
                raise ConnectionResetError(errno.ECONNRESET, "the peer closed during the TLS handshake")
            try:
                self._feed()
            except BlockingIOError:
                return False
        return False

    @property
    def version(self) -> str | None:
        return self._ssl.version()

    # -- Transport ------------------------------------------------------------

    def recv(self, n: int) -> bytes:
        """Up to n bytes of plaintext; b"" at EOF (close_notify or FIN);
        BlockingIOError when none can be had now."""
        import ssl  # memory: libssl only with a tls: config (docs/benchmarks.md)

        for _ in range(MAX_READS):
            try:
                data = self._ssl.read(n)
            except ssl.SSLWantReadError:
                data = None
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""  # close_notify, or a FIN without it: either way the end of input
            finally:
                self._take_output()  # reading may produce output (key updates, alerts)
            if data:
                self._starved = False
                return data
            if data is not None:
                return b""
            if self._eof:
                return b""
            try:
                self._feed()
            except BlockingIOError:
                self._starved = True
                raise
        raise BlockingIOError(errno.EAGAIN, "more TLS input waits in the socket")

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypt up to one record of data and offer it to the socket; the
        plaintext count taken. BlockingIOError while earlier records wait."""
        import ssl  # memory: libssl only with a tls: config (docs/benchmarks.md)

        self.flush()
        if self._cipher:
            raise BlockingIOError(errno.EAGAIN, "TLS records wait for the socket")
        if not data:
            return 0
        try:
            n = self._ssl.write(memoryview(data)[:RECORD])
        except ssl.SSLWantReadError:  # renegotiation, which the context refuses: not now
            raise BlockingIOError(errno.EAGAIN, "TLS wants input first") from None
        self._take_output()
        with contextlib.suppress(BlockingIOError):
            self.flush()
        return n

    def write(self, data: memoryview) -> int:
        # The hub writes only to plain transports; here for the Transport shape.
        return self.send(data)

    def writev(self, data: list[memoryview]) -> int:
        return self.send(b"".join(data))

    def flush(self) -> None:
        """Offer the socket the ciphertext it has not taken; OSError if the peer is gone."""
        cipher = self._cipher
        while cipher:
            try:
                n = self.raw.send(cipher)
            except BlockingIOError:
                return
            del cipher[:n]

    @property
    def unsent(self) -> int:
        return len(self._cipher)

    @property
    def buffered(self) -> bool:
        """True when recv() may return data without the socket being readable:
        a decrypted record partly read, or whole records still in the BIO
        (epoll cannot see either)."""
        return bool(self._ssl.pending()) or (self._incoming.pending > 0 and not self._starved)

    def pending_error(self) -> int:
        if not isinstance(self.raw, socket.socket):
            return 0
        try:
            return self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            return exc.errno or 0

    def close(self) -> None:
        """close_notify (not waiting for the peer's), then the graceful close. Safe twice."""
        import ssl  # memory: libssl only with a tls: config (docs/benchmarks.md)

        if self._closed:
            return
        self._closed = True
        if self.handshake_done:
            # SSLWantReadError: the peer's close_notify has not come, and is not awaited.
            with contextlib.suppress(ssl.SSLError):
                self._ssl.unwrap()
            self._take_output()
            with contextlib.suppress(OSError):
                self.flush()
        if isinstance(self.raw, socket.socket):
            graceful_close(self.raw)
        else:
            self.raw.close()

    # -- between the socket and the BIOs --------------------------------------

    def _feed(self) -> None:
        """One read of ciphertext into the incoming BIO; BlockingIOError if none."""
        chunk = self.raw.recv(READ_CHUNK)
        if chunk:
            self._incoming.write(chunk)
            self._starved = False
        else:
            self._eof = True
            self._incoming.write_eof()

    def _take_output(self) -> None:
        if self._outgoing.pending:
            self._cipher += self._outgoing.read()
