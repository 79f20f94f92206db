"""A published port's feed: the hub reader behind ``<prefix>/<port>/rx`` and ``/tx``.

A Feed is a hub reader like a trace file (muxd.trace): a cursor, a bound
(the port's ``mqtt: buffer``, 1 MiB by default: 90 s of a 115200-baud console,
enough to ride out a broker restart or a failover) and counted losses. It
takes records (text, jsonl) or raw chunks from the hub into a small bounded
stage, and the bridge (muxd.mqtt.bridge) hands the staged messages to paho.
Messages from ``/tx`` go to the device through the port's write arbitration.
The topic layout and the reasons for it are in muxd.mqtt's docstring.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from muxd.config import PortMqtt
from muxd.hub import Hub, Reader, ReaderPolicy
from muxd.reactor import Timer

if TYPE_CHECKING:
    from muxd.mqtt.bridge import MqttBridge
    from muxd.port import PortRuntime

log = logging.getLogger("muxd.mqtt")

# Bytes taken from the hub per turn and port: a bounded stage between the
# ring and paho, and a bounded slice of one turn of the loop.
FILL_LIMIT = 16 * 1024
# The largest rx message: a longer text line is cut here.
MAX_MESSAGE = 64 * 1024
# raw: a chunk goes out at this size, or RAW_DELAY after its first byte came,
# whichever first: 20 ms adds little latency and at 115200 baud makes
# messages of about 230 bytes rather than one per byte.
RAW_CHUNK = 4096
RAW_DELAY = 0.02
# text: a line still open is sent as it is after this long (a prompt).
LINE_HOLD = 0.5


class Feed:
    """One port on the broker: a hub reader that publishes its rx topic."""

    def __init__(self, bridge: MqttBridge, rt: PortRuntime, spec: PortMqtt) -> None:
        self.bridge = bridge
        self.rt = rt
        self.hub: Hub = rt.hub
        self.spec = spec
        prefix = bridge.cfg.prefix
        self.rx_topic = f"{prefix}/{rt.name}/rx"
        self.tx_topic = f"{prefix}/{rt.name}/tx"
        self.state_topic = f"{prefix}/{rt.name}/state"
        self.published = 0  # messages acknowledged (QoS 1) or written (QoS 0)
        self.published_bytes = 0
        self.lost = 0  # QoS 0 messages paho had not written when the link went
        self.tx_accepted = 0
        self.tx_refused = 0
        self._stage: deque[bytes] = deque()
        self._partial = b""  # text: a line still open
        self._timer: Timer | None = None
        self._last_state: tuple[Any, ...] | None = None
        policy = ReaderPolicy(
            listener=f"mqtt:{rt.name}",
            capacity=spec.buffer,
            drop_oldest=True,
            writable=spec.write,
            lines=True,
            notices=False,
            format=spec.format,
        )
        self.reader: Reader = self.hub.attach(self, policy, f"mqtt:{bridge.cfg.broker}")

    # -- ReaderOwner -----------------------------------------------------------------

    def on_data(self) -> None:
        if self.spec.format == "raw" and self.hub.lag(self.reader) < RAW_CHUNK:
            self._arm(RAW_DELAY)
            return
        self.bridge.pump()

    def on_write_room(self) -> None:
        pass  # a refused message is not retried: the publisher sends again if it wants

    def close(self, reason: str) -> None:
        log.error("%s: mqtt feed closed (%s)", self.rt.name, reason)
        self.detach()

    def detach(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.hub.detach(self.reader, "stopped")

    # -- rx ------------------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        if self._timer is None:
            self._timer = self.bridge.reactor.call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._partial and self.hub.caught_up(self.reader):
            self._stage.append(self._partial)
            self._partial = b""
        self.bridge.pump()

    def next_message(self) -> bytes | None:
        """The next rx message, taking more from the hub when the stage is empty."""
        if not self._stage:
            self._fill()
        return self._stage.popleft() if self._stage else None

    def _fill(self) -> None:
        data = self.hub.take(self.reader, FILL_LIMIT)
        if not data:
            return
        if self.spec.format == "raw":
            for i in range(0, len(data), RAW_CHUNK):
                self._stage.append(data[i : i + RAW_CHUNK])
            return
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        # jsonl: a record is a JSON document (its data holds the device's newline);
        # text: the line with its newline, so the payloads joined give the stream.
        end = b"" if self.spec.format == "jsonl" else b"\n"
        self._stage.extend(line + end for line in lines)
        while len(self._partial) >= MAX_MESSAGE:
            self._stage.append(self._partial[:MAX_MESSAGE])
            self._partial = self._partial[MAX_MESSAGE:]
        if self._partial:
            self._arm(LINE_HOLD)

    def has_pending(self) -> bool:
        return bool(self._stage) or not self.hub.caught_up(self.reader)

    def block(self, blocked: bool) -> None:
        self.hub.set_blocked(self.reader, blocked)

    # -- tx ------------------------------------------------------------------------

    def write(self, payload: bytes) -> None:
        if not self.spec.write or self.reader.doomed is not None:
            self.tx_refused += 1
            return
        if not payload:
            return
        if not self.hub.writes.offer(self.reader, payload):  # whole, or refused: never half
            self.tx_refused += 1
            return
        self.tx_accepted += 1

    # -- state ---------------------------------------------------------------------

    def state_payload(self) -> tuple[tuple[Any, ...], bytes]:
        rt = self.rt
        st = rt.upstream.status
        s = rt.line_control.settings
        line = {
            "baudrate": s.baudrate,
            "bytesize": s.bytesize,
            "parity": s.parity,
            "stopbits": s.stopbits,
            "flow": s.flow,
        }
        key = (st.state.value, st.reason, st.since, tuple(line.values()))
        doc = {
            "port": rt.name,
            "state": st.state.value,
            "reason": st.reason,
            "since": st.since,
            "line": line,
            "bytes_in": self.hub.bytes_in,
            "bytes_out": self.hub.writes.bytes_out,
            "published": self.published,
            "dropped": self.reader.dropped,
            "t": round(time.time(), 3),
        }
        return key, json.dumps(doc, separators=(",", ":")).encode()

    def view(self) -> dict[str, Any]:
        b = self.bridge
        return {
            "state": b.state,
            "reason": b.reason,
            "broker": b.cfg.broker,
            "rx": self.rx_topic,
            "tx": self.tx_topic if self.spec.write else None,
            "format": self.spec.format,
            "qos": self.spec.qos,
            "published": self.published,
            "published_bytes": self.published_bytes,
            "dropped": self.reader.dropped,
            "lost": self.lost,
            "lag": self.hub.lag(self.reader),
            "tx_accepted": self.tx_accepted,
            "tx_refused": self.tx_refused,
            "connects": b.connects,
            "reconnects": b.reconnects,
        }
