"""The rfc2217 listener: Telnet with COM-PORT-OPTION (RFC 2217) over TCP.

It is a StreamListener (same bind, bounded accept loop, EMFILE backoff,
max_clients) whose connections speak through the sans-I/O codec in
``muxd.protocol.rfc2217``. Each connection is one hub reader.

Output. Telnet escaping (0xFF doubled) makes the bytes on the wire differ
from the ring, so a connection cannot send from ring memoryviews as a raw
stream does. It keeps a small encoded-output buffer and pulls from the hub
only while that buffer is below ``OUT_LOW``: the backlog stays in the hub,
where it is bounded by the listener's ``buffer`` and governed by its overflow
policy, and this buffer stays small whatever the client does.

Input. Data goes to the hub under the same budget and backpressure as a raw
stream. Line-settings requests (baud rate, data size, parity, stop size, flow
control) go through the port's LineControl, and the answer carries the
settings in force, which is how RFC 2217 says "refused". BREAK, DTR and RTS
requests are acknowledged but not applied (muxd has no such hook on its
upstreams, and a DTR pulse resets many boards: it is not a thing one of many
readers should do). A purge of the receive buffer skips this client's own
backlog; a purge of the transmit buffer is acknowledged only, since the
device write queue holds other writers' bytes too. Modem state is reported
as CTS, DSR and CD on; line state as all clear. FLOWCONTROL-SUSPEND stops
output to this client (its lag then grows in the hub) until RESUME.

A malformed subnegotiation is the peer's error: that client is closed, and
nobody else notices.
"""

from __future__ import annotations

import dataclasses
import logging
import socket

from muxd import __version__
from muxd.config import Listener
from muxd.errors import RemoteProtocolError
from muxd.hub import Hub
from muxd.linecontrol import LineControl
from muxd.listeners.stream import StreamClient, StreamListener
from muxd.protocol.line_settings import LineSettings
from muxd.protocol.rfc2217 import (
    ComPortOption,
    ConnectionClosed,
    Data,
    Event,
    FlowControlResume,
    FlowControlSuspend,
    NotifyLinestate,
    NotifyModemstate,
    Purge,
    Rfc2217Server,
    SetBaudrate,
    SetControl,
    SetDataSize,
    SetParity,
    SetStopSize,
    Signature,
)
from muxd.reactor import IN, OUT, Reactor

log = logging.getLogger("muxd.listener")

# Encoded output is topped up from the hub only below this mark, OUT_CHUNK
# bytes of the ring at a time. Escaping at most doubles a chunk, so the buffer
# holds at most OUT_LOW + 2 * OUT_CHUNK (48 KiB) of data, plus the answers to
# one recv() of requests (under 40 KiB from READ_CHUNK bytes of 6-byte
# requests). 16 KiB keeps a fast client's socket busy between wake-ups.
OUT_LOW = 16 * 1024
OUT_CHUNK = 16 * 1024
# A client that sends requests but does not read the answers: stop reading it
# above this much pending output, so the answers cannot pile up without bound.
OUT_HIGH = 64 * 1024
# What the modem lines say: a device that is there and ready (pyserial's .cts,
# .dsr and .cd read these).
MODEM_STATE = NotifyModemstate.CTS | NotifyModemstate.DSR | NotifyModemstate.CD


