"""A fake USR IOT K2 serial-to-Ethernet converter in TCP-server mode, for tests.

What the real K2 does, and this fake copies: every byte arriving on its UART
goes to every connected TCP client; bytes any client sends go out of its UART.
It takes up to ``max_clients`` clients and, when a new one arrives while full,
closes the OLDEST to make room. Here "the UART" is ``feed()`` (in) and
``uart_received()`` (out). Not modelled: baud-rate pacing (what clients send is
on the UART at once), "55 AA 55" control packets (recorded as UART bytes like
any other), RFC 2217 unless asked for (``rfc2217=True``, below), and the
optional registration/heartbeat packets.

Theory of operation: one daemon thread owns every socket and a selector on
127.0.0.1. Other threads never touch a socket. Each public mutator queues a
command, wakes the thread through a socketpair and waits until the thread has
applied it, so when the call returns its effect is in place (data queued to
every client, sockets reset, listener closed). All state lives under one
Condition, which the thread notifies after every round of events; ``wait_for``
and ``wait_uart`` wait on it, so tests never sleep.

Faults, each switched at runtime: ``reset_all()`` (RST every client),
``black_hole()`` (a hung device: see there), ``refuse()`` (no listener, so
connects are refused; the same port comes back), ``accept_delay()``,
``on_connect()`` (what each new connection gets: served, a banner and a close,
one byte and a close, or an RST) and ``trickle()`` (at most one byte per client
per interval: a K2 whose UART side crawls).

With ``rfc2217=True`` it is a K2 set to RFC 2217 mode: each connection
speaks Telnet + COM-PORT-OPTION through muxd's own sans-I/O server codec,
data is unescaped into the UART log (and escaped on the way out), and every
COM-PORT command a client sends is recorded with its arrival time
(``commands()``, ``control_received()``: what reached "the K2", in order)
and answered as a K2 does, with the value in force. DTR/RTS/BREAK levels are
kept (``lines``). ``spread_answers(interval)`` makes it answer as some K2s do,
one field at a time: each answer in its own packet, one per interval, so the
answers to a multi-field change trail behind the requests that follow it.

Nothing is lost silently. ``lost`` counts fed bytes that reached no client (none
connected, or black hole); ``dropped`` counts bytes queued for a client that
never reached its socket (buffer full, or the client closed with output
pending); ``uart_dropped`` counts the oldest UART-log bytes trimmed past its bound.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import selectors
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType

from muxd.protocol.line_settings import LineSettings
from muxd.protocol.rfc2217 import (
    ComPortCommand,
    ComPortOption,
    ConnectionClosed,
    Data,
    Rfc2217Server,
    SetControl,
    settings_with,
)

HOST = "127.0.0.1"
DEFAULT_MAX_CLIENTS = 4
# The K2's web page allows 1 to 16 clients.
MAX_CLIENTS_LIMIT = 16

# Bytes waiting for one client beyond what its kernel socket buffer already holds.
# An embedded converter holds little per connection and loses the excess: the holes
# its extra readers see. 64 KiB is enough that a client which keeps reading never
# loses a byte to the fake, yet a stalled client cannot grow memory without bound.
CLIENT_BUFFER = 64 * 1024

# What clients sent, kept for tests to assert on. 16 MiB is far above what any test
# writes towards the device (commands, lines, a bench burst) and still bounds memory
# if one pumps without end; past it the oldest bytes go, counted in uart_dropped.
UART_LOG_LIMIT = 16 * 1024 * 1024

# COM-PORT commands kept for tests in RFC 2217 mode: a few thousand esptool
# resets' worth; past it the oldest go.
COMMAND_LOG_LIMIT = 10_000

# One recv() per readiness event: as much as loopback hands over in one go.
RECV_SIZE = 64 * 1024

# How long a public call waits for the thread to apply it. The thread blocks only in
# select(), so this expires only when it is wedged or dead, never in normal use.
COMMAND_TIMEOUT = 5.0

DEFAULT_WAIT = 5.0

# What on_connect() does with each new connection.
SERVE = "serve"  # a K2: keep it and feed it
BANNER_AND_CLOSE = "banner-and-close"  # send BANNER, then FIN
ONE_BYTE_AND_CLOSE = "one-byte-and-close"  # send one byte, then FIN
RST = "rst"  # accept, then reset at once
CONNECT_MODES = (SERVE, BANNER_AND_CLOSE, ONE_BYTE_AND_CLOSE, RST)
# A greeting as some serial servers send one; short, so one send() always takes it whole.
BANNER = b"USR-K2 ready\r\n"

# SO_LINGER on with a zero timeout: close() sends RST and discards unsent data.
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass(eq=False)
class _Command:
    fn: Callable[[], None]
    done: bool = False
    error: OSError | None = None


@dataclass(eq=False)
class _Client:
    sock: socket.socket
    out: bytearray = field(default_factory=bytearray)
    # The selector events watched now; 0 means not registered.
    events: int = 0
    # RFC 2217 mode: this connection's telnet/COM-PORT codec.
    codec: Rfc2217Server | None = None
    # spread_answers(): answers not sent yet, one packet each, oldest first.
    answers: deque[bytes] = field(default_factory=deque)


class FakeK2:
    """A K2 in TCP-server mode on 127.0.0.1, running from construction until ``stop()``."""

    def __init__(
        self, port: int = 0, *, max_clients: int = DEFAULT_MAX_CLIENTS, rfc2217: bool = False
    ) -> None:
        if not 1 <= max_clients <= MAX_CLIENTS_LIMIT:
            raise ValueError(f"max_clients must be 1..{MAX_CLIENTS_LIMIT}, not {max_clients}")
        self._max_clients = max_clients
        self._cond = threading.Condition(threading.RLock())
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = _listen(port)
        self._port: int = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, self._on_wake)
        self._sel.register(self._listener, selectors.EVENT_READ, self._on_listener)
        # Oldest first: a full K2 kicks _clients[0].
        self._clients: list[_Client] = []
        # At most one command per calling thread, since every call waits for its own.
        self._commands: deque[_Command] = deque()
        self._black_hole = False
        self._accept_delay = 0.0
        self._connect_mode = SERVE
        self._trickle: float | None = None  # seconds per byte per client; None: off
        self._trickle_at: float | None = None  # when the next trickled bytes go
        self._spread: float | None = None  # seconds between answers; None: answer at once
        self._spread_at: float | None = None  # when the next spread answers go
        # When set, a connection waits in the backlog and the listener is not watched.
        self._accept_at: float | None = None
        self._uart = bytearray()
        self._rfc2217 = rfc2217
        # RFC 2217 mode: (monotonic arrival time, command) of every COM-PORT
        # command received, bounded like the UART log (oldest dropped).
        self._commands_log: deque[tuple[float, ComPortCommand]] = deque(maxlen=COMMAND_LOG_LIMIT)
        self._settings = LineSettings()
        self._lines: dict[str, bool] = {}
        self._connections_seen = 0
        self._max_active_seen = 0
        self._kicked = 0
        self._lost = 0
        self._dropped = 0
        self._uart_dropped = 0
        self._stopping = False
        self._alive = True
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"FakeK2:{self._port}", daemon=True)
        self._thread.start()

    # -- public face ---------------------------------------------------------

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self._port)

    @property
    def connections_seen(self) -> int:
        """Connections accepted since start."""
        with self._cond:
            return self._connections_seen

    @property
    def active(self) -> int:
        """Clients connected now."""
        with self._cond:
            return len(self._clients)

    @property
    def max_active_seen(self) -> int:
        """The most clients ever connected at once."""
        with self._cond:
            return self._max_active_seen

    @property
    def kicked(self) -> int:
        """Oldest clients closed to make room for a new one."""
        with self._cond:
            return self._kicked

    @property
    def lost(self) -> int:
        """Fed bytes that reached no client: none connected, or black hole."""
        with self._cond:
            return self._lost

    @property
    def dropped(self) -> int:
        """Bytes queued for a client that never reached its socket, summed over clients."""
        with self._cond:
            return self._dropped

    @property
    def uart_dropped(self) -> int:
        """Oldest bytes trimmed from the UART log past UART_LOG_LIMIT."""
        with self._cond:
            return self._uart_dropped

    def uart_received(self) -> bytes:
        """Everything clients sent (out of the UART), in arrival order."""
        with self._cond:
            return bytes(self._uart)

    def commands(self) -> list[tuple[float, ComPortCommand]]:
        """RFC 2217 mode: (monotonic arrival time, command) of every COM-PORT command, in order."""
        with self._cond:
            return list(self._commands_log)

    def control_received(self) -> list[tuple[float, SetControl]]:
        """RFC 2217 mode: the SET-CONTROL commands for DTR, RTS and BREAK (not flow control), in order."""
        return [
            (t, c)
            for t, c in self.commands()
            if isinstance(c, SetControl) and SetControl.BREAK_QUERY <= c.value <= SetControl.RTS_OFF
        ]

    @property
    def lines(self) -> dict[str, bool]:
        """RFC 2217 mode: the levels set so far, by "dtr", "rts", "break" (absent: never set)."""
        with self._cond:
            return dict(self._lines)

    def feed(self, data: bytes) -> None:
        """Bytes arriving on the UART: queued to every client when this returns."""
        self._submit(partial(self._broadcast, bytes(data)))

    def reset_all(self) -> None:
        """Close every client with RST (SO_LINGER on, linger 0)."""
        self._submit(self._reset_all)

    def black_hole(self, on: bool) -> None:
        """A hung K2: connections stay up, nothing is sent to or read from any client.

        This is a K2 whose TCP stack runs while its serial side is wedged. New
        connections are still accepted (and kicked for), and are silent too. Data
        fed meanwhile is lost (counted in ``lost``); bytes already queued for a
        client, and what clients send meanwhile (left in the kernel's receive
        buffer until its window closes), flow again when switched off. A K2 dead
        altogether would stop ACKing too; that cannot be faked from userspace, as
        the kernel ACKs for us (it needs an nftables DROP or tc netem). So TCP
        keepalive sees this fake as healthy: only an idle timeout detects it.
        """
        self._submit(partial(self._set_black_hole, on))

    def refuse(self, on: bool) -> None:
        """On: close the listener so connects get ECONNREFUSED. Off: listen again on the same port.

        Connected clients are untouched (use ``reset_all`` as well for a reboot).
        Connections still in the backlog are reset by the kernel.
        """
        self._submit(partial(self._set_refuse, on))

    def accept_delay(self, seconds: float) -> None:
        """Wait this long before accepting each connection noticed from now on.

        The kernel completes the handshake regardless, so a client's connect()
        returns at once; the connection sits in the backlog unserved meanwhile
        (its sends queue up, nothing is fed to it, it is not counted yet).
        """
        if seconds < 0:
            raise ValueError(f"accept delay must be >= 0, not {seconds}")
        self._submit(partial(self._set_accept_delay, seconds))

    def on_connect(self, mode: str) -> None:
        """What each connection accepted from now on gets (see CONNECT_MODES).

        Connections already open are untouched. The closing modes still count in
        ``connections_seen``: that is how a test measures a client's reconnect rate.
        """
        if mode not in CONNECT_MODES:
            raise ValueError(f"connect mode must be one of {CONNECT_MODES}, not {mode!r}")
        self._submit(partial(self._set_connect_mode, mode))

    def trickle(self, interval: float | None) -> None:
        """Send each client at most one byte per ``interval`` seconds (None: as fast as it reads).

        Fed bytes queue per client as usual (bounded by CLIENT_BUFFER) and drip out.
        """
        if interval is not None and interval <= 0:
            raise ValueError(f"trickle interval must be > 0, not {interval}")
        self._submit(partial(self._set_trickle, interval))

    def spread_answers(self, interval: float | None) -> None:
        """RFC 2217 mode: send each COM-PORT answer in its own packet, at most one
        per client per ``interval`` seconds, in order (None: answer at once)."""
        if interval is not None and interval <= 0:
            raise ValueError(f"answer interval must be > 0, not {interval}")
        self._submit(partial(self._set_spread, interval))

    @property
    def answers_pending(self) -> int:
        """spread_answers(): answers not yet sent, over all clients."""
        with self._cond:
            return sum(len(c.answers) for c in self._clients)

    def wait_for(self, predicate: Callable[[], object], timeout: float = DEFAULT_WAIT) -> bool:
        """Wait until ``predicate()`` is true, re-checked on every state change; False on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: bool(predicate()) or not self._alive, timeout)
            self._raise_if_failed()
            return bool(predicate())

    def wait_uart(self, expected: bytes | Callable[[bytes], object], timeout: float = DEFAULT_WAIT) -> bool:
        """Wait until the UART log contains ``expected``, or ``expected(log)`` is true."""
        if isinstance(expected, bytes):
            return self.wait_for(lambda: expected in self._uart, timeout)
        return self.wait_for(lambda: expected(bytes(self._uart)), timeout)

    def stop(self) -> None:
        """Stop the thread and close every socket; safe to call twice."""
        with self._cond:
            self._stopping = True
            if self._alive:
                self._wake()
        self._thread.join(COMMAND_TIMEOUT)
        if self._thread.is_alive():
            raise RuntimeError("FakeK2 thread did not stop")
        self._raise_if_failed()

    def __enter__(self) -> FakeK2:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- calling thread side -------------------------------------------------

    def _submit(self, fn: Callable[[], None]) -> None:
        cmd = _Command(fn)
        with self._cond:
            if not self._alive:
                self._raise_if_failed()
                raise RuntimeError("FakeK2 is stopped")
            self._commands.append(cmd)
            self._wake()
            if not self._cond.wait_for(lambda: cmd.done or not self._alive, COMMAND_TIMEOUT):
                raise TimeoutError("FakeK2 thread did not apply a command")
            if not cmd.done:
                self._raise_if_failed()
                raise RuntimeError("FakeK2 stopped before applying a command")
            if cmd.error is not None:
                raise cmd.error

    def _wake(self) -> None:
        # A full socketpair already holds a pending wake-up.
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"\0")

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError("FakeK2 thread failed") from self._error

    # -- server thread side --------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                deadlines = [t for t in (self._accept_at, self._trickle_at, self._spread_at) if t is not None]
                timeout = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
                events = self._sel.select(timeout)
                with self._cond:
                    if self._stopping:
                        return
                    for key, mask in events:
                        key.data(mask)
                    if self._accept_at is not None and time.monotonic() >= self._accept_at:
                        self._accept_delayed()
                    if self._trickle_at is not None and time.monotonic() >= self._trickle_at:
                        self._drip()
                    if self._spread_at is not None and time.monotonic() >= self._spread_at:
                        self._answer_one()
                    self._run_commands()
                    self._cond.notify_all()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        with self._cond:
            for client in list(self._clients):
                self._close(client)
            if self._listener is not None:
                self._listener.close()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()
            self._alive = False
            self._cond.notify_all()

    def _run_commands(self) -> None:
        while self._commands:
            cmd = self._commands.popleft()
            try:
                cmd.fn()
            except OSError as exc:
                cmd.error = exc
            cmd.done = True

    def _on_wake(self, _mask: int) -> None:
        with contextlib.suppress(BlockingIOError):
            self._wake_r.recv(4096)

    def _on_listener(self, _mask: int) -> None:
        assert self._listener is not None
        if self._accept_delay > 0:
            self._sel.unregister(self._listener)
            self._accept_at = time.monotonic() + self._accept_delay
        else:
            self._accept_one()

    def _accept_delayed(self) -> None:
        assert self._listener is not None
        self._accept_at = None
        self._accept_one()
        self._sel.register(self._listener, selectors.EVENT_READ, self._on_listener)

    def _accept_one(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return  # the peer gave up while it waited in the backlog
        sock.setblocking(False)
        if len(self._clients) >= self._max_clients:
            self._close(self._clients[0])
            self._kicked += 1
        client = _Client(sock)
        if self._rfc2217:
            client.codec = Rfc2217Server()
            client.out += client.codec.data_to_send()  # its negotiation, DO COM-PORT-OPTION included
        self._clients.append(client)
        self._connections_seen += 1
        self._max_active_seen = max(self._max_active_seen, len(self._clients))
        if self._connect_mode == RST:
            self._close(client, rst=True)
        elif self._connect_mode in (BANNER_AND_CLOSE, ONE_BYTE_AND_CLOSE):
            greeting = BANNER if self._connect_mode == BANNER_AND_CLOSE else BANNER[:1]
            with contextlib.suppress(OSError):  # a peer already gone just misses it
                sock.send(greeting)
            self._close(client)
        else:
            self._sync_events(client)

    def _on_client(self, client: _Client, mask: int) -> None:
        if client not in self._clients:
            return  # closed earlier in this round
        if mask & selectors.EVENT_READ:
            self._read(client)
        if mask & selectors.EVENT_WRITE and client in self._clients:
            self._flush(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except ConnectionError:
            data = b""
        if not data:
            self._close(client)
            return
        if client.codec is not None:
            data = self._rfc2217_received(client, data)
        self._uart += data
        excess = len(self._uart) - UART_LOG_LIMIT
        if excess > 0:
            del self._uart[:excess]
            self._uart_dropped += excess

    def _rfc2217_received(self, client: _Client, data: bytes) -> bytes:
        """Decode a client's telnet stream: record and answer its commands; return its data."""
        assert client.codec is not None
        codec = client.codec
        codec.receive_data(data)
        now = time.monotonic()
        out = bytearray()
        client.out += codec.data_to_send()  # telnet negotiation goes at once, spread or not
        for event in codec.next_events():
            if isinstance(event, Data):
                out += event.data
            elif isinstance(event, (ComPortOption, ConnectionClosed)):
                continue
            else:
                self._commands_log.append((now, event))
                if isinstance(event, SetControl):
                    for line, level in (("dtr", event.dtr), ("rts", event.rts), ("break", event.break_state)):
                        if level is not None:
                            self._lines[line] = level
                self._settings = settings_with(self._settings, event) or self._settings
                codec.reply(event, self._settings)
                if self._spread is not None and (answer := codec.data_to_send()):
                    client.answers.append(answer)
        client.out += codec.data_to_send()
        if client.out:
            self._flush(client)
        return bytes(out)

    def _flush(self, client: _Client) -> None:
        if client.out and not self._black_hole and self._trickle is None:
            try:
                sent = client.sock.send(client.out)
            except BlockingIOError:
                sent = 0
            except ConnectionError:
                self._close(client)
                return
            del client.out[:sent]
        self._sync_events(client)

    def _sync_events(self, client: _Client) -> None:
        want = 0
        if not self._black_hole:
            writable = client.out and self._trickle is None  # trickled bytes go from _drip()
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
        if want == client.events:
            return
        if client.events == 0:
            self._sel.register(client.sock, want, partial(self._on_client, client))
        elif want == 0:
            self._sel.unregister(client.sock)
        else:
            self._sel.modify(client.sock, want, partial(self._on_client, client))
        client.events = want

    def _close(self, client: _Client, *, rst: bool = False) -> None:
        if client.events:
            self._sel.unregister(client.sock)
        if rst:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        client.sock.close()
        self._clients.remove(client)
        self._dropped += len(client.out)

    def _broadcast(self, data: bytes) -> None:
        if self._black_hole or not self._clients:
            self._lost += len(data)
            return
        for client in list(self._clients):
            wire = data
            if client.codec is not None:  # RFC 2217 mode: IAC bytes doubled
                client.codec.send(Data(data))
                wire = client.codec.data_to_send()
            room = CLIENT_BUFFER - len(client.out)
            client.out += wire[:room]
            self._dropped += max(0, len(wire) - room)
            self._flush(client)

    def _reset_all(self) -> None:
        for client in list(self._clients):
            self._close(client, rst=True)

    def _set_black_hole(self, on: bool) -> None:
        self._black_hole = on
        for client in list(self._clients):
            self._flush(client)

    def _set_connect_mode(self, mode: str) -> None:
        self._connect_mode = mode

    def _set_trickle(self, interval: float | None) -> None:
        self._trickle = interval
        self._trickle_at = None if interval is None else time.monotonic() + interval
        for client in list(self._clients):
            self._flush(client)

    def _drip(self) -> None:
        """One byte to each client with output waiting (trickle mode)."""
        assert self._trickle is not None
        self._trickle_at = time.monotonic() + self._trickle
        if self._black_hole:
            return
        for client in list(self._clients):
            if not client.out:
                continue
            try:
                sent = client.sock.send(client.out[:1])
            except BlockingIOError:
                continue
            except ConnectionError:
                self._close(client)
                continue
            del client.out[:sent]

    def _set_spread(self, interval: float | None) -> None:
        self._spread = interval
        self._spread_at = None if interval is None else time.monotonic() + interval
        if interval is None:  # what was held goes now, in order
            for client in list(self._clients):
                while client.answers:
                    client.out += client.answers.popleft()
                self._flush(client)

    def _answer_one(self) -> None:
        """One held answer to each client that has some (spread_answers)."""
        assert self._spread is not None
        self._spread_at = time.monotonic() + self._spread
        for client in list(self._clients):
            if client.answers:
                client.out += client.answers.popleft()
                self._flush(client)

    def _set_accept_delay(self, seconds: float) -> None:
        self._accept_delay = seconds

    def _set_refuse(self, on: bool) -> None:
        if on and self._listener is not None:
            if self._accept_at is None:
                self._sel.unregister(self._listener)
            self._accept_at = None
            self._listener.close()
            self._listener = None
        elif not on and self._listener is None:
            self._listener = _listen(self._port)
            self._sel.register(self._listener, selectors.EVENT_READ, self._on_listener)


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Binding the same port again after refuse() or a restart, past TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen()
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _main() -> None:
    parser = argparse.ArgumentParser(description="Run a fake K2 that feeds a line a second.")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with FakeK2(args.port) as k2, contextlib.suppress(KeyboardInterrupt):
        print(f"fake K2 on {HOST}:{k2.port}; Ctrl-C stops", flush=True)
        for n in itertools.count():
            k2.feed(f"k2 line {n}\r\n".encode())
            time.sleep(1.0)


if __name__ == "__main__":
    _main()
