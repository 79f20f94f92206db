"""The operator's command line: `muxd status` in pipes and scripts (exit codes,
--url forms, closed pipes, Ctrl-C), `muxd demo` on busy ports, `--ready-file`
with the kernel's choice of port, `muxd_build_info`, and what `make run` installs.

Every muxd here is a real subprocess, stopped by its PID; every wait polls a
condition until a deadline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from muxd import config as configmod
from muxd import metrics
from muxd.apiclient import normalize_url
from muxd.cli import demo_config
from muxd.client import format_status
from muxd.errors import ConfigError
from muxd.reactor import Reactor
from tests.helpers import (
    ROOT,
    Muxd,
    StartMuxd,
    auto_address,
    connect,
    free_port,
    has_ready_file,
    wait_for,
    write_config,
)

HEADER = ["PORT", "STATE", "FOR", "UPSTREAM", "IN", "OUT", "CLIENTS", "MAX", "LAG", "DROPPED", "WQUEUE"]
HEADER += ["LINE"]  # the line settings in force, e.g. "115200 8N1"

# A `muxd` command is Python starting up and one HTTP round trip on loopback.
COMMAND_TIMEOUT = 30


def muxd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "muxd", *args]


def run_muxd(*args: str) -> subprocess.CompletedProcess[str]:
    # subprocess.run kills the child by its PID if it overruns the timeout.
    return subprocess.run(
        muxd_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def sim_port(name: str = "sim") -> dict[str, Any]:
    return {"name": name, "upstream": {"sim": {"status_interval": "1s"}}, "listeners": []}


def start_with_http(muxd: StartMuxd, tmp_path: Path, ports: list[dict[str, Any]]) -> tuple[Muxd, str]:
    """muxd with these ports and an http server "web" (on port 0 where muxd binds it,
    the ready file saying where); waits for its API, gives (muxd, "host:port")."""
    http = {"listen": auto_address(), "name": "web"}
    path = write_config(tmp_path, {"ports": ports, "http": http})
    ready = tmp_path / "ready-web.json" if has_ready_file() else None
    m = muxd("run", "-c", str(path), ready_file=ready)
    m.http = m.wait_ready_file()["listeners"]["web"] if ready is not None else http["listen"]
    m.wait_api()
    return m, m.http


def api_ports(addr: str) -> list[dict[str, Any]]:
    done = run_muxd("status", "--url", addr, "--json")
    assert done.returncode in (0, 1), done.stderr
    ports: list[dict[str, Any]] = json.loads(done.stdout)["ports"]
    return ports


@pytest.fixture
def sim_muxd(muxd: StartMuxd, tmp_path: Path) -> tuple[Muxd, str]:
    m, addr = start_with_http(muxd, tmp_path, [sim_port()])
    m.wait_state("up", port="sim")
    return m, addr


# -- muxd status: pipes and Ctrl-C --------------------------------------------------------------


def test_status_into_head_prints_the_header_without_a_traceback(sim_muxd: tuple[Muxd, str]) -> None:
    _, addr = sim_muxd
    # A real shell pipe, as an operator types it; bash reports muxd's own status.
    script = f'{" ".join(muxd_cmd())} status --url {addr} | head -1; echo "muxd=${{PIPESTATUS[0]}}" >&2'
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
    )
    assert done.stdout.split() == HEADER
    no_traceback(done.stderr)
    # The status fits in the pipe and goes in one write, before head can go: 0, every time.
    assert re.search(r"muxd=0$", done.stderr.strip()), done.stderr


def test_status_into_a_closed_pipe_exits_141_quietly(sim_muxd: tuple[Muxd, str]) -> None:
    _, addr = sim_muxd
    # The reader is gone before muxd writes: deterministic, unlike a race with head.
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run(
            muxd_cmd("status", "--url", addr),
            cwd=ROOT,
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )
    finally:
        os.close(w)
    no_traceback(proc.stderr)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_ctrl_c_while_waiting_for_a_daemon_exits_130_quietly() -> None:
    # A "daemon" that accepts the connection and never answers.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        proc = subprocess.Popen(
            muxd_cmd("status", "--url", f"127.0.0.1:{port}"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            server.settimeout(COMMAND_TIMEOUT)
            conn, _ = server.accept()  # muxd status is now waiting for its answer
            with conn:
                os.kill(proc.pid, signal.SIGINT)
                out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(COMMAND_TIMEOUT)
    no_traceback(err)
    assert (proc.returncode, out) == (130, "")


# -- muxd status: exit codes and --url -----------------------------------------------------------


def test_status_exits_0_when_every_port_is_up(sim_muxd: tuple[Muxd, str]) -> None:
    _, addr = sim_muxd
    done = run_muxd("status", "--url", addr)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:2] == ["sim", "up"]
    assert run_muxd("status", "--url", addr, "--json").returncode == 0


def test_status_exits_1_with_a_port_down_and_shows_the_outage(muxd: StartMuxd, tmp_path: Path) -> None:
    absent = {"name": "gone", "upstream": {"serial": str(tmp_path / "no-such-tty")}, "listeners": []}
    m, addr = start_with_http(muxd, tmp_path, [sim_port(), absent])
    m.wait_state("up", port="sim")
    done = run_muxd("status", "--url", addr)
    assert done.returncode == 1, (done.stdout, done.stderr)
    row = next(line for line in done.stdout.splitlines() if line.startswith("gone "))
    # The state may move between retries, from one command to the next: the
    # reason (why it is down) does not.
    shown = re.match(r"gone\s+(\S+) \(([^)]*)\)", row)
    assert shown is not None, row
    view = next(p for p in api_ports(addr) if p["name"] == "gone")
    assert shown[1] != "up" and view["state"] != "up"
    assert shown[2] == view["reason"], (row, view)
    if "attempts" in view and shown[1] == "backing-off":  # the retry detail, where the API has it
        assert re.search(r"\), \d+ attempts?, next in \d+\.\ds\s", row), row
    assert run_muxd("status", "--url", addr, "--json").returncode == 1


def test_status_url_forms(sim_muxd: tuple[Muxd, str]) -> None:
    _, addr = sim_muxd
    for url in (addr, f"http://{addr}", f"http://{addr}/"):
        done = run_muxd("status", "--url", url)
        assert done.returncode == 0, (url, done.stderr)
        assert done.stdout.startswith("PORT ")


def test_status_usage_and_unreachable_codes() -> None:
    done = run_muxd("status", "--url", "localhost")
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
    done = run_muxd("status", "--url", "ftp://127.0.0.1:21")
    assert done.returncode == 2
    done = run_muxd("status", "--url", f"127.0.0.1:{free_port()}")
    assert done.returncode == 3 and "cannot reach" in done.stderr
    no_traceback(done.stderr)


def test_normalize_url() -> None:
    assert normalize_url("127.0.0.1:8020") == "http://127.0.0.1:8020"
    assert normalize_url("[::1]:8020") == "http://[::1]:8020"
    assert normalize_url("8020") == "http://127.0.0.1:8020"
    assert normalize_url("http://10.0.0.5:8020") == "http://10.0.0.5:8020"
    assert normalize_url("https://muxd.lab") == "https://muxd.lab"
    for bad in ("localhost", "127.0.0.1:http", "ftp://x:1", "", "http://:8020"):
        with pytest.raises(ValueError):
            normalize_url(bad)


def test_format_status_outage_view() -> None:
    port = {
        "name": "dut1",
        "state": "backing-off",
        "reason": "device absent",
        "since": 1000.0,
        "attempts": 17,
        "next_attempt_in": 1.62,
        "upstream": "serial:/dev/ttyUSB0",
        "bytes_in": 0,
        "bytes_out": 0,
        "clients": 0,
        "max_lag": 0,
        "dropped": 0,
        "write_queue_bytes": 0,
    }
    text = format_status({"ports": [port], "clients": {}}, now=1000.0 + 125)
    row = text.splitlines()[1]
    assert "backing-off (device absent), 17 attempts, next in 1.6s" in row
    assert " 2m05s " in row  # FOR: since the port went down, not since the last retry
    # A daemon whose view has no retry detail: state and reason only.
    del port["attempts"], port["next_attempt_in"]
    assert "backing-off (device absent)  " in format_status({"ports": [port], "clients": {}}, now=1000.0)


# -- muxd demo on busy ports ----------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield int(s.getsockname()[1])


def two_free_ports() -> int:
    """P such that P and P+1 are free now (the demo's two TCP listeners)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


def demo_listener_names(tcp: int, http: int) -> list[str]:
    """The demo's TCP listeners' names, then its http server's: as its config names them."""
    cfg = demo_config(tcp, http)
    return [lst.name for lst in cfg.ports[0].listeners if lst.kind == "tcp"] + [cfg.http[0].name]


def test_demo_busy_tcp_port_gives_one_line_and_a_hint(busy_port: int) -> None:
    http = free_port()
    done = run_muxd("demo", "--tcp", str(busy_port), "--http", str(http))
    no_traceback(done.stderr)
    assert done.returncode == 2
    name = demo_listener_names(busy_port, http)[0]
    assert done.stderr.strip().splitlines() == [
        f"muxd: demo listener {name}: address already in use; try --tcp {busy_port + 100}"
    ]


def test_demo_busy_http_port_names_the_http_listener(busy_port: int) -> None:
    tcp = two_free_ports()
    done = run_muxd("demo", "--tcp", str(tcp), "--http", str(busy_port))
    no_traceback(done.stderr)
    assert done.returncode == 2
    # Log lines of the listeners bound before it may come first; the error is the last line, alone.
    name = demo_listener_names(tcp, busy_port)[-1]
    assert done.stderr.strip().splitlines()[-1] == (
        f"muxd: demo listener {name}: address already in use; try --http {busy_port + 100}"
    )
    assert done.stderr.count("already in use") == 1


def test_demo_moves_its_listeners(muxd: StartMuxd, tmp_path: Path) -> None:
    tcp, http = two_free_ports(), free_port()
    ready = tmp_path / "ready.json"
    m = muxd("demo", "--tcp", str(tcp), "--http", str(http), "--ready-file", str(ready))
    data = wait_ready(m, ready)
    assert sorted(data["listeners"].values()) == sorted(
        [f"127.0.0.1:{tcp}", f"127.0.0.1:{tcp + 1}", f"127.0.0.1:{http}"]
    )
    connect(tcp).close()
    assert run_muxd("status", "--url", f"127.0.0.1:{http}").returncode == 0


# -- --ready-file and bound addresses -------------------------------------------------------------


def wait_ready(m: Muxd, path: Path) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        if m.proc.poll() is not None:
            raise AssertionError(f"muxd exited with {m.proc.returncode}:\n{m.log()}")
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return None  # not yet: it appears whole, by rename
        return data

    data: dict[str, Any] = wait_for(ready, 10, f"the ready file {path}")
    assert data["pid"] == m.pid
    return data


def hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def test_ready_file_names_every_listener(muxd: StartMuxd, tmp_path: Path) -> None:
    tcp, http = free_port(), free_port()
    sock = tmp_path / "dut.sock"
    ready = tmp_path / "run" / "ready.json"
    ready.parent.mkdir()
    listeners = [{"tcp": f"127.0.0.1:{tcp}", "name": "raw"}, {"unix": str(sock), "name": "local"}]
    path = write_config(
        tmp_path,
        {
            "ports": [{**sim_port(), "listeners": listeners}],
            "http": {"listen": f"127.0.0.1:{http}", "name": "web"},
        },
    )
    m = muxd("run", "-c", str(path), "--ready-file", str(ready))
    data = wait_ready(m, ready)
    assert data["listeners"] == {"raw": f"127.0.0.1:{tcp}", "local": str(sock), "web": f"127.0.0.1:{http}"}
    assert [p.name for p in ready.parent.iterdir()] == ["ready.json"]  # no temporary file left
    m.signal(signal.SIGTERM)
    assert m.wait_exit(10) == 0
    assert not ready.exists()  # it would say "ready" for a PID that is gone


def port_zero_accepted() -> bool:
    try:
        configmod.from_data(
            {"ports": [{"name": "x", "upstream": {"sim": True}, "listeners": [{"tcp": "127.0.0.1:0"}]}]}
        )
    except ConfigError:
        return False
    return True


def test_ready_file_with_port_0_gives_addresses_to_connect_to(muxd: StartMuxd, tmp_path: Path) -> None:
    if not port_zero_accepted():
        pytest.skip("the config does not accept port 0 yet (listen addresses must be 1..65535)")
    ready = tmp_path / "ready.json"
    listeners = [
        {"tcp": "127.0.0.1:0", "name": "raw", "mode": "rw"},
        {"tcp": "127.0.0.1:0", "name": "raw2"},
        {"rfc2217": "127.0.0.1:0", "name": "vcom"},
    ]
    path = write_config(
        tmp_path,
        {"ports": [{**sim_port(), "listeners": listeners}], "http": {"listen": "127.0.0.1:0", "name": "web"}},
    )
    m = muxd("run", "-c", str(path), "--ready-file", str(ready))
    got = wait_ready(m, ready)["listeners"]
    assert set(got) == {"raw", "raw2", "vcom", "web"}
    ports = {hostport(a)[1] for a in got.values()}
    assert 0 not in ports and len(ports) == 4
    for address in got.values():
        host, port = hostport(address)
        assert host == "127.0.0.1"
        connect(port, host).close()
    # The API, and so `muxd status`, shows the same bound addresses.
    view = api_ports(got["web"])[0]
    assert {lst["name"]: lst["address"] for lst in view["listeners"]} == {
        k: v for k, v in got.items() if k != "web"
    }


def test_ready_file_in_a_missing_directory_fails_the_start(muxd: StartMuxd, tmp_path: Path) -> None:
    path = write_config(tmp_path, {"ports": [{**sim_port(), "listeners": [{"tcp": auto_address()}]}]})
    m = muxd("run", "-c", str(path), "--ready-file", str(tmp_path / "nowhere" / "ready.json"))
    assert m.wait_exit(10) == 1
    assert "cannot write the ready file" in m.log()


def test_a_stale_ready_file_goes_even_when_the_start_fails(
    muxd: StartMuxd, tmp_path: Path, busy_port: int
) -> None:
    ready = tmp_path / "ready.json"
    ready.write_text('{"pid": 1, "listeners": {}}\n')  # left by a killed instance
    listeners = [{"tcp": f"127.0.0.1:{busy_port}"}]
    path = write_config(tmp_path, {"ports": [{**sim_port(), "listeners": listeners}]})
    m = muxd("run", "-c", str(path), "--ready-file", str(ready))
    assert m.wait_exit(10) == 2  # a start error: the operator must act (muxd.startup.StartError)
    assert "already in use" in m.log() and f"127.0.0.1:{busy_port}" in m.log()
    assert not ready.exists()


# -- metrics ----------------------------------------------------------------------------------------


def test_build_info() -> None:
    reactor = Reactor()
    try:
        text = metrics.render(metrics.make_registry(lambda: [], reactor)).decode()
    finally:
        reactor.close()
    line = next(x for x in text.splitlines() if x.startswith("muxd_build_info{"))
    assert re.fullmatch(r'muxd_build_info\{python="3\.\d+\.\d+\S*",version="[^"]+"\} 1\.0', line), line
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; `make test` installs it)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# -- make run -----------------------------------------------------------------------------------------


