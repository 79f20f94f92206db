"""`muxd tail` from the shell, and the pexpect example (issue 12, items 5 and 6).

`muxd tail` runs as a real subprocess against a real muxd (port 0 and a ready
file), on a pty device whose output the test writes, or on the simulated
board: stamped text, jsonl that parses, history by lines, `| head -3`, a
closed pipe on a quiet port, Ctrl-C, the server's close, unreachable and
refused URLs, usage errors. Its WebSocket client is also met by a wsproto
server in a thread, to see it answer pings and report an unusual close.

examples/expect_status.py runs as a subprocess against the simulated board:
it gets the answer to `status` through a rw listener (exit 0), and times out
through a ro one (exit 1), where the command never reaches the board.

Every process started here is stopped by its PID; every wait polls a
condition, or reads, until a deadline.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
)
from wsproto.utilities import RemoteProtocolError

from muxd import tail
from tests.helpers import (
    AUTO,
    ROOT,
    Muxd,
    PtyDevice,
    StartMuxd,
    free_port,
    port_info,
    start_muxd,
    start_on_pty,
    wait_clients,
    wait_for,
    write_config,
)

# A command is Python starting up plus a few round trips on loopback.
COMMAND_TIMEOUT = 30
STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
EXAMPLE = ROOT / "examples" / "expect_status.py"


def muxd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "muxd", *args]


def unstamped(line: bytes) -> bytes:
    """A text record's line without its stamp (which must be there)."""
    match = STAMP.match(line)
    assert match, line
    return line[match.end() :]


def stamp_time(line: bytes) -> float:
    """A text record's stamp as Unix seconds."""
    text = line[: STAMP.match(line).end() - 2].decode()  # type: ignore[union-attr]
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc).timestamp()


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def with_default_sigint(cmd: list[str]) -> list[str]:
    """cmd, exec'd by a Python that first restores SIGINT's default: a runner
    started in the background may ignore SIGINT, an ignored signal stays
    ignored across exec, and Python then installs no Ctrl-C handler. (exec
    keeps the PID, so the test signals the command itself.)"""
    trampoline = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", trampoline, *cmd]


class Tail:
    """`muxd tail` as a subprocess, its standard output a pipe this reads."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            with_default_sigint(muxd_cmd("tail", *args)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        self.buf = bytearray()

    def lines(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """The next n lines (LF-terminated), read until a deadline."""
        deadline = time.monotonic() + timeout
        while self.buf.count(b"\n") < n:
            left = deadline - time.monotonic()
            assert left > 0, f"{n} lines not read in {timeout}s: {bytes(self.buf)!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                assert chunk, f"EOF after {bytes(self.buf)!r}; stderr: {self.stderr()}"
                self.buf += chunk
        out = []
        for _ in range(n):
            line, _, rest = bytes(self.buf).partition(b"\n")
            out.append(line + b"\n")
            self.buf = bytearray(rest)
        return out

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: SIGINT to the process; its exit status and standard error."""
        os.kill(self.proc.pid, signal.SIGINT)
        return self.wait()

    def wait(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=COMMAND_TIMEOUT)
        return self.proc.returncode, err.decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(COMMAND_TIMEOUT)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def tails() -> Iterator[list[Tail]]:
    started: list[Tail] = []
    yield started
    for t in started:
        t.stop()


def start_tail(tails: list[Tail], *args: str) -> Tail:
    t = Tail(*args)
    tails.append(t)
    return t


def on_pty(muxd: StartMuxd, tmp_path: Path, dev: PtyDevice) -> Muxd:
    """muxd on the pty as port "dut", with a websocket listener (the tail's way in)."""
    return start_on_pty(muxd, tmp_path, dev, [{"websocket": True}])


def publish(m: Muxd, dev: PtyDevice, data: bytes) -> None:
    """Write to the device and wait until muxd has read it all: one write, one chunk."""
    before = port_info(m.http)["bytes_in"]
    dev.write(data)
    wait_for(lambda: port_info(m.http)["bytes_in"] >= before + len(data), 10, f"muxd to read {data!r}")


def on_sim(muxd: StartMuxd, tmp_path: Path, status_interval: str = "1s") -> Muxd:
    """muxd on the simulated board as port "dut": rw and ro TCP listeners, and a websocket one."""
    return start_muxd(
        muxd,
        tmp_path,
        {"sim": {"status_interval": status_interval}},
        [{"tcp": AUTO, "mode": "rw"}, {"tcp": AUTO, "mode": "ro"}, {"websocket": True}],
    )


