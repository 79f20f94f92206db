"""Telnet (RFC 854/855) stream codec and option negotiation, sans-I/O.

Theory of operation: ``TelnetParser.feed(data)`` runs a byte-level state
machine over the incoming stream and returns events: ``Data`` (with IAC IAC
already turned back into one 0xFF), ``Negotiation`` (WILL/WONT/DO/DONT and the
option code), ``Subnegotiation`` (IAC SB option ... IAC SE, payload
unescaped) and ``Command`` (NOP, BRK, AYT, ...). The state survives between
calls, so a stream split at any byte boundary gives the same events; only the
way ``Data`` is cut into pieces may differ. ``feed(b"")`` means the peer
closed. The state machine is the table ``_TABLE``: for each state, what a byte
does and which state follows; runs of plain bytes take a fast path.

Errors, as in h11: a peer's garbage raises RemoteProtocolError and breaks the
parser for good. The events of the failed call are discarded, and every later
``feed()`` raises RemoteProtocolError at once: a stream that lost its framing
cannot be trusted to find it again, so the caller closes that peer.

Option 255. In a negotiation the option code is one plain byte, never doubled
(RFC 854/855), so ``IAC WILL 255`` is EXOPL (RFC 861), a legal request that is
refused like any unknown option (``IAC DONT 255``). After ``IAC SB`` the byte
255 would open an EXOPL subnegotiation, which RFC 861 allows only once both
sides agreed to EXOPL; we never do, so there it is the peer's error.

``OptionNegotiator`` answers WILL/WONT/DO/DONT by RFC 1143's "Q method", which
can never loop: it only answers a request that changes an option's state, and
it never asks to turn an option off. An option it does not accept is refused
once per request.

CR handling: none. Data passes through untouched in both directions, as in
BINARY mode, whatever was negotiated. muxd asks for BINARY both ways and RFC
2217 peers grant it; a plain telnet client that refuses it sends Enter as
CR NUL or CR LF, and the device gets exactly that.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from muxd.errors import LocalProtocolError, RemoteProtocolError

# Commands (RFC 854).
SE = 240
NOP = 241
DM = 242
BRK = 243
IP = 244
AO = 245
AYT = 246
EC = 247
EL = 248
GA = 249
SB = 250
WILL = 251
WONT = 252
DO = 253
DONT = 254
IAC = 255

# Options muxd speaks.
BINARY = 0
ECHO = 1
SGA = 3
# Not spoken, but legal on the wire: RFC 861's extended options list, refused.
EXOPL = 255

# Longest subnegotiation payload held. The longest message muxd understands is
# an RFC 2217 SIGNATURE, a short product string ("ser2net 4.3"); everything else
# is at most 8 bytes (sredird's SET-BAUDRATE answer). 256 leaves ample room and
# keeps a peer that never sends IAC SE from making us hold memory without end.
MAX_SUBNEGOTIATION = 256


@dataclass(frozen=True)
class Data:
    data: bytes


@dataclass(frozen=True)
class Negotiation:
    command: int  # WILL, WONT, DO or DONT
    option: int


@dataclass(frozen=True)
class Subnegotiation:
    option: int
    payload: bytes


@dataclass(frozen=True)
class Command:
    command: int  # any command but SB, SE and the negotiations


TelnetEvent = Data | Negotiation | Subnegotiation | Command


def escape(data: bytes) -> bytes:
    """Data as it goes on the wire: every 0xFF doubled."""
    return data.replace(b"\xff", b"\xff\xff")


def encode_negotiation(command: int, option: int) -> bytes:
    # The option is a plain byte: 255 (EXOPL) goes out as it is, not doubled
    # (RFC 854's "IAC WILL <option code>"), so every byte value is an option.
    if command not in (WILL, WONT, DO, DONT) or not 0 <= option <= 255:
        raise LocalProtocolError(f"not a telnet negotiation: {command} {option}")
    return bytes((IAC, command, option))


def encode_subnegotiation(option: int, payload: bytes) -> bytes:
    # The parser rejects option 255 (IAC) after SB, so we never send it either.
    if not 0 <= option < IAC:
        raise LocalProtocolError(f"not a telnet option: {option}")
    return bytes((IAC, SB, option)) + escape(payload) + bytes((IAC, SE))


class _State(enum.Enum):
    DATA = enum.auto()
    IAC = enum.auto()  # after IAC
    NEGOTIATE = enum.auto()  # after IAC WILL/WONT/DO/DONT: the option follows
    SB_OPTION = enum.auto()  # after IAC SB: the option follows
    SB_DATA = enum.auto()  # inside a subnegotiation payload
    SB_IAC = enum.auto()  # after IAC inside a subnegotiation


_Action = Callable[["TelnetParser", int], None]


def _skip(parser: TelnetParser, byte: int) -> None:
    pass


def _data(parser: TelnetParser, byte: int) -> None:
    parser._data.append(byte)


def _command(parser: TelnetParser, byte: int) -> None:
    parser._emit(Command(byte))


def _verb(parser: TelnetParser, byte: int) -> None:
    parser._verb = byte


def _negotiate(parser: TelnetParser, byte: int) -> None:
    parser._emit(Negotiation(parser._verb, byte))


def _sb_begin(parser: TelnetParser, byte: int) -> None:
    parser._option = byte
    parser._payload.clear()


def _sb_data(parser: TelnetParser, byte: int) -> None:
    parser._sb_append(bytes((byte,)))


def _sb_end(parser: TelnetParser, byte: int) -> None:
    parser._emit(Subnegotiation(parser._option, bytes(parser._payload)))
    parser._payload.clear()


def _reject(why: str, parser: TelnetParser, byte: int) -> None:
    raise RemoteProtocolError(f"telnet: {why} (byte {byte})")


_S = _State
_ANY = -1  # the key of a state's default row

# state -> {byte or _ANY: (action, next state)}
_TABLE: dict[_State, dict[int, tuple[_Action, _State]]] = {
    _S.DATA: {IAC: (_skip, _S.IAC), _ANY: (_data, _S.DATA)},
    _S.IAC: {
        IAC: (_data, _S.DATA),
        SB: (_skip, _S.SB_OPTION),
        SE: (partial(_reject, "IAC SE outside a subnegotiation"), _S.DATA),
        WILL: (_verb, _S.NEGOTIATE),
        WONT: (_verb, _S.NEGOTIATE),
        DO: (_verb, _S.NEGOTIATE),
        DONT: (_verb, _S.NEGOTIATE),
        _ANY: (_command, _S.DATA),
    },
    _S.NEGOTIATE: {_ANY: (_negotiate, _S.DATA)},
    _S.SB_OPTION: {
        # 255 here would be EXOPL's subnegotiation, legal only once agreed: never (module doc).
        IAC: (partial(_reject, "IAC where a subnegotiation option belongs (EXOPL was not agreed)"), _S.DATA),
        _ANY: (_sb_begin, _S.SB_DATA),
    },
    _S.SB_DATA: {IAC: (_skip, _S.SB_IAC), _ANY: (_sb_data, _S.SB_DATA)},
    _S.SB_IAC: {
        IAC: (_sb_data, _S.SB_DATA),
        SE: (_sb_end, _S.DATA),
        _ANY: (partial(_reject, "telnet command inside a subnegotiation"), _S.DATA),
    },
}


class TelnetParser:
    """Incoming telnet stream -> events. Feed bytes; ``feed(b"")`` is EOF."""

    def __init__(self) -> None:
        self._state = _State.DATA
        self._verb = 0
        self._option = 0
        # Bounded by MAX_SUBNEGOTIATION.
        self._payload = bytearray()
        # Plain data of the current feed; bounded by the size of that feed.
        self._data = bytearray()
        self._events: list[TelnetEvent] = []
        self._closed = False
        self._broken = False  # a RemoteProtocolError was raised: refuse all input

    def feed(self, data: bytes) -> list[TelnetEvent]:
        """Events of ``data``; raises RemoteProtocolError on garbage, and after it."""
        if self._broken:
            raise RemoteProtocolError("telnet: data received after an earlier error")
        if self._closed:
            raise LocalProtocolError("telnet: data fed after EOF")
        try:
            return self._feed(data)
        except RemoteProtocolError:
            # Broken for good (module doc): nothing of this call comes out.
            self._broken = True
            self._events.clear()
            self._data.clear()
            self._payload.clear()
            raise

    def _feed(self, data: bytes) -> list[TelnetEvent]:
        if not data:
            self._closed = True
            if self._state is not _State.DATA:
                raise RemoteProtocolError("telnet: connection closed inside a telnet command")
            return []
        view = memoryview(data)
        i = 0
        while i < len(data):
            # Fast path: a run of bytes without IAC is data (or payload) as it is.
            if self._state is _State.DATA or self._state is _State.SB_DATA:
                end = data.find(b"\xff", i)
                if end < 0:
                    end = len(data)
                if end > i:
                    if self._state is _State.DATA:
                        self._data += view[i:end]
                    else:
                        self._sb_append(view[i:end])
                    i = end
                    continue
            row = _TABLE[self._state]
            action, self._state = row.get(data[i]) or row[_ANY]
            action(self, data[i])
            i += 1
        self._flush()
        events, self._events = self._events, []
        return events

    def _emit(self, event: TelnetEvent) -> None:
        self._flush()
        self._events.append(event)

    def _flush(self) -> None:
        if self._data:
            self._events.append(Data(bytes(self._data)))
            self._data.clear()

    def _sb_append(self, chunk: bytes | memoryview) -> None:
        if len(self._payload) + len(chunk) > MAX_SUBNEGOTIATION:
            raise RemoteProtocolError(
                f"telnet: subnegotiation of option {self._option} longer than {MAX_SUBNEGOTIATION} bytes"
            )
        self._payload += chunk


class _Q(enum.Enum):
    """RFC 1143 option states. WANTNO is absent: we never ask to turn an option off."""

    NO = enum.auto()
    YES = enum.auto()
    WANTYES = enum.auto()


# Verbs per side of an option: (the peer's yes, the peer's no, our yes, our no).
# "local" is an option we perform (peer says DO, we say WILL); "remote" one the peer does.
_LOCAL = (DO, DONT, WILL, WONT)
_REMOTE = (WILL, WONT, DO, DONT)


class OptionNegotiator:
    """Answers WILL/WONT/DO/DONT for the options we accept; refuses the rest.

    ``local`` are the options we agree to perform ourselves (we answer DO with
    WILL), ``remote`` those we let the peer perform (we answer WILL with DO).
    """

    def __init__(self, local: Iterable[int], remote: Iterable[int]) -> None:
        # At most 256 entries each: one per option code we accept.
        self._us = dict.fromkeys(local, _Q.NO)
        self._him = dict.fromkeys(remote, _Q.NO)

    def request(self, option: int, *, local: bool) -> bytes:
        """Ask to turn an accepted option on: the bytes to send (b"" if already on or asked)."""
        states, verbs = (self._us, _LOCAL) if local else (self._him, _REMOTE)
        if option not in states:
            raise LocalProtocolError(f"telnet: option {option} is not one we accept")
        if states[option] is not _Q.NO:
            return b""
        states[option] = _Q.WANTYES
        return encode_negotiation(verbs[2], option)

    def receive(self, event: Negotiation) -> bytes:
        """Update the option's state; return the answer to send, often b""."""
        local = event.command in (DO, DONT)
        states, verbs = (self._us, _LOCAL) if local else (self._him, _REMOTE)
        yes = event.command == verbs[0]
        state = states.get(event.option)
        if state is None:
            return encode_negotiation(verbs[3], event.option) if yes else b""
        if yes:
            states[event.option] = _Q.YES
            return encode_negotiation(verbs[2], event.option) if state is _Q.NO else b""
        states[event.option] = _Q.NO
        return encode_negotiation(verbs[3], event.option) if state is _Q.YES else b""

    def enabled(self, option: int, *, local: bool) -> bool:
        states = self._us if local else self._him
        return states.get(option) is _Q.YES
