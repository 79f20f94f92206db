"""The test harness: plain functions and classes, no fixtures (those are in conftest.py).

- Waiting: ``wait_for`` polls a condition until a deadline, bounded in time and
  rounds. Nothing here sleeps to synchronise.
- Sockets: ``recv_exactly`` / ``recv_until`` / ``read_to_eof`` fail with an
  AssertionError that says what was received.
- Codec tests: ``splits`` / ``cut`` / ``merge_data`` feed a wire whole, byte by
  byte and cut anywhere, and compare events up to how data was chunked.
  ``feeds`` adds TRAILING bytes; ``settled`` / ``sent`` collect a codec's outbox.
- The device: ``PtyDevice``, a pty whose slave muxd opens as its serial port.
- The daemon: ``Muxd`` (a real subprocess, stopped by PID) and ``start_muxd``
  (write a config, start, wait until ready). Tests synchronise on state read
  from the JSON API (``/api/v1/ports``: each port's state and clients), not on
  the wording of log lines: ``start_muxd`` adds an http server to a config that
  has none. ``Muxd.wait_log`` stays for tests whose assertion is a log line.
- In-process: ``make_front`` (an HttpFront on its own reactor), ``running_front``
  and the fuzz drivers ``fuzz_settings`` / ``fuzz_seeds``; ``IdleOwner``, a hub
  reader's owner that does nothing. ``run_muxd`` runs the command line.
- Addresses: when muxd binds port 0 and writes ``--ready-file``, the harness
  asks for port 0 and reads the bound addresses from the ready file (no
  bind-close-reuse race). On a muxd without them it falls back to
  ``free_port()`` and to the first API answer as the readiness signal (the
  daemon binds every port listener before its http servers, and answers only
  once its loop runs).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import http.client
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import yaml

if TYPE_CHECKING:
    import pytest
    from hypothesis import settings

    from muxd.listeners.http import HttpFront, HttpTimeouts
    from muxd.reactor import Reactor

ROOT = Path(__file__).resolve().parent.parent

# A listener address for start_muxd to choose: port 0 where muxd supports it, else a free port.
AUTO = "auto"
LOCAL = "127.0.0.1"


# -- waiting ------------------------------------------------------------------------------------


def wait_for(cond: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll cond() until truthy and return its value; fail after timeout. Bounded in time and rounds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.005) + 2):
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        select.select([], [], [], 0.005)  # a poll interval, not a synchronisation
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class _Loop(Protocol):
    def run_once(self, max_wait: float | None = ...) -> Any: ...


def run_until(
    reactor: _Loop, cond: Callable[[], object], what: str = "condition", timeout: float = 5.0
) -> None:
    """Turn an in-process reactor until cond() is true; fail after timeout. Bounded in time and turns."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.01) + 2):
        if cond():
            return
        if time.monotonic() > deadline:
            break
        reactor.run_once(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# -- sockets ------------------------------------------------------------------------------------


def free_port(host: str = LOCAL) -> int:
    """A port that was free a moment ago. Racy (bind, close, reuse): only for what
    cannot take port 0, such as systemd-socket-activate's --listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_hostport(addr: str) -> tuple[str, int]:
    """'127.0.0.1:5000' or '[::1]:5000' -> (host, port)."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def connect(port: int, host: str = LOCAL, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def stuck_reader(port: int, rcvbuf: int = 4096, host: str = LOCAL) -> socket.socket:
    """A client with a small receive buffer, for a test to read slowly or never:
    it fills at once, so muxd's per-client bound is what holds the rest."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, port))
    return s


def recv_exactly(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    """Exactly n bytes before the deadline, or an AssertionError saying what came."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {len(buf)} of {n} bytes before the deadline: {bytes(buf[-80:])!r}")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes: {bytes(buf[-80:])!r}")
        buf += chunk
    return bytes(buf)


