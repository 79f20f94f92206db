"""Listeners at run time: POST/DELETE /api/v1/ports/NAME/listeners, ?hold=1,
GET /api/v1/ports?device=, `muxd ctl port add-listener|remove-listener`.

A real daemon on a pty ("dut", a rw TCP listener with notices and a
websocket); listeners are added to it while it runs. Readers are raw TCP
clients and a WebSocket; state is read from the JSON API. The holder of held
listeners is a real `muxd ctl port add-listener --hold` subprocess, killed by
its PID.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect as ws_connect

from muxd import apiclient
from tests import test_runtime_ports as runtime_ports
from tests.helpers import (
    AUTO,
    LOCAL,
    ROOT,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    free_port,
    muxd_cmd,
    read_to_eof,
    recv_exactly,
    request,
    run_muxd,
    split_hostport,
    wait_clients,
    wait_for,
)


def start(muxd: StartMuxd, tmp_path: Path, dev: PtyDevice) -> tuple[Muxd, str]:
    """test_runtime_ports' port "dut", with a websocket listener too."""
    listeners: list[dict[str, Any]] = [{"tcp": AUTO, "mode": "rw", "notices": True}, {"websocket": True}]
    return runtime_ports.start(muxd, tmp_path, dev, listeners)


def post(addr: str, body: Any, port: str = "dut") -> tuple[int, Any]:
    return runtime_ports.post(addr, body, f"/api/v1/ports/{port}/listeners")


def delete(addr: str, name: str, port: str = "dut") -> tuple[int, Any]:
    status, _, answer = request(addr, "DELETE", f"/api/v1/ports/{port}/listeners/{name}")
    return status, json.loads(answer)


def listeners(m: Muxd, port: str = "dut") -> dict[str, str]:
    [view] = [p for p in m.api("/api/v1/ports")["ports"] if p["name"] == port]
    return {lst["name"]: lst["address"] for lst in view["listeners"]}


def extra(name: str = "late", **opts: Any) -> dict[str, Any]:
    return {"tcp": f"{LOCAL}:0", "name": name, "notices": True, **opts}


