"""The USR K2 "similar RFC2217" packet."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muxd.errors import LocalProtocolError, RemoteProtocolError
from muxd.protocol import usr
from muxd.protocol.line_settings import LineSettings

KNOWN = [
    (LineSettings(baudrate=115200), "55 AA 55 01 C2 00 83 46"),
    (LineSettings(baudrate=9600), "55 AA 55 00 25 80 83 28"),
]


@pytest.mark.parametrize(("settings", "packet"), KNOWN)
def test_known_vectors(settings: LineSettings, packet: str) -> None:
    assert usr.encode(settings) == bytes.fromhex(packet)
    assert usr.decode(bytes.fromhex(packet)) == settings


def with_checksum(body: bytes) -> bytes:
    return usr.HEADER + body + bytes((sum(body) & 0xFF,))


def test_parameter_bits() -> None:
    # 7 data bits (2), 2 stop bits (bit 2), parity on (bit 3), even (1 << 4), bit 7.
    packet = usr.encode(LineSettings(baudrate=9600, bytesize=7, parity="E", stopbits=2))
    assert packet[6] == 0x80 | 0x10 | 0x08 | 0x04 | 0x02
    assert usr.encode(LineSettings(bytesize=5, parity="S"))[6] == 0x80 | 0x30 | 0x08
    assert usr.encode(LineSettings(parity="O"))[6] == 0x80 | 0x08 | 0x03
    assert usr.encode(LineSettings(parity="M"))[6] == 0x80 | 0x20 | 0x08 | 0x03


def test_bit7_clear_is_accepted() -> None:
    # The checksum is over the parameter byte as sent.
    assert usr.decode(with_checksum(b"\x01\xc2\x00\x03")) == LineSettings(baudrate=115200)


def test_parity_type_is_ignored_while_parity_is_off() -> None:
    assert usr.decode(with_checksum(b"\x00\x25\x80\xb3")).parity == "N"


@given(
    st.builds(
        LineSettings,
        baudrate=st.integers(1, 2**24 - 1),
        bytesize=st.sampled_from([5, 6, 7, 8]),
        parity=st.sampled_from("NOEMS"),
        stopbits=st.sampled_from([1, 2]),
    )
)
def test_round_trip(settings: LineSettings) -> None:
    packet = usr.encode(settings)
    assert len(packet) == usr.PACKET_SIZE
    assert usr.decode(packet) == settings


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        ("55 AA 55 01 C2 00 83", "length"),
        ("55 AA 55 01 C2 00 83 46 00", "length"),
        ("55 AA 54 01 C2 00 83 45", "header"),
        ("55 AA 55 01 C2 00 83 47", "checksum"),
        ("55 AA 55 00 00 00 83 83", "baud rate"),  # baud rate 0
        ("55 AA 55 01 C2 00 C3 86", "parameter"),  # bit 6, undefined
    ],
)
def test_garbage_is_the_peers_error(packet: str, why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        usr.decode(bytes.fromhex(packet))


@pytest.mark.parametrize(
    "settings",
    [
        LineSettings(baudrate=2**24),
        LineSettings(baudrate=0),
        LineSettings(stopbits=1.5),
        LineSettings(bytesize=9),
        LineSettings(parity="X"),
    ],
)
def test_what_the_packet_cannot_say_is_our_error(settings: LineSettings) -> None:
    with pytest.raises(LocalProtocolError):
        usr.encode(settings)
