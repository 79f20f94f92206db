"""muxd.systemd against real peers: a test-made notify socket, a real
systemd-socket-activate, and a stand-in journald socket in a private mount
namespace. Every test runs twice: through systemd-python (when importable) and
through the stdlib fallback."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import muxd.systemd as sd
from tests.helpers import free_port

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_PYTHON = sd.systemd_python()  # muxd loads it only under systemd; the tests ask for it
HAVE_SYSTEMD_PYTHON = SYSTEMD_PYTHON is not None
# Prepended to child scripts to force the stdlib fallback: a None entry makes `import systemd` fail.
FORCE_STDLIB = "import sys; sys.modules['systemd'] = None\n"


@pytest.fixture(
    params=[
        pytest.param(
            "systemd-python",
            marks=pytest.mark.skipif(not HAVE_SYSTEMD_PYTHON, reason="systemd-python is not importable"),
        ),
        "stdlib",
    ]
)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    daemon, journal = SYSTEMD_PYTHON if request.param != "stdlib" and SYSTEMD_PYTHON else (None, None)
    monkeypatch.setattr(sd, "_sd_daemon", daemon)
    monkeypatch.setattr(sd, "_sd_journal", journal)
    monkeypatch.setattr(sd, "_notify_failed", False)
    yield request.param


def child_preamble(backend: str) -> str:
    return FORCE_STDLIB if backend == "stdlib" else ""


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "JOURNAL_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def recv_datagram(sock: socket.socket) -> str:
    sock.settimeout(5)
    return sock.recv(4096).decode()


# --------------------------------------------------------------------------- notify


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        yield sock, path


@pytest.fixture
def abstract_socket() -> Iterator[tuple[socket.socket, str]]:
    name = f"muxd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield sock, "@" + name


@pytest.mark.parametrize("which", ["path_socket", "abstract_socket"])
def test_notify_sends_one_datagram(
    backend: str, which: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = request.getfixturevalue(which)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert sd.notify("READY=1", "STATUS=serving 2 ports")
    assert recv_datagram(sock) == "READY=1\nSTATUS=serving 2 ports"
    assert sd.notify("WATCHDOG=1")
    assert recv_datagram(sock) == "WATCHDOG=1"


def test_reloading_carries_monotonic_usec(
    backend: str, path_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, address = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    before = time.monotonic_ns() // 1000
    assert sd.notify("RELOADING=1")
    after = time.monotonic_ns() // 1000
    state, stamp = recv_datagram(sock).split("\n")
    assert state == "RELOADING=1"
    key, _, usec = stamp.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert sd.notify("RELOADING=1", "MONOTONIC_USEC=42")
    assert recv_datagram(sock) == "RELOADING=1\nMONOTONIC_USEC=42"


def test_notify_outside_systemd_is_a_quiet_no(
    backend: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd.notify("READY=1") is False
    assert not caplog.records


def test_missing_socket_is_logged_once(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sd.notify("READY=1") is False
    assert sd.notify("WATCHDOG=1") is False
    warnings = [r for r in caplog.records if r.name == "muxd.systemd"]
    assert len(warnings) == 1 and "gone" in warnings[0].getMessage()


# --------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("1000", "self", 0.0005),
        ("30000000", "1", None),  # meant for another process (our main pid, say)
        ("0", None, None),
        ("", None, None),
        ("thirty", None, None),
        ("30000000", "nope", None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    usec: str | None, pid: str | None, expected: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(os.getpid()) if value == "self" else value)
    assert sd.watchdog_interval() == expected


# --------------------------------------------------------------------------- socket activation

ACTIVATED_CHILD = textwrap.dedent(
    """
    import json, os, select, socket
    import muxd.systemd as sd
    fds = sd.listen_fds()
    report = {
        "names": {n: [(s.family.name, s.type.name, s.getblocking(), s.get_inheritable()) for s in socks]
                  for n, socks in fds.items()},
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }
    (tcp,) = fds["dut1-tcp"]
    ready, _, _ = select.select([tcp], [], [], 10)
    conn, _ = tcp.accept()
    conn.setblocking(True)
    conn.sendall(json.dumps(report).encode())
    conn.shutdown(socket.SHUT_WR)
    conn.close()
    """
)


def read_all(conn: socket.socket, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while time.monotonic() < deadline:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    raise TimeoutError("activated child did not finish its report")


def wait_for_stderr(proc: subprocess.Popen[bytes], needle: bytes, count: int, deadline: float) -> None:
    assert proc.stderr is not None
    seen = b""
    while seen.count(needle) < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([proc.stderr], [], [], max(0.0, left))
        if not ready:
            raise TimeoutError(f"systemd-socket-activate said only: {seen!r}")
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"systemd-socket-activate exited: {seen!r}")
        seen += chunk


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_listen_fds_from_real_socket_activation(backend: str, tmp_path: Path) -> None:
    port = free_port()
    unix_path = tmp_path / "dut1.sock"
    cmd = [
        "systemd-socket-activate",
        f"--listen=127.0.0.1:{port}",
        f"--listen={unix_path}",
        "--fdname=dut1-tcp:dut1-unix",
        sys.executable,
        "-c",
        child_preamble(backend) + ACTIVATED_CHILD,
    ]
    proc = subprocess.Popen(cmd, env=child_env(), stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        # It binds both sockets, then waits for the first connection before it execs the child.
        wait_for_stderr(proc, b"Listening on", 2, deadline)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            report = json.loads(read_all(conn, deadline))
        assert proc.wait(timeout=max(0.1, deadline - time.monotonic())) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        assert proc.stderr is not None
        proc.stderr.close()
    assert report == {
        "names": {
            "dut1-tcp": [["AF_INET", "SOCK_STREAM", False, False]],
            "dut1-unix": [["AF_UNIX", "SOCK_STREAM", False, False]],
        },
        "env_left": [],
    }


def test_listen_fds_ignores_fds_meant_for_another_process(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LISTEN_PID names someone else, so fd 3 is not ours and must not be touched.
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "web")
    assert sd.listen_fds() == {}
    assert not any(k.startswith("LISTEN_") for k in os.environ)


def test_listen_fds_unnamed_and_not_activated(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert sd.listen_fds() == {}


def test_listen_fds_default_name_is_unknown(backend: str, tmp_path: Path) -> None:
    # An activated process without --fdname: every fd is called "unknown".
    port = free_port()
    script = child_preamble(backend) + textwrap.dedent(
        """
        import json, muxd.systemd as sd
        fds = sd.listen_fds()
        print(json.dumps(sorted(fds)))
        """
    )
    proc = subprocess.Popen(
        ["systemd-socket-activate", f"--listen=127.0.0.1:{port}", sys.executable, "-c", script],
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        wait_for_stderr(proc, b"Listening on", 1, deadline)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert proc.returncode == 0
    assert json.loads(out) == ["unknown"]


# --------------------------------------------------------------------------- logging

LOGGING_CHILD = textwrap.dedent(
    """
    import logging, os, sys
    import muxd.systemd as sd
    if sys.argv[1] == "journal":
        st = os.fstat(2)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    sd.setup_logging("debug")
    sd.setup_logging("info")  # again, as on reload: still one handler
    assert len(logging.getLogger().handlers) == 1
    log = logging.getLogger("muxd.test")
    log.debug("not shown at info")
    log.info("hello %s", "world", extra={"MUXD_PORT": "dut1", "MUXD_PEER": "127.0.0.1:5"})
    log.error("bad")
    """
)


def run_logging_child(backend: str, where: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", child_preamble(backend) + LOGGING_CHILD, where],
        env=child_env(),
        capture_output=True,
        timeout=30,
        check=True,
    )
    return proc.stderr.decode()


def test_stderr_logging_has_timestamps_and_ignores_fields(backend: str) -> None:
    lines = run_logging_child(backend, "terminal").splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert len(lines) == 2
    assert re.fullmatch(stamp + r" INFO muxd.test: hello world", lines[0])
    assert re.fullmatch(stamp + r" ERROR muxd.test: bad", lines[1])


def test_journal_stream_without_systemd_python_gets_priority_prefixes() -> None:
    assert (
        run_logging_child("stdlib", "journal") == "<6>INFO muxd.test: hello world\n<3>ERROR muxd.test: bad\n"
    )


JOURNALD_CHILD = textwrap.dedent(
    """
    import json, logging, os, socket, sys
    os.makedirs("/run/systemd/journal")
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind("/run/systemd/journal/socket")
    journald.settimeout(10)
    st = os.fstat(2)
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    import muxd.systemd as sd
    sd.setup_logging("info")
    fields = {"MUXD_PORT": "dut1", "MUXD_PEER": "[::1]:9"}
    logging.getLogger("muxd.test").info("hello %s", "world", extra=fields)
    print(json.dumps(journald.recv(65536).decode("utf-8", "replace").split("\\n")))
    """
)


@pytest.mark.skipif(not HAVE_SYSTEMD_PYTHON, reason="systemd-python is not importable")
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_journal_gets_structured_fields() -> None:
    # libsystemd always writes to /run/systemd/journal/socket, so the stand-in journald
    # lives in a private mount namespace with a fresh tmpfs on /run.
    cmd = [
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount -t tmpfs tmpfs /run && exec "$0" "$@"',
        sys.executable, "-c", JOURNALD_CHILD,
    ]  # fmt: skip
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace: {probe.stderr.decode().strip()}")
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""  # it went to the journal, not to stderr
    fields = json.loads(proc.stdout)
    for field in (
        "MESSAGE=hello world",
        "PRIORITY=6",
        "SYSLOG_IDENTIFIER=muxd",
        "LOGGER=muxd.test",
        "MUXD_PORT=dut1",
        "MUXD_PEER=[::1]:9",
    ):
        assert field in fields
