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
settings in force, which is how RFC 2217 says "refused"; under
``line_control: virtual`` (the default) it carries the value asked, and
later queries from the same client answer with what it asked. BREAK, DTR and RTS
requests go through the same LineControl (``request_control``: the same
policies, and no client may cut into a running sequence), and the answer
carries the level in force, or under ``ignore``/``virtual`` the level asked
(acknowledged, not applied); where muxd does not know the level (a K2 whose
lines nobody set) the request is echoed, as pyserial's server does. Queries
are answered when the level is known. A purge of the receive buffer skips this client's
own backlog, counted as purged; a purge of the transmit buffer is
acknowledged only, since the device write queue holds other writers' bytes
too. Line state is reported as all clear. Modem state is the upstream's
(``modem_state``; CTS, DSR and CD on where it cannot tell): sent once
COM-PORT-OPTION is agreed, on each poll, and, unless the client set its
modem-state mask to 0 (it starts at 255, as pyserial's server has it),
whenever it changes, found by reading it every MODEM_POLL on a timer of that
connection, from COM-PORT-OPTION agreement on.
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
    SetControl,
    SetModemstateMask,
    Signature,
    settings_with,
)
from muxd.ratelimit import LogLimiter
from muxd.reactor import Reactor
from muxd.transport import Transport
from muxd.upstream.base import ControlLines, ModemLines

log = logging.getLogger("muxd.listener")
# A peer that sends garbage again and again gets one line a minute, not one per
# connection (muxd.ratelimit).
_protocol_errors = LogLimiter(log)

# What the modem lines say: a device that is there and ready (pyserial's .cts,
# .dsr and .cd read these).
MODEM_STATE = NotifyModemstate.CTS | NotifyModemstate.DSR | NotifyModemstate.CD
# How often a watching client's modem lines are read: a person sees a CD or
# DSR change within half a second, and a serial port pays one ioctl for it.
MODEM_POLL = 0.5
# The change bits of NOTIFY-MODEMSTATE sit four places below their line's.
_DELTA_SHIFT = 4


def modem_bits(lines: ModemLines | None) -> int:
    """The NOTIFY-MODEMSTATE value for these lines (no change bits)."""
    if lines is None:
        return MODEM_STATE
    return (
        (NotifyModemstate.CTS if lines.cts else 0)
        | (NotifyModemstate.DSR if lines.dsr else 0)
        | (NotifyModemstate.RI if lines.ri else 0)
        | (NotifyModemstate.CD if lines.cd else 0)
    )


def control_answer(request: SetControl, lines: ControlLines) -> SetControl | None:
    """The answer to a DTR/RTS/BREAK set or query: the level in lines, the
    request itself where the level is unknown (a set), None for a query then."""
    for level, values in (
        (lines.dtr, (SetControl.DTR_QUERY, SetControl.DTR_ON, SetControl.DTR_OFF)),
        (lines.rts, (SetControl.RTS_QUERY, SetControl.RTS_ON, SetControl.RTS_OFF)),
        (lines.brk, (SetControl.BREAK_QUERY, SetControl.BREAK_ON, SetControl.BREAK_OFF)),
    ):
        if request.value in values:
            if level is None:
                return None if request.is_query else request
            return SetControl(values[1] if level else values[2])
    return None


class Rfc2217Connection(Connection):
    HALF_CLOSE = False

    def __init__(
        self,
        transport: Transport,
        peer: str,
        cfg: Listener,
        hub: Hub,
        reactor: Reactor,
        *,
        line_control: LineControl,
        banner: bytes = b"",
    ) -> None:
        self.codec = Rfc2217Server()  # queues the initial negotiation
        if banner:  # after the negotiation, IAC-escaped as any data (muxd.banner)
            self.codec.send(Data(banner))
        self.line_control = line_control
        self._suspended = False
        # The client's SET-MODEMSTATE-MASK: 0 wants no change notifications.
        # 255 until it says otherwise, as pyserial's server starts (its client never sets one).
        self._modem_mask = 255
        self._modem_sent: int | None = None  # the modem bits last told this client
        # The negotiation goes out at once: a telnet client on a port other
        # than 23 waits for the server to begin.
        initial = self.codec.data_to_send()
        super().__init__(transport, hub, cfg, peer, reactor, encoding=True, initial=initial)

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
            self.hub.writes.submit(self.reader, event.data)
        elif isinstance(event, ConnectionClosed):
            self.close("peer closed")
        elif isinstance(event, ComPortOption):
            if event.enabled:  # pyserial's .cts needs a first notification
                self._notify_modem(force=True)
                self._set_timer("modem", MODEM_POLL, self._poll_modem)
        elif isinstance(event, NotifyModemstate):
            self._notify_modem(force=True)
        elif isinstance(event, SetModemstateMask):
            self._modem_mask = event.value
            codec.reply(event, self.line_control.settings_for(self.reader))
            if self._modem_mask:
                self._set_timer("modem", MODEM_POLL, self._poll_modem)
        elif isinstance(event, SetControl) and SetControl.BREAK_QUERY <= event.value <= SetControl.RTS_OFF:
            lines = self._control(event)
            answer = control_answer(event, lines)
            if answer is not None:
                codec.send(answer)
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

    def _control(self, event: SetControl) -> ControlLines:
        """The lines after a DTR/RTS/BREAK request (through the policy), or in force for a query."""
        lc = self.line_control
        if event.is_query:
            return lc.control or ControlLines()
        return lc.request_control(self.reader, dtr=event.dtr, rts=event.rts, brk=event.break_state)

    def _notify_modem(self, force: bool = False) -> None:
        """Tell the client the modem lines: always when forced (it asked, or
        just agreed to COM-PORT-OPTION), else only a change it watches."""
        bits = modem_bits(self.line_control.modem_state())
        last = self._modem_sent
        if not force and (last is None or bits == last):
            return
        delta = ((bits ^ last) >> _DELTA_SHIFT) if last is not None else 0
        value = bits | delta
        if not force:
            value &= self._modem_mask
            if not value:
                self._modem_sent = bits
                return
        self._modem_sent = bits
        self.codec.send(NotifyModemstate(value))

    def _poll_modem(self) -> None:
        if self.closed or not self._modem_mask:
            return
        self._notify_modem()
        out = self.codec.data_to_send()
        if out:
            self._out += out
            self.on_data()
        self._set_timer("modem", MODEM_POLL, self._poll_modem)

    def _request(self, event: ComPortCommand) -> LineSettings:
        """The settings in force after the request (if it is one for a line
        setting), as this client is to see them: under ``line_control:
        virtual``, what it asked for, remembered per client so that its later
        queries get the same answer (muxd.linecontrol)."""
        shown = self.line_control.settings_for(self.reader)
        wanted = settings_with(shown, event)
        if wanted is None:  # a query, a mask, BREAK/DTR/RTS, a purge
            return shown
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
        super().__init__(cfg, hub, reactor, sock, line_control)
        self.line_control: LineControl = line_control

    def _client(self, transport: Transport, peer: str) -> Connection:
        return Rfc2217Connection(
            transport,
            peer,
            self.cfg,
            self.hub,
            self.reactor,
            line_control=self.line_control,
            banner=self.banner_for(peer),
        )