def test_added_listener_serves_history_and_its_removal_disturbs_no_one_else(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, _ = start(muxd, tmp_path, pty_device)
    first = connect(m.port())
    wait_clients(m.http, 1)
    pty_device.write(b"before the listener\n")
    assert recv_exactly(first, 20) == b"before the listener\n"
    with ws_connect(f"ws://{m.http}/ws/dut?format=raw", open_timeout=5) as browser:
        wait_clients(m.http, 2)
        status, answer = post(m.http, extra(history="1KiB"))
        assert status == 201, answer
        assert answer["held"] is False and answer["port"] == "dut"
        [view] = answer["listeners"]
        assert view["name"] == "late" and not view["address"].endswith(":0")
        assert listeners(m)["late"] == view["address"]
        late = connect(split_hostport(view["address"])[1])
        # Its history: what the device said before the listener existed.
        assert recv_exactly(late, 20) == b"before the listener\n"
        wait_clients(m.http, 3)
        pty_device.write(b"to all three\n")
        assert recv_exactly(late, 13) == recv_exactly(first, 13) == b"to all three\n"
        assert delete(m.http, "late") == (200, {"ok": True, "removed": "late"})
        rest = read_to_eof(late)  # the notice, then FIN (read_to_eof fails on a reset)
        assert b"dut listener late removed" in rest, rest
        with pytest.raises(OSError):
            connect(split_hostport(view["address"])[1], timeout=1).close()
        assert "late" not in listeners(m)
        # The port's other clients: still there, still served.
        wait_clients(m.http, 2)
        pty_device.write(b"after\n")
        assert recv_exactly(first, 6) == b"after\n"  # with notices on, and none for it
        seen = b""
        for _ in range(50):
            if b"after\n" in seen:
                break
            message = browser.recv(timeout=5)
            seen += message if isinstance(message, bytes) else message.encode()
        assert b"to all three\nafter\n" in seen, seen
    first.close()
    late.close()


def test_bad_bodies_get_the_config_files_errors_and_clashes_409(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, _ = start(muxd, tmp_path, pty_device)
    before = listeners(m)
    status, answer = post(m.http, [extra("ok"), {"tcp": "127.0.0.1:x", "overflow": "sometimes"}])
    assert status == 400, answer
    paths = [e["path"] for e in answer["errors"]]
    assert "listeners[1].tcp" in paths and "listeners[1].overflow" in paths, answer
    assert post(m.http, b"[]")[0] == 400
    assert post(m.http, b"not json")[0] == 400
    # A name or an address in use, or a second listener of the body on a busy
    # address: 409, and the first listener of the body is not left behind.
    taken_name = post(m.http, extra(m.names[0]))
    assert taken_name[0] == 409 and "is taken" in taken_name[1]["error"], taken_name
    status, answer = post(m.http, {"tcp": m.address(0), "name": "same-address"})
    assert status == 409 and "in use" in answer["error"], answer
    busy = connect_listening()
    first = free_port()
    try:
        body = [{"tcp": f"{LOCAL}:{first}", "name": "first"}, {"tcp": f"{LOCAL}:{busy.getsockname()[1]}"}]
        status, answer = post(m.http, body)
    finally:
        busy.close()
    assert status == 409 and "address already in use" in answer["error"], answer
    with pytest.raises(OSError):
        connect(first, timeout=1).close()  # bound, then let go
    assert listeners(m) == before
    assert post(m.http, extra(), port="nosuch")[0] == 404
    # The config file's listeners are not the API's to remove.
    status, answer = delete(m.http, m.names[0])
    assert status == 409 and "config file" in answer["error"], answer
    assert delete(m.http, "nosuch")[0] == 404
    assert listeners(m) == before


def connect_listening() -> socket.socket:
    """A socket listening on a loopback port nobody else has."""
    sock = socket.socket()
    sock.bind((LOCAL, 0))
    sock.listen()
    return sock


def test_device_query_finds_the_port_that_owns_a_device(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, control = start(muxd, tmp_path, pty_device)
    link = tmp_path / "another-link"
    link.symlink_to(os.path.realpath(pty_device.path))
    for device in (pty_device.path, str(link)):  # by its real path
        [port] = m.api(f"/api/v1/ports?device={device}")["ports"]
        assert port["name"] == "dut" and port["history"] == 64 * 1024
    assert m.api("/api/v1/ports?device=/dev/null")["ports"] == []
    assert m.api("/api/v1/ports?device=not-a-device")["ports"] == []
    owner = apiclient.device_owner(control, str(link))
    assert owner is not None and owner["name"] == "dut"


def test_a_reload_keeps_added_listeners(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    m, _ = start(muxd, tmp_path, pty_device)
    status, answer = post(m.http, extra())
    assert status == 201
    late = connect(split_hostport(answer["listeners"][0]["address"])[1])
    wait_clients(m.http, 1)
    # The file now names a listener "late" too: the run-time one stays.
    ports = m.data["ports"]
    m.rewrite(
        [{**ports[0], "listeners": [*ports[0]["listeners"], {"unix": str(tmp_path / "s"), "name": "late"}]}]
    )
    m.signal(signal.SIGHUP)
    m.wait_log("reloaded")
    assert "listener late of port dut was added at run time" in m.log()
    assert not (tmp_path / "s").exists()
    # Nor a new port of the file with a listener of that name.
    new_port = {
        "name": "other",
        "upstream": {"sim": True},
        "listeners": [{"unix": str(tmp_path / "o"), "name": "late"}],
    }
    m.rewrite([*m.data["ports"], new_port])
    m.signal(signal.SIGHUP)
    wait_for(lambda: m.log().count("reloaded") == 2, 10, "the second reload")
    assert "cannot start port other: listener name 'late' is taken" in m.log()
    assert not (tmp_path / "o").exists()
    pty_device.write(b"after reload\n")
    assert recv_exactly(late, 13) == b"after reload\n"
    assert delete(m.http, "late")[0] == 200
    late.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_held_listeners_go_with_their_holder(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, sig: int
) -> None:
    m, control = start(muxd, tmp_path, pty_device)
    first = connect(m.port())
    wait_clients(m.http, 1)
    body = tmp_path / "late.yaml"
    body.write_text(json.dumps([extra("late"), extra("later")]))
    holder = subprocess.Popen(
        muxd_cmd("ctl", "--control", control, "port", "add-listener", "--hold", "dut", str(body)),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = runtime_ports.holder_line(holder)
        assert b"dut: added, held until this command ends; late 127.0.0.1:" in line, line
        address = line.split(b"late ")[1].split(b",")[0].decode()
        late = connect(split_hostport(address)[1])
        wait_clients(m.http, 2)
        assert {"late", "later"} <= set(listeners(m))
        os.kill(holder.pid, sig)
        assert holder.wait(10) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    wait_for(lambda: not {"late", "later"} & set(listeners(m)), 10, "the held listeners removed")
    assert b"dut listener late removed" in read_to_eof(late)
    pty_device.write(b"still here\n")
    assert recv_exactly(first, 11) == b"still here\n"
    late.close()
    first.close()


def test_ctl_port_add_listener_and_remove_listener(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, control = start(muxd, tmp_path, pty_device)
    body = tmp_path / "late.yaml"
    body.write_text(f"tcp: {LOCAL}:0\nname: late\n")
    added = run_muxd("ctl", "--control", control, "port", "add-listener", "dut", str(body))
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("dut: added; late 127.0.0.1:"), added.stdout
    again = run_muxd("ctl", "--url", m.http, "port", "add-listener", "dut", str(body))
    assert again.returncode == 1 and "(409)" in again.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("tcp: nope\n")
    refused = run_muxd("ctl", "--control", control, "port", "add-listener", "dut", str(bad))
    assert refused.returncode == 1 and "listeners[0].tcp:" in refused.stderr, refused.stderr
    usage = run_muxd("ctl", "--control", control, "port", "remove-listener", "dut")
    assert usage.returncode == 2 and "remove-listener takes NAME LISTENER" in usage.stderr
    removed = run_muxd("ctl", "--control", control, "port", "remove-listener", "dut", "late")
    assert (removed.returncode, removed.stdout) == (0, "dut: listener late removed\n"), removed.stderr
    assert "late" not in listeners(m)