def make_dry_run(target: str) -> list[str]:
    """The commands `make` would run for target in a fresh clone (-B: as if nothing were built)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    done = subprocess.run(
        [make, "-n", "-B", "--no-print-directory", "-C", str(ROOT), target, "VENV=/nonexistent/venv"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.strip()]


def test_make_run_installs_no_test_toolchain() -> None:
    commands = make_dry_run("run")
    installs = [c for c in commands if "pip install" in c]
    assert installs, commands
    assert not any("[test]" in c or "pytest" in c for c in commands), installs
    assert commands[-1].endswith("muxd demo") or "muxd demo " in commands[-1]
    # `make test` adds the extra on top, into the same venv.
    assert any("'.[test]'" in c for c in make_dry_run("venv"))


@pytest.mark.skipif(
    not os.environ.get("MUXD_SLOW_TESTS"),
    reason="installs a venv from a package index (network, 10-30 s with a local mirror); "
    "set MUXD_SLOW_TESTS=1 to run it. test_make_run_installs_no_test_toolchain checks the recipe.",
)
def test_make_run_venv_has_no_pytest(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    make = shutil.which("make")
    assert make is not None
    # The run stamp alone: what `make run` builds before it starts the demo.
    done = subprocess.run(
        [make, "-C", str(ROOT), f"VENV={venv}", f"{venv}/.run-stamp"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    probe = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.util as u; print(u.find_spec('pytest') is None)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert probe.stdout.strip() == "True"
    assert (venv / "bin" / "muxd").exists()


# -- status, tail and ctl over HTTPS with tokens (muxd.apiclient) ----------------------------------

ADMIN_TOKEN = "admin-" + "a1B2c3D4e5F6g7H8i9"
READ_TOKEN = "read-" + "z9Y8x7W6v5U4t3S2r1"


class HttpsMuxd:
    """muxd with a sim port whose first http server speaks TLS and wants tokens
    (an admin and a read one, in files); a plain one after it for the harness."""

    def __init__(self, muxd: StartMuxd, tmp_path: Path) -> None:
        from tests.test_tls import Pki

        self.pki = Pki(tmp_path)
        self.token_files: dict[str, Path] = {}
        tokens = []
        for scope, secret in (("admin", ADMIN_TOKEN), ("read", READ_TOKEN)):
            path = tmp_path / f"{scope}.token"
            path.write_text(secret + "\n")
            path.chmod(0o600)
            self.token_files[scope] = path
            tokens.append({"name": scope, "file": str(path), "scope": scope})
        # A fixed port: `-c` reads the address from the config, where port 0 says nothing.
        https = {
            "listen": f"127.0.0.1:{free_port()}",
            "name": "https",
            "tls": self.pki.tls(),
            "tokens": tokens,
        }
        port = sim_port()
        port["listeners"] = [{"websocket": True, "mode": "rw"}]
        port["sequences"] = {"reset": ["dtr=0", "10ms", "dtr=1"]}
        self.config = write_config(
            tmp_path, {"ports": [port], "http": [https, {"listen": auto_address(), "name": "web"}]}
        )
        self.m = muxd("run", "-c", str(self.config), ready_file=tmp_path / "ready-https.json")
        listeners = self.m.wait_ready_file()["listeners"]
        self.m.http = listeners["web"]
        self.url = f"https://{listeners['https']}"
        self.m.wait_state("up", port="sim")

    def by_url(self) -> list[str]:
        return ["--url", self.url, "--cacert", str(self.pki.ca_path)]


@pytest.fixture
def https_muxd(muxd: StartMuxd, tmp_path: Path) -> HttpsMuxd:
    pytest.importorskip("trustme")
    return HttpsMuxd(muxd, tmp_path)


def run_with(env: dict[str, str] | None, *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "MUXD_TOKEN"} | (env or {})
    return subprocess.run(
        muxd_cmd(*args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        env=full,
    )


def tail_some(env: dict[str, str] | None, *args: str) -> tuple[int, str, str]:
    """`muxd tail ARGS` until it printed a status line of the sim (or ended): (status, out, err).
    Ctrl-C ends it (130), as an operator would."""
    full = {k: v for k, v in os.environ.items() if k != "MUXD_TOKEN"} | (env or {})
    proc = subprocess.Popen(
        muxd_cmd("tail", *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full
    )
    try:
        assert proc.stdout is not None
        out = b""
        # Each read returns what the sim sent (a line a second) or b"" at the end; bounded by the count.
        for _ in range(100):
            chunk = os.read(proc.stdout.fileno(), 4096)
            out += chunk
            if not chunk or b"status: counter=" in out:
                break
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(COMMAND_TIMEOUT)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def test_status_tail_and_ctl_over_https_from_the_config(https_muxd: HttpsMuxd) -> None:
    """-c: https because the server has tls:, trusted by its own certificate; the token from $MUXD_TOKEN."""
    env = {"MUXD_TOKEN": ADMIN_TOKEN}
    where = ["-c", str(https_muxd.config)]
    done = run_with(env, "status", *where)
    assert done.returncode == 0 and done.stdout.startswith("PORT "), done
    code, out, err = tail_some(env, "sim", *where)
    assert (code, "status: counter=" in out) == (130, True), (code, out, err)
    done = run_with(env, "ctl", "sim", "reset", *where)
    assert done.returncode == 0 and "sequence reset started" in done.stdout, done


def test_status_tail_and_ctl_over_https_by_url_with_cacert(https_muxd: HttpsMuxd) -> None:
    """--url https://... --cacert: the host name is checked too; --token and --token-file."""
    admin_file = str(https_muxd.token_files["admin"])
    done = run_with(None, "status", *https_muxd.by_url(), "--token", READ_TOKEN)
    assert done.returncode == 0 and done.stdout.startswith("PORT "), done
    code, out, err = tail_some(
        None, "sim", *https_muxd.by_url(), "--token-file", str(https_muxd.token_files["read"])
    )
    assert (code, "status: counter=" in out) == (130, True), (code, out, err)
    done = run_with(None, "ctl", "sim", "--dtr", "0", *https_muxd.by_url(), "--token-file", admin_file)
    assert done.returncode == 0 and done.stdout.startswith("sim: done;"), done
    # Without --cacert, the throwaway CA is nobody's: no daemon is trusted there (3).
    done = run_with({"MUXD_TOKEN": ADMIN_TOKEN}, "status", "--url", https_muxd.url)
    assert done.returncode == 3 and "CERTIFICATE_VERIFY_FAILED" in done.stderr, done


