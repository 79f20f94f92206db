"""Line framing, fed whole, one byte at a time, and split at every point."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from muxd.protocol.framing import MAX_ESCAPE, LineAssembler
from tests.helpers import cut, splits

CONTROLS = bytes(b for b in range(0x20) if b not in b"\r\n\t")


def feed_all(chunks: list[bytes], max_line: int = 4096) -> tuple[list[bytes], bytes, int]:
    a = LineAssembler(max_line)
    out: list[bytes] = []
    for c in chunks:
        out += a.feed(c)
    return out, a.flush(), a.overlong


def kind(unit: bytes, max_line: int, following: bytes) -> str:
    """What a unit is; "bad" for anything the assembler must never give."""
    body = unit.rstrip(b"\r\n")
    if unit.startswith(b"\x1b"):
        return "escape" if len(unit) <= MAX_ESCAPE and not any(b in CONTROLS for b in unit[1:]) else "bad"
    if len(unit) == 1 and unit[0] in CONTROLS:
        return "control"
    if any(b in CONTROLS or b in b"\r\n" for b in body):
        return "bad"  # a control character or line end never rides inside a unit of text
    if body != unit:
        return "line" if unit.endswith((b"\n", b"\r")) and len(unit) - len(body) <= 2 else "bad"
    if len(unit) == max_line:
        return "overlong piece"
    # A partial line goes out early only right before a control unit.
    return (
        "partial" if following[:1] == b"\x1b" or (len(following) == 1 and following[0] in CONTROLS) else "bad"
    )


def test_whole_lines_and_partial_held() -> None:
    lines, rest, _ = feed_all([b"status\r\nhelp\nrebo", b"ot\r"])
    assert lines == [b"status\r\n", b"help\n", b"reboot\r"]
    assert rest == b""


def test_byte_by_byte_equals_whole() -> None:
    data = b"one\ntwo\r\nthree\rfour"
    whole, rest_whole, _ = feed_all([data])
    bytewise, rest_bytes, _ = feed_all([data[i : i + 1] for i in range(len(data))])
    assert b"".join(whole) + rest_whole == data == b"".join(bytewise) + rest_bytes
    # CR LF split across reads gives a lone LF unit, never a lost or merged byte
    assert bytewise[:2] == [b"one\n", b"two\r"]


def test_overlong_line_is_released_not_dropped() -> None:
    lines, rest, overlong = feed_all([b"x" * 10, b"\n"], max_line=4)
    assert lines == [b"xxxx", b"xxxx", b"xx\n"]
    assert overlong == 2 and rest == b""


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10), st.integers(1, 64))
def test_any_split_preserves_every_byte_in_order(data: bytes, cuts: list[int], max_line: int) -> None:
    units, rest, _ = feed_all(cut(data, cuts), max_line)
    assert b"".join(units) + rest == data
    for i, unit in enumerate(units):
        # After the last unit comes what is held: an escape sequence in
        # progress also released the partial line before it.
        following = units[i + 1] if i + 1 < len(units) else rest
        assert kind(unit, max_line, following) != "bad", (unit, units, rest)


# (wire, units, held after): every split of the wire gives the same units.
INTERACTIVE = [
    (b"ls\x03", [b"ls", b"\x03"], b""),  # Ctrl-C after the partial line, not inside it
    (b"ls\x03pwd", [b"ls", b"\x03"], b"pwd"),  # trailing bytes: a new partial line
    (b"\x03\x04\x1a", [b"\x03", b"\x04", b"\x1a"], b""),  # each key its own unit
    (b"make\tall\n", [b"make\tall\n"], b""),  # TAB belongs to the line
    (b"top\x7f\x7fp\r", [b"top\x7f\x7fp\r"], b""),  # DEL (backspace) is not below 0x20
    (b"\x1b[A\x1b[B", [b"\x1b[A", b"\x1b[B"], b""),  # arrows: whole CSI sequences
    (b"ab\x1b[1;5C\r", [b"ab", b"\x1b[1;5C", b"\r"], b""),  # Ctrl+Right after text
    (b"\x1bOA\x1bOP", [b"\x1bOA", b"\x1bOP"], b""),  # SS3: application-mode arrows, F1
    (b"\x1bx\x1b(B", [b"\x1bx", b"\x1b(B"], b""),  # Alt+x; an nF sequence
    (b"\x1b\x03", [b"\x1b", b"\x03"], b""),  # Esc then Ctrl-C: the ESC ends alone
    (b"\x1b[2\r", [b"\x1b[2", b"\r"], b""),  # a broken sequence ends at the CR
    (b"\x1b[200~paste\x1b[201~", [b"\x1b[200~", b"\x1b[201~"], b""),  # bracketed paste
    (b"echo hi\x1b", [b"echo hi"], b"\x1b"),  # a lone Esc key: held (the hub's timeout sends it)
    (b"vi\x1b[", [b"vi"], b"\x1b["),  # a sequence cut by the read stays held
]


@pytest.mark.parametrize(("wire", "units", "rest"), INTERACTIVE)
def test_control_keys_are_units_of_their_own(wire: bytes, units: list[bytes], rest: bytes) -> None:
    for chunks in splits(wire):  # whole, byte by byte, and cut in two anywhere
        got, held, _ = feed_all(chunks)
        if b"paste" in wire:  # the pasted text between the two markers is a partial line
            assert got == [b"\x1b[200~", b"paste", b"\x1b[201~"] and held == b""
            continue
        assert (got, held) == (units, rest), chunks


def test_held_escape_and_text_count_and_flush() -> None:
    a = LineAssembler(64)
    assert a.feed(b"ab") == [] and a.held == 2
    assert a.feed(b"\x1b[") == [b"ab"] and a.held == 2  # now the escape is what is held
    assert a.flush() == b"\x1b[" and a.held == 0
    assert a.feed(b"A") == []  # after a flush, a new partial line: not the end of the old sequence
    assert a.flush() == b"A"


def test_overlong_escape_is_released_in_bounded_pieces() -> None:
    wire = b"\x1b[" + b"1" * (MAX_ESCAPE + 8) + b"m\n"
    units, rest, _ = feed_all([wire])
    assert units == [wire[:MAX_ESCAPE], wire[MAX_ESCAPE:]] and rest == b""
    bytewise, rest, _ = feed_all([wire[i : i + 1] for i in range(len(wire))])
    assert bytewise == units and rest == b""


@given(st.lists(st.sampled_from([b"ls", b" -l", b"\r", b"\n", b"\x03", b"\x1b[A", b"\x1b", b"\t", b"O"])))
def test_keystrokes_fed_whole_or_byte_by_byte_agree(keys: list[bytes]) -> None:
    data = b"".join(keys)
    whole, rest_whole, _ = feed_all([data])
    bytewise, rest_bytes, _ = feed_all([data[i : i + 1] for i in range(len(data))])
    assert b"".join(whole) + rest_whole == data
    # Only a CR LF pair comes apart when a read ends between the two.
    apart = [piece for u in whole for piece in ([u[:-1], b"\n"] if u.endswith(b"\r\n") else [u])]
    assert (bytewise, rest_bytes) == (apart, rest_whole)
