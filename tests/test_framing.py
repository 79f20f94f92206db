"""Line framing, fed whole, one byte at a time, and split at every point."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from muxd.protocol.framing import LineAssembler
from tests.helpers import cut


def feed_all(chunks: list[bytes], max_line: int = 4096) -> tuple[list[bytes], bytes, int]:
    a = LineAssembler(max_line)
    out: list[bytes] = []
    for c in chunks:
        out += a.feed(c)
    return out, a.flush(), a.overlong


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
    lines, rest, _ = feed_all(cut(data, cuts), max_line)
    assert b"".join(lines) + rest == data
    for line in lines:  # a unit is a whole line, or a bounded piece of an overlong one
        assert line.endswith((b"\n", b"\r")) or len(line) == max_line
