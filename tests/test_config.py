"""Config validation: every error names the file, the line and the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from muxd.config import KiB, MiB, SerialUpstream, loads, parse_hostport
from muxd.errors import ConfigError
from tests.conftest import ROOT

GOOD = """\
ports:
  - name: dut1
    upstream:
      serial: /dev/ttyUSB0
      baudrate: 9600
      parity: even
      stopbits: 2
    listeners:
      - tcp: 7000
        mode: rw
        buffer: 1MiB
        write: lines
      - tcp: "[::1]:7001"
        overflow: disconnect
      - unix: /run/muxd/dut1.sock
        socket_mode: "0600"
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        loads(text, "muxd.yaml")
    return str(info.value)


def test_good_config() -> None:
    cfg = loads(GOOD, "muxd.yaml")
    port = cfg.ports[0]
    assert isinstance(port.upstream, SerialUpstream)
    assert port.upstream.settings.parity == "E" and port.upstream.settings.stopbits == 2
    tcp, v6, unix = port.listeners
    assert (tcp.host, tcp.port, tcp.mode, tcp.buffer, tcp.write) == (
        "127.0.0.1",
        7000,
        "rw",
        1 * MiB,
        "lines",
    )
    assert (v6.host, v6.port, v6.overflow, v6.buffer) == ("::1", 7001, "disconnect", 256 * KiB)
    assert unix.file_mode == 0o600
    assert port.log_capacity == 1 * MiB


def test_the_issue_example() -> None:
    text = GOOD.replace('      - tcp: "[::1]:7001"', "      - tcp: 127.0.0.1:70000")
    assert error_of(text) == "muxd.yaml:13: ports[0].listeners[1].tcp: port must be 1..65535, got 70000"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("        mode: rw", "        mode: rwx"),
            "muxd.yaml:10: ports[0].listeners[0].mode: must be one of ro, rw",
        ),
        (
            ("        buffer: 1MiB", "        bufer: 1MiB"),
            "muxd.yaml:11: ports[0].listeners[0].bufer: unknown key",
        ),
        (
            ("        buffer: 1MiB", "        buffer: lots"),
            "muxd.yaml:11: ports[0].listeners[0].buffer: expected a size",
        ),
        (
            ("      baudrate: 9600", "      baudrate: fast"),
            "muxd.yaml:5: ports[0].upstream.baudrate: expected an integer",
        ),
        (
            ("      parity: even", "      parity: maybe"),
            "muxd.yaml:6: ports[0].upstream.parity: must be one of",
        ),
        (
            ("      stopbits: 2", "      stopbits: 3"),
            "muxd.yaml:7: ports[0].upstream.stopbits: must be 1, 1.5 or 2",
        ),
        (("  - name: dut1", "  - name: 'dut 1'"), "muxd.yaml:2: ports[0].name: must match"),
        (
            ("      - unix: /run/muxd/dut1.sock", "      - unix: dut1.sock"),
            "muxd.yaml:15: ports[0].listeners[2].unix: must be an absolute path",
        ),
        (
            ("      - tcp: 7000", "      - tcp: 7000\n        pty: /x"),
            "muxd.yaml:9: ports[0].listeners[0]: needs exactly one of",
        ),
        (
            ("      serial: /dev/ttyUSB0", "      serial: /dev/ttyUSB0\n      sim: {}"),
            "muxd.yaml:3: ports[0].upstream: needs exactly one",
        ),
    ],
)
def test_errors_name_line_and_key(change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in GOOD
    assert error_of(GOOD.replace(old, new, 1)).startswith(expected)


def test_duplicates_are_errors() -> None:
    text = GOOD + "  - name: dut1\n    upstream: {sim: {}}\n"
    assert error_of(text).startswith(
        "muxd.yaml:17: ports[1].name: duplicate port name 'dut1' (first at line 2)"
    )
    text = GOOD.replace('"[::1]:7001"', "127.0.0.1:7000")
    assert "duplicate listening address '127.0.0.1:7000'" in error_of(text)
    assert "duplicate key" in error_of("ports: []\nports: []\n")


def test_yaml_syntax_and_empty() -> None:
    assert error_of("ports: [\n").startswith("muxd.yaml:2: YAML syntax error")
    assert error_of("") == "muxd.yaml: the file is empty"
    assert error_of("ports: []\n") == "muxd.yaml:1: ports: needs at least one port"


def test_hostport_forms() -> None:
    assert parse_hostport("7000") == ("127.0.0.1", 7000)
    assert parse_hostport(":7000") == ("127.0.0.1", 7000)
    assert parse_hostport("[::]:7000") == ("::", 7000)
    assert parse_hostport("0.0.0.0:1") == ("0.0.0.0", 1)
    with pytest.raises(ValueError, match="brackets"):
        parse_hostport("::1:7000")


def test_check_command_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("buffer: 1MiB", "buffer: 1TiB"))
    ok = subprocess.run(
        [sys.executable, "-m", "muxd", "check", "-c", str(good)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    res = subprocess.run(
        [sys.executable, "-m", "muxd", "check", "-c", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 2
    assert f"{bad}:11: ports[0].listeners[0].buffer:" in res.stderr
    run = subprocess.run(
        [sys.executable, "-m", "muxd", "run", "-c", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 2 and "buffer" in run.stderr


def test_demo_config_is_valid() -> None:
    cfg = loads((ROOT / "muxd" / "demo.yaml").read_text(), "demo.yaml")
    assert cfg.ports[0].name == "demo"
