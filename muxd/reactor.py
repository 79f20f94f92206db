"""The event loop: the only code in muxd that calls epoll.

Every fd (device, listening sockets, clients, the signal pipe) is registered
with a callback that receives the epoll event mask. epoll is used
level-triggered on purpose: a handler may read a bounded amount per wake-up
(fairness between a flooding device and a thousand clients) and will simply be
woken again if more is pending, where edge-triggered mode would require
draining to EAGAIN every time.

Timers are a heap of deadlines on the monotonic clock. ``call_soon`` callbacks
run after the current batch of fd events, which is how the hub coalesces the
fan-out of several device reads into one pass over the clients.

A cancelled timer stays in the heap until its deadline pops it (removing it
from the middle of a heap costs O(n)), but it lets go of its callback at once,
so a closed connection is not kept alive by an idle timer due in 30 s. And, as
asyncio does, once cancelled timers are more than half of a heap of any size
the heap is rebuilt without them: a connection storm that arms and cancels a
timer per connection leaves a heap the size of the live timers, not of the
storm. The rebuild is O(n) after n/2 cancellations, so O(1) amortised.

Signals arrive through ``signal.set_wakeup_fd`` on a non-blocking pipe: the C
handler writes the signal number, the loop reads it and dispatches, so no
Python code runs in signal context.

A callback that raises is a bug of ours. The reactor logs it with its
traceback, counts it, and hands the exception to the fd's error callback (which
closes that one connection), so one bad client never takes the daemon down.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("muxd.reactor")

EventCallback = Callable[[int], None]
ErrorCallback = Callable[[BaseException], None]

IN = select.EPOLLIN
OUT = select.EPOLLOUT
# HUP and ERR are always reported by epoll; RDHUP tells a peer's FIN apart early.
ERRMASK = select.EPOLLHUP | select.EPOLLERR


# A heap is swept of cancelled timers when they are more than this fraction of
# it: asyncio's _MIN_CANCELLED_TIMER_HANDLES_FRACTION. Half keeps the heap at
# most twice its live size while each sweep is paid for by n/2 cancellations.
CANCELLED_FRACTION = 0.5
# ...and only past this many timers: a few cancelled ones are cheaper to pop as
# their deadlines come than to sweep (asyncio's _MIN_SCHEDULED_TIMER_HANDLES).
MIN_SWEEP = 100


@dataclass(order=True)
class Timer:
    when: float
    seq: int
    # None once cancelled: the callback (a bound method, so its whole connection)
    # is released now, not when the deadline pops the timer.
    callback: Callable[[], None] | None = field(compare=False)
    cancelled: bool = field(default=False, compare=False)
    # The reactor whose heap holds this timer; None once popped (fired or swept).
    _reactor: Reactor | None = field(default=None, compare=False, repr=False)

    def cancel(self) -> None:
        """Safe to call twice, and on a timer that already fired."""
        if self.cancelled:
            return
        self.cancelled = True
        self.callback = None
        reactor, self._reactor = self._reactor, None
        if reactor is not None:
            reactor._timer_cancelled()


@dataclass
class _Registration:
    callback: EventCallback
    on_error: ErrorCallback | None
    mask: int


class Reactor:
    # Wake-ups per poll are bounded so a thousand ready clients cannot starve timers.
    MAX_EVENTS = 1024

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fds: dict[int, _Registration] = {}
        self._timers: list[Timer] = []
        self._cancelled = 0  # cancelled timers still in _timers
        self._seq = itertools.count()
        self._soon: list[Callable[[], None]] = []
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._sig_r: int | None = None
        self._running = False
        self.busy_seconds = 0.0  # time spent handling events, not waiting in epoll
        self.internal_errors = 0

    # -- fds ---------------------------------------------------------------

    def add(self, fd: int, mask: int, callback: EventCallback, on_error: ErrorCallback | None = None) -> None:
        self._epoll.register(fd, mask)
        self._fds[fd] = _Registration(callback, on_error, mask)

    def modify(self, fd: int, mask: int) -> None:
        reg = self._fds[fd]
        if reg.mask != mask:
            self._epoll.modify(fd, mask)
            reg.mask = mask

    def mask(self, fd: int) -> int:
        return self._fds[fd].mask

    def remove(self, fd: int) -> None:
        """Forget fd; safe to call twice and for an fd already closed."""
        if self._fds.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    # -- time --------------------------------------------------------------

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.now() + max(0.0, delay), next(self._seq), callback, _reactor=self)
        heapq.heappush(self._timers, timer)
        return timer

    @property
    def timer_count(self) -> int:
        """Timers in the heap, cancelled ones included (for tests and diagnostics)."""
        return len(self._timers)

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        n = len(self._timers)
        if n > MIN_SWEEP and self._cancelled > n * CANCELLED_FRACTION:
            live = []
            for timer in self._timers:
                if timer.cancelled:
                    timer._reactor = None
                else:
                    live.append(timer)
            heapq.heapify(live)
            self._timers = live
            self._cancelled = 0

    def _pop_timer(self) -> Timer:
        timer = heapq.heappop(self._timers)
        if timer.cancelled:
            self._cancelled -= 1
        timer._reactor = None  # out of the heap: a cancel() from now on counts nothing
        return timer

    def call_soon(self, callback: Callable[[], None]) -> None:
        self._soon.append(callback)

    # -- signals -----------------------------------------------------------

    def add_signal(self, signum: int, handler: Callable[[int], None]) -> None:
        if self._sig_r is None:
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._sig_r = r
            self._sig_w = w
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            self.add(r, IN, self._on_signal_pipe)
        self._signal_handlers[signum] = handler
        # A Python-level handler must exist or the default action would kill us;
        # the real work happens in the loop when the wakeup byte is read.
        signal.signal(signum, lambda _s, _f: None)

    def _on_signal_pipe(self, _mask: int) -> None:
        assert self._sig_r is not None
        try:
            data = os.read(self._sig_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

    # -- loop --------------------------------------------------------------

    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        while self._running:
            self.run_once()

    def run_once(self, max_wait: float | None = None) -> None:
        timeout = self._next_timeout()
        if max_wait is not None:
            timeout = max_wait if timeout < 0 else min(timeout, max_wait)
        try:
            events = self._epoll.poll(timeout, self.MAX_EVENTS)
        except InterruptedError:  # EINTR: Python retries for us since PEP 475; belt and braces
            events = []
        started = time.monotonic()
        for fd, mask in events:
            reg = self._fds.get(fd)
            if reg is None:  # closed by an earlier callback in this batch
                continue
            self._dispatch(reg.on_error, reg.callback, mask)
        self._run_timers()
        self._run_soon()
        self.busy_seconds += time.monotonic() - started

    def _next_timeout(self) -> float:
        if self._soon:
            return 0.0
        while self._timers and self._timers[0].cancelled:
            self._pop_timer()
        if not self._timers:
            return -1.0
        return max(0.0, self._timers[0].when - self.now())

    def _run_timers(self) -> None:
        now = self.now()
        while self._timers and self._timers[0].when <= now:
            timer = self._pop_timer()
            callback = timer.callback
            if callback is not None:
                self._dispatch(None, callback)

    def _run_soon(self) -> None:
        # Callbacks queued while running go to the next turn, so a callback that
        # re-queues itself cannot spin this loop forever.
        batch, self._soon = self._soon, []
        for callback in batch:
            self._dispatch(None, callback)

    def _dispatch(self, on_error: ErrorCallback | None, fn: Callable[..., None], *args: int) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a bug of ours: contain it to the one owner
            self.internal_errors += 1
            log.error("internal error in event handler", exc_info=exc)
            if on_error is not None:
                try:
                    on_error(exc)
                except Exception as exc2:
                    log.error("internal error in error handler", exc_info=exc2)

    def close(self) -> None:
        if self._sig_r is not None:
            with contextlib.suppress(ValueError):
                signal.set_wakeup_fd(-1)
            for fd in (self._sig_r, self._sig_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._sig_r = None
        self._epoll.close()


def is_disconnect(exc: OSError) -> bool:
    """True for the errors that just mean the peer went away."""
    return exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.ECONNABORTED)
