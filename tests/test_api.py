"""The JSON API, the admin disconnect, and `muxd status`, against muxd on a pty."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import h11
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from muxd import config as configmod
from muxd.listeners.http import HttpFront
from muxd.port import PortRuntime
from muxd.protocol.http_names import is_loopback
from muxd.reactor import Reactor
from tests.helpers import (
    AUTO,
    ROOT,
    PtyDevice,
    StartMuxd,
    connect,
    free_port,
    get_json,
    port_info,
    recv_exactly,
    request,
    start_http,
    stuck_reader,
    wait_clients,
    wait_for,
    write_config,
)

TOKEN = "a-long-enough-token-0123"


def clients(addr: str) -> dict[str, dict[str, Any]]:
    """The port's clients by peer."""
    return {c["peer"]: c for c in get_json(addr, "/api/v1/ports/dut/clients")["clients"]}


def peer_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def test_ports_and_clients_views(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    tcp = free_port()
    _, addr = start_http(
        muxd, tmp_path, pty_device, listeners=[{"tcp": f"127.0.0.1:{tcp}"}, {"websocket": True, "mode": "rw"}]
    )
    c = connect(tcp)
    wait_clients(addr, 1)
    pty_device.write(b"hello\n")
    recv_exactly(c, 6)
    wait_for(lambda: clients(addr)[peer_of(c)]["delivered"] == 6, 5, "delivered counted")
    port = port_info(addr)
    assert port["name"] == "dut" and port["state"] == "up" and port["writable"] is True
    assert port["upstream"] == f"serial:{pty_device.path}"
    assert (port["bytes_in"], port["bytes_out"], port["clients"], port["max_lag"], port["dropped"]) == (
        6,
        0,
        1,
        0,
        0,
    )
    assert port["write_queue_bytes"] == 0 and isinstance(port["since"], float)
    assert port["listeners"] == [
        {
            "name": f"tcp:127.0.0.1:{tcp}",
            "kind": "tcp",
            "address": f"127.0.0.1:{tcp}",
            "mode": "ro",
            "clients": 1,
        },
        {"name": "websocket:dut", "kind": "websocket", "address": "/ws/dut", "mode": "rw", "clients": 0},
    ]
    [client] = clients(addr).values()
    assert client["peer"] == peer_of(c) and client["listener"] == f"tcp:127.0.0.1:{tcp}"
    assert (client["mode"], client["delivered"], client["dropped"], client["lag"]) == ("ro", 6, 0, 0)
    assert isinstance(client["id"], int) and isinstance(client["since"], float)
    c.close()


def test_writable_needs_an_rw_websocket_listener(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"tcp": AUTO, "mode": "rw"}])
    assert port_info(addr)["writable"] is False  # rw over TCP is not writable from a browser


def test_stuck_client_shows_growing_lag_then_drops(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"tcp": AUTO, "buffer": "64KiB"}])
    tcp = m.port()
    stuck = stuck_reader(tcp)
    healthy = connect(tcp)
    wait_clients(addr, 2)
    chunk = b"y" * 8192
    lags: list[int] = []
    info: dict[str, Any] = {}
    for i in range(1, 200):  # until the stuck reader's bound is reached: a few hundred KB
        pty_device.write(chunk)
        recv_exactly(healthy, len(chunk))
        wait_for(lambda n=i: port_info(addr)["bytes_in"] == n * len(chunk), 5, "the device's bytes")  # type: ignore[misc]
        info = clients(addr)[peer_of(stuck)]
        lags.append(info["lag"])
        if info["dropped"]:
            break
    growing = [lag for lag in lags if lag > 0]
    assert len(growing) >= 4 and growing == sorted(growing), lags
    assert 0 < info["lag"] <= 64 * 1024 and info["dropped"] > 0
    first_drop = info["dropped"]
    for _ in range(10):
        pty_device.write(chunk)
        recv_exactly(healthy, len(chunk))
    wait_for(
        lambda: clients(addr)[peer_of(stuck)]["dropped"] >= first_drop + 10 * len(chunk), 5, "more drops"
    )
    port = port_info(addr)
    assert port["max_lag"] == clients(addr)[peer_of(stuck)]["lag"]
    assert port["dropped"] == clients(addr)[peer_of(stuck)]["dropped"]
    assert clients(addr)[peer_of(healthy)]["dropped"] == 0
    stuck.close()
    healthy.close()


