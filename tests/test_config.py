"""Config validation: every error names the file, the line and the key path."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

import pytest

from muxd import sequences
from muxd.config import (
    LISTENER_KINDS,
    Config,
    KiB,
    LineControlPolicy,
    Listener,
    ListenerKind,
    LogLevel,
    MiB,
    Mode,
    Overflow,
    Port,
    SerialUpstream,
    TcpUpstream,
    UpstreamControl,
    WriteMode,
    each_error,
    from_data,
    load,
    loads,
    parse_duration,
    parse_hostport,
)
from muxd.errors import ConfigError
from muxd.sequences import Step, parse_step
from tests.helpers import ROOT, StartMuxd, run_muxd, start_muxd

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


def test_hostport_port_zero() -> None:
    # Listening addresses may say 0 (tests/helpers.py probes exactly this call);
    # an address to connect to may not.
    assert parse_hostport("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_hostport(0) == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"port must be 1\.\.65535, got 0"):
        parse_hostport("127.0.0.1:0", allow_any_port=False)
    with pytest.raises(ValueError, match="numeric port"):
        parse_hostport("127.0.0.1:-1")


def test_check_command_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("buffer: 1MiB", "buffer: 1TiB"))
    ok = run_muxd("check", "-c", str(good))
    assert ok.returncode == 0, ok.stderr
    res = run_muxd("check", "-c", str(bad))
    assert res.returncode == 2
    assert f"{bad}:11: ports[0].listeners[0].buffer:" in res.stderr
    run = run_muxd("run", "-c", str(bad))
    assert run.returncode == 2 and "buffer" in run.stderr


def test_demo_config_is_valid() -> None:
    cfg = loads((ROOT / "muxd" / "demo.yaml").read_text(), "demo.yaml")
    assert cfg.ports[0].name == "demo"


# --------------------------------------------------------------------------
# Issue 15 item 7: configs that crashed the loader are ConfigErrors with a line

SIM = """\
ports:
  - name: dut1
    upstream:
{upstream}
    listeners:
      - tcp: 7000
