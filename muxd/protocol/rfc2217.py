"""RFC 2217 COM-PORT-OPTION (telnet option 44) on top of telnet.py, sans-I/O.

Theory of operation: one connection class holds a ``TelnetParser``, an
``OptionNegotiator`` and a list of pending events; ``Rfc2217Server`` (muxd's
rfc2217 listener) and ``Rfc2217Client`` (an upstream K2 with ``control:
rfc2217``) differ only in which options they ask for and which command codes
they receive and send: a client sends code N and a server answers with
N + 100. The events are named after the RFC's commands and mean the same in
both directions: a server receives ``SetBaudrate(9600)`` as a request and
sends ``SetBaudrate(9600)`` as its answer, carrying the value in force; a
client sends the request and receives the answer. A value of None is the
RFC's 0, "tell me the current value".

The h11-style contract: ``receive_data(bytes)`` (b"" = EOF), then
``next_events()``. Output has one channel, an outbox of wire bytes: the
constructor queues the initial negotiation, ``receive_data()`` queues the
codec's own answers to the peer's negotiation, and ``send(event)``,
``Rfc2217Server.reply()`` and ``Rfc2217Client.configure()`` queue the bytes of
events of ours (data escaped). ``data_to_send()`` returns everything queued,
in the order it was queued, and empties the outbox. None of these calls does
I/O.

Bounds of the outbox. What the peer makes us say is bounded here: the
negotiation answers queued since the last ``data_to_send()`` may not pass
MAX_PENDING_ANSWERS. What we say is bounded by the caller: each call queues
at most twice its payload (escaping) plus a few framing bytes, and the caller
collects the outbox after each call, or each received chunk, and holds it
under its own bound (``upstream/tcp.py``'s OUT_LIMIT, the listener's high
watermark).

Broken after a peer error, as h11: once ``receive_data()`` has raised
RemoteProtocolError the codec takes no more input. Pending events are
discarded (``next_events()`` returns []), so are the answers queued by the
failed call, and every later ``receive_data()`` raises RemoteProtocolError at
once. The caller closes that peer; ``send()`` still works, for what it may
want to flush first.

What is fatal and what is tolerated. Fatal (RemoteProtocolError): a known
command whose payload has the wrong length or a value outside the RFC's range
(a parity code of 9, a purge of 0): acting on a guess would reconfigure a
device many readers share. Tolerated (dropped): command codes the RFC does not
assign or that belong to the other direction, an empty COM-PORT
subnegotiation (telnetcpcd's way to ask for a signature), subnegotiations of
other options, and telnet commands such as NOP or AYT: their framing is
intact, so skipping them is safe, and they come from real peers' quirks or
future extensions rather than from a corrupt stream. COM-PORT commands are
accepted even before option 44 is negotiated, since ser2net, for one, never
negotiates it for its own side. Refused (answered DONT/WONT, never raised):
a negotiation of any option we do not speak, 255 (EXOPL) included, which is
legal on the wire whatever we support.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from muxd.errors import LocalProtocolError, RemoteProtocolError
from muxd.protocol.line_settings import LineSettings
from muxd.protocol.rfc2217_events import (
    DECODERS,
    INBOUND_FLOW,
    INBOUND_FLOW_REQUESTS,
    OUTBOUND_FLOW,
    OUTBOUND_FLOW_REQUESTS,
    SETTING_FIELDS,
    ComPortCommand,
    ComPortOption,
    ConnectionClosed,
    Event,
    FlowControlResume,
    FlowControlSuspend,
    NotifyLinestate,
    NotifyModemstate,
    Purge,
    SetBaudrate,
    SetControl,
    SetDataSize,
    SetLinestateMask,
    SetModemstateMask,
    SetParity,
    SetStopSize,
    Signature,
    setting_of,
    settings_with,
)
from muxd.protocol.telnet import (
    BINARY,
    ECHO,
    SGA,
    Data,
    Negotiation,
    OptionNegotiator,
    Subnegotiation,
    TelnetParser,
    encode_subnegotiation,
    escape,
)

__all__ = [
    "COM_PORT_OPTION",
    "SETTING_FIELDS",
    "ComPortCommand",
    "ComPortOption",
    "ConnectionClosed",
    "Data",
    "Event",
    "FlowControlResume",
    "FlowControlSuspend",
    "NotifyLinestate",
    "NotifyModemstate",
    "Purge",
    "Rfc2217Client",
    "Rfc2217Server",
    "SetBaudrate",
    "SetControl",
    "SetDataSize",
    "SetLinestateMask",
    "SetModemstateMask",
    "SetParity",
    "SetStopSize",
    "Signature",
    "setting_of",
    "settings_with",
]

COM_PORT_OPTION = 44
SERVER_OFFSET = 100

# Negotiation answers queued since the last data_to_send(). A whole negotiation
# is a dozen 3-byte answers; a peer whose requests pile up past 1 KiB between two
# collections is flooding us, not negotiating.
MAX_PENDING_ANSWERS = 1024


class _Connection:
    """What client and server share: everything but their role's constants."""

    _RECEIVE_OFFSET: ClassVar[int]
    _SEND_OFFSET: ClassVar[int]
    _ACCEPT_LOCAL: ClassVar[tuple[int, ...]]
    _ACCEPT_REMOTE: ClassVar[tuple[int, ...]]
    _REQUEST: ClassVar[tuple[tuple[int, bool], ...]]  # (option, local) asked for on connect

    def __init__(self) -> None:
        self._parser = TelnetParser()
        self._options = OptionNegotiator(self._ACCEPT_LOCAL, self._ACCEPT_REMOTE)
        # Events of the input since the last next_events(): bounded by the size
        # of that input, which the caller bounds by its recv() size.
        self._events: list[Event] = []
        # Wire bytes for the peer, in order. What the peer causes is bounded by
        # MAX_PENDING_ANSWERS, what we send by the caller (module doc).
        self._outbox = bytearray()
        self._answered = 0  # negotiation answers queued since the last data_to_send()
        self._com_port: bool | None = None
        self._broken = False  # receive_data() raised RemoteProtocolError: no more input
        for option, local in self._REQUEST:
            self._outbox += self._options.request(option, local=local)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" when it closed. Events wait for next_events()."""
        if self._broken:
            raise RemoteProtocolError("RFC 2217: data received after an earlier error")
        queued = len(self._outbox)
        try:
            self._receive(data)
        except RemoteProtocolError:
            # Broken for good (module doc): none of this input's effects remain.
            self._broken = True
            self._events.clear()
            del self._outbox[queued:]
            raise

    def _receive(self, data: bytes) -> None:
        for event in self._parser.feed(data):
            if isinstance(event, Data):
                self._events.append(event)
            elif isinstance(event, Negotiation):
                self._negotiate(event)
            elif isinstance(event, Subnegotiation) and event.option == COM_PORT_OPTION:
                self._com_port_command(event.payload)
            # Other commands and other options' subnegotiations: dropped (module doc).
        if not data:
            self._events.append(ConnectionClosed())

    def next_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        """Everything queued for the peer, in order; the outbox is emptied."""
        out = bytes(self._outbox)
        self._outbox.clear()
        self._answered = 0
        return out

    def send(self, event: Data | ComPortCommand) -> None:
        """Queue an event of ours for the peer: data escaped, a command framed."""
        self._outbox += self._encode(event)

    def _encode(self, event: Data | ComPortCommand) -> bytes:
        if isinstance(event, Data):
            return escape(event.data)
        code = bytes((event.code + self._SEND_OFFSET,))
        return encode_subnegotiation(COM_PORT_OPTION, code + event._encode())

    def _negotiate(self, event: Negotiation) -> None:
        answer = self._options.receive(event)
        self._answered += len(answer)
        if self._answered > MAX_PENDING_ANSWERS:
            raise RemoteProtocolError("telnet: negotiation flood")
        self._outbox += answer
        if event.option == COM_PORT_OPTION:
            enabled = any(self._options.enabled(COM_PORT_OPTION, local=side) for side in (True, False))
            if enabled != self._com_port:
                self._com_port = enabled
                self._events.append(ComPortOption(enabled))

    def _com_port_command(self, payload: bytes) -> None:
        if not payload:
            return  # telnetcpcd's signature request: tolerated (module doc)
        decode = DECODERS.get(payload[0] - self._RECEIVE_OFFSET)
        if decode is not None:  # else unassigned or the other direction's code: tolerated
            self._events.append(decode(payload[1:]))


