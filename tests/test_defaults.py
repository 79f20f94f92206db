"""Safe defaults with real peers: line_control: virtual (pyserial's rfc2217://
and a pty program ask for any baud rate, the device's termios stay as
configured), read-only clients of every listener kind, the packaged config,
`muxd check` reporting every problem in line order, and start errors as one
line with exit status 2."""

from __future__ import annotations

import re
import socket
import termios
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import serial
import yaml
from websockets.sync.client import connect as ws_connect

from muxd import config as configmod
from muxd.checks import is_loopback_host
from muxd.config import Listener, Port, SimUpstream
from muxd.connection import policy_for
from muxd.hub import Hub
from muxd.linecontrol import LineControl
from muxd.port import bounds_for
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor
from muxd.upstream.sim import SimDevice
from tests.helpers import (
    AUTO,
    ROOT,
    PtyDevice,
    StartMuxd,
    connect,
    split_hostport,
    start_on_pty,
    wait_for,
    write_config,
)
from tests.helpers import run_muxd as muxd_cli


class Idle:
    """A reader owner that never has room: the hub only needs it to exist."""

    def on_data(self) -> None: ...

    def close(self, reason: str) -> None: ...


@pytest.fixture
def clients() -> Iterator[list[Any]]:
    opened: list[Any] = []
    yield opened
    for c in opened:
        c.close()


def device_attrs(dev: PtyDevice) -> list[Any]:
    return termios.tcgetattr(dev.master)


# -- line_control: virtual ---------------------------------------------------------------------


def test_virtual_remembers_each_clients_request_and_applies_none() -> None:
    reactor = Reactor()
    try:
        port = Port("dut", SimUpstream(baudrate=115200))
        assert port.line_control == "virtual"  # the default
        hub = Hub(port.name, bounds_for(port), reactor)
        sim = SimDevice(port.upstream, hub, reactor)  # type: ignore[arg-type]
        lc = LineControl(port, sim)
        rw = policy_for(Listener("rfc2217", "vcom", mode="rw"))
        a, b = hub.attach(Idle(), rw, "a:1"), hub.attach(Idle(), rw, "b:2")  # type: ignore[arg-type]
        slow = LineSettings(baudrate=9600)
        assert lc.request(a, slow) == slow  # acknowledged as asked
        assert lc.settings_for(a) == slow and lc.settings_for(b) == LineSettings(baudrate=115200)
        assert sim.settings == LineSettings(baudrate=115200)  # never applied
        assert lc.counts["vcom"].acknowledged == 1 and lc.counts["vcom"].applied == 0
        lc.release(a)
        assert lc.settings_for(a) == LineSettings(baudrate=115200) and not lc.virtual
    finally:
        reactor.close()


def test_pyserial_rfc2217_without_baudrate_leaves_the_device_alone(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, clients: list[Any]
) -> None:
    m = start_on_pty(muxd, tmp_path, pty_device, [{"rfc2217": AUTO, "mode": "rw", "name": "vcom"}])
    before = device_attrs(pty_device)
    assert before[4] == termios.B115200
    host, port = split_hostport(m.address(0))
    # pyserial's default is 9600: asked for on open, acknowledged, never applied.
    plain = serial.serial_for_url(f"rfc2217://{host}:{port}", timeout=5)
    clients.append(plain)
    other = serial.serial_for_url(f"rfc2217://{host}:{port}", baudrate=57600, timeout=5)
    clients.append(other)
    assert plain.baudrate == 9600 and other.baudrate == 57600
    plain.baudrate = 300  # any value, any time
    pty_device.write(b"hello\n")
    assert plain.read_until(b"\n") == b"hello\n" and other.read_until(b"\n") == b"hello\n"
    plain.write(b"ping\n")
    assert pty_device.read(5) == b"ping\n"
    m.wait_metric("muxd_line_settings_requests_total", 3, outcome="acknowledged")
    assert m.metric("muxd_line_settings_requests_total", outcome="applied") == 0
    assert device_attrs(pty_device) == before
    assert "acknowledged for vcom" in m.log()


def test_a_pty_programs_baud_rate_is_acknowledged_not_applied(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, clients: list[Any]
) -> None:
    link = tmp_path / "ttyDUT0"
    m = start_on_pty(muxd, tmp_path, pty_device, [{"pty": str(link), "mode": "rw", "name": "tty"}])
    before = device_attrs(pty_device)
    program = serial.Serial(str(link), 9600, timeout=5)
    clients.append(program)
    program.baudrate = 19200
    # (An open and a change within one poll of the pty are one request.)
    m.wait_log("line settings 19200 8N1 acknowledged for tty")
    # The slave keeps what the program set; the device keeps its own.
    assert termios.tcgetattr(program.fd)[4] == termios.B19200
    assert device_attrs(pty_device) == before


