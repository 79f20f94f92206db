"""Trace files: an independent record of a port, kept whether or not anyone is connected.

A trace is a reader of the hub like any other: a cursor, a bound
(TRACE_BACKLOG) and a counted overflow. Its transport is a file. ``format``
is ``text`` (a stamp per line), ``jsonl`` (a record per line) or ``raw`` (the
bytes as they came); see muxd.records. In text and jsonl the events of the
port go in too (upstream down/up, a gap where the trace itself lost bytes),
and with ``input: true`` so does what clients wrote, with who wrote it
(``"dir": "tx", "client": ID`` in jsonl, ``>> [client 7 peer] ...`` in text).
With ``events: true`` (off by default, as conserver's ``a`` and ``b`` log
flags are) the port's control events go in as well, with who caused them: a
client attaching or leaving, the write lock changing hands, a BREAK, a
sequence (muxd.writes ``events``; ``{"event": "attach", "client": ID,
"peer": ..., "listener": ...}`` in jsonl, ``-- muxd: LISTENER PEER attached
--`` in text).

Never blocking the device. Regular files cannot be watched with epoll, so a
trace is written on a timer (FLUSH_INTERVAL after the first byte pending), and
at once by the fan-out pass when EAGER bytes (at most a quarter of the ring) are
pending, at most WRITE_LIMIT bytes per call: a port that talks costs a write
every quarter second, a quiet one nothing (the timer is armed only while
something waits), and a flood is written as it comes, so the trace keeps up with
any rate the device reaches and loses bytes (counted as ``backlog``, with a gap
record) only if the ring overwrote them first. A disk that is full or failing
costs trace bytes, never device bytes: a failed write skips what it could not
write, counts it in ``dropped`` (muxd_trace_dropped_bytes_total, reason
``disk``), logs once until writing works again, and the next write simply tries
again (opening PATH again if it had to). Page-cache writes do not wait for the
disk; a filesystem that blocks inside write() (a hung NFS server) would hold
the loop for that call, which is why traces belong on local disks.

Rotation. With ``rotate: SIZE``, no file passes SIZE: what does not fit is cut
(text and jsonl after the last whole line that fits, raw at the byte), PATH is
renamed to PATH.1 (PATH.1 to PATH.2, ... up to ``keep``; PATH.keep is removed)
and a new one begun. ``reopen()`` (SIGHUP, or POST
/api/v1/ports/NAME/trace/reopen) closes and reopens PATH, so logrotate's
move-then-signal works too. New files get ``mode`` (default 0640, whatever the
umask) and, where given, ``group``; an existing file is appended to as it is.
PATH is never followed if it is a symbolic link, nor written if it is a block
device: that is refused like a failing disk (logged, bytes counted as dropped)
until PATH is a file again. A FIFO or a character device is written, without
blocking.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time

from muxd.checks import group_id
from muxd.config import TraceFile
from muxd.files import kind_of
from muxd.hub import MAX_NOTICES, Hub, Reader, ReaderPolicy
from muxd.reactor import Reactor, Timer
from muxd.records import TextEncoder, stamp

log = logging.getLogger("muxd.trace")

# The reader's nominal bound. A trace is never "blocked" (its writes are
# synchronous), so in practice it loses bytes only to the ring: see EAGER.
TRACE_BACKLOG = 1024 * 1024
# How often pending output is written: a quarter second is "live" for a human
# tailing the file, few syscalls for a quiet port, and under a flood of
# 1 MB/s a quarter of TRACE_BACKLOG.
FLUSH_INTERVAL = 0.25
# The most written per turn: one turn of the loop never spends long on a disk.
WRITE_LIMIT = 256 * 1024
# Pending bytes that get written at once instead of on the timer: 64 KiB is
# over 5 s of a 115200-baud port (so a serial console is written four times a
# second, in few syscalls), and a flood faster than WRITE_LIMIT per
# FLUSH_INTERVAL is written as it comes rather than overrun in the ring. Never
# more than a quarter of the ring, so a small ring is written before it wraps.
EAGER = 64 * 1024
# Input records pending before they are written at once: the hub keeps at most
# MAX_NOTICES in-band records per reader and drops the oldest beyond that.
INPUT_RECORDS = MAX_NOTICES // 2
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
            hub.writes.observers.append(self._on_input)
        if spec.events and spec.format != "raw":
            hub.writes.events.append(self._on_event)

    def start(self) -> None:
        self._open()

    def stop(self) -> None:
        """Write what is pending, then close; the reader leaves the hub."""
        if self.reader.id in self.hub.readers:
            self.flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(ValueError):
            self.hub.writes.observers.remove(self._on_input)
        with contextlib.suppress(ValueError):
            self.hub.writes.events.remove(self._on_event)
        self.hub.detach(self.reader, "stopped")
        self._close_fd()

    def reopen(self, reason: str = "admin request") -> None:
        """Close and open PATH again (after logrotate moved it away). Text and
        jsonl files get a marked line there, saying why (``reload`` on SIGHUP)."""
        self.flush()
        self._close_fd()
        self._open()
        text = f"{self.hub.name} trace reopened ({reason})"
        self.hub.notice_to(self.reader, text, event="reopen", reason=reason)

    # -- ReaderOwner: the hub wakes it; it writes on its own schedule ------------

    def on_data(self) -> None:
        """The fan-out pass: the device sent more. A quiet port waits for the
        timer; a busy one is written now, before the ring can wrap past it."""
        # Small chunks make many records: the format's own ring must not wrap either.
        if self.hub.behind(self.reader, EAGER):
            self.flush()
        if not self.hub.caught_up(self.reader):
            self._schedule(FLUSH_INTERVAL)

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
        # Armed again only while something waits (WRITE_LIMIT was reached):
        # a quiet port has no timer at all.
        if not self.hub.caught_up(self.reader):
            self._schedule(FLUSH_INTERVAL)

    def flush(self) -> None:
        budget = WRITE_LIMIT
        while budget > 0 and (data := self.hub.take(self.reader, budget)):
            self._write(data)
            budget -= len(data)
        self._input_bytes = 0

    def _write(self, data: bytes) -> None:
        """Write data, rotating wherever the next byte would pass ``rotate``."""
        limit = self.spec.rotate
        while data:
            piece = data
            if limit and len(data) > limit - self.size:
                n = self._fits(data, limit - self.size)
                if n == 0 and self.size:
                    self._rotate()  # leaves size 0: the next round writes
                    continue
                piece = data[: n or limit]  # a record longer than a whole file is cut
            data = data[len(piece) :]
            self._write_file(piece)

    def _fits(self, data: bytes, room: int) -> int:
        """How much of data goes in a file with room bytes left: whole lines
        of text and jsonl (0 if not one fits), any bytes of raw."""
        if room <= 0:
            return 0
        if self.spec.format == "raw":
            return room
        return data.rfind(b"\n", 0, room) + 1

    def _write_file(self, data: bytes) -> None:
        if self.fd < 0:
            self._open()
            if self.fd < 0:
                self.dropped += len(data)
                return
        try:
            n = os.write(self.fd, data)
        except OSError as exc:
            self._failed(len(data), exc)
            # The next write opens PATH again: a stale NFS handle, a FIFO whose
            # reader went, a volume remounted recover only that way.
            self._close_fd()
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
        self.hub.insert(self.reader, record)
        if len(self.reader.notices) >= INPUT_RECORDS:
            self.flush()  # before the hub's bound on notices drops one

    def _on_event(self, name: str, text: str, fields: dict[str, object]) -> None:
        """A control event of the port (attach, detach, lock, break, sequence),
        recorded where it happened in the device's stream."""
        if self.reader.doomed is not None or self.reader.id not in self.hub.readers:
            return
        self.hub.notice_to(self.reader, text, **{**fields, "event": name})
        if len(self.reader.notices) >= INPUT_RECORDS:
            self.flush()  # before the hub's bound on notices drops one

    def _input_record(self, reader: Reader, data: bytes) -> bytes:
        """One record per line written (a line ends after LF), stamped now."""
        encoder = self.reader.log.encoder if self.reader.log is not None else None
        now = time.time()
        lines = [line + b"\n" for line in data.split(b"\n")]
        lines[-1] = lines[-1][:-1]
        if not lines[-1]:
            lines.pop()
        if isinstance(encoder, TextEncoder):
            # On lines of their own, each stamped; a device line in progress is
            # ended first and goes on after them stamped again, as after a notice.
            mid_line = not encoder.at_line_start
            tag = f"{stamp(now)} >> [client {reader.id} {reader.peer}] "
            text = "".join(
                f"{tag}{line.decode('utf-8', 'backslashreplace').rstrip(chr(13) + chr(10))}\n"
                for line in lines
            )
            return ("\n" + text + f"{stamp(now)} " if mid_line else text).encode()
        assert encoder is not None
        return b"".join(
            encoder.event(
                now,
                "",
                dir="tx",
                client=reader.id,
                peer=reader.peer,
                data=line.decode("utf-8", "surrogateescape"),
            )
            for line in lines
        )

    # -- files ----------------------------------------------------------------

    def _open(self) -> None:
        spec = self.spec
        # O_NONBLOCK: a FIFO with no reader must not hold the loop in open() (it
        # fails with ENXIO, and is tried again), nor a full one in write().
        # O_NOFOLLOW: a symlink put at PATH (after a rotation, before a reopen)
        # must not make muxd append console lines to whatever it names; it is
        # refused like a failing disk (logged once, bytes counted as dropped)
        # until PATH is a file again.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
        try:
            try:
                fd = os.open(spec.path, flags | os.O_CREAT | os.O_EXCL, spec.file_mode)
                created = True
            except FileExistsError:  # appended to as it is: an operator's chmod stays
                fd = os.open(spec.path, flags)
                created = False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                exc = OSError(errno.ELOOP, "it is a symbolic link, which is not followed")
            self._failed(0, exc)
            return
        try:
            st = os.fstat(fd)
            # A regular file; or what a config may name on purpose and O_NONBLOCK
            # keeps from blocking: a FIFO (a reader's pipe), a character device
            # (/dev/null, a tty). Never a block device (a disk's raw bytes).
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode)):
                raise OSError(errno.EINVAL, f"it is {kind_of(st.st_mode)}, not a regular file")
        except OSError as exc:
            os.close(fd)
            self._failed(0, exc)
            return
        self.size = st.st_size
        self.fd = fd
        if not created:
            return
        try:
            os.fchmod(fd, spec.file_mode)  # the mode configured, whatever the umask
        except OSError as exc:
            log.warning(
                "%s: trace %s: cannot set mode %04o: %s", self.hub.name, spec.path, spec.file_mode, exc
            )
        if spec.group is not None:
            try:
                os.fchown(fd, -1, group_id(spec.group))
            except (KeyError, OSError) as exc:
                log.warning(
                    "%s: trace %s: cannot set group %s: %s", self.hub.name, spec.path, spec.group, exc
                )

    def _close_fd(self) -> None:
        fd, self.fd, self.size = self.fd, -1, 0
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as exc:  # NFS may report a failed write-back here: those bytes are gone
                self._failed(0, exc)

    def _rotate(self) -> None:
        self._close_fd()
        path, keep = self.spec.path, self.spec.keep
        names = [path, *(f"{path}.{i}" for i in range(1, keep + 1))]
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(names[-1])
            for i in range(len(names) - 2, -1, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(names[i], names[i + 1])
        except OSError as exc:
            # A file that cannot move aside is appended to (it may pass SIZE);
            # the trace never stops for it.
            self._failed(0, exc)
        self.rotations += 1
        self._open()
