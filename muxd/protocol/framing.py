"""Line framing for ``write: lines``: bytes in, whole lines out.

TCP is a byte stream, so one command may arrive in several reads and several
commands in one read. A writer's bytes are held until a line end arrives and
then released as one unit, which the hub's write queue never splits: two
clients' commands cannot interleave mid-line.

A line ends at LF or at CR (terminals in raw mode send a lone CR for Enter).
CR LF in one read stays one unit; if a read ends right after the CR, the LF
that starts the next read is released on its own, which is harmless.

A partial line is held up to ``max_line`` bytes. Past that it is not a command
but a stream of data: the held bytes are released as a unit (nothing is ever
dropped) and ``overlong`` counts it so the operator can see it.
"""

from __future__ import annotations


class LineAssembler:
    def __init__(self, max_line: int) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self.max_line = max_line
        self._held = bytearray()
        self.overlong = 0

    @property
    def held(self) -> int:
        return len(self._held)

    def feed(self, data: bytes) -> list[bytes]:
        """Append data; return the complete lines (with their line ends), oldest first."""
        out: list[bytes] = []
        buf = self._held
        buf += data
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start)
            ends = [i for i in (lf, cr) if i >= 0]
            if not ends:
                break
            end = min(ends)
            if end == cr and end + 1 < n and buf[end + 1] == 0x0A:
                end += 1  # keep CR LF together
            out.append(bytes(buf[start : end + 1]))
            start = end + 1
        del buf[:start]
        while len(buf) >= self.max_line:
            out.append(bytes(buf[: self.max_line]))
            del buf[: self.max_line]
            self.overlong += 1
        return out

    def flush(self) -> bytes:
        """Release the held partial line (the writer went away)."""
        rest = bytes(self._held)
        self._held.clear()
        return rest
