"""TLS handshakes on the server side: one TlsServer per listener or http
server, the handshakes it has in flight, and who may hold a slot.

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
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from muxd.config import TlsConfig
from muxd.errors import MuxdError
from muxd.ratelimit import LogLimiter, peer_key
from muxd.reactor import ERRMASK, IN, OUT, Reactor, Timer
from muxd.tls import TLS_STATS, TlsStats, TlsTransport, make_context
from muxd.transport import SEND_BUFFER

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
        import ssl  # memory: libssl only with a tls: config (docs/benchmarks.md)

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
