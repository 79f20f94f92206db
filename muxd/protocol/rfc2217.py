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

import dataclasses
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from muxd.errors import LocalProtocolError, RemoteProtocolError
from muxd.protocol.line_settings import LineSettings
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
]

COM_PORT_OPTION = 44
SERVER_OFFSET = 100

# Negotiation answers queued since the last data_to_send(). A whole negotiation
# is a dozen 3-byte answers; a peer whose requests pile up past 1 KiB between two
# collections is flooding us, not negotiating.
MAX_PENDING_ANSWERS = 1024

_T = TypeVar("_T")


def _one_byte(payload: bytes, what: str) -> int:
    if len(payload) != 1:
        raise RemoteProtocolError(f"RFC 2217: {what} takes 1 byte, got {len(payload)}")
    return payload[0]


def _encode_choice(value: _T | None, codes: Mapping[_T, int], what: str) -> bytes:
    if value is None:
        return b"\x00"
    if value not in codes:
        raise LocalProtocolError(f"RFC 2217 cannot express {what} {value!r}")
    return bytes((codes[value],))


def _decode_choice(payload: bytes, codes: Mapping[_T, int], what: str) -> _T | None:
    code = _one_byte(payload, what)
    if code == 0:
        return None
    for value, known in codes.items():
        if known == code:
            return value
    raise RemoteProtocolError(f"RFC 2217: {what} code {code} out of range")


def _encode_byte(value: int, what: str, top: int = 255) -> bytes:
    if not 0 <= value <= top:
        raise LocalProtocolError(f"RFC 2217: {what} {value} out of range")
    return bytes((value,))


def _decode_byte(payload: bytes, what: str, low: int = 0, top: int = 255) -> int:
    value = _one_byte(payload, what)
    if not low <= value <= top:
        raise RemoteProtocolError(f"RFC 2217: {what} {value} out of range")
    return value


_DATASIZES = {5: 5, 6: 6, 7: 7, 8: 8}
_PARITIES = {"N": 1, "O": 2, "E": 3, "M": 4, "S": 5}
_STOPBITS: dict[float, int] = {1: 1, 2: 2, 1.5: 3}


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed its side (receive_data(b""))."""


@dataclass(frozen=True)
class ComPortOption:
    """The peer agreed to (True) or refused (False) COM-PORT-OPTION.

    Emitted when the answer first arrives and whenever it changes. Either
    direction counts, as in pyserial: some peers only negotiate one.
    """

    enabled: bool


@dataclass(frozen=True)
class Signature:
    """SIGNATURE: the sender's product text; None asks the peer for its own."""

    text: bytes | None
    code: ClassVar[int] = 0

    def _encode(self) -> bytes:
        if self.text == b"":
            raise LocalProtocolError("RFC 2217: an empty signature means a request; send Signature(None)")
        return self.text or b""

    @classmethod
    def _decode(cls, payload: bytes) -> Signature:
        return cls(payload or None)


@dataclass(frozen=True)
class SetBaudrate:
    value: int | None  # None: query
    code: ClassVar[int] = 1

    def _encode(self) -> bytes:
        if self.value is not None and not 0 < self.value < 2**32:
            raise LocalProtocolError(f"RFC 2217: baud rate {self.value} out of range")
        return struct.pack("!I", self.value or 0)

    @classmethod
    def _decode(cls, payload: bytes) -> SetBaudrate:
        # sredird answers with 4 extra NUL bytes after the value (pyserial's notes).
        if len(payload) < 4 or any(payload[4:]):
            raise RemoteProtocolError(f"RFC 2217: SET-BAUDRATE takes 4 bytes, got {payload.hex()}")
        (value,) = struct.unpack("!I", payload[:4])
        return cls(value or None)


@dataclass(frozen=True)
class SetDataSize:
    value: int | None  # 5..8; None: query
    code: ClassVar[int] = 2

    def _encode(self) -> bytes:
        return _encode_choice(self.value, _DATASIZES, "data size")

    @classmethod
    def _decode(cls, payload: bytes) -> SetDataSize:
        return cls(_decode_choice(payload, _DATASIZES, "data size"))


@dataclass(frozen=True)
class SetParity:
    value: str | None  # pyserial's letter: N O E M S; None: query
    code: ClassVar[int] = 3

    def _encode(self) -> bytes:
        return _encode_choice(self.value, _PARITIES, "parity")

    @classmethod
    def _decode(cls, payload: bytes) -> SetParity:
        return cls(_decode_choice(payload, _PARITIES, "parity"))


@dataclass(frozen=True)
class SetStopSize:
    value: float | None  # 1, 1.5 or 2; None: query
    code: ClassVar[int] = 4

    def _encode(self) -> bytes:
        return _encode_choice(self.value, _STOPBITS, "stop size")

    @classmethod
    def _decode(cls, payload: bytes) -> SetStopSize:
        return cls(_decode_choice(payload, _STOPBITS, "stop size"))