class Rfc2217Connection(StreamClient):
    PLAIN = False  # IAC escaping: the hub must not write ring bytes to it directly

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        cfg: Listener,
        hub: Hub,
        reactor: Reactor,
        *,
        line_control: LineControl,
    ) -> None:
        self.codec = Rfc2217Server()
        self.line_control = line_control
        self._out = bytearray(self.codec.initial_negotiation())
        self._suspended = False
        super().__init__(sock, peer, cfg, hub, reactor)  # sends the negotiation
        self.on_close.append(lambda _client: line_control.release(self.reader))

    # -- out: hub -> client -------------------------------------------------

    def on_data(self) -> None:
        if self.closed:
            return
        hub, reader = self.hub, self.reader
        while True:
            if not self._suspended and len(self._out) < OUT_LOW:
                for view in hub.pending(reader, OUT_CHUNK):
                    self._out += self.codec.send(Data(bytes(view)))
                    hub.advance(reader, len(view))
                if reader.id not in hub.readers:  # closed by the overflow policy
                    return
            if not self._out:
                break
            try:
                n = self.sock.send(self._out)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._gone(exc)
                return
            del self._out[:n]
            if self._out:
                break  # the kernel's buffer is full: EPOLLOUT will call again
        if self.finishing and not self._out and hub.caught_up(reader):
            self.close("shutdown")
            return
        # Suspended counts as blocked too: the hub then applies the overflow
        # policy as the lag grows, and does not wake us for every publish.
        blocked = bool(self._out) or self._suspended
        if blocked != reader.blocked:
            hub.set_blocked(reader, blocked)
        self._watch()

    def _watch(self) -> None:
        mask = IN
        if self.reader.input_paused or self.finishing or len(self._out) >= OUT_HIGH:
            mask = 0
        if self._out:
            mask |= OUT
        self.reactor.modify(self.fd, mask)

    # -- in: client -> hub and line control ------------------------------------

    def _end_of_input(self) -> None:
        # Telnet clients do not half-close: EOF is the end, and an owner's
        # claim on the line settings must be released now, not after a linger.
        self.close("peer closed")

    def _received(self, data: bytes) -> None:
        try:
            self.codec.receive_data(data)
        except RemoteProtocolError as exc:
            log.warning("%s: %s: %s; closing this client", self.cfg.name, self.peer, exc)
            self.close("protocol error")
            return
        self._out += self.codec.data_to_send()
        for event in self.codec.next_events():
            self._handle(event)
            if self.closed:
                return
        self.on_data()

    def _handle(self, event: Event) -> None:
        codec = self.codec
        if isinstance(event, Data):
            self.hub.submit(self.reader, event.data)
        elif isinstance(event, ConnectionClosed):
            self.close("peer closed")
        elif isinstance(event, ComPortOption):
            if event.enabled:  # pyserial's .cts needs a first notification
                self._out += codec.send(NotifyModemstate(MODEM_STATE))
        elif isinstance(event, NotifyModemstate):
            self._out += codec.send(NotifyModemstate(MODEM_STATE))
        elif isinstance(event, NotifyLinestate):
            self._out += codec.send(NotifyLinestate(0))
        elif isinstance(event, Signature):
            if event.text is None:
                self._out += codec.send(Signature(f"muxd {__version__} {self.hub.name}".encode()))
            else:
                log.debug("%s: %s is %r", self.cfg.name, self.peer, event.text)
        elif isinstance(event, FlowControlSuspend):
            self._suspended = True
        elif isinstance(event, FlowControlResume):
            self._suspended = False
        else:
            if isinstance(event, Purge) and event.value & Purge.RECEIVE:
                # Skip this client's backlog. What is already encoded goes out
                # before the answer, and the client discards up to the answer.
                self.reader.cursor = self.hub.head
            self._out += codec.reply(event, self._request(event))

    def _request(self, event: Event) -> LineSettings:
        """The settings in force after the request (if it is one for a line setting)."""
        current = self.line_control.settings
        if isinstance(event, SetBaudrate) and event.value is not None:
            wanted = dataclasses.replace(current, baudrate=event.value)
        elif isinstance(event, SetDataSize) and event.value is not None:
            wanted = dataclasses.replace(current, bytesize=event.value)
        elif isinstance(event, SetParity) and event.value is not None:
            wanted = dataclasses.replace(current, parity=event.value)
        elif isinstance(event, SetStopSize) and event.value is not None:
            wanted = dataclasses.replace(current, stopbits=event.value)
        elif isinstance(event, SetControl) and event.flow is not None:
            wanted = dataclasses.replace(current, flow=event.flow)
        else:
            return current  # a query, a mask, BREAK/DTR/RTS, a purge
        return self.line_control.request(self.reader, wanted)


class Rfc2217Listener(StreamListener):
    def __init__(
        self,
        cfg: Listener,
        hub: Hub,
        reactor: Reactor,
        line_control: LineControl,
        sock: socket.socket | None = None,
    ) -> None:
        super().__init__(cfg, hub, reactor, sock)
        self.line_control = line_control

    def _client(self, conn: socket.socket, peer: str) -> StreamClient:
        return Rfc2217Connection(conn, peer, self.cfg, self.hub, self.reactor, line_control=self.line_control)
