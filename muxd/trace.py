"""Trace files: an independent record of a port, kept whether or not anyone is connected.

A trace is a reader of the hub like any other: a cursor, a bound
(TRACE_BACKLOG) and a counted overflow. Its transport is a file. ``format``
is ``text`` (a stamp per line), ``jsonl`` (a record per line) or ``raw`` (the
bytes as they came); see muxd.records. In text and jsonl the events of the
port go in too (upstream down/up, a gap where the trace itself lost bytes),
and with ``input: true`` so does what clients wrote, with who wrote it
(``"dir": "tx", "client": ID`` in jsonl, ``>> [client 7 peer] ...`` in text).

Never blocking the device. Regular files cannot be watched with epoll, so a
trace is written on a timer (FLUSH_INTERVAL), at most WRITE_LIMIT bytes per
turn; the hub never wakes it per chunk (it counts as blocked), but judges its
backlog against TRACE_BACKLOG like any reader's. A disk that is full or failing
costs trace bytes, never device bytes: a failed write skips what it could not
write, counts it in ``dropped`` (muxd_trace_dropped_bytes_total), logs once
until writing works again, and the next turn simply tries again. Page-cache
writes do not wait for the disk; a filesystem that blocks inside write()
(a hung NFS server) would hold the loop for that call, which is why traces
belong on local disks.

Rotation. With ``rotate: SIZE``, a file that would pass SIZE is renamed to
PATH.1 (PATH.1 to PATH.2, ... up to ``keep``) and a new one begun. ``reopen()``
(SIGHUP, or POST /api/v1/ports/NAME/trace/reopen) closes and reopens PATH, so
logrotate's move-then-signal works too. New files get ``mode`` (default 0640)
and, where given, ``group``.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import time

from muxd.config import TraceFile
from muxd.hub import Hub, Reader, ReaderPolicy
from muxd.reactor import Reactor, Timer
from muxd.records import TextEncoder, stamp

log = logging.getLogger("muxd.trace")

# A trace may lag this far behind the device before it loses bytes (counted):
# 1 MiB is over a minute of a 115200-baud port, enough to ride out a slow disk.
TRACE_BACKLOG = 1024 * 1024
# How often pending output is written: a quarter second is "live" for a human
# tailing the file, few syscalls for a quiet port, and under a flood of
# 1 MB/s a quarter of TRACE_BACKLOG.
FLUSH_INTERVAL = 0.25
# The most written per turn: one turn of the loop never spends long on a disk.
WRITE_LIMIT = 256 * 1024
# Client writes recorded per turn, at most; an input record beyond it is
# counted as dropped (a flood of input is not what a trace is for).
INPUT_LIMIT = 64 * 1024


class Trace:
    """One trace file of one port: a hub reader that writes on a timer."""

    def __init__(self, spec: TraceFile, hub: Hub, reactor: Reactor) -> None:
        self.spec = spec
        self.hub = hub
        self.reactor = reactor
        self.fd = -1
        self.size = 0
        self.written = 0
        self.dropped = 0  # trace bytes lost to a full disk or an I/O error
        self.rotations = 0
        self._failing: str | None = None  # the error being suppressed until writing works
        self._timer: Timer | None = None
        self._input_bytes = 0  # input recorded since the last flush
        policy = ReaderPolicy(
            listener=f"trace:{spec.path}",
            capacity=TRACE_BACKLOG,
            drop_oldest=True,
            writable=False,
            lines=False,
            notices=False,
            format=spec.format,
        )
        self.reader: Reader = hub.attach(self, policy, f"file:{spec.path}")
        if spec.input and spec.format != "raw":
            hub.input_observers.append(self._on_input)

    def start(self) -> None:
        self._open()
        self._schedule(FLUSH_INTERVAL)

    def stop(self) -> None:
        """Write what is pending, then close; the reader leaves the hub."""
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(ValueError):
            self.hub.input_observers.remove(self._on_input)
        self.hub.detach(self.reader, "stopped")
        self._close_fd()

    def reopen(self) -> None:
        """Close and open PATH again (after logrotate moved it away)."""
        self.flush()
        self._close_fd()
        self._open()

    # -- ReaderOwner: the hub wakes it; it writes on its own schedule ------------

    def on_data(self) -> None:
        self.hub.set_blocked(self.reader, True)  # never woken per chunk: the timer writes

    def on_write_room(self) -> None:
        pass

    def close(self, reason: str) -> None:
        log.error("%s: trace %s closed (%s)", self.hub.name, self.spec.path, reason)
        self.stop()

    # -- writing --------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and delay > 0:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.reactor.call_later(delay, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.flush()
        self._schedule(FLUSH_INTERVAL)

    def flush(self) -> None:
        hub, reader = self.hub, self.reader
        budget = WRITE_LIMIT
        while budget > 0 and (views := hub.pending(reader, budget)):
            data = b"".join(views)
            hub.advance(reader, len(data))
            self._write(data)
            budget -= len(data)
        self._input_bytes = 0
        self.hub.set_blocked(reader, True)

    def _write(self, data: bytes) -> None:
        if self.spec.rotate and self.size + len(data) > self.spec.rotate and self.size:
            self._rotate()
        if self.fd < 0:
            self._open()
            if self.fd < 0:
                self.dropped += len(data)
                return
        try:
            n = os.write(self.fd, data)
        except OSError as exc:
            self._failed(len(data), exc)
            return
        if n < len(data):  # a short write to a file: the disk filled up mid-way
            self._failed(len(data) - n, OSError(28, "short write"))
        elif self._failing is not None:
            log.warning("%s: trace %s writes again", self.hub.name, self.spec.path)
            self._failing = None
        self.size += n
        self.written += n

    def _failed(self, lost: int, exc: OSError) -> None:
        self.dropped += lost
        if self._failing is None:
            log.error(
                "%s: trace %s: %s; its bytes are dropped (counted) until writing works again",
                self.hub.name,
                self.spec.path,
                exc.strerror or exc,
            )
        self._failing = str(exc)

    def _on_input(self, reader: Reader, data: bytes) -> None:
        """What a client wrote to the device, recorded where it happened in the
        device's stream (an in-band record at the current offset)."""
        if self._input_bytes + len(data) > INPUT_LIMIT:
            self.dropped += len(data)
            return
        record = self._input_record(reader, data)
        self._input_bytes += len(record)
        self.reader.notices.append((self.hub.head, record))

    def _input_record(self, reader: Reader, data: bytes) -> bytes:
        encoder = self.reader.log.encoder if self.reader.log is not None else None
        now = time.time()
        if isinstance(encoder, TextEncoder):
            lead = "" if encoder.at_line_start else "\n"
            text = data.decode("utf-8", "backslashreplace").rstrip("\r\n")
            return f"{lead}{stamp(now)} >> [client {reader.id} {reader.peer}] {text}\n".encode()
        assert encoder is not None
        text = data.decode("utf-8", "surrogateescape")
        return encoder.event(now, "", dir="tx", client=reader.id, peer=reader.peer, data=text)

    # -- files ----------------------------------------------------------------

    def _open(self) -> None:
        spec = self.spec
        try:
            fd = os.open(spec.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, spec.file_mode)
        except OSError as exc:
            self._failed(0, exc)
            return
        self.fd = fd
        self.size = os.fstat(fd).st_size
        if spec.group is not None:
            try:
                gid = spec.group if isinstance(spec.group, int) else grp.getgrnam(spec.group).gr_gid
                os.fchown(fd, -1, gid)
            except (KeyError, OSError) as exc:
                log.warning(
                    "%s: trace %s: cannot set group %s: %s", self.hub.name, spec.path, spec.group, exc
                )

    def _close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _rotate(self) -> None:
        self._close_fd()
        path, keep = self.spec.path, self.spec.keep
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}.{keep}")
        for i in range(keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{path}.{i}", f"{path}.{i + 1}")
        if keep > 0:
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, f"{path}.1")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.rotations += 1
        self._open()