"""


def sim_with(upstream: str) -> str:
    return SIM.format(upstream="\n".join("      " + line for line in upstream.splitlines()))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The realistic one: a slow backoff_min with the default backoff_max (KeyError before).
        (
            sim_with("serial: /dev/ttyUSB0\nbackoff_min: 30s"),
            "muxd.yaml:5: ports[0].upstream.backoff_min: must not exceed backoff_max (default 10s)",
        ),
        (
            "ports:\n  - <<: {name: dut1}\n    upstream: {sim: true}\n",
            "muxd.yaml:2: ports[0].<<: merge keys (<<) are not supported",
        ),
        (
            sim_with("serial: !vault |\n  ciphertext"),
            "muxd.yaml:4: ports[0].upstream.serial: YAML tags such as '!vault' are not supported",
        ),
        (
            sim_with("serial: /dev/ttyUSB0\nbaudrate: !!int fast"),
            "muxd.yaml:5: ports[0].upstream.baudrate: YAML tags such as '!!int' are not supported",
        ),
        (
            sim_with("serial: /dev/ttyUSB0\nbackoff_min: !!float soon"),
            "muxd.yaml:5: ports[0].upstream.backoff_min: YAML tags such as '!!float' are not supported",
        ),
        (
            sim_with("sim: !!bool maybe"),
            "muxd.yaml:4: ports[0].upstream.sim: YAML tags such as '!!bool' are not supported",
        ),
        (
            sim_with("serial: !!timestamp never"),
            "muxd.yaml:4: ports[0].upstream.serial: YAML tags such as '!!timestamp' are not supported",
        ),
        (
            sim_with("serial: !!binary '#'"),
            "muxd.yaml:4: ports[0].upstream.serial: YAML tags such as '!!binary' are not supported",
        ),
        (
            sim_with("serial: /dev/ttyUSB0\nbackoff_max: 1" + "0" * 400),
            "muxd.yaml:5: ports[0].upstream.backoff_max: number too long (401 characters)",
        ),
        (
            sim_with("serial: /dev/ttyUSB0\nbackoff_max: 1" + "0" * 400 + "s"),
            "muxd.yaml:5: ports[0].upstream.backoff_max: must be between 0.01 and 3600 seconds, got inf",
        ),
        (
            sim_with("serial: /dev/ttyUSB0\nbaudrate: 1" + "0" * 4300),
            "muxd.yaml:5: ports[0].upstream.baudrate: number too long (4301 characters)",
        ),
        (
            "ports: " + "[" * 5000 + "]" * 5000 + "\n",
            "muxd.yaml:1: ports" + "[0]" * 19 + ": nested more than 20 levels deep",
        ),
    ],
    ids=[
        "backoff_min-alone",
        "merge-key",
        "vault-tag",
        "int-tag",
        "float-tag",
        "bool-tag",
        "timestamp-tag",
        "binary-tag",
        "1e400-duration",
        "1e400-duration-string",
        "4301-digits",
        "5000-brackets",
    ],
)
def test_loader_crashes_are_config_errors(text: str, expected: str) -> None:
    assert error_of(text).startswith(expected)


def test_anchors_and_aliases_are_refused() -> None:
    # Billion laughs: nine levels of ten aliases each would build 10^9 nodes.
    lol = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lol.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 10)}]")
    assert error_of("\n".join(lol) + "\n").startswith("muxd.yaml:1: a: anchors (&a) are not supported")
    assert error_of("ports: *nothing\n").startswith(
        "muxd.yaml:1: ports: aliases (*nothing) are not supported"
    )
    text = GOOD.replace("        mode: rw", "        mode: &m rw").replace("overflow: disconnect", "mode: *m")
    assert error_of(text).startswith("muxd.yaml:10: ports[0].listeners[0].mode: anchors (&m)")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # Number texts that YAML 1.1's patterns accept and Python's int()/float() do not.
        (("baudrate: 9600", "baudrate: 0x_"), "muxd.yaml:5: ports[0].upstream.baudrate: not a valid number"),
        (("baudrate: 9600", "baudrate: 0b_"), "muxd.yaml:5: ports[0].upstream.baudrate: not a valid number"),
        # An octal mode past 4,300 digits: its repr() in the message used to raise.
        (
            ('socket_mode: "0600"', 'socket_mode: "' + "7" * 5000 + '"'),
            "muxd.yaml:16: ports[0].listeners[2].socket_mode: expected an octal mode",
        ),
        (
            ("unix: /run/muxd/dut1.sock", "unix: /run/muxd/dut1.sock\x00"),
            "muxd.yaml:15: unacceptable character",
        ),
        (("- name: dut1", '- name: "dut1\\n"'), "muxd.yaml:2: ports[0].name: must match"),
        (
            ("unix: /run/muxd/dut1.sock", 'unix: "/run/muxd/dut1.sock\\0"'),
            "muxd.yaml:15: ports[0].listeners[2].unix: a path cannot hold a NUL character",
        ),
        (
            ("serial: /dev/ttyUSB0", 'serial: "/dev/ttyUSB0\\0"'),
            "muxd.yaml:4: ports[0].upstream.serial: a path cannot hold a NUL character",
        ),
        (("tcp: 7000", 'tcp: "127.0.0.1:²"'), "muxd.yaml:9: ports[0].listeners[0].tcp: expected HOST:PORT"),
        (("tcp: 7000", 'tcp: "1' + "0" * 5000 + '"'), "muxd.yaml:9: ports[0].listeners[0].tcp: expected"),
        (("buffer: 1MiB", "buffer: " + "9" * 5000 + "KiB"), "muxd.yaml:11: ports[0].listeners[0].buffer:"),
    ],
    ids=[
        "0x_",
        "0b_",
        "long-octal",
        "nul",
        "name-newline",
        "nul-unix",
        "nul-serial",
        "unicode-port",
        "long-port",
        "long-size",
    ],
)
def test_odd_scalars_are_config_errors(change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert old in GOOD
    message = error_of(GOOD.replace(old, new, 1))
    assert message.startswith(expected)
    assert "\n" not in message and len(message) < 300


def test_odd_keys_stay_on_one_line() -> None:
    # Found by tests/test_fuzz_config.py: a key "[\n" was taken for a list index.
    assert error_of('"[\\n": 1\nports: []\n') == (
        "muxd.yaml:1: '[\\n': unknown key (expected one of: control, http, log_level, mqtt, ports)"
    )
    long_key = "k" * 100
    assert error_of(f"ports:\n  - {long_key}: 1\n").startswith(
        f"muxd.yaml:2: ports[0].'{'k' * 56}...: unknown key"
    )


def test_plain_values_that_look_like_other_types_stay_strings() -> None:
    # The resolver's date, merge and value patterns give no special meaning here.
    more = "  - name: dut2\n    upstream: {serial: <<}\n  - name: dut3\n    upstream: {serial: =}\n"
    cfg = loads(sim_with("serial: 2024-01-01") + more, "muxd.yaml")
    paths = [p.upstream.path for p in cfg.ports if isinstance(p.upstream, SerialUpstream)]
    assert paths == ["2024-01-01", "<<", "="]


def test_check_exits_2_with_one_line_on_a_former_crash(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(sim_with("serial: /dev/ttyUSB0\nbackoff_min: 30s"))
    res = run_muxd("check", "-c", str(bad))
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.splitlines() == [
        f"muxd: {bad}:5: ports[0].upstream.backoff_min: "
        "must not exceed backoff_max (default 10s): set backoff_max too"
    ]


# --------------------------------------------------------------------------
# Issue 10 part 3: no silent fallback; each value is valid as written or an error


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        (
            "serial: /dev/ttyUSB0\nbackoff_min: 0",
            "muxd.yaml:5: ports[0].upstream.backoff_min: must be between 0.01 and 60 seconds, got 0",
        ),
        (
            "serial: /dev/ttyUSB0\nbackoff_max: 0s",
            "muxd.yaml:5: ports[0].upstream.backoff_max: must be between 0.01 and 3600 seconds, got 0",
        ),
        (
            "tcp: 192.168.1.50:8899\nconnect_timeout: 0",
            "muxd.yaml:5: ports[0].upstream.connect_timeout: must be between 0.1 and 300 seconds, got 0",
        ),
        (
            "sim:\n  status_interval: 0",
            "muxd.yaml:5: ports[0].upstream.sim.status_interval: "
            "must be between 0.01 and 3600 seconds, got 0",
        ),
        (
            "tcp: 192.168.1.50:0",
            "muxd.yaml:4: ports[0].upstream.tcp: port must be 1..65535, got 0",
        ),
    ],
)
def test_zero_is_an_error_where_it_means_nothing(upstream: str, expected: str) -> None:
    assert error_of(sim_with(upstream)) == expected


def test_zero_is_valid_where_it_means_off() -> None:
    text = sim_with("tcp: 192.168.1.50:8899\nidle_timeout: 0").replace(
        "    listeners:", "    history: 0\n    listeners:"
    )
    port = loads(text, "muxd.yaml").ports[0]
    assert port.history == 0
    assert port.upstream == TcpUpstream("192.168.1.50", 8899, idle_timeout=0.0)


def test_backoff_values_are_kept_as_written() -> None:
    port = loads(sim_with("serial: /dev/ttyUSB0\nbackoff_min: 30s\nbackoff_max: 1m"), "muxd.yaml").ports[0]
    assert isinstance(port.upstream, SerialUpstream)
    assert (port.upstream.backoff_min, port.upstream.backoff_max) == (30.0, 60.0)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('socket_mode: "0600"', "group:"), "muxd.yaml:16: ports[0].listeners[2].group: expected a group"),
        (('socket_mode: "0600"', "group: ''"), "muxd.yaml:16: ports[0].listeners[2].group: expected a group"),
        (('socket_mode: "0600"', "group: -1"), "muxd.yaml:16: ports[0].listeners[2].group: a gid must be"),
    ],
)
def test_empty_group_is_an_error(change: tuple[str, str], expected: str) -> None:
    old, new = change
    assert error_of(GOOD.replace(old, new, 1)).startswith(expected)


def test_an_inline_token_is_an_error_pointing_to_tokens() -> None:
    # Secrets live in files (tokens:); an inline one, empty or not, is refused.
    for token in ("token:", "token: ''", "token: short", "token: a-long-enough-token-0123"):
        text = GOOD + f"http:\n  listen: 8020\n  {token}\n"
        assert error_of(text).startswith("muxd.yaml:19: http.token: inline tokens are no longer accepted")


# --------------------------------------------------------------------------
# Issue 10 part 3: Literal types that mypy checks


def test_vocabularies_are_literal_types() -> None:
    hints = {
        (Listener, "kind"): ListenerKind,
        (Listener, "mode"): Mode,
        (Listener, "overflow"): Overflow,
        (Listener, "write"): WriteMode,
        (Port, "line_control"): LineControlPolicy,
        (TcpUpstream, "control"): UpstreamControl,
        (Config, "log_level"): LogLevel,
    }
    for (cls, name), alias in hints.items():
        assert get_type_hints(cls)[name] == alias, (cls, name)
        assert get_origin(alias) is Literal
    assert get_args(Mode) == ("ro", "rw")
    assert LISTENER_KINDS == ("tcp", "unix", "pty", "rfc2217", "websocket")
    # Loaded values are the literals themselves.
    listener = loads(GOOD, "muxd.yaml").ports[0].listeners[0]
    assert (listener.kind, listener.mode, listener.write) == ("tcp", "rw", "lines")


@pytest.mark.skipif(shutil.which("mypy", path=str(Path(sys.executable).parent)) is None, reason="needs mypy")
def test_mypy_checks_the_literals(tmp_path: Path) -> None:
    snippet = tmp_path / "uses_config.py"
    snippet.write_text(
        "from muxd.config import Listener, Mode, loads\n"
        "ok: Mode = loads('').ports[0].listeners[0].mode\n"
        "bad = Listener('tcp', 'x', mode='rx')\n"
        "worse = Listener('tpc', 'x')\n"
    )
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "mypy"),
            "--follow-imports=silent",
            "--no-incremental",
            "--strict",
            str(snippet),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    errors = [line for line in res.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["3", "4"], res.stdout
    assert all("Literal[" in line for line in errors), res.stdout


# --------------------------------------------------------------------------
# Issue 10 part 6: port 0 on addresses muxd listens on


def test_port_zero_on_listeners_and_http() -> None:
    text = (
        sim_with("sim: true").replace("      - tcp: 7000\n", "")
        + "      - tcp: 0\n"
        + "      - tcp: 127.0.0.1:0\n"
        + "      - rfc2217: '[::1]:0'\n"
        + "      - rfc2217: 0\n"
        + "        name: vcom\n"
        + "http:\n  - listen: 0\n  - listen: 127.0.0.1:0\n  - listen: 8020\n"
    )
    cfg = loads(text, "muxd.yaml")
    listeners = cfg.ports[0].listeners
    assert [(lst.kind, lst.host, lst.port) for lst in listeners] == [
        ("tcp", "127.0.0.1", 0),
        ("tcp", "127.0.0.1", 0),
        ("rfc2217", "::1", 0),
        ("rfc2217", "127.0.0.1", 0),
    ]
    assert [lst.name for lst in listeners] == ["tcp:dut1/0", "tcp:dut1/1", "rfc2217:dut1/2", "vcom"]
    assert [(s.host, s.port, s.name) for s in cfg.http] == [
        ("127.0.0.1", 0, "http:0"),
        ("127.0.0.1", 0, "http:1"),
        ("127.0.0.1", 8020, "http:127.0.0.1:8020"),
    ]


def test_port_zero_defaults_stay_unique_across_ports() -> None:
    two = sim_with("sim: true").replace("tcp: 7000", "tcp: 0") + "  - name: dut2\n    upstream: {sim: true}\n"
    two += "    listeners: [{tcp: 0}]\n"
    assert [p.listeners[0].name for p in loads(two, "muxd.yaml").ports] == ["tcp:dut1/0", "tcp:dut2/0"]


def test_port_zero_is_not_for_upstreams_and_names_still_clash() -> None:
    assert error_of(sim_with("tcp: 127.0.0.1:0")).endswith("port must be 1..65535, got 0")
    text = sim_with("sim: true").replace(
        "tcp: 7000", "tcp: 0\n        name: x\n      - tcp: 0\n        name: x"
    )
    assert "duplicate listener name 'x'" in error_of(text)


def test_port_zero_through_from_data() -> None:
    # The command-line form goes through a dump and the same loader: a listener
    # mapping used twice must not come back as an alias, which the loader refuses.
    listener = {"tcp": 0, "mode": "rw"}
    cfg = from_data({"ports": [{"name": "a", "upstream": {"sim": True}, "listeners": [listener, listener]}]})
    assert [(lst.port, lst.name) for lst in cfg.ports[0].listeners] == [(0, "tcp:a/0"), (0, "tcp:a/1")]


# --------------------------------------------------------------------------
# server_names on http servers (issue 15 item 8's DNS-rebinding check reads them)


def test_server_names() -> None:
    names = "[Bench1.LAB, 192.168.1.10, 'fe80::1', localhost]"
    text = GOOD + f"http:\n  - listen: 0.0.0.0:8020\n    server_names: {names}\n"
    cfg = loads(text, "muxd.yaml")
    assert cfg.http[0].server_names == ("bench1.lab", "192.168.1.10", "fe80::1", "localhost")
    assert loads(GOOD + "http: {listen: 8020}\n", "muxd.yaml").http[0].server_names == ()
    assert loads(GOOD + "http: {listen: 8020, server_names: []}\n", "muxd.yaml").http[0].server_names == ()


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ("[ok.lab, 'bench:8020']", "muxd.yaml:19: http.server_names[1]: not a valid host name"),
        ("['*.lab']", "muxd.yaml:19: http.server_names[0]: not a valid host name"),
        ("['[::1]']", "muxd.yaml:19: http.server_names[0]: not a valid host name"),
        ("[-bench]", "muxd.yaml:19: http.server_names[0]: not a valid host name"),
        ("['a b']", "muxd.yaml:19: http.server_names[0]: not a valid host name"),
        ("['" + "a" * 64 + "']", "muxd.yaml:19: http.server_names[0]: not a valid host name"),
        ("[80]", "muxd.yaml:19: http.server_names[0]: expected a host name or IP address, got 80"),
        ("['']", "muxd.yaml:19: http.server_names[0]: expected a host name or IP address"),
        ("[a.lab, A.lab]", "muxd.yaml:19: http.server_names[1]: duplicate server name 'a.lab'"),
        ("bench.lab", "muxd.yaml:19: http.server_names: expected a list"),
    ],
)
def test_bad_server_names(names: str, expected: str) -> None:
    text = GOOD + f"http:\n  listen: 8020\n  server_names: {names}\n"
    assert error_of(text).startswith(expected)


# --------------------------------------------------------------------------
# Issue 20 item 2: the dataclasses load no YAML; every error in one pass; NUL


@pytest.mark.parametrize(
    "module", ["muxd.protocol.http_names", "muxd.config", "muxd.sequences", "muxd.checks"]
)
def test_importing_the_dataclasses_loads_no_yaml(module: str) -> None:
    # A subprocess: this test process has loaded YAML long ago.
    code = f"import sys, {module}; print('yaml' in sys.modules)"
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert res.stdout == "False\n"
    assert not [line for line in res.stderr.splitlines() if line.split("|")[-1].strip() == "yaml"]


def twenty_mistakes() -> tuple[str, list[tuple[int, str]]]:
    """A config with 20 mistakes over four ports (two listeners each) and the
    http section, and the (line, key path) of each, in line order."""
    lines: list[str] = ["ports:"]
    expected: list[tuple[int, str]] = []

    def add(text: str, path: str | None = None) -> None:
        lines.append(text)
        if path is not None:
            expected.append((len(lines), path))

    port_mistakes = ["write_queue: lots", "line_control: maybe", "history: -1", "max_line: 1GiB"]
    first_mistakes = [
        ("mode: rwx", "buffer: 1TiB"),
        ("max_clients: 0", "bufer: 1MiB"),
        ("notices: maybe", "history_lines: lots"),
        ("overflow: sometimes", "write: words"),
    ]
    second_mistakes = ["tcp: 127.0.0.1:70000", "unix: relative.sock", "format: xml", "socket_mode: '0999'"]
    for p in range(4):
        add(f"  - name: p{p}")
        add("    upstream: {sim: true}")
        key = port_mistakes[p].split(":")[0]
        add(f"    {port_mistakes[p]}", f"ports[{p}].{key}")
        add("    listeners:")
        add("      - tcp: 127.0.0.1:0")
        for mistake in first_mistakes[p]:
            add(f"        {mistake}", f"ports[{p}].listeners[0].{mistake.split(':')[0]}")
        second = second_mistakes[p]
        if second.startswith(("tcp", "unix")):
            add(f"      - {second}", f"ports[{p}].listeners[1].{second.split(':')[0]}")
        else:
            add("      - unix: /run/muxd/x.sock")
            add(f"        {second}", f"ports[{p}].listeners[1].{second.split(':')[0]}")
    add("http:")
    add("  listen: 127.0.0.1:99999", "http.listen")
    add("  origins: not-a-list", "http.origins")
    add("  metrics_token: perhaps", "http.metrics_token")
    add("  server_names: ['*.lab']", "http.server_names[0]")
    return "\n".join(lines) + "\n", expected


def test_check_and_run_report_all_twenty_mistakes_in_line_order(tmp_path: Path) -> None:
    text, expected = twenty_mistakes()
    assert len(expected) == 20
    path = tmp_path / "muxd.yaml"
    path.write_text(text)
    check = run_muxd("check", "-c", str(path))
    assert check.returncode == 2 and check.stdout == "", check.stderr
    found = check.stderr.splitlines()
    assert len(found) == 20, check.stderr
    prefix = f"muxd: {path}:"
    located = [line.removeprefix(prefix).split(": ")[:2] for line in found]
    assert [(int(n), key) for n, key in located] == expected, check.stderr
    assert all(line.startswith(prefix) for line in found)
    run = run_muxd("run", "-c", str(path))
    assert run.returncode == 2 and run.stderr.splitlines() == found
    # As a ConfigError the whole is the first error; each_error gives them all.
    with pytest.raises(ConfigError) as info:
        loads(text, "m.yaml")
    assert (info.value.line, info.value.path) == expected[0]
    assert [(e.line, e.path) for e in each_error(info.value)] == expected


NUL_GROUP = """\
ports:
  - name: dut
    upstream: {{sim: true}}
    listeners:
      - unix: {sock}
        group: "dial\\0out"
