"""ser2net compatibility end to end: `muxd convert ser2net`, `muxd run --ser2net`,
and muxd started as `ser2net` the way labgrid's exporter starts it (muxd.ser2net)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import serial
import yaml
from websockets.sync.client import connect as ws_connect

from muxd.ser2net import convert, mode, reader, render
from tests.helpers import (
    AUTO,
    LOCAL,
    ROOT,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    free_port,
    recv_until,
    run_muxd,
    start_muxd,
    wait_for,
)

DEBIAN_CONFIG = Path("/etc/ser2net.yaml")
DEBIAN_EXAMPLES = Path("/usr/share/doc/ser2net/examples/ser2net.yaml")
MUXD_SCRIPT = Path(sys.executable).parent / "muxd"  # the console script a `ser2net` symlink points at


def _convert(path: Path) -> subprocess.CompletedProcess[str]:
    return run_muxd("convert", "ser2net", str(path))


def _no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr


# -- converting files --------------------------------------------------------------------------


@pytest.mark.skipif(
    not DEBIAN_CONFIG.exists(), reason="ser2net's /etc/ser2net.yaml is absent (apt install ser2net)"
)
def test_debians_shipped_file_converts_and_muxd_check_accepts_it(tmp_path: Path) -> None:
    done = _convert(DEBIAN_CONFIG)
    assert done.returncode == 0, done.stderr
    # ttyS0 and ttyS1 are each opened at 9600 and at 19200: one port each, the first speed kept.
    assert (
        len(
            re.findall(
                r"/etc/ser2net.yaml:\d+: warning: connection &con[01]192 asks for 19200n81", done.stderr
            )
        )
        == 2
    )
    out = tmp_path / "muxd.yaml"
    out.write_text(done.stdout)
    assert "# warning: connection &con0192 asks for 19200n81 on /dev/ttyS0" in done.stdout
    data = yaml.safe_load(done.stdout)
    assert [
        (p["name"], p["upstream"]["baudrate"], [lst["name"] for lst in p["listeners"]]) for p in data["ports"]
    ] == [
        ("ttyS0", 9600, ["con0096", "con0192"]),
        ("ttyS1", 9600, ["con1096", "con1192"]),
    ]
    assert data["ports"][0]["listeners"][0]["tcp"] == "127.0.0.1:2000"
    check = run_muxd("check", "-c", str(out))
    assert check.returncode == 0, check.stderr


def _uncommented_examples(tmp_path: Path) -> Path:
    """Debian's example file, every example uncommented (it ships all commented out)."""
    lines, on = [], False
    for line in DEBIAN_EXAMPLES.read_text().splitlines():
        text = line
        if on:
            text = line[2:] if line.startswith("# ") else ("" if line == "#" else line)
        on = on or text.startswith("define: &confver")
        lines.append(text)
    path = tmp_path / "examples.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.skipif(
    not DEBIAN_EXAMPLES.exists(), reason="ser2net's example file is absent (apt install ser2net)"
)
def test_debians_examples_each_unsupported_item_is_named_and_the_serial_ones_convert(tmp_path: Path) -> None:
    path = _uncommented_examples(tmp_path)
    done = _convert(path)
    _no_traceback(done)
    assert done.returncode == 2 and done.stdout == ""
    lines = path.read_text().splitlines()
    errors = re.findall(rf"^muxd: {re.escape(str(path))}:(\d+): (.*)$", done.stderr, re.M)
    assert len(errors) == len(done.stderr.splitlines()) >= 25
    for number, message in errors:
        # Each error points at the line it is about.
        word = re.search(r"^(?:connection &\S+: )?([\w*{-]+)", message)
        assert word is not None
        key = {"*{FILE": "*{"}.get(word.group(1), word.group(1))
        assert key.split("'")[0] in lines[int(number) - 1], (number, message, lines[int(number) - 1])
    # The serial-device connections of the examples are not among them.
    assert "&con00:" not in done.stderr and "&con01:" not in done.stderr
    serial_only = "".join(
        line + "\n"
        for line in lines[: next(i for i, x in enumerate(lines) if x.startswith("# Set all baud"))]
    )
    part = tmp_path / "serial.yaml"
    part.write_text(serial_only.replace("include:", "#include:"))
    ok = _convert(part)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "m.yaml").write_text(ok.stdout)
    assert run_muxd("check", "-c", str(tmp_path / "m.yaml")).returncode == 0