def disconnect(addr: str, client_id: int, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, _, body = request(addr, "POST", f"/api/v1/ports/dut/clients/{client_id}/disconnect", headers)
    return status, json.loads(body)


def test_admin_disconnect(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    # No tokens: admin actions from loopback only (tokens: tests/test_access.py).
    m, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"tcp": AUTO}, {"websocket": True}])
    tcp, tcp_name = m.port(), m.names[0]
    victim = connect(tcp)
    with ws_connect(f"ws://{addr}/ws/dut", open_timeout=5) as browser:
        wait_clients(addr, 2)
        ids = {c["listener"]: c["id"] for c in clients(addr).values()}
        tcp_id, ws_id = ids[tcp_name], ids["websocket:dut"]

        assert disconnect(addr, tcp_id, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 403
        assert disconnect(addr, tcp_id, {"Authorization": f"Basic {TOKEN}"})[0] == 403
        assert disconnect(addr, tcp_id, {"Origin": "http://evil.example"})[0] == 403
        assert port_info(addr)["clients"] == 2, "a refused request must not disconnect anybody"
        assert disconnect(addr, 999_999)[0] == 404
        assert request(addr, "GET", f"/api/v1/ports/dut/clients/{tcp_id}/disconnect")[0] == 405

        assert disconnect(addr, tcp_id) == (200, {"ok": True})  # loopback, no credentials
        victim.settimeout(5)
        assert victim.recv(100) == b""
        assert disconnect(addr, ws_id) == (200, {"ok": True})
        with pytest.raises(ConnectionClosed) as closed:
            browser.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    wait_clients(addr, 0)
    metrics = request(addr, "GET", "/metrics")[2].decode()
    assert f'muxd_client_disconnects_total{{listener="{tcp_name}",port="dut",reason="admin"}} 1.0' in metrics


def test_admin_off_loopback_needs_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    tokens = [{"name": "ops", "file": str(token_file), "scope": "admin"}]
    reactor = Reactor()

    def front_for(http: dict[str, Any]) -> HttpFront:
        cfg = configmod.from_data({"ports": [{"name": "p", "upstream": {"sim": True}}], "http": http})
        return HttpFront(cfg.http[0], lambda: {"p": PortRuntime.build(cfg.ports[0], reactor)}, reactor)

    plain = front_for({"listen": "127.0.0.1:1"})
    tokened = front_for({"listen": "127.0.0.1:1", "tokens": tokens})

    def refusal(peer: str, headers: list[tuple[str, str]], front: HttpFront = plain) -> str | int | None:
        req = h11.Request(method="POST", target="/", headers=[("host", "127.0.0.1:1"), *headers])
        denied = front._token_refusal(req, "admin", True)
        return denied.status if denied is not None else front._admin_refusal(req, peer)

    # With tokens, loopback is no exception: an admin token or 401.
    assert refusal("127.0.0.1", [], tokened) == 401
    assert refusal("192.0.2.7", [("authorization", "Bearer nope")], tokened) == 401
    assert refusal("192.0.2.7", [("authorization", f"Bearer {TOKEN}")], tokened) is None
    # Without tokens: loopback only, and credentials are never a pass.
    assert refusal("192.0.2.7", []) is not None
    assert refusal("127.0.0.1", [("authorization", f"Bearer {TOKEN}")]) is not None
    assert refusal("::ffff:127.0.0.1", []) is None
    assert refusal("::1", []) is None
    assert refusal("127.0.0.1", [("origin", "http://127.0.0.1:1")]) is None  # the console itself
    assert is_loopback("127.8.9.1") and not is_loopback("10.0.0.1") and not is_loopback("nonsense")
    reactor.close()


# -- muxd status ------------------------------------------------------------------------------


def run_status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "muxd", "status", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_status_table_and_json(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    m, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"tcp": AUTO}, {"websocket": True}])
    c = connect(m.port())
    wait_clients(addr, 1)
    pty_device.write(b"z" * 3000)
    recv_exactly(c, 3000)

    done = run_status("--url", f"http://{addr}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["PORT", "STATE", "FOR"]
    assert lines[1].split()[0:2] == ["dut", "up"] and "2.9 KiB" in lines[1]
    assert "dut: 1 client\n" in done.stdout and peer_of(c) in done.stdout

    done = run_status("--url", f"http://{addr}", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["ports"][0]["name"] == "dut" and data["ports"][0]["bytes_in"] == 3000
    assert [x["peer"] for x in data["clients"]["dut"]] == [peer_of(c)]

    cfg = write_config(
        tmp_path,
        {"ports": [{"name": "x", "upstream": {"sim": True}}], "http": {"listen": addr}},
        name="other.yaml",
    )
    done = run_status("-c", str(cfg), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["ports"][0]["name"] == "dut"
    c.close()


def test_status_errors(tmp_path: Path) -> None:
    done = run_status("--url", f"http://127.0.0.1:{free_port()}")
    # 3: no daemon answered (1 is kept for "a port is not up"; see muxd(8)).
    assert done.returncode == 3 and "cannot reach" in done.stderr
    no_http = write_config(tmp_path, {"ports": [{"name": "x", "upstream": {"sim": True}}]})
    done = run_status("-c", str(no_http))
    assert done.returncode == 2 and "http" in done.stderr