@dataclass(frozen=True)
class SetControl:
    """SET-CONTROL with its raw value (RFC 2217 defines 0..19); properties give the meaning."""

    value: int
    code: ClassVar[int] = 5

    FLOW_QUERY: ClassVar[int] = 0  # outbound/both
    FLOW_NONE: ClassVar[int] = 1
    FLOW_XONXOFF: ClassVar[int] = 2
    FLOW_RTSCTS: ClassVar[int] = 3
    BREAK_QUERY: ClassVar[int] = 4
    BREAK_ON: ClassVar[int] = 5
    BREAK_OFF: ClassVar[int] = 6
    DTR_QUERY: ClassVar[int] = 7
    DTR_ON: ClassVar[int] = 8
    DTR_OFF: ClassVar[int] = 9
    RTS_QUERY: ClassVar[int] = 10
    RTS_ON: ClassVar[int] = 11
    RTS_OFF: ClassVar[int] = 12
    INBOUND_FLOW_QUERY: ClassVar[int] = 13
    INBOUND_FLOW_NONE: ClassVar[int] = 14
    INBOUND_FLOW_XONXOFF: ClassVar[int] = 15
    INBOUND_FLOW_RTSCTS: ClassVar[int] = 16
    FLOW_DCD: ClassVar[int] = 17  # outbound/both
    INBOUND_FLOW_DTR: ClassVar[int] = 18
    FLOW_DSR: ClassVar[int] = 19  # outbound/both

    @property
    def is_query(self) -> bool:
        return self.value in (
            self.FLOW_QUERY,
            self.BREAK_QUERY,
            self.DTR_QUERY,
            self.RTS_QUERY,
            self.INBOUND_FLOW_QUERY,
        )

    @property
    def flow(self) -> str | None:
        """The outbound/both flow control set, as LineSettings.flow; None if not such a set."""
        return {1: "none", 2: "xonxoff", 3: "rtscts"}.get(self.value)

    @property
    def break_state(self) -> bool | None:
        return {5: True, 6: False}.get(self.value)

    @property
    def dtr(self) -> bool | None:
        return {8: True, 9: False}.get(self.value)

    @property
    def rts(self) -> bool | None:
        return {11: True, 12: False}.get(self.value)

    def _encode(self) -> bytes:
        return _encode_byte(self.value, "SET-CONTROL value", 19)

    @classmethod
    def _decode(cls, payload: bytes) -> SetControl:
        return cls(_decode_byte(payload, "SET-CONTROL value", top=19))


# The LineSettings fields RFC 2217 carries, in the order a client sends them.
SETTING_FIELDS = ("baudrate", "bytesize", "parity", "stopbits", "flow")

_OUTBOUND_FLOW = {
    "none": SetControl.FLOW_NONE,
    "xonxoff": SetControl.FLOW_XONXOFF,
    "rtscts": SetControl.FLOW_RTSCTS,
}
_INBOUND_FLOW = {
    "none": SetControl.INBOUND_FLOW_NONE,
    "xonxoff": SetControl.INBOUND_FLOW_XONXOFF,
    "rtscts": SetControl.INBOUND_FLOW_RTSCTS,
}

# SET-CONTROL values about flow control, answered with the flow in force.
_OUTBOUND_FLOW_REQUESTS = {
    SetControl.FLOW_QUERY,
    SetControl.FLOW_DCD,
    SetControl.FLOW_DSR,
    *_OUTBOUND_FLOW.values(),
}
_INBOUND_FLOW_REQUESTS = {SetControl.INBOUND_FLOW_QUERY, SetControl.INBOUND_FLOW_DTR, *_INBOUND_FLOW.values()}


@dataclass(frozen=True)
class NotifyLinestate:
    value: int | None  # None: a client's poll
    code: ClassVar[int] = 6

    def _encode(self) -> bytes:
        return b"" if self.value is None else _encode_byte(self.value, "line state")

    @classmethod
    def _decode(cls, payload: bytes) -> NotifyLinestate:
        return cls(_decode_byte(payload, "line state") if payload else None)


@dataclass(frozen=True)
class NotifyModemstate:
    value: int | None  # None: a client's poll (pyserial's poll_modem sends one)
    code: ClassVar[int] = 7

    CD: ClassVar[int] = 0x80
    RI: ClassVar[int] = 0x40
    DSR: ClassVar[int] = 0x20
    CTS: ClassVar[int] = 0x10
    DELTA_CD: ClassVar[int] = 0x08
    TRAILING_RI: ClassVar[int] = 0x04
    DELTA_DSR: ClassVar[int] = 0x02
    DELTA_CTS: ClassVar[int] = 0x01

    def _encode(self) -> bytes:
        return b"" if self.value is None else _encode_byte(self.value, "modem state")

    @classmethod
    def _decode(cls, payload: bytes) -> NotifyModemstate:
        return cls(_decode_byte(payload, "modem state") if payload else None)