HOSTILE = """\
define: &when at \\Y\\r\\n
admin:                                                # E
  accepter: tcp,3000
connection: &a
  accepter: sctp,2000                                 # E
  connector: serialdev,/dev/ttyS0,115200n81
connection: &b
  accepter: telnet,tcp,2001
  timeout: 30                                         # E
  connector: ipmisol,lan -U admin,115200              # E
connection: &c
  accepter: tcp,myhost.example.org,2002               # E
  connector: serialdev(rs485=on),/dev/ttyS2,9600n81,dtr=off   # E
  options:
    openstr: hello                                    # E
    closestr: bye                                     # E
    closeon: quit                                     # E
    banner: *when                                     # E
    trace-read: relative/trace                        # E
    trace-both: /var/log/t-\\I                        # E
    trace-both-hexdump: true                          # E
    remaddr: '!10.0.0.1,4000'                         # E
    pamauth: login                                    # E
    allowed-users: alice                              # E
    connback: tcp,10.0.0.1,4000                       # E
    no-con-to-acc: true                               # E
    mdns: true                                        # E
    led-tx: *led                                      # E
connection: &d
  accepter: telnet(rfc2217),tcp,2003
  connector: serialdev,/dev/ttyS3,fast                # E
  options:
    telnet-brk-on-sync: true                          # E
    max-connections: many                             # E
    remaddr: 10.0.0.0/8,22                            # E
    frobnicate: yes                                   # E
connection:                                           # E
  accepter: tcp,2004
  connector: serialdev,/dev/ttyS4
rotator: &r                                           # E
  accepter: tcp,2005
  connections: [*a]
include: /etc/ser2net/*.yaml                          # E
"""


def test_hostile_file_every_unsupported_item_is_reported_with_its_line_in_one_run(tmp_path: Path) -> None:
    # The LED alias must exist for the file to be YAML; it is defined on a line of its own, before use.
    text = HOSTILE.replace(
        "admin:", "led: &led\n  driver: sysfs                                      # E\nadmin:", 1
    )
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    done = _convert(path)
    _no_traceback(done)
    assert done.returncode == 2 and done.stdout == ""
    reported = sorted({int(n) for n in re.findall(rf"{re.escape(str(path))}:(\d+): ", done.stderr)})
    marked = [i for i, line in enumerate(text.splitlines(), 1) if line.rstrip().endswith("# E")]
    marked.remove(3)  # the led's "driver:" line: the error is on "led: &led", the line above
    marked.append(2)
    assert reported == sorted(marked), done.stderr


LAB = """\
%YAML 1.1
---
define: &banner \\r\\nmuxd-as-ser2net port \\p on \\d [\\B]\\r\\n
default:
  name: kickolduser
  value: false
  class: ser2net
connection: &console
  accepter: telnet(rfc2217),tcp,{p1}
  enable: on
  connector: serialdev(nouucplock=true),
             {dev},
             115200n81,local
  options:
    banner: *banner
    max-connections: 4
    remaddr: 127.0.0.1,0;::1,0
    trace-both: /tmp/muxd-ser2net-\\o.log
    trace-timestamp: true
    telnet-brk-on-sync: false
    chardelay: true
connection: &raw
  accepter: tcp,localhost,{p2}
  connector: serialdev,{dev},9600n81,local
  options:
    banner: 'raw \\p\\r\\n'
    max-connections: 3
    kickolduser: false
    trace-read: /tmp/muxd-ser2net-read-\\p.log
connection: &old
  accepter: telnet(rfc2217),{p3}
  connector: serialdev,/dev/ttyUSB7,57600n81,rtscts
connection: &plain
  accepter: telnet,tcp,::1,{p4}
  connector: serialdev,/dev/ttyUSB8,115200e71
  options:
    kickolduser: true
    no-acc-to-con: true
connection: &off
  accepter: tcp,{p5}
  enable: off
  connector: serialdev,/dev/ttyUSB9,9600n81
"""


def _lab(dev: str, ports: list[int]) -> str:
    return LAB.format(dev=dev, p1=ports[0], p2=ports[1], p3=ports[2], p4=ports[3], p5=ports[4])


