"""Fuzzing the RFC 2217 codecs, and the telnet parser under them (issue 15, "keep the attack").

Theory of operation: hypothesis builds peer input three ways and feeds it to a
fresh ``Rfc2217Server`` or ``Rfc2217Client``, cut at random points, the way
recv() would hand it over, then EOF:

- random bytes, drawn from an alphabet biased towards the telnet command bytes
  (IAC, SB, SE, the four verbs) and COM-PORT-OPTION's 44, since uniform bytes
  almost never form an IAC sequence;
- legal streams: data, negotiations of any option 0..255 (EXOPL included),
  telnet commands, COM-PORT commands of the peer's direction with valid values,
  tolerated COM-PORT codes and other options' subnegotiations. A legal
  stream must raise nothing at all: codecs refuse, rather than raise on, what
  a peer may legally send;
- structured mutations of legal streams: bytes inserted, deleted, replaced,
  slices duplicated or dropped, a truncation. Only RemoteProtocolError may
  escape, and once it has, the codec is broken: no events, and every later
  call raises RemoteProtocolError again.

Each call is also checked for bounded output: the answers it queues are at
most its input plus the two bytes of a negotiation begun in an earlier call,
and never past MAX_PENDING_ANSWERS; its events number at most one per input
byte (plus ConnectionClosed).

Size: ``MUXD_FUZZ_EXAMPLES`` examples per test, 300 by default so CI takes
seconds; ``make fuzz`` sets 1,000,000. ``deadline=None`` because a shared CI
core makes single examples slow now and then, which is not a failure.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muxd.errors import RemoteProtocolError
from muxd.protocol.rfc2217 import (
    COM_PORT_OPTION,
    MAX_PENDING_ANSWERS,
    ComPortCommand,
    ConnectionClosed,
    FlowControlResume,
    FlowControlSuspend,
    NotifyLinestate,
    NotifyModemstate,
    Purge,
    Rfc2217Client,
    Rfc2217Server,
    SetBaudrate,
    SetControl,
    SetDataSize,
    SetLinestateMask,
    SetModemstateMask,
    SetParity,
    SetStopSize,
    Signature,
)
from muxd.protocol.telnet import (
    DO,
    DONT,
    IAC,
    MAX_SUBNEGOTIATION,
    SB,
    SE,
    WILL,
    WONT,
    TelnetParser,
    encode_subnegotiation,
    escape,
)
from tests.helpers import sent, settled

EXAMPLES = int(os.environ.get("MUXD_FUZZ_EXAMPLES", "300"))
# pytest-timeout's 120 s (pyproject) fits the CI size; a long run gets time in
# proportion, at a pessimistic 50 examples a second (about 250 are measured).
pytestmark = pytest.mark.timeout(max(120, EXAMPLES // 50))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # The strategies build whole streams; hypothesis may find that slow on a busy core.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Codec = Rfc2217Server | Rfc2217Client
roles = st.sampled_from([Rfc2217Server, Rfc2217Client])

# -- random bytes ---------------------------------------------------------------------

SPECIAL = [IAC, SB, SE, WILL, WONT, DO, DONT, COM_PORT_OPTION, 0, 1, 2, 5, 12, 101, 112, 241]
byte = st.one_of(st.sampled_from(SPECIAL), st.integers(0, 255))
# Fragments of telnet syntax, so random streams reach deeper states than a first
# stray IAC SE would let them.
FRAGMENTS = [
    b"\xff",
    b"\xff\xff",
    b"\xff\xf0",
    b"\xff\xfa",
    b"\xff\xfa\x2c",
    b"\xff\xfb",
    b"\xff\xfd",
    b"\xff\xfc",
]
piece = st.one_of(byte.map(lambda b: bytes((b,))), st.sampled_from(FRAGMENTS))
noise = st.lists(piece, max_size=400).map(b"".join)
# Where recv() cuts the stream: offsets taken modulo its length.
cuts = st.lists(st.integers(0, 1 << 16), max_size=12)

# -- legal streams ----------------------------------------------------------------------

# Requests a client may send, with the values RFC 2217 allows. A client's
# notifications are polls (no value); a server's carry one.
client_requests = st.one_of(
    st.builds(Signature, st.one_of(st.none(), st.binary(min_size=1, max_size=200))),
    st.builds(SetBaudrate, st.one_of(st.none(), st.integers(1, 2**32 - 1))),
    st.builds(SetDataSize, st.sampled_from([None, 5, 6, 7, 8])),
    st.builds(SetParity, st.sampled_from([None, "N", "O", "E", "M", "S"])),
    st.builds(SetStopSize, st.sampled_from([None, 1, 1.5, 2])),
    st.builds(SetControl, st.integers(0, 19)),
    st.just(NotifyLinestate(None)),
    st.just(NotifyModemstate(None)),
    st.just(FlowControlSuspend()),
    st.just(FlowControlResume()),
    st.builds(SetLinestateMask, st.integers(0, 255)),
    st.builds(SetModemstateMask, st.integers(0, 255)),
    st.builds(Purge, st.integers(1, 3)),
)
server_answers = st.one_of(
    st.builds(Signature, st.one_of(st.none(), st.binary(min_size=1, max_size=200))),
    st.builds(SetBaudrate, st.integers(1, 2**32 - 1)),
    st.builds(SetDataSize, st.sampled_from([5, 6, 7, 8])),
    st.builds(SetParity, st.sampled_from(["N", "O", "E", "M", "S"])),
    st.builds(SetStopSize, st.sampled_from([1, 1.5, 2])),
    st.builds(SetControl, st.integers(0, 19)),
    st.builds(NotifyLinestate, st.integers(0, 255)),
    st.builds(NotifyModemstate, st.integers(0, 255)),
    st.just(FlowControlSuspend()),
    st.just(FlowControlResume()),
    st.builds(SetLinestateMask, st.integers(0, 255)),
    st.builds(SetModemstateMask, st.integers(0, 255)),
    st.builds(Purge, st.integers(1, 3)),
)


def _command_wire(command: ComPortCommand, receiver: type[Codec]) -> bytes:
    """The command as the receiver's peer puts it on the wire."""
    sender: Codec = Rfc2217Client() if receiver is Rfc2217Server else Rfc2217Server()
    return sent(settled(sender), command)  # its initial negotiation is not part of this token


