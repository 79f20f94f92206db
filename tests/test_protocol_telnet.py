"""The telnet codec, byte by byte, without sockets."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muxd.errors import LocalProtocolError, RemoteProtocolError
from muxd.protocol.telnet import (
    AYT,
    BINARY,
    BRK,
    DO,
    DONT,
    EXOPL,
    IAC,
    MAX_SUBNEGOTIATION,
    NOP,
    SB,
    SE,
    SGA,
    WILL,
    WONT,
    Command,
    Data,
    Negotiation,
    OptionNegotiator,
    Subnegotiation,
    TelnetEvent,
    TelnetParser,
    encode_negotiation,
    encode_subnegotiation,
    escape,
)
from tests import helpers
from tests.helpers import TRAILING, cut, feeds, splits


def merge_data(events: Sequence[TelnetEvent]) -> list[TelnetEvent]:
    """Data may come in any number of pieces; only its concatenation is defined."""
    return helpers.merge_data(events, Data)


def parse(chunks: Sequence[bytes]) -> list[TelnetEvent]:
    parser = TelnetParser()
    events: list[TelnetEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    assert parser.feed(b"") == []
    return merge_data(events)


VECTORS: list[tuple[bytes, list[TelnetEvent]]] = [
    (b"hello\r\n", [Data(b"hello\r\n")]),
    (b"a\xff\xffb", [Data(b"a\xffb")]),
    (b"\xff\xff\xff\xff", [Data(b"\xff\xff")]),
    (b"\xff\xfb\x00", [Negotiation(WILL, BINARY)]),
    (b"\xff\xfb\xff", [Negotiation(WILL, EXOPL)]),  # option 255 is not doubled
    (b"\xff\xfd\xffa\xff\xff", [Negotiation(DO, EXOPL), Data(b"a\xff")]),
    (b"x\xff\xfe\x03y", [Data(b"x"), Negotiation(DONT, SGA), Data(b"y")]),
    (b"\xff\xfa\x2c\x01\x00\x01\xc2\x00\xff\xf0", [Subnegotiation(44, b"\x01\x00\x01\xc2\x00")]),
    (b"\xff\xfa\x2c\x01\xff\xff\x00\xff\xf0", [Subnegotiation(44, b"\x01\xff\x00")]),
    (b"\xff\xfa\x18\xff\xf0", [Subnegotiation(24, b"")]),
    (b"\xff\xf1\xff\xf6\xff\xf3", [Command(NOP), Command(AYT), Command(BRK)]),
    (
        b"\xff\xfd\x2cok\xff\xfa\x2c\x65\xff\xff\xff\xf0\xff\xff",
        [Negotiation(DO, 44), Data(b"ok"), Subnegotiation(44, b"\x65\xff"), Data(b"\xff")],
    ),
]


@pytest.mark.parametrize(("wire", "expected"), VECTORS)
def test_vectors_at_every_split(wire: bytes, expected: list[TelnetEvent]) -> None:
    for chunks in splits(wire):
        assert parse(chunks) == expected, chunks


def test_data_comes_out_per_feed_not_held() -> None:
    parser = TelnetParser()
    assert parser.feed(b"ab\xff") == [Data(b"ab")]
    assert parser.feed(b"\xffc") == [Data(b"\xffc")]


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"\xff\xf0", "IAC SE outside"),
        (b"\xff\xfa\xff", "IAC where a subnegotiation option"),
        (b"\xff\xfa\x2c\x01\xff\xf1\xff\xf0", "command inside a subnegotiation"),
        (b"\xff\xfa\x2c\x01\xff\xfb\x00", "command inside a subnegotiation"),
        (b"\xff\xfa\x2c" + b"x" * (MAX_SUBNEGOTIATION + 1) + b"\xff\xf0", "longer than"),
        (b"\xff\xfa\x2c" + b"\xff\xff" * (MAX_SUBNEGOTIATION + 1) + b"\xff\xf0", "longer than"),
    ],
)
def test_malformed_raises_at_every_split(wire: bytes, why: str) -> None:
    for chunks in splits(wire):
        parser = TelnetParser()
        with pytest.raises(RemoteProtocolError, match=why):
            for chunk in chunks:
                parser.feed(chunk)


def test_subnegotiation_at_the_bound_is_accepted() -> None:
    payload = b"\xff" * MAX_SUBNEGOTIATION
    wire = encode_subnegotiation(44, payload)
    assert parse([wire]) == [Subnegotiation(44, payload)]
    assert parse([wire[i : i + 1] for i in range(len(wire))]) == [Subnegotiation(44, payload)]


@pytest.mark.parametrize(
    "partial", [b"\xff", b"\xff\xfd", b"\xff\xfa", b"\xff\xfa\x2c\x01", b"\xff\xfa\x2c\xff"]
)
def test_eof_inside_a_command_is_the_peers_error(partial: bytes) -> None:
    parser = TelnetParser()
    parser.feed(partial)
    with pytest.raises(RemoteProtocolError, match="closed inside"):
        parser.feed(b"")


def test_feed_after_eof_is_our_error() -> None:
    parser = TelnetParser()
    assert parser.feed(b"") == []
    with pytest.raises(LocalProtocolError):
        parser.feed(b"x")


def test_encoders() -> None:
    assert escape(b"a\xffb\xff") == b"a\xff\xffb\xff\xff"
    assert encode_negotiation(WILL, 44) == b"\xff\xfb\x2c"
    assert encode_subnegotiation(44, b"\x01\xff") == b"\xff\xfa\x2c\x01\xff\xff\xff\xf0"
    with pytest.raises(LocalProtocolError):
        encode_negotiation(SB, 1)
    # Option 255 (EXOPL) is a plain byte in a negotiation (RFC 854/855/861): it
    # encodes, so refusing it is possible. This assertion used to pin the bug of
    # issue 15 item 6 (encode_negotiation(DO, IAC) raised); a non-byte still raises.
    assert encode_negotiation(DONT, IAC) == b"\xff\xfe\xff"
    with pytest.raises(LocalProtocolError):
        encode_negotiation(DO, IAC + 1)
    with pytest.raises(LocalProtocolError):
        encode_negotiation(DO, -1)
    with pytest.raises(LocalProtocolError):
        encode_subnegotiation(IAC, b"")


negotiations = st.builds(Negotiation, st.sampled_from([WILL, WONT, DO, DONT]), st.integers(0, 255))
subnegotiations = st.builds(Subnegotiation, st.integers(0, 254), st.binary(max_size=MAX_SUBNEGOTIATION))
commands = st.builds(Command, st.integers(0, 249).filter(lambda c: c not in (SE, SB)))
datas = st.builds(Data, st.binary(min_size=1).map(lambda b: b + b"\xff"))
events_strategy = st.lists(st.one_of(negotiations, subnegotiations, commands, datas), max_size=20)


def encode(event: TelnetEvent) -> bytes:
    if isinstance(event, Data):
        return escape(event.data)
    if isinstance(event, Negotiation):
        return encode_negotiation(event.command, event.option)
    if isinstance(event, Subnegotiation):
        return encode_subnegotiation(event.option, event.payload)
    return bytes((IAC, event.command))


@given(events_strategy, st.lists(st.integers(0, 10_000), max_size=12))
def test_encode_then_parse_round_trips_split_anywhere(events: list[TelnetEvent], points: list[int]) -> None:
    wire = b"".join(encode(event) for event in events)
    points = [p % (len(wire) + 1) for p in points]
    assert parse(cut(wire, points)) == merge_data(events)


@given(st.binary(), st.lists(st.integers(0, 10_000), max_size=8))
def test_escape_round_trips(data: bytes, points: list[int]) -> None:
    wire = escape(data)
    points = [p % (len(wire) + 1) for p in points]
    assert parse(cut(wire, points)) == ([Data(data)] if data else [])


def test_negotiator_refuses_unknown_options_once_per_request() -> None:
    options = OptionNegotiator(local=[BINARY], remote=[BINARY])
    assert options.receive(Negotiation(WILL, 99)) == b"\xff\xfe\x63"
    assert options.receive(Negotiation(DO, 99)) == b"\xff\xfc\x63"
    assert options.receive(Negotiation(WONT, 99)) == b""
    assert options.receive(Negotiation(DONT, 99)) == b""
    assert not options.enabled(99, local=True)


def test_negotiator_accepts_once_and_never_echoes_its_own_state() -> None:
    options = OptionNegotiator(local=[BINARY], remote=[SGA])
    assert options.receive(Negotiation(DO, BINARY)) == b"\xff\xfb\x00"
    assert options.receive(Negotiation(DO, BINARY)) == b""
    assert options.enabled(BINARY, local=True)
    assert options.receive(Negotiation(WILL, SGA)) == b"\xff\xfd\x03"
    assert options.receive(Negotiation(WONT, SGA)) == b"\xff\xfe\x03"
    assert options.receive(Negotiation(WONT, SGA)) == b""
    assert not options.enabled(SGA, local=False)


def test_negotiator_request_answered_either_way_sends_nothing_more() -> None:
    options = OptionNegotiator(local=[BINARY], remote=[BINARY])
    assert options.request(BINARY, local=True) == b"\xff\xfb\x00"
    assert options.request(BINARY, local=True) == b""
    assert options.receive(Negotiation(DO, BINARY)) == b""
    assert options.enabled(BINARY, local=True)
    assert options.request(BINARY, local=False) == b"\xff\xfd\x00"
    assert options.receive(Negotiation(WONT, BINARY)) == b""
    assert not options.enabled(BINARY, local=False)
    with pytest.raises(LocalProtocolError):
        options.request(SGA, local=True)


option_sets = st.frozensets(st.integers(0, 5), max_size=6)
# (options it performs, options it lets the peer perform, options it asks for at once)
peers = st.tuples(option_sets, option_sets, option_sets)


def start(
    local: frozenset[int], remote: frozenset[int], asks: frozenset[int]
) -> tuple[OptionNegotiator, bytes]:
    options = OptionNegotiator(local, remote)
    first = b"".join(
        options.request(o, local=True) + options.request(o, local=False) for o in asks & local & remote
    )
    return options, first


@given(peers, peers)
def test_two_negotiators_settle_and_agree(
    a_sets: tuple[frozenset[int], frozenset[int], frozenset[int]],
    b_sets: tuple[frozenset[int], frozenset[int], frozenset[int]],
) -> None:
    a, to_b = start(*a_sets)
    b, to_a = start(*b_sets)
    rounds = 0
    while to_a or to_b:
        rounds += 1
        assert rounds <= 4, "negotiation loop"
        events_for_b, events_for_a = TelnetParser().feed(to_b), TelnetParser().feed(to_a)
        to_a = b"".join(b.receive(e) for e in events_for_b if isinstance(e, Negotiation))
        to_b = b"".join(a.receive(e) for e in events_for_a if isinstance(e, Negotiation))
    for option in range(6):
        assert a.enabled(option, local=True) == b.enabled(option, local=False)
        assert a.enabled(option, local=False) == b.enabled(option, local=True)


# -- broken after a peer error, and option 255 (issues 10 and 15) ---------------------

MALFORMED = [
    b"\xff\xf0",
    b"ok\xff\xf0",
    b"\xff\xfa\xff",
    b"\xff\xfb\x2c\xff\xfa\x2c\x01\xff\xf1\xff\xf0",
    b"\xff\xfa\x2c" + b"x" * (MAX_SUBNEGOTIATION + 1) + b"\xff\xf0",
]


@pytest.mark.parametrize("wire", MALFORMED)
def test_parser_stays_broken_after_a_peer_error(wire: bytes) -> None:
    for chunks in feeds(wire):
        parser = TelnetParser()
        with pytest.raises(RemoteProtocolError) as first:
            for chunk in chunks:
                parser.feed(chunk)
        assert "earlier error" not in str(first.value)
        for later in (b"x", b"\xff\xfb\x00", b""):
            with pytest.raises(RemoteProtocolError, match="after an earlier error"):
                parser.feed(later)


def test_parser_broken_by_eof_inside_a_command_refuses_more() -> None:
    parser = TelnetParser()
    parser.feed(b"\xff\xfa\x2c")
    with pytest.raises(RemoteProtocolError, match="closed inside"):
        parser.feed(b"")
    with pytest.raises(RemoteProtocolError, match="after an earlier error"):
        parser.feed(b"x")


def test_parser_discards_the_failed_calls_events() -> None:
    # Before the error the same bytes gave events; once broken, nothing of them leaks.
    parser = TelnetParser()
    assert parser.feed(b"a") == [Data(b"a")]
    with pytest.raises(RemoteProtocolError):
        parser.feed(b"b\xff\xfb\x00\xff\xf0")
    assert parser._events == [] and not parser._data and not parser._payload


@pytest.mark.parametrize(
    ("wire", "answer"),
    [
        (b"\xff\xfb\xff", b"\xff\xfe\xff"),  # WILL EXOPL: DONT
        (b"\xff\xfd\xff", b"\xff\xfc\xff"),  # DO EXOPL: WONT
        (b"\xff\xfc\xff", b""),  # WONT EXOPL: already off
        (b"\xff\xfe\xff", b""),  # DONT EXOPL: already off
    ],
)
def test_option_255_is_refused_not_raised(wire: bytes, answer: bytes) -> None:
    for chunks in feeds(wire):
        parser, options = TelnetParser(), OptionNegotiator(local=[BINARY], remote=[BINARY])
        out = b""
        events: list[TelnetEvent] = []
        for chunk in chunks:
            events += parser.feed(chunk)
        for event in events:
            if isinstance(event, Negotiation):
                out += options.receive(event)
        assert Negotiation(wire[1], EXOPL) in events
        assert not options.enabled(EXOPL, local=True) and not options.enabled(EXOPL, local=False)
        # The trailing bytes carry a WILL BINARY, accepted after the refusal.
        trailing = b"".join(chunks).endswith(TRAILING)
        assert out == answer + (b"\xff\xfd\x00" if trailing else b""), chunks


@given(st.binary(max_size=64), st.lists(st.integers(0, 10_000), max_size=8))
def test_any_input_gives_events_or_a_remote_error(wire: bytes, points: list[int]) -> None:
    points = [p % (len(wire) + 1) for p in points]
    parser = TelnetParser()
    options = OptionNegotiator(local=[BINARY, SGA], remote=[BINARY])
    try:
        for chunk in [*cut(wire, points), b""]:
            for event in parser.feed(chunk):
                if isinstance(event, Negotiation):
                    options.receive(event)
    except RemoteProtocolError:
        with pytest.raises(RemoteProtocolError, match="after an earlier error"):
            parser.feed(b"x")
