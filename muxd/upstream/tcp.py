"""A remote serial port over TCP: the USR K2 in TCP-server mode, or any raw
TCP serial server (ser2net, another muxd).

Connecting never blocks the loop: a non-blocking connect() gives EINPROGRESS,
the socket is watched for EPOLLOUT and SO_ERROR tells the outcome, while a
timer enforces ``connect_timeout``. The host must be a numeric address: the
stdlib resolver blocks, and a dead DNS server would freeze every port's
readers for its timeout on each attempt. A K2 has a fixed IP anyway.

A dead link is found three ways. TCP keepalive probes an idle connection
(``keepalive_idle`` + ``keepalive_interval`` x ``keepalive_count``, 15 s by
default); TCP_USER_TIMEOUT gives unacknowledged writes the same deadline, so a
K2 that vanishes mid-write is noticed as fast as a quiet one. Both surface as
ETIMEDOUT, "keepalive timeout". A K2 whose TCP stack answers while its serial
side is wedged passes keepalive: the optional ``idle_timeout`` (no byte for
that long) catches it. Each loss closes the socket before the next attempt is
made, so the K2 never sees two of us (FdUpstream's backoff does the rest).

``control`` says how line settings reach the device. ``none``: they cannot;
the K2 keeps what its web page says, and a change is refused. ``usr``: the
vendor's 8-byte packet goes out first on every connection and again on each
change (it has no answer). ``rfc2217``: the link speaks Telnet + RFC 2217;
device bytes are decoded out of the stream, negotiation is answered, writes
are escaped, and the line settings are sent once the K2 agrees to
COM-PORT-OPTION; the K2's answers carry the values it has in force, and
``settings`` follows them. DTR, RTS and BREAK (``set_control``) need
``control: rfc2217`` (SET-CONTROL); the vendor packet has no such field and
``none`` no channel at all, so there a request is refused (SettingsRefused,
which muxd.linecontrol logs), never acknowledged as if done. ``control``
starts unknown (the K2 keeps its own levels) and follows the K2's answers;
DTR and RTS asked while the link is down or before the K2 agreed to
COM-PORT-OPTION are sent once it has, a BREAK is refused then. NOTIFY-MODEMSTATE
from the K2 is kept for ``modem_state``. Escaping changes lengths, so writes go
through ``_out``, a small buffer of wire bytes: a queue chunk is encoded only
when ``_out`` is empty, and counted consumed once encoded, so a partial send
never loses or repeats a byte.

Writes wait in the hub's queue while the link is down and go out in order on
the next one. Bytes already handed to a link that then dies may be lost with
it, as with any TCP connection: a small SO_SNDBUF keeps that amount small
(the rest stays queued in the hub), and when a link is dropped the bytes the
K2 never acknowledged (TCP_INFO's bytes_acked) are logged and counted in
``bytes_unacked_lost`` (a metric), never lost silently.

Why this module is long: connecting without blocking, the three ways a dead
link is found, the vendor and RFC 2217 control channels and the reconciling
of a K2's answers all act on the one socket and its state; split apart, each
would need the others' internals.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections import deque

from muxd.config import TcpUpstream
from muxd.errors import LocalProtocolError, RemoteProtocolError, SettingsRefused
from muxd.hub import Hub
from muxd.protocol import usr
from muxd.protocol.line_settings import LineSettings
from muxd.protocol.rfc2217 import (
    SETTING_FIELDS,
    ComPortCommand,
    ComPortOption,
    Data,
    NotifyModemstate,
    Rfc2217Client,
    SetBaudrate,
    SetControl,
    SetDataSize,
    SetParity,
    SetStopSize,
    setting_of,
)
from muxd.reactor import OUT, Reactor, Timer
from muxd.upstream.base import READ_SIZE, ControlLines, FdUpstream, ModemLines

log = logging.getLogger("muxd.upstream")

# Raw queue bytes escaped per step: RFC 2217 at most doubles them, so _out holds
# at most 8 KiB of data plus a few control messages. Small, because whatever
# sits in _out when the link dies is lost with it.
ENCODE_CHUNK = 4096
# Wire bytes _out may hold: data (above) plus negotiation answers and settings
# requests, a few dozen bytes each. Past this the peer is flooding us with
# negotiation while not reading our answers.
OUT_LIMIT = 64 * 1024
# The kernel's send buffer (it doubles this): 32 KiB is about 3 s of a 115200
# baud UART, ample to keep the K2 busy, while writes beyond it stay in the hub's
# queue (visible, bounded, with backpressure) rather than in a kernel buffer
# that a dead link throws away.
SEND_BUFFER = 16 * 1024

# Settings requests per field remembered until answered (``_asked``): a K2
# answers within milliseconds, so this many in flight is one that does not
# answer at all; the oldest are then forgotten, and the newest still decides.
MAX_ASKED = 16

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a u64 at byte 120 since
# Linux 4.1. It counts the SYN too, hence the 1 taken off where it is read.
TCP_INFO_SIZE = 128
BYTES_ACKED = 120

_CONNECT_REASONS = {errno.ECONNREFUSED: "connection refused", errno.ETIMEDOUT: "connect timeout"}
_LOSS_REASONS = {
    errno.ECONNRESET: "connection reset",
    errno.EPIPE: "connection reset",
    errno.ETIMEDOUT: "keepalive timeout",
}


class TcpPort(FdUpstream):
    def __init__(self, cfg: TcpUpstream, hub: Hub, reactor: Reactor) -> None:
        super().__init__(hub, reactor, cfg.backoff_min, cfg.backoff_max)
        self.cfg = cfg
        self.settings = cfg.settings
        self.control = ControlLines()  # unknown until set: the K2 keeps its own levels
        self.control_lines = cfg.control == "rfc2217"  # the one way to tell a K2 DTR and RTS
        self._modem: ModemLines | None = None  # the K2's last NOTIFY-MODEMSTATE
        # SET-CONTROL requests per line not answered yet on this link: only the
        # answer to the last one says what is in force (a pulse's first answer
        # comes after its second request went out).
        self._unanswered = {"dtr": 0, "rts": 0, "brk": 0}
        # The same for line settings, per field and with the values asked, oldest
        # first: the K2 answers each request in turn, so its next answer for a
        # field is to the oldest request of that field still here.
        self._asked: dict[str, deque[object]] = {f: deque(maxlen=MAX_ASKED) for f in SETTING_FIELDS}
        # config.py accepts only numeric hosts: a name lookup would block the loop.
        ip = ipaddress.ip_address(cfg.host)
        self._family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self._sock: socket.socket | None = None
        self._codec: Rfc2217Client | None = None
        self._com_port = False  # the K2 agreed to COM-PORT-OPTION on this connection
        self._sent = 0  # wire bytes handed to the kernel on this connection
        self._out = bytearray()  # wire bytes not yet sent; bounded by OUT_LIMIT
        self._connect_timer: Timer | None = None
        self._idle_timer: Timer | None = None
        self._last_rx = 0.0

    def describe(self) -> str:
        return self.cfg.describe()

    # -- connecting -------------------------------------------------------------

    def _open(self) -> None:
        cfg = self.cfg
        sock = socket.socket(self._family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self._sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # typed commands go out at once
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(cfg.keepalive_idle)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(cfg.keepalive_interval)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, cfg.keepalive_count)
        dead_after = cfg.keepalive_idle + cfg.keepalive_interval * cfg.keepalive_count
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after * 1000))
        err = sock.connect_ex((cfg.host, cfg.port))
        if err == 0:
            self._connected()
        elif err == errno.EINPROGRESS:
            self.reactor.add(sock.fileno(), OUT, self._on_connect_event, self._on_internal_error)
            self._connect_timer = self.reactor.call_later(
                cfg.connect_timeout, self._guarded(self._on_connect_timeout)
            )
        else:
            self._failed(_CONNECT_REASONS.get(err, _strerror(err)))

    def _on_connect_event(self, _mask: int) -> None:
        assert self._sock is not None
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(_CONNECT_REASONS.get(err, _strerror(err)))
        else:
            self.reactor.remove(self._sock.fileno())  # _opened() registers it for data
            self._connected()

    def _on_connect_timeout(self) -> None:
        self._connect_timer = None
        self._failed("connect timeout")

    def _connected(self) -> None:
        assert self._sock is not None
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        self._opened(self._sock.fileno())

    def _on_up(self) -> None:
        log.debug("%s: connected to %s (control: %s)", self.hub.name, self.describe(), self.cfg.control)
        if self.cfg.control == "usr":
            self._out += usr.encode(self.settings)
        elif self.cfg.control == "rfc2217":
            self._codec = Rfc2217Client()
            self._out += self._codec.data_to_send()  # the negotiation its constructor queued
        if self.cfg.idle_timeout:
            self._last_rx = self.reactor.now()
            self._idle_timer = self.reactor.call_later(self.cfg.idle_timeout, self._guarded(self._check_idle))
        self._drain()

    def set_reading(self, on: bool) -> None:
        # A link we stopped reading is not idle: its quiet time starts again
        # when reading resumes (muxd.hub holds the device for a lossless reader).
        self._last_rx = self.reactor.now()
        super().set_reading(on)

    def _check_idle(self) -> None:
        if not self._reading:  # held: what the K2 sends waits in its window
            self._last_rx = self.reactor.now()
        left = self._last_rx + self.cfg.idle_timeout - self.reactor.now()
        if left > 0:
            self._idle_timer = self.reactor.call_later(left, self._guarded(self._check_idle))
        else:
            self._idle_timer = None
            self._lost("idle timeout")

    def _drop_fd(self) -> None:
        for timer in (self._connect_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._connect_timer = self._idle_timer = None
        super()._drop_fd()  # a connected socket: unregistered and closed by _close_fd()
        if self._sock is not None:  # a connect still in progress
            self.reactor.remove(self._sock.fileno())
            self._close_fd()
        self._codec = None
        self._com_port = False
        self._unanswered = dict.fromkeys(self._unanswered, 0)
        for asked in self._asked.values():
            asked.clear()
        self.control = dataclasses.replace(self.control, brk=False)  # a BREAK ends with the link
        self._sent = 0
        self._out.clear()

    def _close_fd(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _lost(self, reason: str) -> None:
        unacked = self._unacknowledged()
        if unacked:
            self.bytes_unacked_lost += unacked
            log.warning(
                "%s: %d bytes written to the K2 were not acknowledged when the link was dropped; "
                "they may not have reached the device",
                self.hub.name,
                unacked,
            )
        super()._lost(reason)

    def _unacknowledged(self) -> int:
        if self._sock is None or self.fd is None:
            return 0
        info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        if len(info) < BYTES_ACKED + 8:  # a kernel older than 4.1: assume the worst
            return self._sent + len(self._out)
        acked: int = struct.unpack_from("=Q", info, BYTES_ACKED)[0]
        return max(0, self._sent - (acked - 1)) + len(self._out)

    def _loss_reason(self, exc: OSError | None) -> str:
        if exc is None:
            return "closed by peer"
        return _LOSS_REASONS.get(exc.errno or 0) or _strerror(exc.errno or 0)

    # -- data -------------------------------------------------------------------

    def _read(self) -> bytes:
        assert self._sock is not None
        return self._sock.recv(READ_SIZE)

    def _received(self, data: bytes) -> None:
        self._last_rx = self.reactor.now()
        codec = self._codec
        if codec is None:
            self.hub.publish(data)
            return
        try:
            codec.receive_data(data)
        except RemoteProtocolError as exc:
            self._lost(f"protocol error: {exc}")
            return
        for event in codec.next_events():
            if isinstance(event, Data):
                self.hub.publish(event.data)
            elif isinstance(event, ComPortOption):
                self._com_port = event.enabled
                if event.enabled:
                    self._ask_settings(codec, self.settings)  # collected with the answers below
                    self._queue_control(codec, self.control.dtr, self.control.rts, None)
                else:
                    log.warning(
                        "%s: the K2 refused RFC 2217 COM-PORT-OPTION; line settings stay as they are",
                        self.hub.name,
                    )
            elif isinstance(event, (SetBaudrate, SetDataSize, SetParity, SetStopSize, SetControl)):
                self._reconcile(event)
            elif isinstance(event, NotifyModemstate) and event.value is not None:
                v = event.value
                self._modem = ModemLines(
                    cts=bool(v & NotifyModemstate.CTS),
                    dsr=bool(v & NotifyModemstate.DSR),
                    ri=bool(v & NotifyModemstate.RI),
                    cd=bool(v & NotifyModemstate.CD),
                )
            else:
                log.debug("%s: RFC 2217: %s", self.hub.name, event)
        self._out += codec.data_to_send()
        if len(self._out) > OUT_LIMIT:
            self._lost("protocol error: negotiation flood")
        elif self._out and self.fd is not None:
            self._drain()

    def _out_mask(self) -> int:
        return OUT if self._out or self.hub.writes.queue.bytes else 0

    def _drain(self) -> None:
        try:
            self._flush_out()
        except OSError as exc:
            self._lost(self._loss_reason(exc))
            return
        super()._drain()

    def _flush_out(self) -> bool:
        """Send what _out holds; True when it is empty. May raise OSError."""
        assert self._sock is not None
        while self._out:
            try:
                n = self._sock.send(self._out)
            except BlockingIOError:
                return False
            del self._out[:n]
            self._sent += n
        return True

    def _write(self, data: memoryview) -> int:
        assert self._sock is not None
        if self._out:
            raise BlockingIOError  # control bytes or encoded data go first
        if self._codec is None:
            n = self._sock.send(data)
            self._sent += n
            return n
        chunk = data[:ENCODE_CHUNK]
        self._codec.send(Data(bytes(chunk)))
        self._out += self._codec.data_to_send()
        try:
            self._flush_out()
        except OSError:
            self._out.clear()  # not consumed: the chunk goes to the next link whole
            raise
        return len(chunk)

    # -- line settings ------------------------------------------------------------

    def apply_settings(self, wanted: LineSettings) -> LineSettings:
        """New line settings (from muxd.linecontrol), passed on to the K2 as
        ``control`` allows; ``settings`` is also what every later connection sends.

        Returns ``wanted``: the vendor packet has no answer, and an RFC 2217
        answer arrives later (``_reconcile`` then corrects ``settings``). Raises
        SettingsRefused, changing nothing, when the K2 cannot be told
        (``control: none``) or the packet cannot carry the value.
        """
        if wanted == self.settings:
            return wanted
        control = self.cfg.control
        if control == "none":
            raise SettingsRefused("with control: none the K2 keeps the line settings set on its web page")
        message = b""
        try:
            if control == "usr":
                message = usr.encode(wanted)
            else:
                # A throwaway codec first: a value refused half-way through the
                # live codec's configure() would leave part of it queued.
                Rfc2217Client().configure(wanted)
        except LocalProtocolError as exc:
            raise SettingsRefused(f"the K2 cannot be sent {wanted}: {exc}") from exc
        if control == "rfc2217" and self._codec is not None and self._com_port:
            # Only the fields that change: a client changing one at a time (pyserial
            # sets each attribute on its own) costs one request each, not the lot.
            changed = [f for f in SETTING_FIELDS if getattr(wanted, f) != getattr(self.settings, f)]
            self._ask_settings(self._codec, wanted, changed)
            message = self._codec.data_to_send()
        # else (rfc2217): sent once the next link agrees to COM-PORT-OPTION (_received)
        self.settings = wanted
        if self.fd is not None and message:
            self._out += message
            self._drain()
        return wanted

    def _ask_settings(
        self, codec: Rfc2217Client, wanted: LineSettings, fields: tuple[str, ...] | list[str] = SETTING_FIELDS
    ) -> None:
        """Queue a request for each field given (the caller collects the bytes),
        and remember what was asked until its answer comes (``_reconcile``)."""
        codec.configure(wanted, fields)
        for f in fields:
            self._asked[f].append(getattr(wanted, f))

    # -- control lines -------------------------------------------------------------

    def set_control(
        self, dtr: bool | None = None, rts: bool | None = None, brk: bool | None = None
    ) -> ControlLines:
        """SET-CONTROL for each line given, in the order DTR, RTS, BREAK.

        Returns the lines as asked (the K2's answers, which carry its levels,
        correct ``control`` when they come: ``_reconcile``). Raises
        SettingsRefused with ``control: none`` or ``usr``, and for a BREAK
        while the K2 cannot be told at once.
        """
        control = self.cfg.control
        if control != "rfc2217":
            raise SettingsRefused(
                f"with control: {control} the K2 cannot be sent DTR, RTS or BREAK (use control: rfc2217)"
            )
        live = self._codec is not None and self._com_port and self.fd is not None
        if brk is not None and not live:
            raise SettingsRefused("the K2 link is down (or refused COM-PORT-OPTION): no BREAK to send")
        current = self.control
        self.control = ControlLines(
            current.dtr if dtr is None else dtr,
            current.rts if rts is None else rts,
            current.brk if brk is None else brk,
        )
        if live:
            assert self._codec is not None
            self._queue_control(self._codec, dtr, rts, brk)
            self._out += self._codec.data_to_send()
            self._drain()
        # else: DTR and RTS go out once the next link agrees to COM-PORT-OPTION (_received)
        return self.control

    def _queue_control(
        self, codec: Rfc2217Client, dtr: bool | None, rts: bool | None, brk: bool | None
    ) -> None:
        """Queue SET-CONTROL for each line given (the caller collects the bytes)."""
        for line, value, on, off in (
            ("dtr", dtr, SetControl.DTR_ON, SetControl.DTR_OFF),
            ("rts", rts, SetControl.RTS_ON, SetControl.RTS_OFF),
            ("brk", brk, SetControl.BREAK_ON, SetControl.BREAK_OFF),
        ):
            if value is not None:
                codec.send(SetControl(on if value else off))
                self._unanswered[line] += 1

    def modem_state(self) -> ModemLines | None:
        """What the K2 last reported with NOTIFY-MODEMSTATE; None if it never did."""
        return self._modem

    def _reconcile(self, answer: ComPortCommand) -> None:
        """An RFC 2217 answer to one of our requests: it carries the value the K2
        has in force, which becomes ours. A K2 that cannot take a baud rate
        answers with the one it kept; that is what readers are told from now on.

        Requests are answered in order, each field on its own (a K2 may answer
        a change of four fields with four answers, spread out), so an answer is
        matched to the oldest unanswered request of its field (``_asked``), as
        SET-CONTROL answers are to theirs (``_unanswered``): only the answer to
        the latest request of a field says what is in force, and an answer
        that is what was asked changes nothing and logs nothing.
        """
        if isinstance(answer, SetControl) and answer.flow is None:
            line, level = next(
                (
                    (k, v)
                    for k, v in (("dtr", answer.dtr), ("rts", answer.rts), ("brk", answer.break_state))
                    if v is not None
                ),
                ("", None),
            )
            if level is None:
                log.debug("%s: RFC 2217: %s", self.hub.name, answer)
                return
            self._unanswered[line] = max(0, self._unanswered[line] - 1)
            if self._unanswered[line]:
                return  # a later request of ours is still on its way: its answer decides
            lines = dataclasses.replace(self.control, **{line: level})
            if lines != self.control:
                name = "BREAK" if line == "brk" else line.upper()
                word = ("on" if level else "off") if line == "brk" else ("high" if level else "low")
                log.info("%s: the K2 has %s %s in force, not what was asked", self.hub.name, name, word)
                self.control = lines
            return
        carried = setting_of(answer)
        if carried is None:  # no value (a query's form), or BREAK/DTR/RTS: not a line setting
            log.debug("%s: RFC 2217: %s", self.hub.name, answer)
            return
        field, value = carried
        asked = self._asked[field]
        if asked:
            wanted = asked.popleft()  # the request this answers
            if asked:  # a later request of ours for this field is on its way: its answer decides
                if value != wanted:
                    log.debug(
                        "%s: the K2 answered %s=%s to %s (superseded)", self.hub.name, field, value, wanted
                    )
                return
        # The answer to the latest request for this field, or the K2's own news.
        if value != getattr(self.settings, field):
            granted = dataclasses.replace(self.settings, **{field: value})
            log.info(
                "%s: the K2 has line settings %s in force where %s was asked",
                self.hub.name,
                granted,
                self.settings,
            )
            self.settings = granted


def _strerror(err: int) -> str:
    return os.strerror(err).lower()
