"""Ports at run time: POST/DELETE /api/v1/ports, ?hold=1, the control socket, `muxd ctl port`.

A real daemon on a pty ("dut", a rw TCP listener with notices) and a second
pty for the port added at run time ("b"). Readers are raw TCP clients; state
is read from the JSON API. The holder of a held port is a real `muxd ctl port
add --hold` subprocess, killed by its PID.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from muxd import apiclient
from tests.helpers import (
    AUTO,
    LOCAL,
    ROOT,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    muxd_cmd,
    read_to_eof,
    recv_exactly,
    request,
    run_muxd,
    run_until,
    split_hostport,
    start_on_pty,
    wait_clients,
    wait_for,
    write_config,
)
from tests.test_metrics import promtool_check, scrape, value


def start(
    muxd: StartMuxd,
    tmp_path: Path,
    dev: PtyDevice,
    listeners: list[dict[str, Any]] | None = None,
    **opts: Any,
) -> tuple[Muxd, str]:
    """muxd on `dev` as "dut" with a control socket (by default one rw tcp
    listener with notices); (muxd, the control socket's path)."""
    control = str(tmp_path / "control.sock")
    top = {"control": {"path": control, "socket_mode": "0660"}, **opts.pop("top", {})}
    listeners = listeners or [{"tcp": AUTO, "mode": "rw", "notices": True}]
    return start_on_pty(muxd, tmp_path, dev, listeners, top=top, **opts), control


def port_b(dev: PtyDevice, **extra: Any) -> dict[str, Any]:
    return {
        "name": "b",
        "upstream": {"serial": dev.path},
        "listeners": [{"tcp": f"{LOCAL}:0", "name": "tb", "notices": True}],
        **extra,
    }


def post(addr: str, body: Any, path: str = "/api/v1/ports") -> tuple[int, Any]:
    """POST body (JSON, or bytes as they are) to the API; (status, the JSON answer)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, answer = request(addr, "POST", path, {"content-type": "application/json"}, data)
    return status, json.loads(answer)


def delete(addr: str, name: str) -> tuple[int, Any]:
    status, _, answer = request(addr, "DELETE", f"/api/v1/ports/{name}")
    return status, json.loads(answer)


def bound(answer: dict[str, Any], listener: str = "tb") -> int:
    [lst] = [lst for lst in answer["port"]["listeners"] if lst["name"] == listener]
    return split_hostport(lst["address"])[1]


def port_names(m: Muxd) -> list[str]:
    return [p["name"] for p in m.api("/api/v1/ports")["ports"]]


@pytest.fixture
def dev_b(tmp_path: Path) -> Any:
    dev = PtyDevice(tmp_path / "ttyB")
    yield dev
    dev.close()


def test_added_port_serves_readers_api_and_metrics(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, dev_b: PtyDevice
) -> None:
    m, _ = start(muxd, tmp_path, pty_device)
    status, answer = post(m.http, port_b(dev_b))
    assert status == 201, answer
    assert answer["held"] is False and answer["port"]["name"] == "b"
    m.wait_state("up", port="b")
    client = connect(bound(answer))
    wait_clients(m.http, 1, port="b")
    dev_b.write(b"hello from b\n")
    assert recv_exactly(client, 13) == b"hello from b\n"
    assert port_names(m) == ["dut", "b"]
    text, samples = scrape(m.http)
    promtool_check(text)
    assert value(samples, "muxd_upstream_up", port="b") == 1
    assert value(samples, "muxd_clients", port="b", listener="tb") == 1
    client.close()


def test_invalid_port_gets_every_error_the_config_file_gets(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, _ = start(muxd, tmp_path, pty_device)
    bad = {
        "name": "b c",
        "upstream": {"serial": "relative/tty"},
        "listeners": [{"tcp": "127.0.0.1:x"}, {"unix": "/tmp/s", "overflow": "sometimes"}],
        "write_queue": "lots",
    }
    status, answer = post(m.http, bad)
    assert status == 400, answer
    errors = [f"{e['path']}: {e['message']}" for e in answer["errors"]]
    assert len(errors) >= 4 and all(e.startswith("ports[0].") for e in errors), errors
    # `muxd check` on the same port in a file: the same key paths and texts, with lines.
    checked = run_muxd("check", "-c", str(write_config(tmp_path, {"ports": [bad]}, "bad.yaml")))
    assert checked.returncode == 2
    lines = checked.stderr.splitlines()
    assert all("bad.yaml:" in line for line in lines)  # the file's errors have lines; the API's none
    # In the file's line order there, in the body's key order here: the same set.
    assert sorted(line.split(": ", 2)[2] for line in lines) == sorted(errors), (lines, errors)
    assert "line" not in answer["errors"][0]
    # What the machine refuses, as a start says it.
    status, answer = post(
        m.http,
        port_b(pty_device, name="c", upstream={"sim": True}, listeners=[{"unix": "/nonexistent/c.sock"}]),
    )
    assert (status, answer["error"]) == (
        400,
        "port c, listener unix:/nonexistent/c.sock: directory /nonexistent does not exist",
    )
    assert post(m.http, b"{not json")[0] == 400
    assert post(m.http, [port_b(pty_device)])[0] == 400
    assert port_names(m) == ["dut"]


def test_clashes_get_409_and_change_nothing(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, dev_b: PtyDevice
) -> None:
    m, _ = start(muxd, tmp_path, pty_device)
    reader = connect(m.port())
    wait_clients(m.http, 1)
    other_link = tmp_path / "same-tty"
    other_link.symlink_to(os.readlink(pty_device.path))
    busy = socket.socket()
    busy.bind((LOCAL, 0))
    busy.listen()
    unix_path = tmp_path / "b.sock"
    clashes = {
        "name": port_b(dev_b, name="dut"),
        "device": port_b(pty_device),
        "device by another link": port_b(dev_b, upstream={"serial": str(other_link)}),
        "listener address": port_b(dev_b, listeners=[{"tcp": m.address()}]),
        # Bound by another process: the unix socket made first is undone.
        "address in use": port_b(
            dev_b, listeners=[{"unix": str(unix_path)}, {"tcp": f"{LOCAL}:{busy.getsockname()[1]}"}]
        ),
        "listener name": port_b(dev_b, listeners=[{"tcp": f"{LOCAL}:0", "name": m.names[0]}]),
    }
    for what, port in clashes.items():
        status, answer = post(m.http, port)
        assert status == 409, (what, answer)
        assert answer["error"], what
    busy.close()
    assert not unix_path.exists()
    assert port_names(m) == ["dut"]
    pty_device.write(b"still here\n")
    assert recv_exactly(reader, 11) == b"still here\n"
    # And b's device was never opened: it can be added now.
    assert post(m.http, port_b(dev_b))[0] == 201
    reader.close()


def test_delete_closes_its_clients_cleanly_and_no_one_else(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, dev_b: PtyDevice
) -> None:
    m, _ = start(muxd, tmp_path, pty_device)
    trace = tmp_path / "b.trace"
    port = port_b(dev_b, trace=[{"path": str(trace)}])
    port["listeners"].append({"websocket": True})
    status, answer = post(m.http, port)
    assert status == 201
    m.wait_state("up", port="b")
    b_client = connect(bound(answer))
    dut_client = connect(m.port())
    with ws_connect(f"ws://{m.http}/ws/b", open_timeout=5) as browser:
        wait_clients(m.http, 2, port="b")
        wait_clients(m.http, 1, port="dut")
        dev_b.write(b"last words\n")
        assert recv_exactly(b_client, 11) == b"last words\n"
        assert delete(m.http, "b") == (200, {"ok": True, "removed": "b"})
        rest = read_to_eof(b_client)  # the notice, then FIN (read_to_eof fails on a reset)
        assert b"b port removed" in rest, rest
        with pytest.raises(ConnectionClosed):
            for _ in range(100):  # what it is owed, then the close
                browser.recv(timeout=5)
    assert port_names(m) == ["dut"]
    assert b"last words" in trace.read_bytes()
    held = {os.path.realpath(f"/proc/{m.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{m.pid}/fd")}
    assert str(trace) not in held and os.path.realpath(dev_b.path) not in held
    pty_device.write(b"undisturbed\n")
    assert recv_exactly(dut_client, 12) == b"undisturbed\n"
    assert delete(m.http, "b")[0] == 404
    assert delete(m.http, "dut")[0] == 409  # the file's port
    # The device was let go: the same port can be added again.
    assert post(m.http, port_b(dev_b))[0] == 201
    b_client.close()
    dut_client.close()


def test_reload_keeps_run_time_ports(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, dev_b: PtyDevice
) -> None:
    m, _ = start(muxd, tmp_path, pty_device)
    status, answer = post(m.http, port_b(dev_b))
    assert status == 201
    client = connect(bound(answer))
    wait_clients(m.http, 1, port="b")
    m.signal(signal.SIGHUP)
    m.wait_log("reloaded")
    assert port_names(m) == ["dut", "b"]
    dev_b.write(b"after reload\n")
    assert recv_exactly(client, 13) == b"after reload\n"
    # A file that now names b, and a port on b's device: neither is started.
    other_link = tmp_path / "b-again"
    other_link.symlink_to(os.readlink(dev_b.path))
    m.rewrite(
        [
            *m.data["ports"],
            {"name": "b", "upstream": {"sim": True}},
            {"name": "c", "upstream": {"serial": str(other_link)}},
        ]
    )
    m.signal(signal.SIGHUP)
    wait_for(lambda: m.log().count("reloaded") == 2, 10, "the second reload")
    assert "port b was added at run time" in m.log()
    assert f"cannot start port c: serial:{other_link} is the device of port 'b'" in m.log()
    assert port_names(m) == ["dut", "b"]
    dev_b.write(b"still b\n")
    assert recv_exactly(client, 8) == b"still b\n"
    client.close()


def _holder(control: str, port_file: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        muxd_cmd("ctl", "--control", control, "port", "add", "--hold", str(port_file)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def holder_line(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the holder printed nothing"
    return proc.stdout.readline()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_held_port_goes_with_its_holder(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, dev_b: PtyDevice, sig: int
) -> None:
    m, control = start(muxd, tmp_path, pty_device)
    port_file = tmp_path / "b.yaml"
    port_file.write_text(yaml.safe_dump(port_b(dev_b)))
    holder = _holder(control, port_file)
    try:
        line = holder_line(holder)
        assert b"b: added, held" in line, line
        address = line.split(b"tb ")[1].split(b",")[0].decode()
        client = connect(split_hostport(address)[1])
        wait_clients(m.http, 1, port="b")
        os.kill(holder.pid, sig)
        assert holder.wait(10) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    wait_for(lambda: port_names(m) == ["dut"], 10, "the held port removed")
    assert b"b port removed" in read_to_eof(client)
    client.close()


HOLD_PORTS = (
    "import json, sys\n"
    "from muxd.apiclient import hold_ports\n"
    "ready = lambda: print('ready', flush=True)\n"
    "sys.exit(hold_ports(sys.argv[1], [json.loads(sys.argv[2])], on_ready=ready))\n"
)


def test_hold_ports_stops_cleanly_on_a_sigterm_right_after_ready(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, dev_b: PtyDevice
) -> None:
    """on_ready is called with the signal handlers in place already."""
    m, control = start(muxd, tmp_path, pty_device)
    for _ in range(3):
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_PORTS, control, json.dumps(port_b(dev_b))],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        try:
            assert holder_line(holder) == b"ready\n"
            holder.send_signal(signal.SIGTERM)
            assert holder.wait(10) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait(10)
        wait_for(lambda: port_names(m) == ["dut"], 10, "the held port removed")


def test_hold_ports_returns_1_when_the_daemon_goes(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, dev_b: PtyDevice
) -> None:
    m, control = start(muxd, tmp_path, pty_device)
    assert apiclient.daemon_reachable(control)
    assert not apiclient.daemon_reachable(str(tmp_path / "nothing.sock"))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_PORTS, control, json.dumps(port_b(dev_b))],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder_line(holder) == b"ready\n"
        assert port_names(m) == ["dut", "b"]
        m.signal(signal.SIGTERM)
        assert m.wait_exit() == 0
        assert holder.wait(10) == 1
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert not Path(control).exists()


def test_control_socket_is_admin_and_has_its_mode(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, dev_b: PtyDevice
) -> None:
    token = tmp_path / "admin.token"
    token.write_text("s3cret-admin-token-0123456789abcdef\n")
    token.chmod(0o600)
    http = {"tokens": [{"name": "ops", "file": str(token), "scope": "admin"}]}
    m, control = start(muxd, tmp_path, pty_device, http=http, wait_up=False)
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o660
    assert post(m.http, port_b(dev_b))[0] == 401  # over TCP: a token is needed
    ep = apiclient.control_endpoint(control)
    answer = apiclient.add_port(ep, port_b(dev_b))
    assert answer["port"]["name"] == "b"
    names = [p["name"] for p in apiclient.get(ep, "/api/v1/ports")["ports"]]
    assert names == ["dut", "b"]
    conn = apiclient.connection(ep)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200
        assert b'muxd_upstream_state{port="b"' in resp.read()
    finally:
        conn.close()
    with pytest.raises(apiclient.Refused) as refused:
        apiclient.add_port(ep, port_b(dev_b))
    assert refused.value.status == 409
    apiclient.remove_port(ep, "b")
    assert [p["name"] for p in apiclient.get(ep, "/api/v1/ports")["ports"]] == ["dut"]


def test_ctl_port_add_and_remove(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, dev_b: PtyDevice
) -> None:
    m, control = start(muxd, tmp_path, pty_device)
    port_file = tmp_path / "b.json"
    port_file.write_text(json.dumps(port_b(dev_b)))
    added = run_muxd("ctl", "--url", m.http, "port", "add", str(port_file))
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("b: added; tb 127.0.0.1:")
    again = run_muxd("ctl", "--control", control, "port", "add", str(port_file))
    assert again.returncode == 1 and "(409)" in again.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: c\nupstream: {sim: {}}\nwrite_queue: lots\nlisteners: [{tcp: nope}]\n")
    refused = run_muxd("ctl", "--control", control, "port", "add", str(bad))
    assert refused.returncode == 1
    assert "ports[0].write_queue: " in refused.stderr
    assert "ports[0].listeners[0].tcp:" in refused.stderr
    # The same errors, every one, however the daemon is reached.
    over_tcp = run_muxd("ctl", "--url", m.http, "port", "add", str(bad))
    assert (over_tcp.returncode, over_tcp.stderr) == (1, refused.stderr)
    removed = run_muxd("ctl", "--control", control, "port", "remove", "b")
    assert (removed.returncode, removed.stdout) == (0, "b: removed\n")
    assert port_names(m) == ["dut"]
    # `ctl PORT SEQUENCE` is unchanged beside it.
    assert run_muxd("ctl", "--url", m.http, "dut", "nosuch").returncode == 1


def _raw_post(port: int, body: dict[str, Any], query: str = "", extra: str = "") -> socket.socket:
    data = json.dumps(body).encode()
    sock = connect(port)
    head = f"POST /api/v1/ports{query} HTTP/1.1\r\nHost: {LOCAL}:{port}\r\n"
    head += f"{extra}\r\n" if extra else ""
    head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    sock.setblocking(False)
    return sock


def _take(sock: socket.socket, got: bytearray) -> bool:
    """Whatever the socket has now into `got`; True at EOF."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return False
    got += data
    return not data


def test_a_holding_connection_never_idles_out(tmp_path: Path) -> None:
    """In process, with a 0.2 s idle timeout: the connection that added a port
    with ?hold=1 stays open past it (and a plain one beside it does not), and
    its end removes the port; the plain one's port stays."""
    from muxd import config as configmod
    from muxd.daemon import Daemon
    from muxd.listeners.http import HttpTimeouts

    cfg = configmod.from_data(
        {"ports": [{"name": "a", "upstream": {"sim": True}}], "http": {"listen": f"{LOCAL}:0", "name": "h"}}
    )
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    daemon = Daemon(cfg)
    try:
        daemon.start()
        front = daemon.http["h"]
        front.timeouts = HttpTimeouts(idle=0.2)
        http_port = split_hostport(front.bound_address or "")[1]
        held = _raw_post(http_port, {"name": "b", "upstream": {"sim": True}}, "?hold=1")
        plain = _raw_post(http_port, {"name": "c", "upstream": {"sim": True}})
        held_got, plain_got = bytearray(), bytearray()
        run_until(daemon.reactor, lambda: not _take(held, held_got) and b"\r\n\r\n{" in held_got)
        assert held_got.startswith(b"HTTP/1.1 201 "), held_got
        assert b'"held": true' in held_got
        run_until(daemon.reactor, lambda: _take(plain, plain_got), "the plain connection's idle timeout")
        assert plain_got.startswith(b"HTTP/1.1 201 "), plain_got
        assert not _take(held, held_got)  # still open, past the idle timeout
        assert sorted(daemon.ports) == ["a", "b", "c"]
        # A hold on a connection that closes after its answer would hold nothing.
        closing = _raw_post(
            http_port, {"name": "d", "upstream": {"sim": True}}, "?hold=1", "Connection: close"
        )
        closing_got = bytearray()
        run_until(daemon.reactor, lambda: _take(closing, closing_got), "the refusal")
        assert closing_got.startswith(b"HTTP/1.1 400 ") and b"kept-alive" in closing_got
        closing.close()
        assert sorted(daemon.ports) == ["a", "b", "c"]
        held.close()
        run_until(daemon.reactor, lambda: "b" not in daemon.ports, "the held port removed")
        assert sorted(daemon.ports) == ["a", "c"]
        plain.close()
    finally:
        daemon.shutdown()
        daemon.run()
        daemon.close()
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_control_key_reads_as_a_unix_listener_does() -> None:
    from muxd import config as configmod

    port = "ports: [{name: a, upstream: {sim: true}, listeners: [{unix: /tmp/a.sock}]}]\n"
    assert configmod.loads(port + "control: /run/muxd/c.sock\n").control == configmod.ControlSocket(
        "/run/muxd/c.sock", 0o600, None
    )
    cfg = configmod.loads(port + 'control: {path: /run/muxd/c.sock, socket_mode: "0660", group: muxd}\n')
    assert cfg.control == configmod.ControlSocket("/run/muxd/c.sock", 0o660, "muxd")
    assert configmod.loads(port).control is None  # off unless named
    bad = port + "control: {path: /tmp/a.sock, socket_mode: 0999, mode: rw}\n"
    with pytest.raises(configmod.ConfigError) as caught:
        configmod.loads(bad, "muxd.yaml")
    assert [str(e) for e in configmod.each_error(caught.value)] == [
        "muxd.yaml:2: control.mode: unknown key (expected one of: group, path, socket_mode)",
        "muxd.yaml:2: control.socket_mode: expected an octal mode such as 0660, got '0999'",
        "muxd.yaml:2: control: duplicate listening address '/tmp/a.sock' (first at line 1)",
    ]
    with pytest.raises(configmod.ConfigError, match="control: must be an absolute path"):
        configmod.loads(port + "control: run/c.sock\n")