# -- read-only clients of every listener kind --------------------------------------------------


def test_ro_clients_of_every_kind_cannot_write_or_change_the_line(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, clients: list[Any]
) -> None:
    sock_path, link = tmp_path / "ro.sock", tmp_path / "ttyRO"
    listeners: list[dict[str, Any]] = [
        {"tcp": AUTO, "name": "tcp-ro"},
        {"unix": str(sock_path), "name": "unix-ro"},
        {"rfc2217": AUTO, "name": "rfc-ro"},
        {"pty": str(link), "name": "pty-ro"},
        {"websocket": True, "name": "ws-ro"},
        {"tcp": AUTO, "name": "tcp-rw", "mode": "rw"},
    ]
    # `any` is the most permissive policy: what stops these clients is mode: ro.
    m = start_on_pty(muxd, tmp_path, pty_device, listeners, line_control="any")
    before = device_attrs(pty_device)
    tcp = connect(m.port("tcp-ro"))
    clients.append(tcp)
    tcp.sendall(b"T" * 5)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    clients.append(unix)
    unix.connect(str(sock_path))
    unix.sendall(b"U" * 5)
    host, port = split_hostport(m.address("rfc-ro"))
    rfc = serial.serial_for_url(f"rfc2217://{host}:{port}", baudrate=115200, timeout=5)
    clients.append(rfc)
    rfc.write(b"R" * 5)
    with pytest.raises(ValueError, match="remote rejected"):
        rfc.baudrate = 9600  # answered with the settings in force
    # Control lines: a ro client's request is answered with the level in force.
    with pytest.raises(ValueError, match="remote rejected"):
        rfc.dtr = False
    with pytest.raises(ValueError, match="remote rejected"):
        rfc.rts = False
    program = serial.Serial(str(link), 115200, timeout=5)
    clients.append(program)
    program.write(b"P" * 5)
    program.baudrate = 9600  # refused: muxd sets the slave back
    wait_for(lambda: termios.tcgetattr(program.fd)[4] == termios.B115200, what="the slave set back")
    with ws_connect(f"ws://{m.http}/ws/dut", open_timeout=5) as browser:
        browser.send(b"W" * 5)
        m.wait_metric("muxd_input_discarded_bytes_total", 25, port="dut")
    m.wait_metric("muxd_line_settings_requests_total", 1, listener="rfc-ro", outcome="refused")
    m.wait_metric("muxd_line_settings_requests_total", 1, listener="pty-ro", outcome="refused")
    assert m.metric("muxd_line_settings_requests_total", outcome="applied") == 0
    # Whatever a ro client sent would have reached the device before this.
    rw = connect(m.port("tcp-rw"))
    clients.append(rw)
    rw.sendall(b"SENTINEL\n")
    assert pty_device.read(9) == b"SENTINEL\n"
    assert device_attrs(pty_device) == before


# -- the packaged config and `muxd check` ------------------------------------------------------


def test_the_packaged_config_passes_check_and_binds_loopback_only() -> None:
    path = ROOT / "config" / "muxd.yaml"
    done = muxd_cli("check", "-c", str(path))
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    cfg = configmod.load(str(path))
    hosts = [lst.host for port in cfg.ports for lst in port.listeners if lst.kind in ("tcp", "rfc2217")]
    hosts += [srv.host for srv in cfg.http]
    assert hosts and all(is_loopback_host(h) for h in hosts), hosts
    text = path.read_text()
    assert "token" not in text.replace("tokens (kept", "").lower() or "change-me" not in text
    assert "change-me" not in text
    assert cfg.ports[0].line_control == "virtual"


def token_file(tmp_path: Path, name: str, text: str, mode: int = 0o640) -> Path:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_check_lists_every_problem_in_line_order(tmp_path: Path) -> None:
    leaky = token_file(tmp_path, "leaky", "a-long-enough-secret-0123", 0o644)
    placeholder = token_file(tmp_path, "placeholder", "change-me-to-a-long-random-string")
    text = f"""\
ports:
  - name: dut
    upstream: {{sim: true}}
    listeners:
      - unix: {tmp_path}/missing/dut.sock
        group: no-such-group-here
      - tcp: 0.0.0.0:7000
        mode: rw
http:
  listen: 127.0.0.1:8020
  tokens:
    - {{name: ops, file: {leaky}, scope: admin}}
    - {{name: viewers, file: {placeholder}, scope: read}}
"""
    path = tmp_path / "muxd.yaml"
    path.write_text(text)
    done = muxd_cli("check", "-c", str(path))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert [re.search(r"muxd\.yaml:(\d+):", line)[1] for line in lines] == ["5", "6", "7", "12", "13"], lines  # type: ignore[index]
    assert f"{tmp_path}/missing does not exist" in lines[0] and "listener unix:" in lines[0]
    assert "no group 'no-such-group-here'" in lines[1]
    assert lines[2].startswith("muxd: warning:") and "tcp:0.0.0.0:7000" in lines[2]
    assert "neither tls: nor allow:" in lines[2]
    assert "readable by others" in lines[3] and "token ops" in lines[3]
    assert "placeholder" in lines[4] and "token viewers" in lines[4]
    # With allow:, the rw listener on the network is no longer warned about.
    path.write_text(text.replace("        mode: rw\n", "        mode: rw\n        allow: [10.0.0.0/8]\n"))
    assert "neither tls" not in muxd_cli("check", "-c", str(path)).stderr