def test_lab_file_using_every_item_converts_as_expected() -> None:
    text = _lab("/dev/ttyACM0", [4001, 4002, 4003, 4004, 4005])
    result = convert.convert(reader.read(text, "lab.yaml"))
    assert result.errors == []
    assert [(w.line, w.message.split(";")[0]) for w in result.warnings] == [
        (22, "connection &raw asks for 9600n81 on /dev/ttyACM0")
    ]
    assert result.data == [
        {
            "name": "ttyACM0",
            "upstream": {
                "serial": "/dev/ttyACM0",
                "baudrate": 115200,
                "parity": "none",
                "bytesize": 8,
                "stopbits": 1,
            },
            "listeners": [
                {
                    "rfc2217": "0.0.0.0:4001",
                    "name": "console",
                    "mode": "rw",
                    "banner": "\\r\\nmuxd-as-ser2net port \\p on \\d [\\B]\\r\\n",
                    "max_clients": 4,
                    "allow": ["127.0.0.1/32", "::1/128"],
                },
                {
                    "rfc2217": "[::]:4001",
                    "name": "console-v6",
                    "mode": "rw",
                    "banner": "\\r\\nmuxd-as-ser2net port \\p on \\d [\\B]\\r\\n",
                    "max_clients": 4,
                    "allow": ["127.0.0.1/32", "::1/128"],
                },
                {
                    "tcp": "127.0.0.1:4002",
                    "name": "raw",
                    "mode": "rw",
                    "banner": "raw \\p\\r\\n",
                    "max_clients": 3,
                },
            ],
            "trace": [
                {"path": "/tmp/muxd-ser2net-console.log", "format": "text", "input": True},
                {"path": "/tmp/muxd-ser2net-read-4002.log", "format": "raw"},
            ],
        },
        {
            "name": "ttyUSB7",
            "upstream": {
                "serial": "/dev/ttyUSB7",
                "baudrate": 57600,
                "parity": "none",
                "bytesize": 8,
                "stopbits": 1,
                "flow": "rtscts",
            },
            "listeners": [
                {"rfc2217": "0.0.0.0:4003", "name": "old", "mode": "rw", "max_clients": 1},
                {"rfc2217": "[::]:4003", "name": "old-v6", "mode": "rw", "max_clients": 1},
            ],
        },
        {
            "name": "ttyUSB8",
            "upstream": {
                "serial": "/dev/ttyUSB8",
                "baudrate": 115200,
                "parity": "even",
                "bytesize": 7,
                "stopbits": 1,
            },
            "listeners": [{"rfc2217": "[::1]:4004", "name": "plain", "mode": "ro"}],
        },
    ]
    text_out = render.render(result)
    # The comments say what was loose, and the YAML reads back as the data.
    assert yaml.safe_load(text_out) == {"ports": result.data}
    for said in (
        "chardelay: translated loosely",
        "kickolduser: translated loosely",
        "telnet: translated loosely",
    ):
        assert said in text_out
    assert "connection &off (line 39): enable: off, not converted" in text_out
    assert "local: muxd ignores the modem lines" in text_out


# -- serving ------------------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path, pty_device: PtyDevice) -> tuple[Path, list[int]]:
    ports = [free_port() for _ in range(5)]
    text = _lab(pty_device.path, ports)
    # Serve only the two connections on the pty; trace files in the test's directory.
    text = text[: text.index("connection: &old")].replace("/tmp/muxd-", f"{tmp_path}/muxd-")
    path = tmp_path / "ser2net.yaml"
    path.write_text(text)
    return path, ports


def test_converted_config_serves_rfc2217_and_raw_clients_with_banners(
    muxd: Any,
    tmp_path: Path,
    pty_device: PtyDevice,
    lab: tuple[Path, list[int]],
    serial_ports: list[serial.Serial],
) -> None:
    path, ports = lab
    m: Muxd = muxd("run", "--ser2net", str(path), ready_file=tmp_path / "ready.json")
    bound = m.wait_ready_file()["listeners"]
    m.wait_log("upstream up")  # no http server to ask: the log says when the device is open
    assert bound["console"] == f"0.0.0.0:{ports[0]}" and bound["raw"] == f"127.0.0.1:{ports[1]}"
    raw1, raw2 = connect(ports[1]), connect(ports[1])
    for raw in (raw1, raw2):  # two clients on one ser2net connection; \p expanded at connect
        assert recv_until(raw, b"\r\n") == f"raw {ports[1]}\r\n".encode()
    port = serial.serial_for_url(f"rfc2217://{LOCAL}:{ports[0]}?ign_set_control", baudrate=115200, timeout=5)
    serial_ports.append(port)
    pty_device.write(b"login: ")
    for raw in (raw1, raw2):
        assert recv_until(raw, b"login: ") == b"login: "
    # pyserial purges its input as it opens (the banner goes with it): it reads the device.
    assert port.read_until(b"login: ") == b"login: "
    # A telnet client sees the negotiation, then the banner, \p \d \B expanded.
    telnet = connect(ports[0])
    got = recv_until(telnet, b"]\r\n")
    assert got.startswith(b"\xff") and got.endswith(
        f"\r\nmuxd-as-ser2net port {ports[0]} on {pty_device.path} [115200N81]\r\n".encode()
    )
    telnet.close()
    port.write(b"root\r")  # read-write, as a ser2net connection is
    assert pty_device.read(5) == b"root\r"