@pytest.mark.parametrize(
    ("token", "command"),
    [
        (None, ["status"]),
        ("wrong-token-0123456789", ["status"]),
        (None, ["tail", "sim"]),
        ("wrong-token-0123456789", ["tail", "sim"]),
        ("wrong-token-0123456789", ["ctl", "sim", "reset"]),
        (READ_TOKEN, ["ctl", "sim", "reset"]),  # 403: a read token cannot reset a board
    ],
    ids=["status-none", "status-wrong", "tail-none", "tail-wrong", "ctl-wrong", "ctl-read-scope"],
)
def test_a_missing_or_wrong_token_exits_4_with_a_hint(
    https_muxd: HttpsMuxd, token: str | None, command: list[str]
) -> None:
    env = {"MUXD_TOKEN": token} if token else None
    done = run_with(env, *command, *https_muxd.by_url())
    assert done.returncode == 4, done
    [line] = done.stderr.splitlines()
    assert "unauthorised" in line and "pass --token, --token-file or MUXD_TOKEN" in line, line
    assert done.stdout == ""


@pytest.mark.parametrize("command", [["status"], ["tail", "sim"], ["ctl", "sim", "reset"]])
def test_no_daemon_exits_3(command: list[str], tmp_path: Path) -> None:
    for url in (f"127.0.0.1:{free_port()}", f"https://127.0.0.1:{free_port()}"):
        done = run_with({"MUXD_TOKEN": ADMIN_TOKEN}, *command, "--url", url)
        assert done.returncode == 3, done
        no_traceback(done.stderr)
        assert len(done.stderr.splitlines()) == 1, done.stderr