# -- start errors -------------------------------------------------------------------------------


def start_error(tmp_path: Path, data: dict[str, Any]) -> str:
    """muxd run on this config: it must fail with one line and status 2; the line."""
    path = write_config(tmp_path, data)
    done = muxd_cli("run", "-c", str(path))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "cannot start" in line]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr
    return errors[0]


def sim(listeners: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "dut", "upstream": {"sim": True}, "listeners": listeners}


def test_start_errors_are_one_line_naming_the_listener(tmp_path: Path) -> None:
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = start_error(tmp_path, {"ports": [sim([{"tcp": f"127.0.0.1:{port}", "name": "dut-tcp"}])]})
        assert (
            line
            == f"muxd: cannot start: port dut, listener dut-tcp (127.0.0.1:{port}): address already in use"
        )
    finally:
        busy.close()
    missing = tmp_path / "missing"
    line = start_error(tmp_path, {"ports": [sim([{"unix": f"{missing}/x.sock", "name": "dut-unix"}])]})
    assert line.endswith(
        f"port dut, listener dut-unix ({missing}/x.sock): directory {missing} does not exist"
    )
    line = start_error(
        tmp_path, {"ports": [sim([{"pty": f"{tmp_path}/tty0", "name": "dut-pty", "group": "no-such-group"}])]}
    )
    assert line.endswith(
        "port dut, listener dut-pty (" + f"{tmp_path}/tty0): no group 'no-such-group' on this machine"
    )
    for tokens, why in (
        ([{"name": "ops", "file": f"{tmp_path}/none", "scope": "admin"}], "cannot read token file"),
        (
            [
                {
                    "name": "ops",
                    "file": str(token_file(tmp_path, "p", "change-me-please-0123456789")),
                    "scope": "read",
                }
            ],
            "placeholder",
        ),
    ):
        http = {"listen": "127.0.0.1:0", "name": "web", "tokens": tokens}
        line = start_error(tmp_path, {"ports": [sim([])], "http": http})
        assert line.startswith("muxd: cannot start: http server web (127.0.0.1:0): ") and why in line


def test_an_inline_token_is_refused_with_a_pointer(tmp_path: Path) -> None:
    data = {"ports": [sim([])], "http": {"listen": 8020, "token": "a-long-enough-token-0123"}}
    path = write_config(tmp_path, data)
    done = muxd_cli("check", "-c", str(path))
    assert done.returncode == 2 and "tokens: [{name: NAME, file: PATH" in done.stderr
    assert "a-long-enough-token-0123" not in done.stderr
    assert yaml.safe_load(path.read_text())["http"]["token"]  # what was refused


def test_check_reports_three_errors_of_the_file_in_line_order(tmp_path: Path) -> None:
    # Each listener, port and http entry is read on its own: one error hides no other.
    path = tmp_path / "muxd.yaml"
    path.write_text(
        """\
ports:
  - name: dut
    upstream: {sim: true}
    listeners:
      - tcp: 127.0.0.1:70000
      - tcp: 127.0.0.1:7001
        buffer: 1TiB
  - name: dut2
    upstream: {sim: true}
    max_line: 1GiB
"""
    )
    done = muxd_cli("check", "-c", str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"muxd: {path}:5: ports[0].listeners[0].tcp: port must be 1..65535, got 70000",
        f"muxd: {path}:7: ports[0].listeners[1].buffer: "
        "expected a size such as 4096, 64KiB or 1MiB, got '1TiB'",
        f"muxd: {path}:10: ports[1].max_line: must be between 16 and 1048576 bytes, got 1073741824",
    ]
    # muxd run says every error too.
    run = muxd_cli("run", "-c", str(path))
    assert run.returncode == 2 and run.stderr.splitlines() == done.stderr.splitlines()
