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

Handshake. A TlsServer (one per listener or http server) takes each accepted
socket and runs its handshake as a _Handshake registered with the reactor:
readiness events feed ClientHello bytes to OpenSSL and send its answers. The
connection object (a Connection or an HttpConnection) is made only once the
handshake is done, so a client counts as connected, and gets device bytes,
only then. A handshake must finish within ``handshake_timeout`` (default
HANDSHAKE_TIMEOUT); a timeout, a TLS error (a bad or missing client
certificate with ``client_ca``), or a peer that leaves closes that socket
only, is logged once per peer a minute, and is counted in TLS_STATS, which
/metrics exports as ``muxd_tls_handshake_failures_total{listener,reason}``.

Handshake slots. At most MAX_HANDSHAKES may be in flight per server, and
MAX_HANDSHAKES_PER_PEER per host. Slots that are only ever filled, first
come first kept, let a few hosts of silent sockets lock every client out
for a handshake timeout, again and again (8 hosts x 16 sockets fill 128).
So, as nginx and HAProxy treat slowloris, a slot is held only by a peer
that is doing its part:

- a client that sends nothing within FIRST_BYTES_TIMEOUT is closed (reason
  ``silent``): a real client sends its ClientHello the moment it connects;
- a host at its own share makes room by replacing its own oldest silent
  handshake, never someone else's;
- a full table makes room for a newcomer by evicting the oldest handshake
  of the host that holds the most, if that host holds more than the
  newcomer's would (each address keeps a fair share), else the oldest
  silent handshake of anyone, else the oldest one if it has been in flight
  longer than FIRST_BYTES_TIMEOUT (a real handshake takes two round trips:
  one that old has stalled, a byte at a time) (reason ``evicted``). Only a
  table of young handshakes, evenly shared, refuses a newcomer (``busy``).

Reload. ``TlsServer.reload`` builds a new SSLContext from the files; new
handshakes use it, while established connections keep the context they were
made with (an SSLObject holds its own reference), so nobody is dropped.

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
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from muxd.config import TlsConfig
from muxd.errors import MuxdError
from muxd.files import checked_paths
from muxd.ratelimit import LogLimiter, peer_key
from muxd.reactor import ERRMASK, IN, OUT, Reactor, Timer
from muxd.transport import SEND_BUFFER, graceful_close

log = logging.getLogger("muxd.tls")

# A handshake needs two round trips and a few milliseconds of CPU; 10 s covers
# a slow link and a loaded host, and bounds how long a client that connects
# and says nothing (or half a ClientHello) holds a socket and a slot. The
# config's tls.handshake_timeout (tests give a short one) is the one in force.
HANDSHAKE_TIMEOUT = TlsConfig.handshake_timeout
# Handshakes in flight per server: each holds an fd and some 50 KiB of
# OpenSSL state until done or timed out. 128 admits bursts of reconnecting
# clients while a flood of stalled handshakes costs at most this much.
MAX_HANDSHAKES = 128
# ...and per peer host (muxd.ratelimit.peer_key: an IPv4 address, an IPv6
# /64): one host's stalled handshakes cannot take every slot from the others.
MAX_HANDSHAKES_PER_PEER = 16
# The first bytes of a handshake (the ClientHello) must come within this. A
# client sends them as soon as connect() returns, so they arrive within one
# trip; 3 s covers a slow link and the TCP retransmission of a lost first
# segment (initial RTO 1 s, RFC 6298: resent at 1 s, then 3 s), and is a
# third of the default handshake_timeout, so a silent socket holds a slot a
# third as long. Never longer than the configured handshake_timeout.
FIRST_BYTES_TIMEOUT = 3.0
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