def test_ser2net_port_and_listener_names_come_from_device_and_anchors(lab: tuple[Path, list[int]]) -> None:
    path, _ = lab
    done = _convert(path)
    assert done.returncode == 0, done.stderr
    assert [lst["name"] for lst in yaml.safe_load(done.stdout)["ports"][0]["listeners"]] == [
        "console",
        "console-v6",
        "raw",
    ]


# -- muxd as `ser2net` --------------------------------------------------------------------------


@pytest.fixture
def ser2net_bin(tmp_path: Path) -> Path:
    """A `ser2net` that is muxd: a symlink to the muxd console script, as busybox does it."""
    if not MUXD_SCRIPT.exists():
        pytest.skip(f"no muxd console script at {MUXD_SCRIPT} (pip install -e .)")
    link = tmp_path / "bin" / "ser2net"
    link.parent.mkdir()
    link.symlink_to(MUXD_SCRIPT)
    return link


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _labgrid_lines(dev: str, port: int, new: bool) -> list[str]:
    """The command line labgrid's exporter runs: 26.0.1 (new), and before the options and `tcp,` came."""
    if new:
        return [
            "-d",
            "-n",
            "-Y",
            f"connection: &con01#  accepter: telnet(rfc2217,mode=server),tcp,{port}",
            "-Y",
            f"  connector: serialdev(nouucplock=true),{dev},115200n81,local",
            "-Y",
            "  options:",
            "-Y",
            "    max-connections: 10",
        ]
    return [
        "-d",
        "-n",
        "-Y",
        f"connection: &con01#  accepter: telnet(rfc2217),{port}",
        "-Y",
        f"  connector: serialdev,{dev},115200n81,local",
    ]


