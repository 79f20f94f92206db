"""The USR IOT K2's vendor "similar RFC2217" packet: 8 bytes that set the UART.

Layout: ``55 AA 55``, the baud rate as 3 big-endian bytes, a parameter byte,
and a checksum, the low byte of the sum of the four bytes before it (baud
bytes and parameter byte, as sent). Parameter byte: bits 1:0 data bits
(5..8 as 0..3), bit 2 stop bits (0 = 1, 1 = 2), bit 3 parity enable, bits 5:4
parity type (odd, even, mark, space = 0..3). Manuals disagree on bit 7: we
send it set, as the known vectors do, and accept it either way. Flow control
is not in the packet. Pure encode/decode: finding packets in a stream is the
caller's business.
"""

from __future__ import annotations

from muxd.errors import LocalProtocolError, RemoteProtocolError
from muxd.protocol.line_settings import LineSettings

HEADER = b"\x55\xaa\x55"
PACKET_SIZE = 8

_PARITY_TYPES = {"O": 0, "E": 1, "M": 2, "S": 3}
_PARITY_ENABLE = 0x08
_TWO_STOP_BITS = 0x04
_BIT7 = 0x80
# Bits the packet defines, bit 7 included; bit 6 is undefined in every manual.
_KNOWN_BITS = 0xBF


def encode(settings: LineSettings) -> bytes:
    if not 0 < settings.baudrate < 1 << 24:
        raise LocalProtocolError(f"USR packet cannot carry baud rate {settings.baudrate}")
    if settings.bytesize not in (5, 6, 7, 8):
        raise LocalProtocolError(f"USR packet cannot carry {settings.bytesize} data bits")
    if settings.stopbits not in (1, 2):
        raise LocalProtocolError(f"USR packet cannot carry {settings.stopbits} stop bits")
    if settings.parity != "N" and settings.parity not in _PARITY_TYPES:
        raise LocalProtocolError(f"USR packet cannot carry parity {settings.parity!r}")
    param = _BIT7 | (settings.bytesize - 5)
    if settings.stopbits == 2:
        param |= _TWO_STOP_BITS
    if settings.parity != "N":
        param |= _PARITY_ENABLE | _PARITY_TYPES[settings.parity] << 4
    body = settings.baudrate.to_bytes(3, "big") + bytes((param,))
    return HEADER + body + bytes((sum(body) & 0xFF,))


def decode(packet: bytes) -> LineSettings:
    """One whole packet -> its settings (flow control left at the default, "none")."""
    if len(packet) != PACKET_SIZE or packet[:3] != HEADER:
        raise RemoteProtocolError(f"USR packet: bad length or header: {packet.hex(' ')}")
    body = packet[3:7]
    if sum(body) & 0xFF != packet[7]:
        raise RemoteProtocolError(f"USR packet: bad checksum: {packet.hex(' ')}")
    baudrate = int.from_bytes(body[:3], "big")
    param = body[3]
    if baudrate == 0 or param & ~_KNOWN_BITS:
        raise RemoteProtocolError(f"USR packet: bad baud rate or parameter byte: {packet.hex(' ')}")
    parity = "N"
    if param & _PARITY_ENABLE:
        parity = next(letter for letter, code in _PARITY_TYPES.items() if code == (param >> 4) & 3)
    return LineSettings(
        baudrate=baudrate,
        bytesize=(param & 3) + 5,
        parity=parity,
        stopbits=2 if param & _TWO_STOP_BITS else 1,
    )