class TlsServer:
    """One listener's TLS: its context (replaced on reload), the handshakes in
    flight, and its counters."""

    def __init__(
        self,
        name: str,
        spec: TlsConfig,
        reactor: Reactor,
        alpn: tuple[str, ...] = (),
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        self.name = name
        self.reactor = reactor
        self.alpn = alpn
        self.max_handshakes = max_handshakes
        self.spec = spec
        try:
            self.context = make_context(spec, alpn)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; say which files
            raise MuxdError(
                f"{name}: cannot use TLS certificate {spec.cert} and key {spec.key}: {exc}"
            ) from exc
        self.stats = TLS_STATS.setdefault(name, TlsStats())
        # In flight, oldest first (a dict keeps insertion order): the order
        # eviction takes them in. Both bounded by max_handshakes.
        self.handshakes: dict[_Handshake, None] = {}
        self.per_peer: dict[str, dict[_Handshake, None]] = {}  # by peer_key, oldest first
        self.refusals = LogLimiter(log)  # one line per peer a minute

    @property
    def handshake_timeout(self) -> float:
        return self.spec.handshake_timeout

    def reload(self, spec: TlsConfig) -> None:
        """Re-read the files: new handshakes use them, connected clients keep theirs.
        A bad file keeps the context in force (logged), never drops anyone."""
        try:
            context = make_context(spec, self.alpn)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            log.error("%s: TLS files not reloaded, the old ones stay in use: %s", self.name, exc)
            return
        self.spec, self.context = spec, context
        log.info("%s: TLS certificate reloaded from %s", self.name, spec.cert)

    def accept(self, sock: socket.socket, peer: str, on_ready: Callable[[TlsTransport], None]) -> None:
        """Run the handshake of an accepted socket; on_ready(transport) once done."""
        key = peer_key(peer)
        mine = self.per_peer.get(key, {})
        if len(mine) >= MAX_HANDSHAKES_PER_PEER:
            victim = _oldest_silent(mine)  # only its own: a host at its share takes nobody else's slot
        elif len(self.handshakes) >= self.max_handshakes:
            victim = self.victim_for(key)
        else:
            victim = None
        if victim is not None:
            victim.evict(peer)
        elif len(mine) >= MAX_HANDSHAKES_PER_PEER or len(self.handshakes) >= self.max_handshakes:
            self.stats.failed("busy")
            self.refusals.warning(
                peer,
                "tls-busy",
                "%s: %s refused: %d TLS handshakes in flight (%d from this host), all in progress",
                self.name,
                peer,
                len(self.handshakes),
                len(mine),
            )
            sock.close()
            return
        hs = _Handshake(self, sock, peer, on_ready)
        self.handshakes[hs] = None
        self.per_peer.setdefault(key, {})[hs] = None
        hs.start()

    def victim_for(self, key: str) -> _Handshake | None:
        """The handshake to evict for a newcomer from host ``key``: the oldest
        (silent first) of the host holding the most, if it holds more than
        the newcomer's would; else the oldest silent one; else the oldest if
        it has stalled; None: nobody."""
        if not self.per_peer:
            return None
        busiest = max(self.per_peer.values(), key=len)
        if len(busiest) > len(self.per_peer.get(key, ())) + 1:
            return _oldest_silent(busiest) or next(iter(busiest))
        victim = _oldest_silent(self.handshakes)
        if victim is None:
            oldest = next(iter(self.handshakes))
            if self.reactor.now() - oldest.started > FIRST_BYTES_TIMEOUT:
                victim = oldest  # stalled: a real handshake is done in two round trips
        return victim

    def make_room(self, peer: str) -> bool:
        """For a listener at its max_clients that counts handshakes in flight:
        evict one (as a full table does) so the newcomer gets in; False if none
        may go."""
        victim = self.victim_for(peer_key(peer))
        if victim is None:
            return False
        victim.evict(peer)
        return True

    def _ended(self, hs: _Handshake) -> None:
        self.handshakes.pop(hs, None)
        key = peer_key(hs.peer)
        mine = self.per_peer.get(key)
        if mine is not None:
            mine.pop(hs, None)
            if not mine:
                del self.per_peer[key]

    def stop(self) -> None:
        """Abandon the handshakes in flight (the listener stops)."""
        for hs in list(self.handshakes):
            hs.abandon()


def _oldest_silent(handshakes: dict[_Handshake, None]) -> _Handshake | None:
    # At most max_handshakes to look at, oldest first.
    return next((hs for hs in handshakes if not hs.heard), None)


class _Handshake:
    """One accepted socket until its TLS handshake is done, fails or times out."""

    def __init__(
        self, server: TlsServer, sock: socket.socket, peer: str, on_ready: Callable[[TlsTransport], None]
    ) -> None:
        self.server = server
        self.peer = peer
        self.on_ready = on_ready
        sock.setblocking(False)
        # As for plain clients (muxd.transport.SEND_BUFFER): a kernel buffer
        # our accounting sees, so the overflow policy governs the backlog.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Handshake flights and small records should not wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = TlsTransport(sock, server.context)
        self.fd = self.transport.fd
        self.reactor = server.reactor
        self._timer = self.reactor.call_later(server.handshake_timeout, self._timed_out)
        self.heard = False  # the peer has sent something (or closed): not silent
        self.started = self.reactor.now()
        # A handshake_timeout shorter than this (tests) is the only deadline.
        self._silence: Timer | None = None
        if server.handshake_timeout > FIRST_BYTES_TIMEOUT:
            self._silence = self.reactor.call_later(FIRST_BYTES_TIMEOUT, self._silent)
        self._done = False

    def start(self) -> None:
        self.reactor.add(self.fd, IN, self._on_events, self._on_internal_error)

    def _on_events(self, mask: int) -> None:
        if mask & (IN | ERRMASK) and not self.heard:
            # Level-triggered: IN means bytes (or an EOF, which ends it below).
            self.heard = True
            if self._silence is not None:
                self._silence.cancel()
        try:
            if mask & OUT:
                self.transport.flush()
            done = self.transport.handshake() if mask & (IN | ERRMASK) else False
        except ssl.SSLError as exc:
            self._fail("error", f"TLS error: {exc.reason or exc}")
            return
        except OSError as exc:
            self._fail("closed", exc.strerror or str(exc))
            return
        if done:
            self._finish()
            return
        self.reactor.modify(self.fd, IN | (OUT if self.transport.unsent else 0))

    def _finish(self) -> None:
        self._end()
        self.server.stats.handshakes += 1
        log.debug("%s: %s: TLS handshake done (%s)", self.server.name, self.peer, self.transport.version)
        self.on_ready(self.transport)

    def _timed_out(self) -> None:
        self._fail("timeout", f"no TLS handshake within {self.server.handshake_timeout:g}s")

    def _silent(self) -> None:
        self._fail("silent", f"nothing sent within {FIRST_BYTES_TIMEOUT:g}s of connecting")

    def evict(self, newcomer: str) -> None:
        """Closed to make room for ``newcomer`` (TlsServer.accept)."""
        why = f"evicted for {newcomer}: {len(self.server.handshakes)} handshakes in flight"
        self._fail("evicted", why + ("" if self.heard else ", this one silent"))

    def _fail(self, reason: str, why: str) -> None:
        if self._done:
            return
        self._end()
        self.server.stats.failed(reason)
        self.server.refusals.warning(
            self.peer, "tls-" + reason, "%s: %s: TLS handshake failed: %s", self.server.name, self.peer, why
        )
        self.transport.close()

    def abandon(self) -> None:
        self._end()
        self.transport.close()

    def _end(self) -> None:
        if self._done:
            return
        self._done = True
        self._timer.cancel()
        if self._silence is not None:
            self._silence.cancel()
        self.reactor.remove(self.fd)
        self.server._ended(self)

    def _on_internal_error(self, _exc: BaseException) -> None:
        if not self._done:
            self._fail("error", "internal error")