def test_ser2net_v_is_three_words(ser2net_bin: Path) -> None:
    done = subprocess.run([str(ser2net_bin), "-v"], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0
    # labgrid's exporter: version = output.split(" ")[2]; needs major 4.
    words = done.stdout.strip().split(" ")
    assert len(words) == 3 and words[0] == "ser2net" and words[2].startswith("4."), done.stdout


def _bindable(port: int) -> bool:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as any server rebinding does
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        return False
    finally:
        s.close()
    return True


@pytest.mark.parametrize("new", [True, False], ids=["labgrid-26", "labgrid-old"])
def test_labgrid_command_lines_start_serve_and_stop_on_sigterm_within_2s(
    ser2net_bin: Path,
    pty_device: PtyDevice,
    started: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    new: bool,
) -> None:
    port = free_port()
    pidfile = tmp_path / "ser2net.pid"
    log = (tmp_path / "ser2net.log").open("wb")
    proc = subprocess.Popen(
        [str(ser2net_bin), *_labgrid_lines(pty_device.path, port, new), "-u", "-P", str(pidfile)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    started.append(proc)

    def accepted() -> socket.socket | None:
        assert proc.poll() is None, (tmp_path / "ser2net.log").read_text()
        try:
            return connect(port, timeout=0.2)
        except OSError:
            return None

    client = wait_for(accepted, 15, "muxd-as-ser2net listening")
    assert pidfile.read_text() == f"{proc.pid}\n"
    # Opening the tty flushes its input: write only once the device is open (-d logs it).
    wait_for(lambda: "upstream up" in (tmp_path / "ser2net.log").read_text(), 10, "the device open")
    pty_device.write(b"U-Boot> ")
    assert recv_until(client, b"U-Boot> ").endswith(b"U-Boot> ")
    assert proc.poll() is None  # what the exporter checks after 0.5 s
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)  # with a client still connected
    assert proc.wait(2.0) == 0, (tmp_path / "ser2net.log").read_text()
    assert time.monotonic() - t0 < 2.0
    assert _bindable(port)
    assert not pidfile.exists()
    client.close()


def test_ser2net_refuses_the_admin_port_and_bad_files_with_status_2(
    ser2net_bin: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [str(ser2net_bin), "-n", "-p", "tcp,2000"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2 and "admin" in done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("connection: &x\n  accepter: sctp,2000\n  connector: serialdev,/dev/ttyS0\n")
    done = subprocess.run(
        [str(ser2net_bin), "-n", "-c", str(bad)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2 and f"{bad}:2: connection &x: accepter" in done.stderr
    _no_traceback(done)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_with_a_daemon_the_exporters_command_joins_it_and_its_port_leaves_with_the_process(  # noqa: PLR0917
    ser2net_bin: Path,
    pty_device: PtyDevice,
    muxd: StartMuxd,
    started: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    stop: signal.Signals,
) -> None:
    """labgrid's command line with a daemon on the control socket: the port is
    the daemon's (its API, its WebSocket readers) while the process lives; the
    process opens no device; killing it, even outright, removes the port."""
    control = tmp_path / "control.sock"
    daemon = start_muxd(
        muxd,
        tmp_path,
        {"sim": True},
        [{"tcp": AUTO}],
        name="lab",
        top={"control": {"path": str(control), "socket_mode": "0660"}},
    )
    names = lambda: [p["name"] for p in daemon.api("/api/v1/ports")["ports"]]  # noqa: E731
    proc, port = start_exporter_command(
        ser2net_bin,
        pty_device,
        control,
        started,
        log=tmp_path / "ser2net.log",
        joined=lambda: "ttyDUT" in names(),
    )
    assert "through the muxd daemon" in (tmp_path / "ser2net.log").read_text()
    # The device is the daemon's: the ser2net-mode process holds no fd on it.
    tty = os.path.realpath(pty_device.path)
    assert all(os.path.realpath(fd) != tty for fd in Path(f"/proc/{proc.pid}/fd").iterdir())

    # A browser's WebSocket on the daemon follows the console while labgrid's
    # kind of client (pyserial rfc2217) types into it.
    with ws_connect(f"ws://{daemon.http}/ws/ttyDUT?format=raw", open_timeout=5) as ws:
        client = serial.serial_for_url(f"rfc2217://{LOCAL}:{port}", baudrate=115200, timeout=5)
        try:
            client.write(b"uname\r")
            assert pty_device.read(6) == b"uname\r"
            pty_device.write(b"Linux board 6.1\r\n")
            assert client.read_until(b"6.1\r\n").endswith(b"Linux board 6.1\r\n")
            seen = b""
            deadline = time.monotonic() + 10
            while b"6.1\r\n" not in seen and time.monotonic() < deadline:
                message = ws.recv(timeout=deadline - time.monotonic())
                seen += message if isinstance(message, bytes) else message.encode()
            assert b"Linux board 6.1\r\n" in seen
        finally:
            client.close()

    os.kill(proc.pid, stop)
    proc.wait(5)
    wait_for(lambda: "ttyDUT" not in names(), 10, "the port removed with its process")
    assert names() == ["lab"]
    with pytest.raises(OSError):
        connect(port, timeout=1).close()  # nobody listens on the exported port any more


def start_exporter_command(
    ser2net_bin: Path,
    dev: PtyDevice,
    control: Path,
    started: list[subprocess.Popen[bytes]],
    *,
    log: Path,
    joined: Callable[[], bool],
) -> tuple[subprocess.Popen[bytes], int]:
    """labgrid's command line for `dev`, joining the daemon at `control`, once
    `joined()` or the process has exited; (the process, its port). labgrid
    binds 0.0.0.0:PORT and free_port() knows loopback only: a port taken
    elsewhere meanwhile is tried again with another, at most three times."""
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [str(ser2net_bin), *_labgrid_lines(dev.path, port, True)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "MUXD_CONTROL": str(control)},
        )
        started.append(proc)
        wait_for(lambda: joined() or proc.poll() is not None, 15, "the exporter's command joined")  # noqa: B023
        if proc.poll() is None or "address already in use" not in log.read_text():
            break
    assert proc.poll() is None, log.read_text()
    return proc, port


def test_on_a_daemon_that_owns_the_device_the_exporters_listener_joins_its_port_with_its_history(
    ser2net_bin: Path,
    pty_device: PtyDevice,
    muxd: StartMuxd,
    started: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """The board is a port of the daemon's config, watched before any place is
    acquired: labgrid's command line joins that port with its rfc2217
    listener (no second port, no second owner of the device), whose clients
    get the port's history; SIGTERM takes the listener away, the port and
    its other clients stay."""
    control = tmp_path / "control.sock"
    daemon = start_muxd(
        muxd,
        tmp_path,
        {"serial": pty_device.path, "baudrate": 9600},
        [{"tcp": AUTO, "notices": True}],
        name="board",
        history="4KiB",
        top={"control": {"path": str(control), "socket_mode": "0660"}},
    )
    watcher = connect(daemon.port())
    wait_for(lambda: daemon.port_info("board")["clients"] == 1, 10, "the daemon's reader")
    pty_device.write(b"U-Boot 2024.01 before the place was acquired\r\n")
    assert recv_until(watcher, b"acquired\r\n").endswith(b"acquired\r\n")

    listeners = lambda: {lst["name"] for lst in daemon.port_info("board")["listeners"]}  # noqa: E731
    log = tmp_path / "ser2net.log"
    proc, port = start_exporter_command(
        ser2net_bin, pty_device, control, started, log=log, joined=lambda: "con01" in listeners()
    )
    assert [p["name"] for p in daemon.api("/api/v1/ports")["ports"]] == ["board"]
    text = log.read_text()
    assert "serving ttyDUT (on its port board) through the muxd daemon" in text, text
    assert "warning: " in text and "9600 8N1" in text and "115200 8N1" in text, text
    assert daemon.port_info("board")["line"]["baudrate"] == 9600  # the daemon's settings stay

    # A telnet client of the exporter's listener (as `labgrid-client console`
    # is): the line from before the process started comes first.
    console = connect(port)
    assert b"U-Boot 2024.01 before the place was acquired\r\n" in recv_until(console, b"acquired\r\n")
    # labgrid's own kind of client types and reads as before.
    client = serial.serial_for_url(f"rfc2217://{LOCAL}:{port}", baudrate=115200, timeout=5)
    try:
        client.write(b"version\r")
        assert pty_device.read(8) == b"version\r"
        pty_device.write(b"U-Boot 2024.01\r\n=> ")
        assert client.read_until(b"=> ").endswith(b"U-Boot 2024.01\r\n=> ")
    finally:
        client.close()

    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(5) == 0
    wait_for(lambda: "con01" not in listeners(), 10, "the exporter's listener removed with its process")
    with pytest.raises(OSError):
        connect(port, timeout=1).close()
    assert b"board listener con01 removed" not in recv_until(console, b"=> ")  # notices off there
    console.close()
    # The port and its other client: still there, still served, history intact.
    assert [p["name"] for p in daemon.api("/api/v1/ports")["ports"]] == ["board"]
    pty_device.write(b"still watched\r\n")
    assert recv_until(watcher, b"watched\r\n").endswith(b"still watched\r\n")
    watcher.close()


def test_without_a_daemon_ser2net_mode_runs_standalone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MUXD_CONTROL", str(tmp_path / "no-such.sock"))
    assert mode.join_daemon([{"name": "x"}], "ser2net") is None
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))  # a socket file nobody listens on
    stale.close()
    monkeypatch.setenv("MUXD_CONTROL", str(tmp_path / "stale.sock"))
    assert mode.join_daemon([{"name": "x"}], "ser2net") is None
    monkeypatch.setenv("MUXD_CONTROL", "")  # never join
    assert mode.join_daemon([{"name": "x"}], "ser2net") is None


# -- labgrid -----------------------------------------------------------------------------------


class ShellOnPty(threading.Thread):
    """The far end of the pty answers like a shell: echo what is typed, a
    prompt "# " after each line (and first), "hi" for `echo hi`."""

    def __init__(self, dev: PtyDevice) -> None:
        super().__init__(daemon=True)
        self.dev = dev
        self.stop = threading.Event()

    def run(self) -> None:
        import select

        line = b""
        deadline = time.monotonic() + 60  # bounded: a test never lasts this long
        while not self.stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([self.dev.master], [], [], 0.05)
            if not ready:
                continue
            try:
                data = os.read(self.dev.master, 1024)
            except (BlockingIOError, OSError):
                continue
            for byte in data:
                ch = bytes([byte])
                if ch in (b"\r", b"\n"):
                    answer = b"\r\n" + (b"hi\r\n" if line == b"echo hi" else b"") + b"# "
                    self.dev.write(answer)
                    line = b""
                else:
                    self.dev.write(ch)  # the echo
                    line += ch


# labgrid's client runs in its own interpreter (tests/labgrid_client.py says why):
# the Makefile's .venv-labgrid, or LABGRID_PYTHON.
LABGRID_PYTHON = os.environ.get("LABGRID_PYTHON", str(ROOT / ".venv-labgrid" / "bin" / "python"))


def test_labgrid_serial_driver_gets_a_prompt_while_a_raw_reader_follows(
    ser2net_bin: Path, pty_device: PtyDevice, started: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    if not os.access(LABGRID_PYTHON, os.X_OK):
        pytest.skip(f"no labgrid interpreter at {LABGRID_PYTHON} (make test builds .venv-labgrid)")
    port = free_port()
    raw_port = free_port()
    lines = _labgrid_lines(pty_device.path, port, True)
    # A second connection on the same device: a plain TCP reader following the console.
    lines += [
        "-Y",
        f"connection: &follow#  accepter: tcp,localhost,{raw_port}",
        "-Y",
        f"  connector: serialdev,{pty_device.path},115200n81,local",
    ]
    lines += ["-Y", "  options:#    max-connections: 2"]
    proc = subprocess.Popen(
        [str(ser2net_bin), *lines], stdout=(tmp_path / "log").open("wb"), stderr=subprocess.STDOUT
    )
    started.append(proc)

    def accepted() -> socket.socket | None:
        assert proc.poll() is None, (tmp_path / "log").read_text()
        try:
            return connect(raw_port, timeout=0.2)
        except OSError:
            return None

    follower = wait_for(accepted, 15, "muxd-as-ser2net listening")
    shell = ShellOnPty(pty_device)
    shell.start()
    try:
        client = subprocess.run(
            [LABGRID_PYTHON, str(ROOT / "tests" / "labgrid_client.py"), LOCAL, str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert client.returncode == 0, client.stdout + client.stderr
        seen = recv_until(follower, b"hi\r\n# ")
        assert b"echo hi\r\nhi\r\n# " in seen
    finally:
        shell.stop.set()
        shell.join(5)
        follower.close()


# -- the banner key, and the other ways in -------------------------------------------------------


def test_a_banner_with_an_unknown_escape_is_a_config_error_at_its_line(tmp_path: Path) -> None:
    cfg = tmp_path / "muxd.yaml"
    cfg.write_text(
        "ports:\n  - name: p\n    upstream: {sim: true}\n    listeners:\n"
        "      - tcp: 127.0.0.1:0\n        banner: 'on \\d at \\Y'\n"
    )
    done = run_muxd("check", "-c", str(cfg))
    assert done.returncode == 2
    assert re.search(r":6: .*ports\[0\]\.listeners\[0\]\.banner: unknown escape \\Y", done.stderr), (
        done.stderr
    )


def test_run_ser2net_with_a_bad_file_exits_2_naming_each_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(HOSTILE.replace("    led-tx: *led", "    led-tx: x"))
    done = run_muxd("run", "--ser2net", str(path))
    _no_traceback(done)
    assert done.returncode == 2
    assert len(re.findall(rf"^muxd: {re.escape(str(path))}:\d+: ", done.stderr, re.M)) >= 25


def test_ser2net_c_file_and_y_strings_join_into_one_document(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("connection: &a\n  accepter: tcp,localhost,2000\n  connector: serialdev,/dev/ttyS0\n")
    opts = mode.parse_args(
        [
            "-c",
            str(path),
            "-Y",
            "connection: &b#  accepter: tcp,localhost,2001",
            "-Y",
            "  connector: serialdev,/dev/ttyS0",
        ]
    )
    found = mode._config_text(opts)
    assert found is not None
    result = convert.convert(reader.read(*found))
    assert result.errors == []
    assert [lst["name"] for lst in result.data[0]["listeners"]] == ["a", "b"]