def recv_until(sock: socket.socket, marker: bytes, timeout: float = 5.0, limit: int = 1 << 20) -> bytes:
    """Everything up to and including marker (and whatever came in the same read)."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or len(buf) > limit:
            raise AssertionError(f"no {marker!r} before the deadline; got {bytes(buf[-200:])!r}")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"EOF before {marker!r}; got {bytes(buf[-200:])!r}")
        buf += chunk
    return bytes(buf)


def read_to_eof(sock: socket.socket, timeout: float = 5.0, limit: int = 1 << 20) -> bytes:
    """Everything until the peer closes (a reset counts as the end)."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while len(buf) < limit:
        left = deadline - time.monotonic()
        assert left > 0, f"no EOF before the deadline; got {bytes(buf[:200])!r}"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


# -- codec tests: any split of a wire --------------------------------------------------------------


def splits(wire: bytes) -> Iterator[list[bytes]]:
    """The stream whole, one byte at a time, and cut in two at every point."""
    yield [wire]
    yield [wire[i : i + 1] for i in range(len(wire))]
    for i in range(1, len(wire)):
        yield [wire[:i], wire[i:]]


def cut(wire: bytes, points: Sequence[int]) -> list[bytes]:
    """The wire cut at the given offsets (sorted, out-of-range and repeated ones harmless)."""
    bounds = [0, *sorted(points), len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds) if b > a]


# Valid telnet bytes after an input: data, a negotiation, an escaped 0xFF.
TRAILING = b"more\xff\xfb\x00\xff\xff"


def feeds(wire: bytes) -> Iterator[list[bytes]]:
    """``wire`` whole, byte by byte, cut anywhere, and each of those with trailing bytes."""
    yield from splits(wire)
    yield [wire + TRAILING]
    yield [bytes((b,)) for b in wire + TRAILING]
    yield [wire, TRAILING]


E = TypeVar("E")


