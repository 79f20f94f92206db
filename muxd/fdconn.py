"""The fd-connection core: one peer over one transport, with one lifecycle.

Every connection muxd accepts, a hub reader (muxd.connection) or a plain HTTP
connection (muxd.listeners.http_connection), is an FdConnection: the reactor
registration, the watch mask, the read path (including input a TLS transport
has already taken off the socket), the output buffer, the timers and the one
way out. What the bytes mean is the subclass's, through a few hooks: what
arrived (``_received``), what EOF means (``_end_of_input``), how output is
produced (``_write``), and what happens at the end (``_ended``,
``_last_words``, ``_closed``).

Lifecycle. ``State``, with every legal transition in the table
``TRANSITIONS``; ``_enter`` is the only code that changes the state, and an
illegal transition is a bug of ours (LocalProtocolError)::

    OPEN         reading and writing
    INPUT_ENDED  the peer half-closed: writing only, for a linger
    PARKED       out of the reactor until _unpark() (a pty whose program
                 closed the slave while its input waits for the device)
    FINISHING    muxd stops it gracefully: no input; what is owed is sent,
                 then _finished() (by default: close)
    CLOSING      no input, no new output: what is queued is sent, then close
                 (bounded by a timer)
    CLOSED       the end, orderly: last words tried, transport closed
    ERROR        the end, by a transport failure: nothing more is offered
                 to the peer, the transport is closed
    SWITCHED     the end of this connection, not of the fd: the transport
                 belongs to another connection (an HTTP upgrade)

    OPEN        -> INPUT_ENDED | PARKED | FINISHING | CLOSING | CLOSED | ERROR | SWITCHED
    INPUT_ENDED -> FINISHING | CLOSING | CLOSED | ERROR
    PARKED      -> OPEN | CLOSED | ERROR
    FINISHING   -> CLOSING | CLOSED | ERROR
    CLOSING     -> CLOSED | ERROR

The three last states are terminal. ``close()``, ``abort()`` and ``_switch()``
all go through ``_end()``, the one close path: it cancels every timer (a
closed connection is not kept alive by a timer yet to fire), unregisters the
fd, lets the subclass let go (``_ended``), runs the ``on_close`` callbacks,
and (but for SWITCHED) closes the transport: gracefully, FIN after the last
byte (muxd.transport.graceful_close, or close_notify first under TLS).
Calling any of them on an ended connection does nothing, so a close can be
called twice without harm, and a deferred close (the hub's call_soon, a
timer) needs no "am I still alive?" check.

Output. ``_out`` holds bytes for the peer; EPOLLOUT is watched only while
something waits (``_out``, the ciphertext a TLS transport holds, or what the
subclass says). ``pump()`` sends what is owed as far as the transport takes
it, then decides: a CLOSING connection with nothing left closes, a FINISHING
one calls ``_finished()``, any other one updates its watch mask.

Input. Read while ``_reading()`` (OPEN, and whatever the subclass adds:
backpressure, one request at a time), at most ``_read_budget()`` bytes a
wake-up. A TLS transport may hold input that epoll cannot see (``buffered``):
it is read on the next turn of the loop, never left waiting for a wake-up
that will not come. HUP or ERR on a connection that is not reading means the
peer is gone: it is closed (ERROR when the socket reports an error), never
left for epoll to report again and again.

Errors. An OSError from the transport is the peer going away (ERROR, with the
reason from ``disconnect_reason``: one table for every kind), except after a
half-close, where it is how the peer's close shows (CLOSED). An unexpected
errno is logged, at most once a minute per peer. Anything a handler raises
besides is a bug of ours, which the reactor contains to this connection
(``close("internal error")``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
from collections.abc import Callable

from muxd.errors import LocalProtocolError
from muxd.ratelimit import LogLimiter
from muxd.reactor import ERRMASK, IN, OUT, Reactor, Timer, is_disconnect
from muxd.transport import Transport

log = logging.getLogger("muxd.listener")
# A peer whose transport keeps failing oddly gets one line a minute.
_errors = LogLimiter(log)


class State(enum.Enum):
    OPEN = "open"
    INPUT_ENDED = "input ended"
    PARKED = "parked"
    FINISHING = "finishing"
    CLOSING = "closing"
    CLOSED = "closed"
    ERROR = "error"
    SWITCHED = "switched"


TERMINAL = frozenset({State.CLOSED, State.ERROR, State.SWITCHED})
_ENDS = frozenset({State.CLOSED, State.ERROR})

# Every legal transition; anything else raises LocalProtocolError.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.OPEN: frozenset(
        {
            State.INPUT_ENDED,
            State.PARKED,
            State.FINISHING,
            State.CLOSING,
            State.CLOSED,
            State.ERROR,
            State.SWITCHED,
        }
    ),
    State.INPUT_ENDED: frozenset({State.FINISHING, State.CLOSING}) | _ENDS,
    State.PARKED: frozenset({State.OPEN}) | _ENDS,
    State.FINISHING: frozenset({State.CLOSING}) | _ENDS,
    State.CLOSING: _ENDS,
    State.CLOSED: frozenset(),
    State.ERROR: frozenset(),
    State.SWITCHED: frozenset(),
}
# States in which the fd is not in the reactor (or not ours).
_UNWATCHED = TERMINAL | {State.PARKED}

# errno -> the disconnect reason counted in muxd_client_disconnects_total.
_REASONS = {
    errno.ECONNRESET: "reset",
    errno.EPIPE: "reset",
    errno.EIO: "peer closed",  # a pty whose program closed it
}


def disconnect_reason(exc: OSError) -> str:
    return _REASONS.get(exc.errno or 0, "error")


def check_transition(old: State, new: State) -> None:
    """Raise LocalProtocolError unless TRANSITIONS allows old -> new."""
    if new not in TRANSITIONS[old]:
        raise LocalProtocolError(f"connection state {old.value} -> {new.value} is not allowed")


class FdConnection:
    # Bytes read per wake-up, unless _read_budget() says otherwise.
    read_size = 16 * 1024

    def __init__(
        self, transport: Transport, reactor: Reactor, name: str, peer: str, initial: bytes = b""
    ) -> None:
        """Set up; start() registers it with the loop. Subclasses finish their
        own setup between the two, so the core never calls an overridden
        method on a half-built object."""
        self.transport = transport
        self.fd = transport.fd
        self.reactor = reactor
        self.name = name  # the listener's or server's, for the log
        self.peer = peer
        self.state = State.OPEN
        self.on_close: list[Callable[[], None]] = []  # run once, at the end
        # Bytes for the peer. Its bound is the subclass's: it takes from its
        # source only below a low-water mark, or holds one response at most.
        self._out = bytearray(initial)
        self._timers: dict[str, Timer] = {}
        self._read_soon = False  # a read of the transport's buffered input is scheduled
        self._closing_reason = ""  # CLOSING: what close() will say

    def start(self) -> None:
        self.reactor.add(self.fd, IN, self._on_events, self._on_internal_error)
        self.pump()  # what is owed already, or the watch mask (and buffered TLS input)

    @property
    def closed(self) -> bool:
        return self.state in TERMINAL

    def _enter(self, state: State) -> None:
        check_transition(self.state, state)
        self.state = state

    def _set_timer(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        """Arm the connection's timer `name` (replacing it); cancelled at the end."""
        old = self._timers.get(name)
        if old is not None:
            old.cancel()
        self._timers[name] = self.reactor.call_later(delay, callback)

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    # -- output -----------------------------------------------------------------

    def pump(self) -> None:
        """Send what is owed as far as the transport takes it, then decide what comes next."""
        if self.state in TERMINAL:
            return
        try:
            self._write()
        except OSError as exc:
            self._gone(exc)
            return
        # A TLS transport's records the socket has not taken count as output owed.
        owed = bool(self._out) or bool(self.transport.unsent)
        if self.state is State.CLOSING:
            if not owed:
                self.close(self._closing_reason)
                return
        elif self.state is State.FINISHING and not owed and not self._source_pending():
            self._finished()
            return
        self._sent(owed)
        self._watch()

    def _write(self) -> None:
        """Produce output and offer it to the transport (a subclass may take
        from a source first); BlockingIOError stays inside, OSError escapes."""
        self._send_out()

    def _send_out(self) -> None:
        """Offer _out to the transport until it is sent or the transport is full."""
        self.transport.flush()  # what a TLS transport still holds goes first
        out = self._out
        while out:
            try:
                n = self.transport.send(out)
            except BlockingIOError:
                return
            if not n:
                return
            del out[:n]

    def _source_pending(self) -> bool:
        """True while a source still owes the peer output (FINISHING waits for it)."""
        return False

    def _sent(self, owed: bool) -> None:
        """After a pump that did not end the connection: `owed` is what is left queued."""

    def _wants_output(self) -> bool:
        """True while EPOLLOUT must be watched."""
        return bool(self._out) or bool(self.transport.unsent)

    # -- the ways out ---------------------------------------------------------------

    def finish(self) -> None:
        """Graceful stop: read no more, send what is owed, then _finished()."""
        if self.state is State.PARKED:
            self.close("shutdown")  # nobody is there to send to
            return
        if self.state not in (State.OPEN, State.INPUT_ENDED):
            return
        self._enter(State.FINISHING)
        self.pump()

    def _finished(self) -> None:
        """FINISHING, and everything owed is sent: close (a protocol may say goodbye first)."""
        self.close("shutdown")

    def close_after_flush(self, reason: str, timeout: float) -> None:
        """CLOSING: read nothing more, queue nothing more; close once what is
        queued is sent, or after timeout (a peer that stopped reading)."""
        if self.state in TERMINAL or self.state is State.CLOSING:
            return
        self._enter(State.CLOSING)
        self._closing_reason = reason
        self._set_timer("close", timeout, lambda: self.close(reason))
        self.pump()

    def close(self, reason: str) -> None:
        """The orderly end: last words tried, transport closed. Safe twice."""
        self._end(State.CLOSED, reason)

    def abort(self, reason: str) -> None:
        """The end by a transport failure: nothing more is sent. Safe twice."""
        self._end(State.ERROR, reason)

    def _switch(self) -> None:
        """Hand the fd and transport over to another connection (which registers it anew)."""
        self._end(State.SWITCHED, "switched protocol")

    def _end(self, state: State, reason: str) -> None:
        """The one close path (see the module doc)."""
        if self.state in TERMINAL:
            return
        self._enter(state)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self.reactor.remove(self.fd)
        self._ended(reason)
        callbacks, self.on_close = self.on_close, []
        for callback in callbacks:
            callback()
        if state is State.SWITCHED:
            return
        if state is State.CLOSED:
            last = bytes(self._out) + self._last_words(reason)
            if last:
                with contextlib.suppress(OSError):  # best effort: it may not fit, the peer may be gone
                    self.transport.send(last)
        self._out.clear()
        self._closed(reason)
        self.transport.close()

    def _ended(self, reason: str) -> None:
        """The connection has ended (any terminal state), before the on_close
        callbacks: let go of what it holds elsewhere."""

    def _last_words(self, reason: str) -> bytes:
        """Bytes to try to send just before an orderly close (a protocol's close message)."""
        return b""

    def _closed(self, reason: str) -> None:
        """After _ended, before the transport closes (not on SWITCHED): a subclass's cleanup."""

    # -- parking ----------------------------------------------------------------------

    def _park(self) -> None:
        """Out of the reactor (its HUP would wake the loop without end) until _unpark()."""
        self._enter(State.PARKED)
        self.reactor.remove(self.fd)

    def _unpark(self) -> None:
        self._enter(State.OPEN)
        self.reactor.add(self.fd, IN, self._on_events, self._on_internal_error)
        self._watch()

    # -- input --------------------------------------------------------------------------

    def _reading(self) -> bool:
        return self.state is State.OPEN

    def _read_budget(self) -> int:
        """Bytes to read now; 0 stops reading until something calls _watch()."""
        return self.read_size

    def _watch(self) -> None:
        if self.state in _UNWATCHED:
            return
        reading = self._reading()
        mask = IN if reading else 0
        if self._wants_output():
            mask |= OUT
        self.reactor.modify(self.fd, mask)
        if reading and self.transport.buffered and not self._read_soon:
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
            self._on_writable()
        if self.state in TERMINAL:
            return
        if mask & ERRMASK and not self._reading():
            self._hung_up()
        elif mask & (IN | ERRMASK):
            self._on_readable()
            if self.transport.buffered:
                self._watch()  # more TLS input is off the socket already: read it next turn

    def _on_writable(self) -> None:
        self.pump()

    def _hung_up(self) -> None:
        """HUP/ERR while not reading: the peer is gone entirely (a reset, or a
        half-closed peer that closed the rest). End rather than be woken for
        it again and again."""
        err = self.transport.pending_error()
        if err:
            self.abort(disconnect_reason(OSError(err, "")))
        else:
            self.close("peer closed")

    def _on_readable(self) -> None:
        budget = self._read_budget()
        if budget <= 0:
            self._watch()  # stop reading until room comes
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
        else:
            self._received(data)

    def _received(self, data: bytes) -> None:
        """Bytes from the peer: the subclass's to handle."""
        raise NotImplementedError

    def _end_of_input(self) -> None:
        """EOF from the peer: by default, the end."""
        self.close("peer closed")

    def _gone(self, exc: OSError) -> None:
        """The transport failed."""
        if self.state is State.INPUT_ENDED:  # it had said it was done: this is how its close shows
            self.close("peer closed")
            return
        if not is_disconnect(exc) and exc.errno != errno.EIO:
            _errors.warning(self.peer, "transport", "%s: %s: %s", self.name, self.peer, exc)
        self.abort(disconnect_reason(exc))

    def _on_internal_error(self, _exc: BaseException) -> None:
        self.close("internal error")