class Rfc2217Server(_Connection):
    """muxd's side of an rfc2217 listener connection.

    On connect it offers BINARY both ways, SGA and ECHO (so a plain telnet
    client goes to character mode and leaves echo to the device), and asks
    the client to do COM-PORT-OPTION, the RFC's direction. It also grants
    COM-PORT-OPTION on its own side: pyserial's client asks for both.
    """

    _RECEIVE_OFFSET = 0
    _SEND_OFFSET = SERVER_OFFSET
    _ACCEPT_LOCAL = (BINARY, SGA, ECHO, COM_PORT_OPTION)
    _ACCEPT_REMOTE = (BINARY, SGA, COM_PORT_OPTION)
    _REQUEST = ((BINARY, True), (BINARY, False), (SGA, True), (ECHO, True), (COM_PORT_OPTION, False))

    def _encode(self, event: Data | ComPortCommand) -> bytes:
        value_required = (SetBaudrate, SetDataSize, SetParity, SetStopSize, NotifyLinestate, NotifyModemstate)
        if isinstance(event, value_required) and event.value is None:
            raise LocalProtocolError(f"a server's {type(event).__name__} carries a value, not None")
        return super()._encode(event)

    def reply(self, request: ComPortCommand, settings: LineSettings) -> None:
        """Queue the answer RFC 2217 wants for a client's request; nothing when none is due.

        Line settings and flow control are answered with the value in
        ``settings``, the one in force, whatever was asked: that is how the
        client learns a change was refused. BREAK/DTR/RTS changes, masks and
        purges are echoed, as pyserial's PortManager does; pyserial's client
        fails to open unless the echo matches what it sent. No answer goes to
        BREAK/DTR/RTS queries (muxd tracks no such state), to suspend/resume,
        or to a signature; a signature request or a modem/line state poll
        needs data the caller has: answer it with ``send()``.
        """
        answer: ComPortCommand
        if isinstance(request, SetBaudrate):
            answer = SetBaudrate(settings.baudrate)
        elif isinstance(request, SetDataSize):
            answer = SetDataSize(settings.bytesize)
        elif isinstance(request, SetParity):
            answer = SetParity(settings.parity)
        elif isinstance(request, SetStopSize):
            answer = SetStopSize(settings.stopbits)
        elif isinstance(request, SetControl):
            if request.value in OUTBOUND_FLOW_REQUESTS:
                answer = SetControl(OUTBOUND_FLOW[settings.flow])
            elif request.value in INBOUND_FLOW_REQUESTS:
                answer = SetControl(INBOUND_FLOW[settings.flow])
            elif request.is_query:
                return
            else:
                answer = request
        elif isinstance(request, (SetLinestateMask, SetModemstateMask, Purge)):
            answer = request
        else:
            return
        self.send(answer)


