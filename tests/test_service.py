"""muxd as a systemd service: the notify protocol, socket activation and reload,
each against the real daemon (and the real systemd-socket-activate)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from muxd import config as configmod
from muxd.daemon import Daemon
from muxd.startup import StartError
from tests.helpers import (
    AUTO,
    ROOT,
    PtyDevice,
    StartMuxd,
    auto_address,
    connect,
    free_port,
    recv_until,
    run_muxd,
    split_hostport,
    start_on_pty,
    wait_for,
    write_config,
)


class NotifySocket:
    """A stand-in for systemd's notify socket: collects the datagrams muxd sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def poll(self) -> list[str]:
        for _ in range(1000):
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        return self.messages

    def wait(self, state: str, timeout: float = 10.0) -> str:
        def found() -> str | None:
            return next((m for m in self.poll() if state in m.split("\n")), None)

        return str(wait_for(found, timeout, f"{state} on the notify socket"))

    def close(self) -> None:
        self.sock.close()


def _config(tmp_path: Path, dev: PtyDevice, listeners: list[dict[str, Any]], name: str = "muxd.yaml") -> Path:
    return write_config(
        tmp_path, {"ports": [{"name": "dut", "upstream": {"serial": dev.path}, "listeners": listeners}]}, name
    )


def test_ready_after_bind_then_watchdog_then_stopping(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    port = free_port()
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        cfg = _config(tmp_path, pty_device, [{"tcp": f"127.0.0.1:{port}"}])
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"}
        m = muxd("run", "-c", str(cfg), env=env)
        ready = notify.wait("READY=1")
        assert "STATUS=dut up 0 clients" in ready.split("\n")
        connect(port).close()  # READY came after the listener was bound: this cannot be refused
        # Pings at half of WATCHDOG_USEC, from the event loop itself.
        wait_for(lambda: sum(x.startswith("WATCHDOG=1") for x in notify.poll()) >= 5, 3.0, "5 pings")
        c = connect(port)
        wait_for(
            lambda: any("STATUS=dut up 1 client" in x for x in notify.poll()), 5.0, "STATUS with 1 client"
        )
        c.close()
        m.signal(signal.SIGTERM)
        notify.wait("STOPPING=1")
        assert m.wait_exit() == 0
    finally:
        notify.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_socket_activation_serves_on_the_passed_socket(tmp_path: Path, pty_device: PtyDevice) -> None:
    port = free_port()
    # The config's own address is never bound: the passed socket named dut-tcp is used instead.
    cfg = _config(tmp_path, pty_device, [{"tcp": auto_address(), "name": "dut-tcp", "mode": "rw"}])
    proc = _activate(port, "dut-tcp", cfg)
    try:
        # systemd-socket-activate execs muxd (same PID) on the first connection.
        c = wait_for(lambda: _try_connect(port), 10.0, "the activated socket")
        c.sendall(b"ping\n")
        assert pty_device.read(5, timeout=10) == b"ping\n"
        pty_device.write(b"pong\n")
        assert recv_until(c, b"pong\n").endswith(b"pong\n")
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_socket_activation_with_an_unknown_name_is_refused_before_anything_is_bound(
    tmp_path: Path, pty_device: PtyDevice
) -> None:
    """The shipped defect: muxd.socket passed 127.0.0.1:7000 as dut1-tcp, the shipped
    config called that listener serial0-tcp. muxd must say so, before it binds its
    own listeners (it used to bind the same address itself, and failed with
    "address already in use", leaving the real cause unsaid)."""
    port = free_port()
    sock_path = tmp_path / "dut.sock"
    listeners = [
        {"unix": str(sock_path), "name": "dut-unix"},
        {"tcp": f"127.0.0.1:{port}", "name": "dut-tcp"},
    ]
    proc = _activate(port, "dut1-tcp", _config(tmp_path, pty_device, listeners))
    try:
        wait_for(lambda: _try_connect(port), 10.0, "the activation socket")
        assert proc.wait(10) == 2  # the operator's to fix: RestartPreventExitStatus=2
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert "already in use" not in err
        # systemd-socket-activate says its own lines first; muxd's error is one line.
        assert [line for line in err.splitlines() if line.startswith("muxd")] == [
            f"muxd: cannot start: socket activation passed sockets with no matching listener: "
            f"dut1-tcp on 127.0.0.1:{port}; dut-tcp listens on 127.0.0.1:{port} (FileDescriptorName= "
            "must equal the `name:` of a tcp, unix or rfc2217 listener or of an http server)"
        ]
        assert not sock_path.exists()  # refused before anything was bound
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another socket listens on (as tests/test_cli.py's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def _third_listener_busy(tmp_path: Path, dev: PtyDevice, busy: int) -> tuple[Path, Path, Path, int]:
    """A config with a trace whose third listener's address is taken: (config, trace
    file, unix socket path, the first listener's port)."""
    first = free_port()
    trace, sock_path = tmp_path / "dut.trace", tmp_path / "dut.sock"
    port = {
        "name": "dut",
        "upstream": {"serial": dev.path},
        "trace": [{"path": str(trace)}],
        "listeners": [
            {"tcp": f"127.0.0.1:{first}", "name": "one"},
            {"unix": str(sock_path), "name": "two"},
            {"tcp": f"127.0.0.1:{busy}", "name": "three"},
        ],
    }
    return write_config(tmp_path, {"ports": [port]}), trace, sock_path, first


def _bindable(port: int) -> bool:
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_a_failed_start_leaves_nothing_behind(tmp_path: Path, pty_device: PtyDevice, busy_port: int) -> None:
    cfg, trace, sock_path, _first = _third_listener_busy(tmp_path, pty_device, busy_port)
    done = run_muxd("run", "-c", str(cfg))
    assert done.returncode == 2
    # One error line, the last; before it only the log of what was bound (and undone).
    *before, last = done.stderr.strip().splitlines()
    assert (
        last
        == f"muxd: cannot start: port dut, listener three (127.0.0.1:{busy_port}): address already in use"
    )
    assert all(" INFO " in line for line in before), done.stderr
    assert not trace.exists(), "the trace file is created only once every listener is bound"
    assert not sock_path.exists(), "the unix socket of the second listener was left behind"


def test_a_trace_in_a_missing_directory_is_refused_before_anything_is_bound(
    tmp_path: Path, pty_device: PtyDevice
) -> None:
    sock_path, trace = tmp_path / "dut.sock", tmp_path / "missing" / "dut.trace"
    port = {
        "name": "dut",
        "upstream": {"serial": pty_device.path},
        "trace": [{"path": str(trace)}],
        "listeners": [{"unix": str(sock_path), "name": "dut-unix"}],
    }
    done = run_muxd("run", "-c", str(write_config(tmp_path, {"ports": [port]})), timeout=20)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"muxd: cannot start: port dut, trace {trace}: directory {trace.parent} does not exist"
    ]
    assert not sock_path.exists()


def test_a_failed_start_in_process_closes_what_it_bound(
    tmp_path: Path, pty_device: PtyDevice, busy_port: int
) -> None:
    """The same in the process itself: the first listener's port is free again at
    once (a socket still open in this process would hold it), and no fd is left."""
    cfg, trace, sock_path, first = _third_listener_busy(tmp_path, pty_device, busy_port)
    fds = set(os.listdir("/proc/self/fd"))
    daemon = Daemon(configmod.load(str(cfg)))
    try:
        with pytest.raises(StartError, match=r"listener three .* address already in use"):
            daemon.start()
        assert _bindable(first)
        assert not sock_path.exists() and not trace.exists()
        assert daemon.ports == {} and daemon.http == {}
    finally:
        daemon.close()
    assert set(os.listdir("/proc/self/fd")) <= fds


def test_passed_sockets_are_checked_against_their_listeners(tmp_path: Path, pty_device: PtyDevice) -> None:
    """In process, with real listening sockets as systemd would pass them: a Unix
    socket for a tcp listener, two sockets of one name, a socket for a pty."""
    listeners = [
        {"tcp": auto_address(), "name": "dut-tcp"},
        {"pty": str(tmp_path / "tty"), "name": "dut-pty"},
    ]
    cfg = configmod.load(str(_config(tmp_path, pty_device, listeners)))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "passed.sock"))
    tcp = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    cases = [
        ({"dut-tcp": [unix]}, "socket activation passed dut-tcp on " + str(tmp_path / "passed.sock")),
        ({"dut-tcp": tcp}, "socket activation passed 2 sockets named 'dut-tcp'"),
        ({"dut-pty": tcp[:1]}, "no matching listener: dut-pty on 127.0.0.1:"),
    ]
    try:
        for activated, message in cases:
            daemon = Daemon(cfg, activated=activated)
            try:
                with pytest.raises(StartError) as caught:
                    daemon.start()
                assert message in str(caught.value)
                assert not (tmp_path / "tty").exists()  # refused before the pty was made
            finally:
                daemon.close()
    finally:
        for s in [unix, *tcp]:
            s.close()


