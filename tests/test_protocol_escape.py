"""The escape codec (muxd.protocol.escape), byte by byte, without sockets."""

from __future__ import annotations

import pytest

from muxd.protocol.escape import Command, EscapeDecoder, caret, parse_escape
from tests.helpers import splits

ESC = 0x1D  # ^]


def run(pieces: list[bytes]) -> tuple[bytes, list[tuple[int, str]]]:
    """Feed the pieces to one decoder: the device's bytes, and each command
    with how many device bytes came before it (so order is checked too)."""
    dec = EscapeDecoder(ESC)
    data = bytearray()
    commands: list[tuple[int, str]] = []
    for piece in pieces:
        for event in dec.feed(piece):
            if isinstance(event, Command):
                commands.append((len(data), event.letter))
            else:
                assert event, "no empty data events"
                data += event
    return bytes(data), commands


CASES = [
    (b"plain text\r\n", b"plain text\r\n", []),
    (b"ab\x1dbcd", b"abcd", [(2, "b")]),
    (b"\x1d?", b"", [(0, "?")]),
    (b"x\x1d\x1dy", b"x\x1dy", []),  # typed twice: one literal escape
    (b"\x1d\x1d\x1d.", b"\x1d", [(1, ".")]),
    (b"\x1dr\x1dw\x1dh", b"", [(0, "r"), (0, "w"), (0, "h")]),
    (b"1\x1dz2", b"12", [(1, "z")]),  # an unknown letter is still a command (answered as unknown)
    (b"\x00\xff\x1d\x00", b"\x00\xff", [(2, "\x00")]),
]


@pytest.mark.parametrize(("wire", "device", "commands"), CASES)
def test_whole_one_byte_at_a_time_and_split_everywhere(
    wire: bytes, device: bytes, commands: list[tuple[int, str]]
) -> None:
    for pieces in splits(wire):
        assert run(pieces) == (device, commands), pieces


def test_a_pending_escape_is_kept_across_reads() -> None:
    dec = EscapeDecoder(ESC)
    states = []
    for piece in (b"abc\x1d", b"b"):
        states.append((dec.feed(piece), dec.pending))
    assert states == [([b"abc"], True), ([Command("b")], False)]
    assert dec.feed(b"\x1d") == []
    assert dec.feed(b"\x1d") == [b"\x1d"]


def test_nothing_of_a_command_reaches_the_device() -> None:
    data, commands = run([b"\x1d?\x1db\x1dr\x1dw\x1dh\x1df\x1d."])
    assert data == b""
    assert [c for _, c in commands] == list("?brwhf.")


@pytest.mark.parametrize(
    ("text", "byte"), [("^]", 0x1D), ("^E", 0x05), ("^e", 0x05), ("^@", 0), ("^?", 0x7F), ("^_", 0x1F)]
)
def test_caret_notation(text: str, byte: int) -> None:
    assert parse_escape(text) == byte
    assert parse_escape(caret(byte)) == byte


@pytest.mark.parametrize("bad", ["]", "^", "^]]", "^1", "~", 29, None, "^é"])
def test_bad_escapes_say_what_is_expected(bad: object) -> None:
    with pytest.raises(ValueError, match="caret notation"):
        parse_escape(bad)
