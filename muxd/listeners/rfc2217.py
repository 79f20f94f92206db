"""The rfc2217 listener: Telnet with COM-PORT-OPTION (RFC 2217) over TCP.

It is a StreamListener (same bind, bounded accept loop, EMFILE backoff,
max_clients) whose connections are the connection core (muxd.connection)
with the sans-I/O codec of ``muxd.protocol.rfc2217`` as their encoder: device
bytes are IAC-escaped on the way out, so the hub never writes ring bytes to
these sockets directly. Everything the codec has to say (escaped data,
negotiation answers, replies) comes out of its one ``data_to_send()``.

Input. Data goes to the hub under the same budget and backpressure as a raw
stream. Line-settings requests (baud rate, data size, parity, stop size, flow
control) go through the port's LineControl, and the answer carries the
settings in force, which is how RFC 2217 says "refused". BREAK, DTR and RTS
requests are acknowledged but not applied (muxd has no such hook on its
upstreams yet, and a DTR pulse resets many boards: it is not a thing one of
many readers should do). A purge of the receive buffer skips this client's
own backlog, counted as purged; a purge of the transmit buffer is
acknowledged only, since the device write queue holds other writers' bytes
too. Modem state is reported as CTS, DSR and CD on; line state as all clear.
FLOWCONTROL-SUSPEND holds output to this client (its lag then grows in the
hub, under its listener's bound) until RESUME.

Telnet clients do not half-close: EOF is the end, and an owner's claim on the
line settings is released at once. A malformed subnegotiation is the peer's
error: that client is closed, and nobody else notices.
"""

from __future__ import annotations

import logging
import socket

from muxd import __version__
from muxd.config import Listener
from muxd.connection import Connection
from muxd.errors import RemoteProtocolError
from muxd.hub import Hub
from muxd.linecontrol import LineControl
from muxd.listeners.stream import StreamListener
from muxd.protocol.line_settings import LineSettings
from muxd.protocol.rfc2217 import (
    ComPortCommand,
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
    Signature,
    settings_with,
)
from muxd.ratelimit import LogLimiter
from muxd.reactor import Reactor
from muxd.transport import SocketTransport

log = logging.getLogger("muxd.listener")
# A peer that sends garbage again and again gets one line a minute, not one per
# connection (muxd.ratelimit).
_protocol_errors = LogLimiter(log)

# What the modem lines say: a device that is there and ready (pyserial's .cts,
# .dsr and .cd read these).
MODEM_STATE = NotifyModemstate.CTS | NotifyModemstate.DSR | NotifyModemstate.CD


class Rfc2217Connection(Connection):
    HALF_CLOSE = False

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
        self.codec = Rfc2217Server()  # queues the initial negotiation
        self.line_control = line_control
        self._suspended = False
        # The negotiation goes out at once: a telnet client on a port other
        # than 23 waits for the server to begin.
        initial = self.codec.data_to_send()
        super().__init__(SocketTransport(sock), hub, cfg, peer, reactor, encoding=True, initial=initial)

    # -- out: hub -> client -------------------------------------------------

    def encode(self, data: bytes) -> bytes:
        self.codec.send(Data(data))
        return self.codec.data_to_send()

    def _output_held(self) -> bool:
        return self._suspended

    def _closed(self, reason: str) -> None:
        self.line_control.release(self.reader)

    # -- in: client -> hub and line control ------------------------------------

    def _received(self, data: bytes) -> None:
        try:
            self.codec.receive_data(data)
        except RemoteProtocolError as exc:
            _protocol_errors.warning(
                self.peer, "rfc2217", "%s: %s: %s; closing this client", self.cfg.name, self.peer, exc
            )
            self.close("protocol error")
            return
        for event in self.codec.next_events():
            self._handle(event)
            if self.closed:
                return
        self._out += self.codec.data_to_send()
        self.on_data()

    def _handle(self, event: Event) -> None:
        codec = self.codec
        if isinstance(event, Data):
            self.hub.submit(self.reader, event.data)
        elif isinstance(event, ConnectionClosed):
            self.close("peer closed")
        elif isinstance(event, ComPortOption):
            if event.enabled:  # pyserial's .cts needs a first notification
                codec.send(NotifyModemstate(MODEM_STATE))
        elif isinstance(event, NotifyModemstate):
            codec.send(NotifyModemstate(MODEM_STATE))
        elif isinstance(event, NotifyLinestate):
            codec.send(NotifyLinestate(0))
        elif isinstance(event, Signature):
            if event.text is None:
                codec.send(Signature(f"muxd {__version__} {self.hub.name}".encode()))
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
                self.hub.purge(self.reader)
            codec.reply(event, self._request(event))

    def _request(self, event: ComPortCommand) -> LineSettings:
        """The settings in force after the request (if it is one for a line setting)."""
        wanted = settings_with(self.line_control.settings, event)
        if wanted is None:  # a query, a mask, BREAK/DTR/RTS, a purge
            return self.line_control.settings
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

    def _client(self, conn: socket.socket, peer: str) -> Connection:
        return Rfc2217Connection(conn, peer, self.cfg, self.hub, self.reactor, line_control=self.line_control)
