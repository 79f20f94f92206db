"""RFC 2217's COM-PORT-OPTION commands as events: one frozen dataclass per
command of the RFC, each encoding its own payload and decoding a peer's with
range checks, sans-I/O. muxd.protocol.rfc2217 frames them (telnet
subnegotiations of option 44) and runs the negotiation; its docstring has the
theory. A value of None is the RFC's 0, "tell me the current value".

A payload of the wrong length or a value outside the RFC's range is a
RemoteProtocolError (acting on a guess would reconfigure a device many readers
share); a value of ours out of range is a LocalProtocolError.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from muxd.errors import LocalProtocolError, RemoteProtocolError
from muxd.protocol.line_settings import LineSettings
from muxd.protocol.telnet import Data

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

OUTBOUND_FLOW = {
    "none": SetControl.FLOW_NONE,
    "xonxoff": SetControl.FLOW_XONXOFF,
    "rtscts": SetControl.FLOW_RTSCTS,
}
INBOUND_FLOW = {
    "none": SetControl.INBOUND_FLOW_NONE,
    "xonxoff": SetControl.INBOUND_FLOW_XONXOFF,
    "rtscts": SetControl.INBOUND_FLOW_RTSCTS,
}

# SET-CONTROL values about flow control, answered with the flow in force.
OUTBOUND_FLOW_REQUESTS = {
    SetControl.FLOW_QUERY,
    SetControl.FLOW_DCD,
    SetControl.FLOW_DSR,
    *OUTBOUND_FLOW.values(),
}
INBOUND_FLOW_REQUESTS = {SetControl.INBOUND_FLOW_QUERY, SetControl.INBOUND_FLOW_DTR, *INBOUND_FLOW.values()}


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

DECODERS: dict[int, Callable[[bytes], ComPortCommand]] = {
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
