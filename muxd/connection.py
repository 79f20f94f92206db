"""The hub-reader layer: one reader of the hub over one fd connection.

Every reader kind (TCP and Unix streams, RFC 2217, WebSocket, a pty session)
is a Connection: the fd-connection core (muxd.fdconn: transport, watch and
read path, lifecycle, timers, the one close path) plus what makes it a hub
reader: its cursor in the hub, the encoder, backpressure and the half-close.
A listener module adds only what is particular to it, through a few hooks:
how device bytes are encoded (``encode``), what the peer's bytes mean
(``_received``), when output must wait (``_output_held``) and what happens
when muxd finishes with it (``_finished``, ``_last_words``, ``_closed``).

Lifecycle: the core's table (muxd.fdconn.State). A reader uses OPEN;
INPUT_ENDED, which is how ``printf 'status\\r' | nc -q1 host port`` gets its
answer: the peer is done sending but still reading, for HALF_CLOSE_LINGER
(protocols whose EOF is the end, Telnet, WebSocket, a pty, set
``HALF_CLOSE = False``); FINISHING (muxd stops it: shutdown, reload), where
it reads nothing more, sends what the reader is owed, then closes, FIN after
the last byte; CLOSING (a WebSocket's close handshake: its close frame is
queued last, flushed, then the close); PARKED (a pty, muxd.listeners.pty); and
the ends, CLOSED, or ERROR when the transport failed. The hub detaches the
reader at the end, counting the reason.

Output. With no encoder (raw bytes) and a plain transport, the connection
hands itself to the hub as the reader's direct writer (hub.DirectWriter), and
the hub's fan-out pass writes ring views to the fd itself: zero copy, no
Python frame per reader. FINISHING and CLOSING take that away, so that the
connection alone decides when it is done. Otherwise the connection keeps the
core's ``_out``, a small buffer of encoded bytes, topped up by ``_pull()``
from the hub ``encoder_chunk`` ring bytes at a time, only while it holds less
than LOW_WATER. The backlog stays in the hub as the reader's lag, where its
listener's ``buffer`` and ``overflow`` govern it; ``_out`` stays small
whatever the peer does.

Input. Read only while the hub's write queue has room (backpressure, never a
drop) and while less than HIGH_WATER of output is pending, so a peer that
sends requests (pings, RFC 2217 queries) but never reads the answers cannot
make them pile up.

Sharing. A client attaching and leaving is a control event of the port
(``hub.writes.event``: traces with ``events: true`` record it). On a tcp,
unix or pty listener with ``escape:``, the client's input goes through an
EscapeDecoder (muxd.protocol.escape) first: its commands go to the port's
``hub.writes.commands`` (muxd.sharing), the rest to the device.

Errors. An OSError from the transport is the peer going away (the core's
``disconnect_reason``). A RemoteProtocolError from a codec is the peer's
garbage: that connection closes, nobody else notices. Anything else is a bug
of ours, which the reactor contains to this connection ("internal error").
"""

from __future__ import annotations

import logging

from muxd.config import Listener
from muxd.fdconn import FdConnection, State
from muxd.hub import Hub, Reader, ReaderPolicy
from muxd.protocol.escape import Command, EscapeDecoder
from muxd.reactor import Reactor
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
# The listeners whose clients may type an escape (raw terminals); RFC 2217
# and WebSocket clients are programs and browsers, unaffected.
ESCAPE_KINDS = frozenset({"tcp", "unix", "pty"})


def policy_for(cfg: Listener, fmt: Format | None = None) -> ReaderPolicy:
    """The hub's view of a listener's options (a connection may ask for another format)."""
    return ReaderPolicy(
        listener=cfg.name,
        capacity=cfg.buffer,
        drop_oldest=cfg.overflow != "disconnect",  # block falls back to drop-oldest
        writable=cfg.writable,
        lines=cfg.write == "lines",
        notices=cfg.notices,
        format=fmt or cfg.format,
        block=cfg.overflow == "block",
        block_timeout=cfg.block_timeout,
    )