data_tokens = st.binary(min_size=1, max_size=64).map(escape)
negotiation_tokens = st.builds(
    lambda verb, option: bytes((IAC, verb, option)),
    st.sampled_from([WILL, WONT, DO, DONT]),
    st.integers(0, 255),
)
# NOP .. GA: RFC 854's commands that stand alone.
command_tokens = st.integers(241, 249).map(lambda c: bytes((IAC, c)))
other_subnegotiations = st.builds(
    encode_subnegotiation,
    st.integers(0, 254).filter(lambda o: o != COM_PORT_OPTION),
    st.binary(max_size=MAX_SUBNEGOTIATION),
)
# COM-PORT payloads the codec tolerates whatever the role: empty (telnetcpcd's
# signature request) and codes RFC 2217 does not assign.
tolerated_com_port = st.one_of(
    st.just(b""),
    st.builds(lambda c, rest: bytes((c,)) + rest, st.integers(13, 99), st.binary(max_size=8)),
    st.builds(lambda c, rest: bytes((c,)) + rest, st.integers(113, 255), st.binary(max_size=8)),
).map(lambda payload: encode_subnegotiation(COM_PORT_OPTION, payload))


@st.composite
def legal_streams(draw: st.DrawFn, role: type[Codec]) -> list[bytes]:
    """Tokens of a stream a peer may legally send to ``role``. At most 40, so the
    negotiation answers (3 bytes each) stay far below MAX_PENDING_ANSWERS."""
    commands = (client_requests if role is Rfc2217Server else server_answers).map(
        lambda c: _command_wire(c, role)
    )
    # The other direction's codes, whatever their payload: tolerated too.
    low = 100 if role is Rfc2217Server else 0
    wrong_direction = st.builds(
        lambda code, rest: encode_subnegotiation(COM_PORT_OPTION, bytes((code,)) + rest),
        st.integers(low, low + 12),
        st.binary(max_size=8),
    )
    token = st.one_of(
        data_tokens,
        negotiation_tokens,
        command_tokens,
        other_subnegotiations,
        tolerated_com_port,
        wrong_direction,
        commands,
    )
    return draw(st.lists(token, max_size=40))


