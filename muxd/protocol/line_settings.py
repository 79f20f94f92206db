"""Serial line settings as one immutable value shared by config, upstreams and codecs.

Parity and stop bits use pyserial's own constants ('N', 'E', 'O', 'M', 'S';
1, 1.5, 2) so a value can be handed to pyserial unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

PARITIES = ("N", "E", "O", "M", "S")
STOPBITS = (1, 1.5, 2)
BYTESIZES = (5, 6, 7, 8)
FLOWS = ("none", "rtscts", "xonxoff")


@dataclass(frozen=True)
class LineSettings:
    baudrate: int = 115200
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    flow: str = "none"

    def __str__(self) -> str:
        stop = "1.5" if self.stopbits == 1.5 else str(int(self.stopbits))
        return f"{self.baudrate} {self.bytesize}{self.parity}{stop}"