# -- the formats ----------------------------------------------------------------------------------


def test_text_lines_carry_stamps_and_ctrl_c_exits_130(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, tails: list[Tail]
) -> None:
    m = on_pty(muxd, tmp_path, pty_device)
    t = start_tail(tails, "dut", "--url", m.http, "--format", "text")
    wait_clients(m.http, 1)  # attached: what is written now is live for it
    publish(m, pty_device, b"boot ok\n")
    publish(m, pty_device, b"login: \xff\n")  # not UTF-8: text passes bytes through
    assert [unstamped(line) for line in t.lines(2)] == [b"boot ok\n", b"login: \xff\n"]
    code, err = t.interrupt()
    no_traceback(err)
    assert code == 130, err


def test_jsonl_lines_parse_with_json(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, tails: list[Tail]
) -> None:
    m = on_pty(muxd, tmp_path, pty_device)
    t = start_tail(tails, "dut", "--url", m.http, "--format", "jsonl")
    wait_clients(m.http, 1)
    sent = [b"one\n", b"two \xc3\xa9\n", b"three\n"]
    for data in sent:
        publish(m, pty_device, data)
    records = [json.loads(line) for line in t.lines(3)]
    assert "".join(r["data"] for r in records).encode("utf-8", "surrogateescape") == b"".join(sent)
    assert all(r["port"] == "dut" and r["dir"] == "rx" for r in records), records
    times = [r["t"] for r in records]
    assert times == sorted(times), times
    code, err = t.interrupt()
    assert code == 130, err


def test_lines_replays_that_many_past_lines_then_goes_live(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, tails: list[Tail]
) -> None:
    # muxd keeps text records from the start only for a format some listener
    # uses; a format asked for later has records from its first reader on.
    m = start_on_pty(muxd, tmp_path, pty_device, [{"websocket": True, "format": "text"}])
    for i in range(1, 6):
        publish(m, pty_device, f"line{i}\n".encode())
    before = time.time()
    # Raw: exactly the last three lines, then what comes next.
    raw = start_tail(tails, "dut", "--url", m.http, "--format", "raw", "--lines", "3")
    assert raw.lines(3) == [b"line3\n", b"line4\n", b"line5\n"]
    # Text: the same lines, with the stamps of their arrival (before this tail began).
    text = start_tail(tails, "dut", "--url", m.http, "-n", "3")  # the listener's format
    replayed = text.lines(3)
    assert [unstamped(line) for line in replayed] == [b"line3\n", b"line4\n", b"line5\n"]
    # Stamps are milliseconds, cut rather than rounded (allow the one either way).
    assert all(stamp_time(line) <= before + 0.001 for line in replayed), (replayed, before)
    wait_clients(m.http, 2)
    publish(m, pty_device, b"line6\n")
    assert raw.lines(1) == [b"line6\n"]
    assert [unstamped(line) for line in text.lines(1)] == [b"line6\n"]
    for t in (raw, text):
        assert t.interrupt()[0] == 130


def test_history_size_replays_bytes(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, tails: list[Tail]
) -> None:
    m = on_pty(muxd, tmp_path, pty_device)
    publish(m, pty_device, b"a" * 2000 + b"\n")
    publish(m, pty_device, b"end\n")
    t = start_tail(tails, "dut", "--url", m.http, "--history", "1KiB")
    [line, last] = t.lines(2)
    assert line == b"a" * (1024 - 4 - 1) + b"\n" and last == b"end\n"
    assert t.interrupt()[0] == 130


# -- pipes, signals and endings ---------------------------------------------------------------------


def test_into_head_prints_three_lines_and_exits_quietly(
    muxd: StartMuxd, tmp_path: Path, tails: list[Tail]
) -> None:
    m = on_sim(muxd, tmp_path, status_interval="100ms")
    # A real shell pipe, as an operator types it; bash reports muxd's own status.
    script = f'{" ".join(muxd_cmd())} tail dut --url {m.http} | head -3; echo "muxd=${{PIPESTATUS[0]}}" >&2'
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    stderr = done.stderr.decode(errors="replace")
    assert len(done.stdout.splitlines()) == 3, done.stdout
    no_traceback(stderr)
    # muxd tail never ends on its own: only the closed pipe can have stopped it.
    assert stderr.strip().endswith("muxd=141"), stderr


