"""The broker link's bytes: a muxd transport, and the socket paho is given over it.

The bridge connects with the transports every listener uses (muxd.transport,
muxd.tls): a ``PlainTransport`` (a SocketTransport whose handshake is done at
once) or a client-side ``TlsTransport`` (ssl.SSLObject over memory BIOs,
driven by the reactor; muxd.tls says why not a non-blocking SSLSocket).
Choosing one is the only place the bridge knows about TLS: both offer
``handshake()``, ``recv``/``send``, ``flush``/``unsent`` and ``buffered``.

paho wants a socket (its ``SocketLike``: recv, send, close, fileno,
setblocking). ``PahoSocket`` is that socket over a transport:

- recv() takes at most READ_SIZE at a time, whatever paho asks (paho asks
  for a whole packet's body at once), and passes every byte through the
  packet bound (muxd.mqtt.packet) before paho sees it. PacketTooLarge is not
  an OSError, so paho does not take it for a lost link: it comes out of
  ``loop_read`` to the bridge, which refuses the packet by closing the link.
- A transport's OSError (other than BlockingIOError, paho's "not now") is
  kept in ``error`` before paho turns it into a bare error code, and an EOF
  in ``eof``: the bridge reports the cause, not paho's "connection lost".
- setblocking() does nothing: transports are non-blocking from the start.
"""

from __future__ import annotations

from typing import Protocol

from muxd.mqtt.packet import InboundLimit
from muxd.transport import SocketTransport, Transport

# Bytes taken from the transport per recv(): paho asks for a whole packet
# body, and a recv(n) allocates n bytes first. 64 KiB is a default write
# queue's worth of tx message per read, and bounds that allocation.
READ_SIZE = 64 * 1024


class ClientTransport(Transport, Protocol):
    def handshake(self) -> bool:
        """Advance the transport's handshake: True once done, False to wait for
        readiness; ssl.SSLError or OSError if it failed."""


class PlainTransport(SocketTransport):
    """A plain TCP link: nothing to negotiate."""

    def handshake(self) -> bool:
        return True


class PahoSocket:
    """paho's socket: a transport, with the inbound packet bound in front of paho."""

    def __init__(self, transport: ClientTransport, limit: InboundLimit) -> None:
        self.transport = transport
        self.limit = limit
        self.error: OSError | None = None  # what failed the link, as the transport said it
        self.eof = False  # the broker closed the link

    def fileno(self) -> int:
        return self.transport.fd

    def setblocking(self, flag: bool) -> None:
        pass

    def recv(self, n: int) -> bytes:
        try:
            data = self.transport.recv(min(n, READ_SIZE))
        except BlockingIOError:
            raise
        except OSError as exc:
            self.error = exc
            raise
        if not data:
            self.eof = True
        self.limit.feed(data)
        return data

    def send(self, data: bytes | bytearray) -> int:
        try:
            return self.transport.send(data)
        except BlockingIOError:
            raise
        except OSError as exc:
            self.error = exc
            raise

    def close(self) -> None:
        self.transport.close()