class Rfc2217Client(_Connection):
    """muxd's side of an upstream K2 (or any RFC 2217 server) connection.

    On connect it offers and asks for BINARY and SGA and offers
    COM-PORT-OPTION (the RFC's direction). It refuses ECHO: a server that
    echoed our writes would put them into the device's output stream.
    """

    _RECEIVE_OFFSET = SERVER_OFFSET
    _SEND_OFFSET = 0
    _ACCEPT_LOCAL = (BINARY, SGA, COM_PORT_OPTION)
    _ACCEPT_REMOTE = (BINARY, SGA, COM_PORT_OPTION)
    _REQUEST = ((BINARY, True), (BINARY, False), (SGA, True), (SGA, False), (COM_PORT_OPTION, True))

    def _encode(self, event: Data | ComPortCommand) -> bytes:
        if isinstance(event, (NotifyLinestate, NotifyModemstate)) and event.value is not None:
            raise LocalProtocolError(f"a client's {type(event).__name__} is a poll: its value is None")
        return super()._encode(event)

    def configure(self, settings: LineSettings, fields: Iterable[str] = SETTING_FIELDS) -> None:
        """Queue requests for the line settings and the flow control named in
        ``fields`` (all of them by default, as pyserial sends on open), in the
        order of SETTING_FIELDS.

        All or nothing: settings RFC 2217 cannot express raise LocalProtocolError
        before anything is queued.
        """
        wanted = set(fields)
        self._outbox += b"".join(
            self._encode(request)
            for name, request in (
                ("baudrate", SetBaudrate(settings.baudrate)),
                ("bytesize", SetDataSize(settings.bytesize)),
                ("parity", SetParity(settings.parity)),
                ("stopbits", SetStopSize(settings.stopbits)),
                ("flow", SetControl(OUTBOUND_FLOW[settings.flow])),
            )
            if name in wanted
        )
