"""Line framing for ``write: lines``: bytes in, write units out.

TCP is a byte stream, so one command may arrive in several reads and several
commands in one read. A writer's bytes are held until a line end arrives and
then released as one unit, which the hub's write queue never splits: two
clients' commands cannot interleave mid-line.

A line ends at LF or at CR (terminals in raw mode send a lone CR for Enter).
CR LF in one read stays one unit; if a read ends right after the CR, the LF
that starts the next read is released on its own, which is harmless.

Interactive keys cannot wait for a line end. A control character (below 0x20,
other than CR, LF and TAB, which belong to lines) is a unit of its own, released
at once, after whatever partial line the writer held: ``ls`` then Ctrl-C gives
the units ``ls`` and ``\\x03``, in that order, so Ctrl-C reaches the device
while the writer's line is unfinished. ESC is a control character too, but a
key such as an arrow arrives as a whole escape sequence (``ESC [ A``); splitting
it would send ``ESC`` alone and hold ``[A`` as text, where another writer's line
could land between them. So ESC starts a unit that lasts to the end of its
sequence (ECMA-48: CSI ``ESC [`` parameters, intermediates and a final byte;
SS3 ``ESC O`` and one byte; ``ESC`` intermediates and a final byte; or
``ESC`` and one printable byte, which is how terminals send Alt+key). A byte
that cannot continue the sequence ends it early, and is then taken as itself.

A partial line (or escape sequence) that the writer leaves unfinished is the
caller's to time out: ``flush()`` releases it as a unit (the hub does so after
the port's ``line_timeout``, and when the writer goes away).

A partial line is held up to ``max_line`` bytes. Past that it is not a command
but a stream of data: the held bytes are released as a unit (nothing is ever
dropped) and ``overlong`` counts it so the operator can see it.
"""

from __future__ import annotations

import re

CR, LF, ESC = 0x0D, 0x0A, 0x1B
# Every C0 control but TAB: the bytes that end a run of line text (CR and LF
# end the line; the others are units of their own). Found with one regex
# search per run, so a 16 KiB read of text costs no Python loop per byte.
_SPECIAL = re.compile(rb"[\x00-\x08\x0a-\x1f]")
# The longest escape sequence held as one unit. Keys send at most ~8 bytes
# (ESC [ 1 ; 5 ~ for Ctrl+F-keys, ESC [ 2 0 0 ~ for bracketed paste); a mouse
# report in SGR form stays under 20. Anything longer is not a key: what is
# held goes out as a unit and the rest is taken as ordinary bytes.
MAX_ESCAPE = 32


def _escape_step(seq: bytes | bytearray, b: int) -> str:
    """Where byte b takes the escape sequence seq (which starts with ESC):
    ``"more"`` (b belongs and more must follow), ``"done"`` (b ends it), or
    ``"abort"`` (b does not belong: seq ends before it)."""
    if len(seq) == 1:
        if b in (0x5B, 0x4F) or 0x20 <= b <= 0x2F:  # CSI, SS3, or an intermediate byte
            return "more"
        return "done" if 0x30 <= b <= 0x7E else "abort"
    kind = seq[1]
    if kind == 0x5B:  # CSI: parameter and intermediate bytes, then a final byte
        if 0x20 <= b <= 0x3F:
            return "more"
        return "done" if 0x40 <= b <= 0x7E else "abort"
    if kind == 0x4F:  # SS3: exactly one more byte (application-mode arrows, F1-F4)
        return "done" if 0x20 <= b <= 0x7E else "abort"
    if 0x20 <= b <= 0x2F:  # nF: more intermediate bytes
        return "more"
    return "done" if 0x30 <= b <= 0x7E else "abort"


class LineAssembler:
    """One writer's bytes, cut into write units (see the module docstring).

    Holds at most one thing: a partial line of text, or an escape sequence in
    progress (``_escape`` tells which); never both, since an ESC first
    releases the text before it.
    """

    def __init__(self, max_line: int) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self.max_line = max_line
        self._held = bytearray()
        self._escape = False  # _held is an escape sequence, not line text
        self.overlong = 0

    @property
    def held(self) -> int:
        return len(self._held)

    def feed(self, data: bytes) -> list[bytes]:
        """Append data; return the units it completes, oldest first: whole lines
        (with their line ends), control characters, escape sequences."""
        out: list[bytes] = []
        buf = self._held
        i, n = 0, len(data)
        # Each turn consumes at least one byte (or ends), so the loop is bounded by len(data).
        while i < n:
            if self._escape:
                i = self._escape_byte(data, i, out)
                continue
            m = _SPECIAL.search(data, i)
            end = m.start() if m is not None else n
            buf += data[i:end]
            if m is None:
                break
            b = data[end]
            i = end + 1
            if b in (CR, LF):
                buf.append(b)
                if b == CR and i < n and data[i] == LF:
                    buf.append(LF)  # keep CR LF together
                    i += 1
                out.append(bytes(buf))
                buf.clear()
                continue
            if buf:  # the partial line goes first: order is kept
                out.append(bytes(buf))
                buf.clear()
            if b == ESC:
                buf.append(b)
                self._escape = True
            else:
                out.append(bytes((b,)))
        if not self._escape:
            while len(buf) >= self.max_line:
                out.append(bytes(buf[: self.max_line]))
                del buf[: self.max_line]
                self.overlong += 1
        return out

    def _escape_byte(self, data: bytes, i: int, out: list[bytes]) -> int:
        """Take data[i] into the escape sequence held; return where to go on."""
        buf = self._held
        step = _escape_step(buf, data[i])
        if step == "abort":  # the sequence ended before this byte, which is taken anew
            self._end_escape(out)
            return i
        buf.append(data[i])
        if step == "done" or len(buf) >= min(MAX_ESCAPE, self.max_line):
            self._end_escape(out)
        return i + 1

    def _end_escape(self, out: list[bytes]) -> None:
        out.append(bytes(self._held))
        self._held.clear()
        self._escape = False

    def flush(self) -> bytes:
        """Release what is held as a unit: the writer went away, or went idle
        for longer than the port's line_timeout."""
        rest = bytes(self._held)
        self._held.clear()
        self._escape = False
        return rest