def test_a_closed_pipe_ends_it_on_a_quiet_port(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = on_pty(muxd, tmp_path, pty_device)
    r, w = os.pipe()
    proc = subprocess.Popen(
        muxd_cmd("tail", "dut", "--url", m.http), cwd=ROOT, stdout=w, stderr=subprocess.PIPE
    )
    os.close(w)
    try:
        wait_clients(m.http, 1)
        publish(m, pty_device, b"only line\n")
        got = b""
        deadline = time.monotonic() + 10
        while not got.endswith(b"\n"):  # bounded by the deadline; each read by select's timeout
            left = deadline - time.monotonic()
            assert left > 0, f"got {got!r}"
            if select.select([r], [], [], left)[0]:
                chunk = os.read(r, 1024)
                assert chunk, f"EOF after {got!r}"
                got += chunk
        assert got == b"only line\n"
        os.close(r)
        r = -1
        # The device says nothing more: the reader's going alone must end the tail.
        _, err = proc.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        if r >= 0:
            os.close(r)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(COMMAND_TIMEOUT)
    no_traceback(err.decode())
    assert (proc.returncode, err) == (141, b"")


def test_the_servers_close_exits_0(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, tails: list[Tail]
) -> None:
    m = on_pty(muxd, tmp_path, pty_device)
    t = start_tail(tails, "dut", "--url", m.http)
    wait_clients(m.http, 1)
    publish(m, pty_device, b"bye\n")
    assert t.lines(1) == [b"bye\n"]
    m.stop()  # SIGTERM: muxd closes every WebSocket with 1001 going away
    code, err = t.wait()
    no_traceback(err)
    assert (code, err) == (0, "")


def test_config_file_gives_the_url(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, tails: list[Tail]
) -> None:
    m = on_pty(muxd, tmp_path, pty_device)
    # Another file naming the running server's bound address: the one muxd
    # runs from says port 0, which only the ready file resolves.
    cfg = write_config(tmp_path, {**m.data, "http": {"listen": m.http}}, "client.yaml")
    t = start_tail(tails, "dut", "-c", str(cfg))
    wait_clients(m.http, 1)
    publish(m, pty_device, b"via config\n")
    assert t.lines(1) == [b"via config\n"]
    assert t.interrupt()[0] == 130


# -- refusals and usage -------------------------------------------------------------------------------


def run_tail(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        muxd_cmd("tail", *args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def test_an_unreachable_url_exits_3_with_one_line() -> None:
    port = free_port()  # nobody listens there: a refused connection
    done = run_tail("dut", "--url", f"127.0.0.1:{port}")
    assert done.returncode == 3, done.stderr
    assert done.stdout == ""
    [line] = done.stderr.splitlines()
    assert f"ws://127.0.0.1:{port}/ws/dut" in line, line


def test_an_unknown_port_exits_3_with_the_servers_reason(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m = on_pty(muxd, tmp_path, pty_device)
    done = run_tail("nope", "--url", m.http)
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.splitlines()
    assert "404" in line and "nope" in line, line


@pytest.mark.parametrize(
    "args",
    [
        ["dut"],  # neither -c nor --url
        ["dut", "--url", "127.0.0.1:8020", "--history", "lots"],
        ["dut", "--url", "127.0.0.1:8020", "--lines", "-1"],
        ["dut", "--url", "127.0.0.1:8020", "--format", "xml"],
        ["dut", "--url", "no-port"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    done = run_tail(*args)
    assert done.returncode == 2, (done.returncode, done.stderr)
    no_traceback(done.stderr)


def test_a_config_without_http_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path, {"ports": [{"name": "dut", "upstream": {"sim": {}}, "listeners": [{"tcp": "127.0.0.1:0"}]}]}
    )
    done = run_tail("dut", "-c", str(cfg))
    assert done.returncode == 2, done.stderr
    assert "http" in done.stderr


def test_tail_stays_light() -> None:
    """`muxd tail` with --url, --help or not, loads neither PyYAML nor the
    daemon's HTTP side (it starts in a pipeline: it should start at once)."""
    probe = (
        "import sys; from muxd import cli; "
        "codes = [cli.main(['tail', '--help']), cli.main(['tail', 'dut', '--url', sys.argv[1]])]; "
        "print(codes, [m for m in ('yaml', 'muxd.listeners.http', 'muxd.hub') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, f"127.0.0.1:{free_port()}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert done.stdout.splitlines()[-1] == "[0, 3] []", (done.stdout, done.stderr)
    # The idle timeout is written in tail.py rather than imported: it must follow the server's pings.
    from muxd.listeners.http import HttpTimeouts

    assert HttpTimeouts.ping == tail.SERVER_PING


def test_target_builds_the_websocket_request() -> None:
    where = tail.target("http://127.0.0.1:8020", "dut 1/a", "jsonl", 65536, 20)
    assert (where.host, where.port, where.host_header) == ("127.0.0.1", 8020, "127.0.0.1:8020")
    assert where.path == "/ws/dut%201%2Fa?format=jsonl&history=65536&history_lines=20"
    assert where.url == "ws://127.0.0.1:8020/ws/dut%201%2Fa?format=jsonl&history=65536&history_lines=20"
    # Behind a proxy: the prefix stays; IPv6 keeps its brackets in Host; no options, no query.
    where = tail.target("http://[::1]:8020/muxd/", "dut")
    assert (where.host, where.host_header, where.path) == ("::1", "[::1]:8020", "/muxd/ws/dut")
    where = tail.target("https://127.0.0.1:8020", "dut")  # wss://, checked as any https client does
    assert where.context is not None and where.context.check_hostname and where.url.startswith("wss://")
    with pytest.raises(ValueError, match="http"):
        tail.target("ftp://127.0.0.1:8020", "dut")


# -- the WebSocket client against a wsproto server --------------------------------------------------


class OneShotServer:
    """A WebSocket server in a thread for one client: it pings, waits for the
    pong, sends one message, then closes with a code of its choice."""

    def __init__(self, close_code: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.close_code = close_code
        self.events: list[object] = []
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.listener.settimeout(COMMAND_TIMEOUT)
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(COMMAND_TIMEOUT)
                ws = WSConnection(ConnectionType.SERVER)
                self._until(conn, ws, Request)
                conn.sendall(ws.send(AcceptConnection()))
                conn.sendall(ws.send(Ping(b"are you there")))
                self._until(conn, ws, Pong)
                conn.sendall(ws.send(BytesMessage(b"hello\n")))
                conn.sendall(ws.send(CloseConnection(self.close_code, "too slow")))
                self._until(conn, ws, CloseConnection)  # the client answers the close
        except (AssertionError, OSError, RemoteProtocolError) as exc:  # the test fails with it
            self.error = exc
        finally:
            self.listener.close()

    def _until(self, conn: socket.socket, ws: WSConnection, kind: type) -> None:
        for _ in range(100):  # a handful of reads at most; bounded in count and by the socket timeout
            for event in ws.events():
                self.events.append(event)
                if isinstance(event, kind):
                    return
            data = conn.recv(65536)
            assert data, f"EOF while waiting for {kind.__name__}"
            ws.receive_data(data)
        raise AssertionError(f"no {kind.__name__}")

    def join(self) -> None:
        self.thread.join(COMMAND_TIMEOUT)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def test_client_answers_pings_and_reports_an_unusual_close() -> None:
    server = OneShotServer(close_code=1008)
    out = io.BytesIO()
    ending = tail.follow(tail.target(f"http://127.0.0.1:{server.port}", "dut"), out)
    server.join()
    assert out.getvalue() == b"hello\n"
    assert any(isinstance(e, Pong) and e.payload == b"are you there" for e in server.events)
    assert ending is not None and (int(ending.code), ending.reason) == (1008, "too slow")


def test_client_treats_going_away_as_an_ordinary_end() -> None:
    server = OneShotServer(close_code=1001)
    out = io.BytesIO()
    assert tail.follow(tail.target(f"http://127.0.0.1:{server.port}", "dut"), out) is None
    server.join()
    assert out.getvalue() == b"hello\n"


# -- the pexpect example ------------------------------------------------------------------------------


def run_example(address: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), address, "--timeout", str(timeout)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )


def test_expect_example_gets_the_answer_to_status(muxd: StartMuxd, tmp_path: Path) -> None:
    m = on_sim(muxd, tmp_path)
    done = run_example(m.address(0), timeout=10)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"the board answered: counter=\d+\n", done.stdout), done.stdout


def test_expect_example_times_out_when_the_command_cannot_reach_the_board(
    muxd: StartMuxd, tmp_path: Path
) -> None:
    m = on_sim(muxd, tmp_path)
    # The ro listener discards what clients send: the board never hears `status`.
    done = run_example(m.address(1), timeout=1.5)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "no answer" in done.stderr
