"""A bound on the MQTT packets the broker sends, checked as their bytes arrive.

paho reads a packet whole before it looks at it: the fixed header, then as
many bytes as its Remaining Length says (up to 256 MiB), into one growing
buffer. A 100 MB message on a tx topic would be in memory twice over before
anything could refuse it, and reading it would hold the loop. So the bound is
checked below paho: every byte paho takes from the wire passes through
``InboundLimit.feed`` first (muxd.mqtt.wire), which follows the packets'
fixed headers (MQTT 3.1.1 section 2.2, 5.0 section 2.1.1): one byte of type
and flags, the Remaining Length as a base-128 varint of 1 to 4 bytes, then
that many bytes. A Remaining Length over the limit raises PacketTooLarge the
moment its last byte arrives: paho has then taken at most 5 bytes of the
packet and none of its body.

Sans-I/O: bytes in, an exception out; no socket, no paho. Tests feed it whole
streams, byte by byte and split anywhere.
"""

from __future__ import annotations

import enum

from muxd.errors import RemoteProtocolError

# The Remaining Length takes at most 4 bytes (MQTT 3.1.1 section 2.2.3):
# 268,435,455 bytes, which is why a bound of our own is needed at all.
MAX_LENGTH_BYTES = 4


class PacketTooLarge(RemoteProtocolError):
    """The broker began a packet longer than the limit; nothing of its body was read."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes, over the limit of {limit}")
        self.size = size
        self.limit = limit


class _Part(enum.Enum):
    TYPE = "type"  # the next byte starts a packet
    LENGTH = "length"  # inside the Remaining Length
    BODY = "body"  # inside the variable header and payload


class InboundLimit:
    """Follows the broker's packets and refuses one whose body exceeds ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.packets = 0  # packets whose header passed the check
        self._part = _Part.TYPE
        self._length = 0
        self._shift = 0
        self._length_bytes = 0
        self._body_left = 0
        # Once refused, always: the stream's framing is lost with the refused
        # packet, and the link must close.
        self._refused: RemoteProtocolError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Account for bytes the broker sent, in order.

        Raises PacketTooLarge for a packet over the limit and
        RemoteProtocolError for a Remaining Length longer than 4 bytes; the
        connection is then beyond repair (its framing is lost) and must close:
        any later call raises the same error again.
        """
        if self._refused is not None:
            raise self._refused
        view = memoryview(data)
        i, n = 0, len(view)
        while i < n:
            if self._part is _Part.BODY:
                take = min(self._body_left, n - i)
                self._body_left -= take
                i += take
                if self._body_left == 0:
                    self._part = _Part.TYPE
                continue
            byte = view[i]
            i += 1
            if self._part is _Part.TYPE:
                self._part = _Part.LENGTH
                self._length = self._shift = self._length_bytes = 0
                continue
            self._length |= (byte & 0x7F) << self._shift
            self._shift += 7
            self._length_bytes += 1
            if byte & 0x80:
                if self._length_bytes == MAX_LENGTH_BYTES:
                    self._refused = RemoteProtocolError("a Remaining Length of more than 4 bytes")
                    raise self._refused
                continue
            if self._length > self.limit:
                self._refused = PacketTooLarge(self._length, self.limit)
                raise self._refused
            self.packets += 1
            self._body_left = self._length
            self._part = _Part.BODY if self._length else _Part.TYPE