# -- mutations ----------------------------------------------------------------------------

mutation = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), byte),
    st.tuples(st.just("replace"), st.integers(0, 1 << 16), byte),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 8)),
    st.tuples(st.just("duplicate"), st.integers(0, 1 << 16), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.just(0)),
)


def mutate(wire: bytes, mutations: Sequence[tuple[str, int, int]]) -> bytes:
    buf = bytearray(wire)
    for kind, where, arg in mutations:
        at = where % (len(buf) + 1)
        if kind == "insert":
            buf[at:at] = bytes((arg,))
        elif kind == "replace" and at < len(buf):
            buf[at] = arg
        elif kind == "delete":
            del buf[at : at + arg]
        elif kind == "duplicate":
            buf[at:at] = buf[at : at + arg]
        elif kind == "truncate":
            del buf[at:]
    return bytes(buf)


# -- the properties ------------------------------------------------------------------------


def chunks_of(wire: bytes, points: Sequence[int]) -> list[bytes]:
    bounds = sorted({0, len(wire), *(p % (len(wire) + 1) for p in points)})
    return [wire[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def feed(codec: Codec, chunks: Sequence[bytes]) -> RemoteProtocolError | None:
    """Feed ``chunks`` then EOF, checking every call's output bound; the peer error if any.

    Anything but RemoteProtocolError propagates and fails the test: that is an
    internal error in muxd.
    """
    for chunk in [*chunks, b""]:
        try:
            codec.receive_data(chunk)
        except RemoteProtocolError as exc:
            return exc
        events = codec.next_events()
        out = codec.data_to_send()
        # 3 answer bytes per 3-byte negotiation; one begun in the previous call
        # can complete here with a single byte.
        assert len(out) <= min(len(chunk) + 2, MAX_PENDING_ANSWERS), (chunk, out)
        assert len(events) <= len(chunk) + (0 if chunk else 1), (chunk, events)
        if not chunk:
            assert events[-1:] == [ConnectionClosed()]
    return None


def check_broken(codec: Codec) -> None:
    assert codec.next_events() == []
    assert codec.data_to_send() == b""
    for later in (b"x", b"\xff\xfb\x00", b""):
        try:
            codec.receive_data(later)
        except RemoteProtocolError as exc:
            assert "after an earlier error" in str(exc)
        else:
            raise AssertionError("a broken codec took more input")


@FUZZ
@given(roles, noise, cuts)
def test_random_bytes_raise_only_remote_errors(role: type[Codec], wire: bytes, points: list[int]) -> None:
    codec = role()
    codec.data_to_send()
    if feed(codec, chunks_of(wire, points)) is not None:
        check_broken(codec)


@FUZZ
@given(st.data(), roles, cuts)
def test_legal_streams_never_raise(data: st.DataObject, role: type[Codec], points: list[int]) -> None:
    wire = b"".join(data.draw(legal_streams(role)))
    codec = role()
    codec.data_to_send()
    error = feed(codec, chunks_of(wire, points))
    assert error is None, (wire, error)


@FUZZ
@given(st.data(), roles, st.lists(mutation, min_size=1, max_size=6), cuts)
def test_mutated_streams_raise_only_remote_errors(
    data: st.DataObject, role: type[Codec], mutations: list[tuple[str, int, int]], points: list[int]
) -> None:
    wire = mutate(b"".join(data.draw(legal_streams(role))), mutations)
    codec = role()
    codec.data_to_send()
    if feed(codec, chunks_of(wire, points)) is not None:
        check_broken(codec)


@FUZZ
@given(noise, cuts)
def test_telnet_parser_raises_only_remote_errors(wire: bytes, points: list[int]) -> None:
    parser = TelnetParser()
    try:
        for chunk in [*chunks_of(wire, points), b""]:
            events = parser.feed(chunk)
            assert len(events) <= len(chunk)
    except RemoteProtocolError:
        try:
            parser.feed(b"x")
        except RemoteProtocolError as exc:
            assert "after an earlier error" in str(exc)
        else:
            raise AssertionError("a broken parser took more input") from None
