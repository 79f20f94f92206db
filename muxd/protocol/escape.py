"""The escape of a terminal user on a raw listener: ``^]`` then one letter.

conserver's users type ``^Ec`` and a letter, ssh's ``~.``, telnet's ``^]``:
a byte that is taken out of the stream and gives the next one a meaning for
muxd instead of the device. On a ``tcp``, ``unix`` or ``pty`` listener with
``escape: "^]"`` (off by default: a raw listener carries binary, where any
byte may occur), the escape byte followed by a letter is a Command for
muxd (muxd.sharing runs it and answers that client only); the escape typed
twice is one literal escape byte for the device. Nothing else changes: every
other byte goes to the device as it came, in order.

Sans-I/O, in the style of h11: ``EscapeDecoder.feed(bytes)`` gives the
events in input order, ``bytes`` for the device and ``Command`` for muxd,
and keeps a pending escape across reads, so a command split between two
TCP segments (or typed slowly on a pty) is recognised the same. It never
buffers more than that one pending byte.

Config: ``parse_escape`` reads caret notation, ``"^]"`` (0x1d), ``"^A"``
(0x01) ... ``"^_"`` (0x1f), ``"^@"`` (0x00) and ``"^?"`` (0x7f); a control
character is the only sensible escape, since a printable one would be taken
out of ordinary typing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """The byte typed after the escape (its letter, or any other byte as a
    one-character string, which muxd answers as an unknown command)."""

    letter: str


Event = bytes | Command


def parse_escape(value: object) -> int:
    """The escape byte of caret notation ``^X``; ValueError says what is expected."""
    if isinstance(value, str) and len(value) == 2 and value[0] == "^":
        c = value[1].upper()
        if c == "?":
            return 0x7F
        if "@" <= c <= "_":
            return ord(c) - 0x40
    raise ValueError(f'expected a control character in caret notation such as "^]" or "^E", got {value!r}')


def caret(byte: int) -> str:
    """``^]`` for 0x1d: how the help text names the escape."""
    return "^?" if byte == 0x7F else f"^{chr(byte + 0x40)}"


class EscapeDecoder:
    """Splits one client's input into bytes for the device and commands."""

    def __init__(self, escape: int) -> None:
        self.escape = escape
        self._byte = bytes([escape])
        self.pending = False  # the last byte fed was an escape, its command to come

    def feed(self, data: bytes) -> list[Event]:
        """Events in input order; adjacent device bytes come as one ``bytes``."""
        events: list[Event] = []
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self.pending:
                self.pending = False
                b = data[i]
                i += 1
                if b == self.escape:
                    out.append(b)  # typed twice: one literal escape
                    continue
                if out:
                    events.append(bytes(out))
                    out.clear()
                events.append(Command(chr(b)))
                continue
            j = data.find(self._byte, i)
            if j < 0:
                out += data[i:]
                break
            out += data[i:j]
            self.pending = True
            i = j + 1
        if out:
            events.append(bytes(out))
        return events