def merge_data(events: Sequence[E], data_type: type[Any]) -> list[E]:
    """Join adjacent data events (instances of data_type, which has a ``data``
    field): data may come in any number of pieces; only its concatenation is defined."""
    merged: list[E] = []
    for event in events:
        if isinstance(event, data_type) and merged and isinstance(merged[-1], data_type):
            merged[-1] = data_type(merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged


class _Codec(Protocol):
    def send(self, event: Any) -> None: ...
    def data_to_send(self) -> bytes: ...


C = TypeVar("C", bound=_Codec)


def settled(codec: C) -> C:
    """The codec with its initial negotiation collected: its outbox is empty."""
    codec.data_to_send()
    return codec


def sent(codec: _Codec, event: Any) -> bytes:
    """What send() queues for one event, collected at once."""
    codec.send(event)
    return codec.data_to_send()


class IdleOwner:
    """A hub reader's owner that never has anything to do (subclass it for one that does)."""

    def on_data(self) -> None:
        pass

    def on_write_room(self) -> None:
        pass

    def close(self, reason: str) -> None:
        pass


# -- the device: a pty ----------------------------------------------------------------------------


class PtyDevice:
    """A pty pair: muxd opens the slave as its 'serial port', the test drives the master.

    ``path`` is a symlink to the slave, like /dev/serial/by-id/..., so the device
    can be unplugged (master closed, link removed) and replugged (a new pty
    behind the same link).
    """

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self.slave_name = ""
        self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)
        self.slave_name = os.ttyname(slave)
        # Keep no slave fd open: muxd's open must be the one that counts, and
        # a pty whose slave was never opened still buffers master writes.
        os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        tmp = self.link.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(self.slave_name)
        tmp.replace(self.link)

    def unplug(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.link.unlink()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    @property
    def path(self) -> str:
        return str(self.link)

    def write(self, data: bytes, timeout: float = 5.0) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            if time.monotonic() > deadline:
                raise AssertionError("pty write timed out")
            select.select([], [self.master], [], 0.1)
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                continue
            view = view[n:]

    def read(self, n: int, timeout: float = 5.0) -> bytes:
        buf = bytearray()
        deadline = time.monotonic() + timeout
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"device got {len(buf)} of {n} bytes: {bytes(buf[-200:])!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    buf += os.read(self.master, n - len(buf))
                except BlockingIOError:
                    pass
                except OSError as exc:  # EIO: nobody has the slave open (yet); poll again
                    if exc.errno != errno.EIO:
                        raise
                    select.select([], [], [], 0.01)
        return bytes(buf)

    def speed(self) -> int:
        """The baud rate muxd set, read back with termios on the pty."""
        ispeed = termios.tcgetattr(self.master)[4]
        return int(ispeed)

    def close(self) -> None:
        self.unplug()


# -- the JSON API, over plain http.client --------------------------------------------------------


def request(
    addr: str, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, http.client.HTTPResponse, bytes]:
    host, port = split_hostport(addr)
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp, resp.read()
    finally:
        conn.close()


def get_json(addr: str, path: str) -> Any:
    status, _, body = request(addr, "GET", path)
    assert status == 200, body
    return json.loads(body)


def port_info(addr: str, name: str | None = None) -> dict[str, Any]:
    """One port's view from /api/v1/ports: the first, or the one named."""
    ports: list[dict[str, Any]] = get_json(addr, "/api/v1/ports")["ports"]
    if name is None:
        return ports[0]
    [port] = [p for p in ports if p["name"] == name]
    return port


def wait_clients(addr: str, n: int, timeout: float = 10.0, port: str | None = None) -> None:
    """Wait until the API shows exactly n clients on the port (the first, or the one named)."""
    wait_for(lambda: port_info(addr, port)["clients"] == n, timeout, f"{n} clients in the API")


def metric(addr: str, name: str, **labels: str) -> float:
    """The sum of a /metrics family's samples whose labels include these (0.0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = request(addr, "GET", "/metrics")
    assert status == 200, body
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


# -- the command line -----------------------------------------------------------------------------


def muxd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "muxd", *args]


def run_muxd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m muxd ARGS`` in the tree, to its end, output captured as text.
    subprocess.run kills the child by its PID if it overruns the timeout."""
    return subprocess.run(
        muxd_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


# -- what the muxd under test can do -------------------------------------------------------------


@functools.cache
def has_ready_file() -> bool:
    """True when `muxd run` takes --ready-file (asked once per test session)."""
    done = subprocess.run(
        [sys.executable, "-m", "muxd", "run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "--ready-file" in done.stdout


@functools.cache
def binds_port_zero() -> bool:
    """True when the config takes port 0 (the kernel chooses) and muxd reports
    the bound address in its ready file."""
    from muxd.config import parse_hostport

    try:
        parse_hostport(f"{LOCAL}:0")
    except ValueError:
        return False
    return has_ready_file()


# -- the daemon -----------------------------------------------------------------------------------


class Muxd:
    """muxd as a real subprocess; stopped by its PID at the end of the test.

    Started through ``start_muxd`` it also knows its config (``data``), its http
    server's address (``http``) and where each listener of its ports is bound
    (``addresses``, by listener name), and waits on state through the API.
    """

    def __init__(
        self,
        args: list[str],
        tmp_path: Path,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        ready_file: Path | None = None,
    ) -> None:
        self.log_path = tmp_path / f"muxd-{len(list(tmp_path.glob('muxd-*.log')))}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.ready_path = ready_file
        if ready_file is not None:
            args = [*args, "--ready-file", str(ready_file)]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        cmd = [sys.executable, "-m", "muxd", *args]
        if nofile is not None:  # a hard fd limit for this muxd only; exec keeps the PID
            cmd = ["sh", "-c", f'ulimit -n {nofile} && exec "$0" "$@"', *cmd]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=full_env)
        self.pid = self.proc.pid
        # Set by start_muxd:
        self.config_path: Path | None = None
        self.data: dict[str, Any] = {}
        self.http = ""  # "host:port" of the http server the harness reads the API from
        self.addresses: dict[str, str] = {}  # listener name -> "host:port" or path
        self.names: list[str] = []  # the first port's listener names, in config order

    # -- the log: for assertions about what is logged ----------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        """Wait for a log line: for tests whose assertion is what muxd logs."""
        wait_for(lambda: text in self.log() or self.proc.poll() is not None, timeout, f"log line {text!r}")
        if text not in self.log():
            raise AssertionError(
                f"muxd exited ({self.proc.returncode}) before logging {text!r}:\n{self.log()}"
            )

    def wait_clients(self, n: int, timeout: float = 10.0) -> None:
        """Legacy, log-based: n client connections logged so far, probes included
        (needs --log-level debug). Use wait_connected, which reads the API."""
        wait_for(lambda: self.log().count(" connected\n") >= n, timeout, f"{n} clients connected")

    # -- state -------------------------------------------------------------------------------

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"muxd exited with {self.proc.returncode}:\n{self.log()}")

    def api(self, path: str) -> Any:
        assert self.http, "this muxd has no http server the harness knows of"
        return get_json(self.http, path)

    def port_info(self, port: str | None = None) -> dict[str, Any]:
        assert self.http, "this muxd has no http server the harness knows of"
        return port_info(self.http, port)

    def clients(self, port: str | None = None) -> list[dict[str, Any]]:
        name = port or self.data["ports"][0]["name"]
        clients: list[dict[str, Any]] = self.api(f"/api/v1/ports/{name}/clients")["clients"]
        return clients

    def metric(self, name: str, **labels: str) -> float:
        """A /metrics value: the sum of the samples whose labels include these."""
        assert self.http, "this muxd has no http server the harness knows of"
        return metric(self.http, name, **labels)

    def wait_metric(self, name: str, at_least: float, timeout: float = 10.0, **labels: str) -> None:
        """Wait until a /metrics value (see metric) reaches at_least: a counter's progress."""

        def reached() -> bool:
            self._alive()
            return self.metric(name, **labels) >= at_least

        wait_for(reached, timeout, f"{name}{labels or ''} >= {at_least}")

    def wait_connected(self, n: int, timeout: float = 10.0, port: str | None = None) -> None:
        """Wait until the API shows exactly n clients on the port (the first, or the one named)."""

        def there() -> bool:
            self._alive()
            return bool(self.port_info(port)["clients"] == n)

        wait_for(there, timeout, f"{n} clients in the API")

    def wait_state(
        self, state: str, reason: str | None = None, port: str | None = None, timeout: float = 10.0
    ) -> None:
        """Wait until the API shows the port's upstream in this state (and for this reason)."""

        def reached() -> bool:
            self._alive()
            info = self.port_info(port)
            return bool(info["state"] == state and (reason is None or info["reason"] == reason))

        wait_for(reached, timeout, f"upstream {state}" + (f" ({reason})" if reason else ""))

    def wait_listeners(
        self, names: set[str], port: str | None = None, timeout: float = 10.0
    ) -> dict[str, str]:
        """Wait until the port's listeners in the API are exactly these (after a
        reload, say); return their addresses by name, as the API gives them."""

        def there() -> dict[str, str] | None:
            self._alive()
            listeners = {lst["name"]: lst["address"] for lst in self.port_info(port)["listeners"]}
            return listeners if set(listeners) == names else None

        found: dict[str, str] = wait_for(there, timeout, f"listeners {sorted(names)}")
        return found

    def wait_api(self, timeout: float = 10.0) -> Any:
        """Wait for the first API answer: muxd has bound every listener and runs its loop."""

        def answer() -> Any:
            self._alive()
            try:
                return self.api("/api/v1/ports")
            except OSError:
                return None

        return wait_for(answer, timeout, f"the API on {self.http}")

    def wait_ready_file(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the ready file: {"pid": N, "listeners": {name: address}}."""
        assert self.ready_path is not None
        path = self.ready_path

        def ready() -> dict[str, Any] | None:
            self._alive()
            try:
                data: dict[str, Any] = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):  # not yet, or not yet whole
                return None
            return data

        data: dict[str, Any] = wait_for(ready, timeout, f"the ready file {path}")
        assert data["pid"] == self.pid, data
        return data

    # -- addresses ---------------------------------------------------------------------------

    def address(self, which: int | str = 0) -> str:
        """A listener's address: by index among the first port's listeners, or by name."""
        name = self.names[which] if isinstance(which, int) else which
        return self.addresses[name]

    def port(self, which: int | str = 0) -> int:
        """A TCP or RFC 2217 listener's port number (see address)."""
        return split_hostport(self.address(which))[1]

    def listener(self, which: int = 0) -> dict[str, Any]:
        """The first port's listener config as written (port 0 and harness names included)."""
        listeners: list[dict[str, Any]] = self.data["ports"][0]["listeners"]
        return listeners[which]

    def rewrite(self, ports: list[dict[str, Any]]) -> Path:
        """Write a new config for a reload: these ports, and the same http server."""
        assert self.config_path is not None
        data = {**self.data, "ports": ports}
        self.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
        return self.config_path

    # -- process -----------------------------------------------------------------------------

    def wait_port(self, port: int, host: str = LOCAL, timeout: float = 10.0) -> None:
        """Connect until accepted. The probe is a client muxd sees: prefer the
        readiness start_muxd waits for."""

        def up() -> bool:
            self._alive()
            try:
                socket.create_connection((host, port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_for(up, timeout, f"muxd listening on {host}:{port}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


StartMuxd = Callable[..., Muxd]


def write_config(tmp_path: Path, data: dict[str, Any], name: str = "muxd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def auto_address() -> str:
    """A TCP address for muxd to bind: port 0 where muxd supports it, else a free port.
    Give the listener a name: several port-0 listeners would share a default one."""
    return f"{LOCAL}:0" if binds_port_zero() else f"{LOCAL}:{free_port()}"


def _listener_name(lst: dict[str, Any], port_name: str) -> str:
    """The name muxd gives a listener: as config.py's default, when the config names none."""
    if "name" in lst:
        return str(lst["name"])
    [kind] = [k for k in ("tcp", "unix", "pty", "rfc2217", "websocket") if k in lst]
    address = str(lst[kind]) if kind != "websocket" else ""
    return f"{kind}:{address or port_name}"


def start_muxd(
    muxd: StartMuxd,
    tmp_path: Path,
    upstream: dict[str, Any],
    listeners: list[dict[str, Any]],
    *,
    name: str = "dut",
    http: dict[str, Any] | None = None,
    wait_up: bool = True,
    log_level: str | None = "debug",
    env: dict[str, str] | None = None,
    nofile: int | None = None,
    top: dict[str, Any] | None = None,
    **port_opts: Any,
) -> Muxd:
    """Start muxd on one port and wait until it is ready; return it.

    A listener address given as AUTO ({"tcp": AUTO}, {"rfc2217": AUTO}) is
    chosen by the harness: port 0 (and a harness name, "tcp-0" for the first
    listener, since several port-0 listeners would share a default name) where
    muxd binds port 0, else a free port. ``m.port(i)`` / ``m.address(i)`` give
    where listener i really listens.

    An http server is added when the config has none (``http`` merges into it):
    the harness reads the port's state and clients from its API. Ready means:
    the ready file was written (or, on a muxd without one, the API answered),
    and, with ``wait_up``, the API shows the upstream up.
    """
    zero = binds_port_zero()
    filled: list[dict[str, Any]] = []
    for i, given in enumerate(listeners):
        lst = dict(given)
        for kind in ("tcp", "rfc2217"):
            if lst.get(kind) == AUTO:
                lst[kind] = auto_address()
                if zero and "name" not in lst:
                    lst["name"] = f"{kind}-{i}"
        filled.append(lst)
    http_cfg = {"listen": AUTO, **(http or {})}
    if http_cfg["listen"] == AUTO:
        http_cfg["listen"] = auto_address()
        if zero:
            http_cfg.setdefault("name", "harness-http")
    http_name = str(http_cfg.get("name") or f"http:{http_cfg['listen']}")
    data = {
        "ports": [{"name": name, "upstream": upstream, "listeners": filled, **port_opts}],
        "http": http_cfg,
        **(top or {}),  # other top-level sections (mqtt:)
    }
    cfg = write_config(tmp_path, data)
    args = ["run", "-c", str(cfg)]
    if log_level is not None:
        args += ["--log-level", log_level]
    ready = tmp_path / f"ready-{len(list(tmp_path.glob('ready-*.json')))}.json" if has_ready_file() else None
    m = muxd(*args, env=env, nofile=nofile, ready_file=ready)
    m.config_path, m.data = cfg, data
    m.names = [_listener_name(lst, name) for lst in filled]
    configured = {
        n: str(lst.get("tcp") or lst.get("rfc2217") or lst.get("unix") or lst.get("pty") or "")
        for n, lst in zip(m.names, filled, strict=True)
    }
    configured[http_name] = str(http_cfg["listen"])
    if ready is not None:
        bound: dict[str, str] = m.wait_ready_file()["listeners"]
        m.addresses = {**configured, **bound}
        m.http = m.addresses[http_name]
        assert not m.http.endswith(":0"), f"the ready file lacks the bound http address: {bound}"
    else:
        m.addresses = configured
        m.http = configured[http_name]
        m.wait_api()
    if wait_up:
        m.wait_state("up", port=name)
    return m


def start_on_pty(
    muxd: StartMuxd, tmp_path: Path, dev: PtyDevice, listeners: list[dict[str, Any]], **opts: Any
) -> Muxd:
    """muxd on the pty as port "dut" (see start_muxd), upstream up."""
    return start_muxd(muxd, tmp_path, {"serial": dev.path}, listeners, **opts)


def start_on_k2(
    muxd: StartMuxd,
    tmp_path: Path,
    k2_port: int,
    listeners: list[dict[str, Any]] | None = None,
    upstream: dict[str, Any] | None = None,
    **opts: Any,
) -> Muxd:
    """muxd on a (fake) K2 at 127.0.0.1:k2_port as port "dut1" (see start_muxd);
    by default one rw TCP listener, and the upstream up."""
    lst = listeners if listeners is not None else [{"tcp": AUTO, "mode": "rw"}]
    up = {"tcp": f"{LOCAL}:{k2_port}", **(upstream or {})}
    return start_muxd(muxd, tmp_path, up, lst, **{"name": "dut1", **opts})


def start_http(
    muxd: StartMuxd,
    tmp_path: Path,
    dev: PtyDevice,
    listeners: list[dict[str, Any]] | None = None,
    http: dict[str, Any] | None = None,
    **port_opts: Any,
) -> tuple[Muxd, str]:
    """muxd on the pty as port "dut", with an http server; returns (muxd, "host:port")."""
    lst = listeners if listeners is not None else [{"websocket": True, "mode": "rw"}]
    m = start_on_pty(muxd, tmp_path, dev, lst, http=http, **port_opts)
    return m, m.http


# -- the HTTP front in-process, and fuzzing it --------------------------------------------------


def make_front(timeouts: HttpTimeouts | None = None, **http: Any) -> tuple[Reactor, HttpFront]:
    """An HttpFront on its own reactor, on 127.0.0.1, serving port "p" (a
    simulated device, with an rw websocket listener); started."""
    from muxd import config as configmod
    from muxd.listeners.http import HttpFront, HttpTimeouts
    from muxd.port import PortRuntime
    from muxd.reactor import Reactor

    cfg = configmod.from_data(
        {
            "ports": [
                {"name": "p", "upstream": {"sim": True}, "listeners": [{"websocket": True, "mode": "rw"}]}
            ],
            "http": {"listen": f"127.0.0.1:{free_port()}", **http},
        }
    )
    reactor = Reactor()
    ports = {p.name: PortRuntime.build(p, reactor) for p in cfg.ports}
    srv = HttpFront(cfg.http[0], lambda: ports, reactor, timeouts=timeouts or HttpTimeouts())
    srv.start()
    return reactor, srv


def stop_front(reactor: Reactor, srv: HttpFront) -> None:
    for client in list(srv.clients):
        client.close("shutdown")
    srv.stop()
    reactor.close()


def running_front() -> Iterator[tuple[Reactor, HttpFront]]:
    """For a module-scoped fixture: make_front with port "p"'s simulated device
    started (it echoes rw input, so both paths run); all stopped after."""
    reactor, srv = make_front()
    srv.ports()["p"].upstream.start()
    yield reactor, srv
    srv.ports()["p"].upstream.stop()
    stop_front(reactor, srv)


def drain_front(reactor: Reactor, srv: HttpFront, turns: int = 100) -> None:
    """Turn the loop until the front holds no connection and no client (or turns run out)."""
    for _ in range(turns):
        if not srv.connections and not srv.clients:
            break
        reactor.run_once(0.01)


def fuzz_settings(default_examples: int) -> settings:
    """Hypothesis settings for a fuzz test: ``MUXD_FUZZ_EXAMPLES`` examples (else
    the default), no deadline, no database (the tree is shared), no health checks."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=int(os.environ.get("MUXD_FUZZ_EXAMPLES", str(default_examples))),
        deadline=None,
        database=None,  # the tree is shared: nothing written under .hypothesis/
        suppress_health_check=list(HealthCheck),
    )


def fuzz_seeds(fuzz: settings, one: Callable[[int], None]) -> tuple[int, float]:
    """Run one(seed) on the seeds Hypothesis draws under these settings; return
    (how many inputs, seconds taken)."""
    from hypothesis import given
    from hypothesis import strategies as st

    count = 0
    started = time.monotonic()

    @fuzz
    @given(seed=st.integers(0, 2**64))
    def run(seed: int) -> None:
        nonlocal count
        count += 1
        one(seed)

    run()
    return count, time.monotonic() - started


def print_fuzz_figures(
    capsys: pytest.CaptureFixture[str], what: str, count: int, elapsed: float, internal_errors: int
) -> None:
    """The run's figures, printed when MUXD_FUZZ_EXAMPLES is set (a long run)."""
    if "MUXD_FUZZ_EXAMPLES" in os.environ:
        with capsys.disabled():
            print(
                f"\nfuzz {what}: {count} inputs in {elapsed:.1f}s ({count / elapsed:.0f}/s),"
                f" internal errors {internal_errors}"
            )


# -- a process's descriptors, from /proc -----------------------------------------------------------


def fd_count(pid: int) -> int:
    """The process's open file descriptors."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the process's open sockets (an fd closed while listed is skipped)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed while listed
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def tcp_sockets(pid: int) -> list[list[str]]:
    """The columns of the /proc/PID/net/tcp rows (IPv4) that are the process's own sockets."""
    inodes = socket_inodes(pid)
    with open(f"/proc/{pid}/net/tcp") as f:
        rows = [row.split() for row in f.read().splitlines()[1:]]
    return [cols for cols in rows if cols[9] in inodes]


def hex_field(column: str) -> int:
    """The number after the colon of a /proc/net/tcp column ("0100007F:1F90" -> 8080)."""
    return int(column.split(":")[1], 16)


def tcp_links(pid: int, port: int, local: bool = False) -> int:
    """TCP sockets the process holds (IPv4) whose peer port is ``port`` (with
    ``local``: whose own port is, as the connections its server accepted), in
    any state but TIME_WAIT and LISTEN."""
    return sum(
        1
        for cols in tcp_sockets(pid)
        if hex_field(cols[1] if local else cols[2]) == port and cols[3] not in ("06", "0A")
    )