"""
NUL_MESSAGE = "ports[0].listeners[0].group: a group name cannot hold a NUL character, got 'dial\\x00out'"


def test_a_nul_in_a_group_is_a_located_error_for_check_and_run(tmp_path: Path) -> None:
    path = tmp_path / "muxd.yaml"
    path.write_text(NUL_GROUP.format(sock=tmp_path / "dut.sock"))
    for command in ("check", "run"):
        res = run_muxd(command, "-c", str(path))
        assert (res.returncode, res.stdout) == (2, ""), res.stderr
        assert res.stderr.splitlines() == [f"muxd: {path}:6: {NUL_MESSAGE}"], res.stderr
    # What a reload validates the new file with (muxd.daemon.Daemon.reload).
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert str(info.value) == f"{path}:6: {NUL_MESSAGE}"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            (
                "    upstream: {sim: true}",
                '    upstream: {sim: true}\n    trace: [{path: /tmp/t, group: "a\\0"}]',
            ),
            "muxd.yaml:4: ports[0].trace[0].group: a group name cannot hold a NUL character",
        ),
        (
            ('        group: "dial\\0out"', '        name: "u\\0"'),
            "muxd.yaml:6: ports[0].listeners[0].name: a name cannot hold a NUL character",
        ),
        (
            ('        group: "dial\\0out"', '        group: dialout\nhttp: {listen: 0, name: "web\\0"}'),
            "muxd.yaml:7: http.name: a name cannot hold a NUL character",
        ),
        (
            ("  - name: dut", '  - name: "dut\\0"'),
            "muxd.yaml:2: ports[0].name: a name cannot hold a NUL character",
        ),
    ],
    ids=["trace-group", "listener-name", "http-name", "port-name"],
)
def test_a_nul_in_a_name_or_group_is_a_located_error(change: tuple[str, str], expected: str) -> None:
    old, new = change
    text = NUL_GROUP.format(sock="/run/muxd/dut.sock")
    assert old in text
    assert error_of(text.replace(old, new, 1)).startswith(expected)


def test_a_reload_with_a_nul_in_a_group_is_rejected_and_named(muxd: StartMuxd, tmp_path: Path) -> None:
    m = start_muxd(muxd, tmp_path, {"sim": True}, [{"unix": str(tmp_path / "u.sock"), "name": "u"}])
    m.rewrite([{**m.data["ports"][0], "listeners": [{**m.listener(0), "group": "dial\x00out"}]}])
    m.signal(signal.SIGHUP)
    m.wait_log("reload rejected")
    assert NUL_MESSAGE in m.log()
    assert "internal error" not in m.log().lower() and "Traceback" not in m.log()
    assert m.proc.poll() is None


def test_a_rejected_reload_logs_every_error_of_the_file(muxd: StartMuxd, tmp_path: Path) -> None:
    m = start_muxd(muxd, tmp_path, {"sim": True}, [{"unix": str(tmp_path / "u.sock"), "name": "u"}])
    listener = {**m.listener(0), "group": "dial\x00out", "buffer": "lots"}
    m.rewrite([{**m.data["ports"][0], "listeners": [listener]}])
    m.signal(signal.SIGHUP)
    m.wait_log(".group: a group name cannot hold a NUL character")
    m.wait_log(".buffer: ")  # the second mistake is logged too, not only the first
    assert m.log().count("reload rejected") >= 2
    assert m.proc.poll() is None


def test_one_duration_grammar_for_the_config_the_sequences_and_ctl() -> None:
    # The superset of the two grammars there were: the config's (a number is
    # seconds; ms, s, m, h) and the sequences' (ms, s; a unit required).
    assert vars(sequences)["parse_duration"] is parse_duration
    good = [("100ms", 0.1), ("0.5s", 0.5), (" 250 ms ", 0.25), ("1m", 60.0), ("2h", 7200.0), ("30", 30.0)]
    for value, seconds in [*good, (5, 5.0), (0.25, 0.25)]:
        assert parse_duration(value) == seconds, value
    for bad in ("", "ms", "5 MS", "-1s", "1e3s", "\u0663s", True, None, -1, float("nan")):
        assert parse_duration(bad) is None, bad
    assert parse_step("1.5") == Step("wait", seconds=1.5)
    assert parse_step("break=0.25") == Step("break", seconds=0.25)
    with pytest.raises(ValueError, match="at most 60s"):
        parse_step("100")  # seconds, then: longer than any wait may be
