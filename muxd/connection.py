"""The connection core: one reader of the hub over one transport, with one lifecycle.

Every reader kind (TCP and Unix streams, RFC 2217, WebSocket, a pty session)
is a Connection: the same output pump, input path, errors and close. A
listener module adds only what is particular to it, through a few hooks:
how device bytes are encoded (``encode``), what the peer's bytes mean
(``_received``), when output must wait (``_output_held``) and what happens
when muxd finishes with it (``_finished``, ``_last_words``, ``_closed``).

Lifecycle (``State``; the allowed transitions are the table ``_NEXT``)::

    OPEN --(peer half-closed after sending input)--> INPUT_ENDED
    OPEN | INPUT_ENDED --(muxd stops it: shutdown, reload)--> FINISHING
    any --(close)--> CLOSED

INPUT_ENDED is how ``printf 'status\\r' | nc -q1 host port`` gets its answer:
the peer is done sending but still reading, for HALF_CLOSE_LINGER. Protocols
whose EOF is the end (Telnet, WebSocket, a pty) set ``HALF_CLOSE = False``.
FINISHING reads nothing more, sends what the reader is owed, then closes:
graceful, FIN after the last byte (muxd.transport.graceful_close).

Output. With no encoder (raw bytes) and a plain transport, the connection
hands itself to the hub as the reader's transport, and the hub's fan-out pass
writes ring views to the fd itself: zero copy, no Python frame per reader.
Otherwise the connection keeps ``_out``, a small buffer of encoded bytes,
topped up from the hub ``encoder_chunk`` ring bytes at a time, only while it
holds less than LOW_WATER. The backlog stays in the hub as the reader's lag,
where its listener's ``buffer`` and ``overflow`` govern it; ``_out`` stays
small whatever the peer does. EPOLLOUT is watched only while something waits.

Input. Read only while the hub's write queue has room (backpressure, never a
drop) and while less than HIGH_WATER of output is pending, so a peer that
sends requests (pings, RFC 2217 queries) but never reads the answers cannot
make them pile up. HUP or ERR on a connection that is not reading means the
peer is gone: it is closed, never left for epoll to report again and again.

Errors. An OSError from the transport is the peer going away, named by
``disconnect_reason`` (one table for every kind). A RemoteProtocolError from a
codec is the peer's garbage: that connection closes, nobody else notices.
Anything else is a bug of ours, which the reactor contains to this connection
("internal error").

Timers belong to the connection (``_set_timer``) and are cancelled at close, so
a closed connection is not kept alive by a timer that has yet to fire.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
from collections.abc import Callable

from muxd.config import Listener
from muxd.errors import LocalProtocolError
from muxd.hub import Hub, Reader, ReaderPolicy
from muxd.reactor import ERRMASK, IN, OUT, Reactor, Timer, is_disconnect
from muxd.records import Format
from muxd.transport import Transport

log = logging.getLogger("muxd.listener")

# Encoded output is topped up from the hub only below this mark: 16 KiB keeps
# a fast peer's socket busy between wake-ups; the buffer then holds at most
# this plus one encoded chunk (an escaped or JSON-framed chunk is a few times
# its raw size) plus the answers to one read of requests.
LOW_WATER = 16 * 1024
# Input is not read while this much output is pending: requests whose answers
# the peer does not read cannot grow the buffer without bound.
HIGH_WATER = 64 * 1024
# How long a client that sent input and then half-closed keeps receiving. A
# peer that closed entirely looks the same until muxd next sends to it (then
# it resets), so this is also how long such a peer may count as connected on
# a quiet device: enough for a console's answer, no more.
HALF_CLOSE_LINGER = 5.0


class State(enum.Enum):
    OPEN = "open"
    INPUT_ENDED = "input ended"
    FINISHING = "finishing"
    CLOSED = "closed"


_NEXT: dict[State, frozenset[State]] = {
    State.OPEN: frozenset({State.INPUT_ENDED, State.FINISHING, State.CLOSED}),
    State.INPUT_ENDED: frozenset({State.FINISHING, State.CLOSED}),
    State.FINISHING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}

# errno -> the disconnect reason counted in muxd_client_disconnects_total.
_REASONS = {
    errno.ECONNRESET: "reset",
    errno.EPIPE: "reset",
    errno.EIO: "peer closed",  # a pty whose program closed it
}


def disconnect_reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0, "error")


def policy_for(cfg: Listener, fmt: Format | None = None) -> ReaderPolicy:
    """The hub's view of a listener's options (a connection may ask for another format)."""
    return ReaderPolicy(
        listener=cfg.name,
        capacity=cfg.buffer,
        drop_oldest=cfg.overflow == "drop-oldest",
        writable=cfg.writable,
        lines=cfg.write == "lines",
        notices=cfg.notices,
        format=fmt or cfg.format,
    )


class Connection:
    # EOF after some input is a half-close (raw streams); protocols whose EOF
    # is the end set False.
    HALF_CLOSE = True
    # Ring bytes per encode() call, for connections with an encoder.
    encoder_chunk = 16 * 1024

    def __init__(
        self,
        transport: Transport,
        hub: Hub,
        cfg: Listener,
        peer: str,
        reactor: Reactor,
        *,
        encoding: bool = False,
        fmt: Format | None = None,
        history: int | None = None,
        history_lines: int = 0,
        initial: bytes = b"",
    ) -> None:
        """Set up; start() registers it with the loop and sends what is owed.
        Subclasses finish their own setup between the two."""
        self.transport = transport
        self.fd = transport.fd
        self.hub = hub
        self.cfg = cfg
        self.peer = peer
        self.reactor = reactor
        self.state = State.OPEN
        policy = policy_for(cfg, fmt)
        # Records (text, jsonl) come encoded from the hub's shared log: sent as
        # they are, but through _out, since they are not the ring's bytes. So
        # do raw bytes to a transport that is not plain (TLS encrypts them).
        self.encoding = encoding or policy.format != "raw" or not transport.plain
        self._read_soon = False  # a read of the transport's buffered input is scheduled
        self.on_close: list[Callable[[Connection], None]] = []
        self._out = bytearray(initial)
        self._had_input = False
        self._close_when_flushed: str | None = None
        self._timers: dict[str, Timer] = {}
        self.reader: Reader = hub.attach(
            self,
            policy,
            peer,
            cfg.history if history is None else history,
            history_lines or cfg.history_lines,
        )
        if not self.encoding:
            self.reader.transport = self
            # The hub's fan-out pass calls these directly (see Hub._flush).
            self.write = transport.write
            self.writev = transport.writev

    def start(self) -> None:
        self.reactor.add(self.fd, IN, self._on_events, self._on_internal_error)
        log.debug("%s: %s connected", self.cfg.name, self.peer)
        self.on_data()  # history, or what was published since attach

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def _enter(self, state: State) -> None:
        if state not in _NEXT[self.state]:
            raise LocalProtocolError(f"connection state {self.state.value} -> {state.value} is not allowed")
        self.state = state

    def _set_timer(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        old = self._timers.get(name)
        if old is not None:
            old.cancel()
        self._timers[name] = self.reactor.call_later(delay, callback)

    # -- the hub's fast path (Transport) -------------------------------------

    def blocked(self) -> None:
        self.hub.set_blocked(self.reader, True)
        self._watch()

    def failed(self, exc: OSError) -> None:
        self._gone(exc)

    # -- ReaderOwner ------------------------------------------------------------

    def on_data(self) -> None:
        """Send what the reader is owed, as far as the transport takes it."""
        if self.state is State.CLOSED:
            return
        try:
            if self.encoding:
                self._pump()
            else:
                self.hub.drain(self.reader, self.transport.writev)
        except OSError as exc:
            self._gone(exc)
            return
        # A TLS transport's records the socket has not taken count as output owed.
        owed = bool(self._out) or bool(self.transport.unsent)
        if self._close_when_flushed is not None and not owed:
            self.close(self._close_when_flushed)
            return
        caught_up = self.hub.caught_up(self.reader)
        if self.state is State.FINISHING and caught_up and not owed:
            self._finished()
            return
        self.hub.set_blocked(self.reader, owed or not caught_up or self._output_held())
        self._watch()

    def on_write_room(self) -> None:
        if self.state is not State.CLOSED:
            self._watch()

    def finish(self) -> None:
        """Graceful stop: read no more, send what this reader is owed, then close."""
        if self.state in (State.FINISHING, State.CLOSED):
            return
        self._enter(State.FINISHING)
        self.reader.transport = None  # on_data() decides when it is done
        self._watch()
        self.on_data()

    def close(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self._enter(State.CLOSED)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.hub.detach(self.reader, reason)
        self.reactor.remove(self.fd)
        callbacks, self.on_close = self.on_close, []
        for callback in callbacks:
            callback(self)
        log.debug("%s: %s disconnected (%s)", self.cfg.name, self.peer, self.reader.doomed or reason)
        last = bytes(self._out) + self._last_words(reason)
        if last:
            with contextlib.suppress(OSError):  # best effort: it may not fit, the peer may be gone
                self.transport.send(last)
        self._closed(reason)
        self.transport.close()

    # -- output ---------------------------------------------------------------

    def _pump(self) -> None:
        """Encode from the hub while below LOW_WATER, send, until blocked or done."""
        hub, reader, out = self.hub, self.reader, self._out
        self.transport.flush()  # what a TLS transport still holds goes first
        while True:
            while (
                len(out) < LOW_WATER
                and self._close_when_flushed is None
                and not self._output_held()
                and (views := hub.pending(reader, self.encoder_chunk))
            ):
                data = views[0].tobytes() if len(views) == 1 else b"".join(views)
                hub.advance(reader, len(data))
                out += self.encode(data)
            if not out:
                return
            try:
                n = self.transport.send(out)
            except BlockingIOError:
                return
            del out[:n]
            if out:
                return  # the transport is full: EPOLLOUT calls again

    def encode(self, data: bytes) -> bytes:
        """What the hub gives (device bytes, or records) -> wire bytes."""
        return data

    def _output_held(self) -> bool:
        """True while the peer asked us to pause output (RFC 2217 flow control)."""
        return False

    def _finished(self) -> None:
        """FINISHING, and everything owed is sent: close (a protocol may say goodbye first)."""
        self.close("shutdown")

    def _close_after_flush(self, reason: str, timeout: float) -> None:
        """Take no more output; close once _out is sent, or after timeout."""
        self._close_when_flushed = reason
        self._set_timer("close", timeout, lambda: self.close(reason))
        self._watch()
        self.on_data()

    def _last_words(self, reason: str) -> bytes:
        """Bytes to try to send just before closing (a protocol's close message)."""
        return b""

    def _closed(self, reason: str) -> None:
        """After the hub let go, before the transport closes: a subclass's cleanup."""

    # -- input ------------------------------------------------------------------

    def _reading(self) -> bool:
        return (
            self.state is State.OPEN
            and self._close_when_flushed is None
            and not self.reader.input_paused
            and len(self._out) < HIGH_WATER
        )

    def _watch(self) -> None:
        if self.state is State.CLOSED:
            return
        mask = IN if self._reading() else 0
        if self.reader.blocked or self._out or self.transport.unsent:
            mask |= OUT
        self.reactor.modify(self.fd, mask)
        if mask & IN and self.transport.buffered and not self._read_soon:
            # Input a TLS transport already took off the socket: epoll will not
            # report it, so read it on the next turn of the loop.
            self._read_soon = True
            self.reactor.call_soon(self._read_buffered)

    def _read_buffered(self) -> None:
        self._read_soon = False
        if self._reading() and self.transport.buffered:
            self._on_readable()
            if self.transport.buffered:
                self._watch()

    def _on_events(self, mask: int) -> None:
        if mask & OUT:
            self.on_data()
        if self.state is State.CLOSED:
            return
        if mask & ERRMASK and not self._reading():
            self._hung_up()
        elif mask & (IN | ERRMASK):
            self._on_readable()
            if self.transport.buffered:
                self._watch()  # more TLS input is off the socket already: read it next turn

    def _hung_up(self) -> None:
        """HUP/ERR while not reading: the peer is gone entirely (a reset, or a
        half-closed peer that closed the rest). Close rather than be woken
        for it again and again."""
        err = self.transport.pending_error()
        self.close(disconnect_reason(OSError(err, "")) if err else "peer closed")

    def _on_readable(self) -> None:
        budget = self.hub.writes.budget(self.reader)
        if budget == 0:
            self._watch()  # the write queue is full: stop reading until it drains
            return
        try:
            data = self.transport.recv(budget)
        except BlockingIOError:
            return
        except OSError as exc:
            self._gone(exc)
            return
        if not data:
            self._end_of_input()
            return
        self._had_input = True
        self._received(data)

    def _received(self, data: bytes) -> None:
        """Bytes from the peer; a protocol decodes them first."""
        self.hub.writes.submit(self.reader, data)

    def _end_of_input(self) -> None:
        """EOF. A client that sent nothing (a probe, a reader) is gone. One that
        sent input may have only half-closed and still await the answer."""
        if not (self.HALF_CLOSE and self._had_input) or self.state is not State.OPEN:
            self.close("peer closed")
            return
        self._enter(State.INPUT_ENDED)
        self.hub.writes.input_ended(self.reader)
        self._set_timer("linger", HALF_CLOSE_LINGER, lambda: self.close("peer closed"))
        self._watch()

    def _gone(self, exc: OSError) -> None:
        if self.state is State.INPUT_ENDED:  # it had said it was done: this is how its close shows
            self.close("peer closed")
            return
        if not is_disconnect(exc) and exc.errno != errno.EIO:
            log.warning("%s: %s: %s", self.cfg.name, self.peer, exc)
        self.close(disconnect_reason(exc))

    def _on_internal_error(self, _exc: BaseException) -> None:
        self.close("internal error")