def _activate(port: int, fdname: str, cfg: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "muxd", "run", "-c", str(cfg)]
    return subprocess.Popen(
        ["systemd-socket-activate", f"--listen=127.0.0.1:{port}", f"--fdname={fdname}", *cmd],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _try_connect(port: int) -> socket.socket | None:
    try:
        return connect(port, timeout=1)
    except OSError:
        return None


def test_sighup_reload_keeps_untouched_clients_flowing(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = start_on_pty(muxd, tmp_path, pty_device, [{"tcp": AUTO, "buffer": "64KiB"}, {"tcp": AUTO}])
    keep, gone = m.port(0), m.port(1)
    reader = connect(keep)
    m.wait_connected(1)
    got = bytearray()
    seq = 0

    def pump(lines: int) -> None:
        nonlocal seq
        for _ in range(lines):
            pty_device.write(b"%08d\n" % seq)
            seq += 1
        got.extend(recv_until(reader, b"%08d\n" % (seq - 1)))

    pump(50)
    # Remove a listener, add one, change the kept one's buffer: a reload.
    kept = {**m.listener(0), "buffer": "1MiB"}
    added = {"tcp": auto_address(), "name": "tcp-new"}
    cfg = m.rewrite([{"name": "dut", "upstream": {"serial": pty_device.path}, "listeners": [kept, added]}])
    m.signal(signal.SIGHUP)
    new = split_hostport(m.wait_listeners({m.names[0], "tcp-new"})["tcp-new"])[1]
    pump(50)
    m.wait_port(new)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gone), timeout=2)
    # A broken file is rejected and everything keeps running.
    cfg.write_text(cfg.read_text().replace("buffer: 1MiB", "buffer: huge"))
    m.signal(signal.SIGHUP)
    m.wait_log("reload rejected")  # no state changes: the log line is what there is to see
    assert "buffer: expected a size" in m.log()
    pump(50)
    numbers = [int(x) for x in bytes(got).split(b"\n") if x]
    assert numbers == list(range(150)), "the kept client saw a gap or a repeat across reloads"
    assert m.proc.poll() is None
    t0 = time.monotonic()
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0 and time.monotonic() - t0 < 5