@dataclass(frozen=True)
class FlowControlSuspend:
    """The sender cannot take more data for now."""

    code: ClassVar[int] = 8

    def _encode(self) -> bytes:
        return b""

    @classmethod
    def _decode(cls, payload: bytes) -> FlowControlSuspend:
        if payload:
            raise RemoteProtocolError("RFC 2217: FLOWCONTROL-SUSPEND takes no value")
        return cls()


@dataclass(frozen=True)
class FlowControlResume:
    code: ClassVar[int] = 9

    def _encode(self) -> bytes:
        return b""

    @classmethod
    def _decode(cls, payload: bytes) -> FlowControlResume:
        if payload:
            raise RemoteProtocolError("RFC 2217: FLOWCONTROL-RESUME takes no value")
        return cls()


@dataclass(frozen=True)
class SetLinestateMask:
    value: int  # 0 is a real mask here, not a query
    code: ClassVar[int] = 10

    def _encode(self) -> bytes:
        return _encode_byte(self.value, "line state mask")

    @classmethod
    def _decode(cls, payload: bytes) -> SetLinestateMask:
        return cls(_decode_byte(payload, "line state mask"))


@dataclass(frozen=True)
class SetModemstateMask:
    value: int
    code: ClassVar[int] = 11

    def _encode(self) -> bytes:
        return _encode_byte(self.value, "modem state mask")

    @classmethod
    def _decode(cls, payload: bytes) -> SetModemstateMask:
        return cls(_decode_byte(payload, "modem state mask"))


@dataclass(frozen=True)
class Purge:
    value: int  # RECEIVE, TRANSMIT or BOTH
    code: ClassVar[int] = 12

    RECEIVE: ClassVar[int] = 1
    TRANSMIT: ClassVar[int] = 2
    BOTH: ClassVar[int] = 3

    def _encode(self) -> bytes:
        if not 1 <= self.value <= 3:
            raise LocalProtocolError(f"RFC 2217: PURGE-DATA {self.value} out of range")
        return bytes((self.value,))

    @classmethod
    def _decode(cls, payload: bytes) -> Purge:
        return cls(_decode_byte(payload, "PURGE-DATA value", 1, 3))


ComPortCommand = (
    Signature
    | SetBaudrate
    | SetDataSize
    | SetParity
    | SetStopSize
    | SetControl
    | NotifyLinestate
    | NotifyModemstate
    | FlowControlSuspend
    | FlowControlResume
    | SetLinestateMask
    | SetModemstateMask
    | Purge
)
Event = Data | ConnectionClosed | ComPortOption | ComPortCommand

_DECODERS: dict[int, Callable[[bytes], ComPortCommand]] = {
    Signature.code: Signature._decode,
    SetBaudrate.code: SetBaudrate._decode,
    SetDataSize.code: SetDataSize._decode,
    SetParity.code: SetParity._decode,
    SetStopSize.code: SetStopSize._decode,
    SetControl.code: SetControl._decode,
    NotifyLinestate.code: NotifyLinestate._decode,
    NotifyModemstate.code: NotifyModemstate._decode,
    FlowControlSuspend.code: FlowControlSuspend._decode,
    FlowControlResume.code: FlowControlResume._decode,
    SetLinestateMask.code: SetLinestateMask._decode,
    SetModemstateMask.code: SetModemstateMask._decode,
    Purge.code: Purge._decode,
}


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
        decode = _DECODERS.get(payload[0] - self._RECEIVE_OFFSET)
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
            if request.value in _OUTBOUND_FLOW_REQUESTS:
                answer = SetControl(_OUTBOUND_FLOW[settings.flow])
            elif request.value in _INBOUND_FLOW_REQUESTS:
                answer = SetControl(_INBOUND_FLOW[settings.flow])
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
                ("flow", SetControl(_OUTBOUND_FLOW[settings.flow])),
            )
            if name in wanted
        )


def setting_of(command: Event) -> tuple[str, Any] | None:
    """The line setting a command carries, as (LineSettings field, value), or
    None when it carries none (a query, a mask, BREAK/DTR/RTS, a purge, data)."""
    if isinstance(command, SetBaudrate) and command.value is not None:
        return "baudrate", command.value
    if isinstance(command, SetDataSize) and command.value is not None:
        return "bytesize", command.value
    if isinstance(command, SetParity) and command.value is not None:
        return "parity", command.value
    if isinstance(command, SetStopSize) and command.value is not None:
        return "stopbits", command.value
    if isinstance(command, SetControl) and command.flow is not None:
        return "flow", command.flow
    return None


def settings_with(settings: LineSettings, command: Event) -> LineSettings | None:
    """The line settings with the one this command carries, or None when it
    carries none (a query, a mask, BREAK/DTR/RTS, a purge, data). Both sides
    use it: a server for what a client asks, a client for what the server says
    is in force."""
    carried = setting_of(command)
    if carried is None:
        return None
    return dataclasses.replace(settings, **{carried[0]: carried[1]})