class Connection(FdConnection):
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
        super().__init__(transport, reactor, cfg.name, peer, initial)
        self.hub = hub
        self.cfg = cfg
        policy = policy_for(cfg, fmt)
        # Records (text, jsonl) come encoded from the hub's shared log: sent as
        # they are, but through _out, since they are not the ring's bytes. So
        # do raw bytes to a transport that is not plain (TLS encrypts them).
        self.encoding = encoding or policy.format != "raw" or not transport.plain
        self._had_input = False
        self.reader: Reader = hub.attach(
            self,
            policy,
            peer,
            cfg.history if history is None else history,
            history_lines or cfg.history_lines,
        )
        if not self.encoding:
            self.reader.write_directly(self)
            # The hub's fan-out pass calls these directly (see Hub._flush).
            self.write = transport.write
            self.writev = transport.writev
        escape = cfg.escape if cfg.kind in ESCAPE_KINDS else None
        self.escape = EscapeDecoder(escape) if escape is not None else None
        self._event("attach", "attached")

    def start(self) -> None:
        log.debug("%s: %s connected", self.cfg.name, self.peer, extra=self._journal_fields())
        super().start()  # history, or what was published since attach

    def _enter(self, state: State) -> None:
        super()._enter(state)
        if state is State.FINISHING or state is State.CLOSING:
            self.reader.write_directly(None)  # pump() decides when it is done

    # -- the hub's fast path (hub.DirectWriter) ------------------------------------

    def blocked(self) -> None:
        self.hub.set_blocked(self.reader, True)
        self._watch()

    def failed(self, exc: OSError) -> None:
        self._gone(exc)

    # -- ReaderOwner ------------------------------------------------------------

    def on_data(self) -> None:
        """Send what the reader is owed, as far as the transport takes it."""
        self.pump()

    def on_write_room(self) -> None:
        self._watch()

    # -- output (the core's pump() hooks) -------------------------------------------

    def _write(self) -> None:
        if not self.encoding:
            self.hub.drain(self.reader, self.transport.writev)
            return
        out = self._out
        self.transport.flush()  # what a TLS transport still holds goes first
        while True:
            self._pull()
            if not out:
                return
            try:
                n = self.transport.send(out)
            except BlockingIOError:
                return
            del out[:n]
            if out:
                return  # the transport is full: EPOLLOUT calls again

    def _pull(self) -> None:
        """The reader's pull loop: encode what the hub owes into _out, a chunk
        at a time, while _out is below LOW_WATER (never while CLOSING)."""
        if self.state is State.CLOSING:
            return
        hub, reader, out = self.hub, self.reader, self._out
        while (
            len(out) < LOW_WATER
            and not self._output_held()
            and (data := hub.take(reader, self.encoder_chunk))
        ):
            out += self.encode(data)

    def _source_pending(self) -> bool:
        return not self.hub.caught_up(self.reader)

    def _sent(self, owed: bool) -> None:
        self.hub.set_blocked(self.reader, owed or not self.hub.caught_up(self.reader) or self._output_held())

    def _wants_output(self) -> bool:
        return self.reader.blocked or bool(self._out) or bool(self.transport.unsent)

    def encode(self, data: bytes) -> bytes:
        """What the hub gives (device bytes, or records) -> wire bytes."""
        return data

    def _output_held(self) -> bool:
        """True while the peer asked us to pause output (RFC 2217 flow control)."""
        return False

    # -- the end -------------------------------------------------------------------

    def _event(self, name: str, verb: str, **fields: object) -> None:
        r = self.reader
        text = f"{r.policy.listener} {r.peer} {verb}"
        self.hub.writes.event(name, text, client=r.id, peer=r.peer, listener=r.policy.listener, **fields)

    def _ended(self, reason: str) -> None:
        self.hub.detach(self.reader, reason)
        why = self.reader.doomed or reason
        self._event("detach", f"left ({why})", reason=why)
        log.debug("%s: %s disconnected (%s)", self.cfg.name, self.peer, why, extra=self._journal_fields())

    def _journal_fields(self) -> dict[str, str]:
        # journalctl -u muxd MUXD_PORT=dut1 (or MUXD_PEER=...): one port's, one peer's story.
        return {"MUXD_PORT": self.hub.name, "MUXD_PEER": self.peer}

    # -- input ------------------------------------------------------------------

    def _reading(self) -> bool:
        return self.state is State.OPEN and not self.reader.input_paused and len(self._out) < HIGH_WATER

    def _read_budget(self) -> int:
        return self.hub.writes.budget(self.reader)  # 0: the write queue is full

    def _received(self, data: bytes) -> None:
        """Bytes from the peer; a protocol decodes them first (and, its EOF
        being the end, does not need _had_input)."""
        self._had_input = True
        self._submit(data)

    def _submit(self, data: bytes) -> None:
        """The peer's bytes for the device, through the escape where it has one."""
        if self.escape is None:
            self.hub.writes.submit(self.reader, data)
            return
        commands = self.hub.writes.commands
        for item in self.escape.feed(data):
            if isinstance(item, Command):
                if commands is not None and not self.closed:
                    commands.command(self.reader, item.letter, self.escape.escape, self.close)
            elif not self.closed:
                self.hub.writes.submit(self.reader, item)

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
