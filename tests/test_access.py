"""Access control with real peers: allow-lists (an outsider gets no byte) and
scoped tokens on the HTTP server, WebSocket included (muxd.access).

The outsider is a client bound to 127.0.0.2: all of 127.0.0.0/8 is loopback,
so ``allow: [127.0.0.1/32]`` has a real address to refuse without leaving the
machine.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from muxd.access import (
    AccessError,
    Tokens,
    TokenSpec,
    bearer,
    parse_network,
    permitted,
    read_token_file,
    ws_bearer,
    ws_offer,
)
from tests.helpers import (
    LOCAL,
    ROOT,
    Muxd,
    StartMuxd,
    metric,
    split_hostport,
    wait_for,
    write_config,
)

OUTSIDER = "127.0.0.2"
SECRETS = {
    "viewer": ("read", "viewer-secret-0123456789abcdef"),
    "engineer": ("write", "engineer-secret-0123456789abcd"),
    "ops": ("admin", "ops-secret-0123456789abcdefghij"),
}


# -- units ---------------------------------------------------------------------------------------


def test_allow_lists_match_ipv4_ipv6_and_mapped_peers() -> None:
    allow = (parse_network("10.0.0.0/8"), parse_network("2001:db8::/32"))
    assert permitted(allow, "10.1.2.3") and permitted(allow, ("10.1.2.3", 5000))
    assert permitted(allow, "::ffff:10.1.2.3")  # a dual-stack socket's IPv4 client
    assert permitted(allow, "2001:db8::7") and permitted(allow, "2001:db8::7%eth0")
    assert not permitted(allow, "11.0.0.1") and not permitted(allow, "::ffff:11.0.0.1")
    assert not permitted(allow, "2001:db9::1")
    assert permitted((), "192.0.2.1")  # no list: everybody
    with pytest.raises(ValueError, match="CIDR"):
        parse_network("10.0.0.1/8")  # host bits set: a typo
    assert parse_network("::1") == ipaddress.ip_network("::1/128")


def test_token_files_are_checked(tmp_path: Path) -> None:
    def token_file(text: str, mode: int = 0o600) -> str:
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        path.write_text(text)
        path.chmod(mode)
        return str(path)

    assert read_token_file(token_file("a-long-enough-secret-123\n")) == "a-long-enough-secret-123"
    for text, mode, why in (
        ("a-long-enough-secret-123", 0o644, "readable by others"),
        ("change-me-to-a-long-random-string", 0o600, "placeholder"),
        ("short", 0o600, "at least 16"),
        ("two words are not a token", 0o600, "printable ASCII"),
    ):
        with pytest.raises(AccessError, match=why):
            read_token_file(token_file(text, mode))
    with pytest.raises(AccessError, match="No such file"):
        read_token_file(str(tmp_path / "missing"))


def test_tokens_match_in_constant_time_and_never_show() -> None:
    tokens = Tokens(
        [(TokenSpec("a", "/x", "read"), "first-secret-0123456"), (TokenSpec("b", "/y", "admin"), "x" * 20)]
    )
    assert tokens.match("first-secret-0123456") == ("a", "read")
    assert tokens.match("x" * 20) == ("b", "admin")
    assert tokens.match("first-secret-012345") is None and tokens.match(None) is None
    assert "secret" not in repr(tokens)
    assert bearer("Bearer abc") == "abc" and bearer("Basic abc") is None and bearer(None) is None
    assert ws_bearer(ws_offer("any/secret+with=chars")) == "any/secret+with=chars"


# -- a muxd of our own config --------------------------------------------------------------------


def start_config(muxd: StartMuxd, tmp_path: Path, data: dict[str, Any]) -> tuple[Muxd, dict[str, str]]:
    """muxd on this config; returns it and where each listener is bound (the ready file)."""
    path = write_config(tmp_path, data)
    m = muxd("run", "-c", str(path), "--log-level", "debug", ready_file=tmp_path / "ready.json")
    m.config_path, m.data = path, data
    bound: dict[str, str] = m.wait_ready_file()["listeners"]
    return m, bound


def outsider_connect(addr: str) -> socket.socket:
    host, port = split_hostport(addr)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((OUTSIDER, 0))
    sock.settimeout(5)
    sock.connect((host, port))
    return sock


def nothing_then_eof(sock: socket.socket) -> bytes:
    """What the server sends before closing: recv until EOF (or a reset)."""
    got = b""
    try:
        for _ in range(100):  # bounded: a server that talks would fill this
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return got


def http_get(
    addr: str,
    path: str,
    headers: dict[str, str] | None = None,
    source: str | None = None,
    method: str = "GET",
) -> tuple[int, dict[str, str], bytes]:
    host, port = split_hostport(addr)
    conn = http.client.HTTPConnection(host, port, timeout=5, source_address=(source, 0) if source else None)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def sim_port(listeners: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": "dut", "upstream": {"sim": {"boot": False}}, "listeners": listeners}


def test_an_address_outside_allow_gets_no_byte(muxd: StartMuxd, tmp_path: Path) -> None:
    only_local = [f"{LOCAL}/32"]
    m, bound = start_config(
        muxd,
        tmp_path,
        {
            "ports": [
                sim_port(
                    [
                        {
                            "tcp": f"{LOCAL}:0",
                            "name": "tcp-walled",
                            "allow": list(only_local),
                            "history": 4096,
                        },
                        {"rfc2217": f"{LOCAL}:0", "name": "rfc-walled", "allow": list(only_local)},
                        {"websocket": True, "allow": list(only_local)},
                    ]
                )
            ],
            "http": [
                {"listen": f"{LOCAL}:0", "name": "open"},
                {"listen": f"{LOCAL}:0", "name": "walled", "allow": list(only_local)},
            ],
        },
    )
    api = bound["open"]
    # The insider is served: the telnet negotiation comes at once.
    host, port = split_hostport(bound["rfc-walled"])
    with socket.create_connection((host, port), timeout=5) as insider:
        assert insider.recv(100).startswith(b"\xff")
    # The outsider: no banner, no negotiation, no HTTP error: EOF.
    for name in ("tcp-walled", "rfc-walled", "walled"):
        for _ in range(3):
            sock = outsider_connect(bound[name])
            if name == "walled":
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert nothing_then_eof(sock) == b"", name
    # The websocket listener's own allow-list applies at the upgrade, with a 403.
    ws_headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    assert http_get(api, "/ws/dut", ws_headers, source=OUTSIDER)[0] == 403
    with ws_connect(f"ws://{api}/ws/dut", open_timeout=5):
        pass  # the insider
    # Counted by reason, per listener; the http server's without a port.
    wait_for(lambda: metric(api, "muxd_client_rejected_total", listener="tcp-walled", reason="address") == 3)
    assert metric(api, "muxd_client_rejected_total", listener="rfc-walled", reason="address") == 3
    assert metric(api, "muxd_client_rejected_total", listener="websocket:dut", reason="address") == 1
    assert metric(api, "muxd_client_rejected_total", listener="walled", reason="address") == 3
    assert metric(api, "muxd_client_rejected_total", listener="tcp-walled", reason="max_clients") == 0
    # One log line per peer and kind per minute, however many refusals.
    assert m.log().count("tcp-walled: 127.0.0.2") == 1, m.log()
    assert m.log().count("walled: refused 127.0.0.2") + m.log().count("walled: 127.0.0.2 refused") <= 2


# -- tokens --------------------------------------------------------------------------------------


def token_files(tmp_path: Path) -> list[dict[str, str]]:
    specs = []
    for name, (scope, secret) in SECRETS.items():
        path = tmp_path / f"{name}.token"
        path.write_text(secret + "\n")
        path.chmod(0o640)
        specs.append({"name": name, "file": str(path), "scope": scope})
    return specs


def auth(name: str | None) -> dict[str, str]:
    if name is None:
        return {}
    secret = SECRETS[name][1] if name in SECRETS else "wrong-secret-0123456789abcdef"
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def tokened(muxd: StartMuxd, tmp_path: Path) -> tuple[Muxd, str, str]:
    specs = token_files(tmp_path)
    m, bound = start_config(
        muxd,
        tmp_path,
        {
            "ports": [sim_port([{"websocket": True, "mode": "rw"}, {"tcp": f"{LOCAL}:0", "name": "tcp"}])],
            "http": [
                {"listen": f"{LOCAL}:0", "name": "web", "tokens": specs},
                {
                    "listen": f"{LOCAL}:0",
                    "name": "strict",
                    "tokens": [dict(s) for s in specs],
                    "metrics_token": True,
                },
            ],
        },
    )
    return m, bound["web"], bound["strict"]


def test_wrong_missing_and_low_scope_tokens_are_refused(tokened: tuple[Muxd, str, str]) -> None:
    _m, web, strict = tokened
    reads = ["/api/v1/ports", "/api/v1/ports/dut/clients"]
    admin = "/api/v1/ports/dut/clients/999999/disconnect"
    for path in reads:
        for who in (None, "nobody"):
            status, headers, _ = http_get(web, path, auth(who))
            assert status == 401 and headers["www-authenticate"].startswith("Bearer"), (path, who)
        for who in SECRETS:
            assert http_get(web, path, auth(who))[0] == 200, (path, who)
    # Admin: no loopback exception once tokens exist; read and write are too low.
    assert http_get(web, admin, method="POST")[0] == 401
    assert http_get(web, admin, auth("nobody"), method="POST")[0] == 401
    assert http_get(web, admin, auth("viewer"), method="POST")[0] == 403
    assert http_get(web, admin, auth("engineer"), method="POST")[0] == 403
    assert http_get(web, admin, auth("ops"), method="POST")[0] == 404  # let through: no such client
    # The console's page itself is open (it is what asks for the token).
    assert http_get(web, "/")[0] == 200
    # /metrics: open by default, a read token with metrics_token: true.
    assert http_get(web, "/metrics")[0] == 200
    assert http_get(strict, "/metrics")[0] == 401
    assert http_get(strict, "/metrics", auth("nobody"))[0] == 401
    assert http_get(strict, "/metrics", auth("viewer"))[0] == 200
    # The WebSocket: 401 without a (right) token, by header or subprotocol.
    for headers in ({}, auth("nobody")):
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(f"ws://{web}/ws/dut", additional_headers=headers, open_timeout=5)
        assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        ws_connect(f"ws://{web}/ws/dut", subprotocols=ws_offer("wrong-secret-0123456789"), open_timeout=5)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 401


def test_read_scope_websocket_is_read_only_write_scope_writes(tokened: tuple[Muxd, str, str]) -> None:
    _m, web, _ = tokened

    def written() -> float:
        return metric(web, "muxd_device_written_bytes_total", port="dut")

    def discarded() -> float:
        return metric(web, "muxd_input_discarded_bytes_total", port="dut")

    # The browser's way: the token in Sec-WebSocket-Protocol; muxd selects "muxd".
    offer = ws_offer(SECRETS["viewer"][1])
    with ws_connect(f"ws://{web}/ws/dut", subprotocols=offer, open_timeout=5) as viewer:  # type: ignore[arg-type]
        assert viewer.subprotocol == "muxd"
        viewer.send(b"reboot\r")
        wait_for(lambda: discarded() >= 7, what="the read-only input discarded")
    assert written() == 0
    with ws_connect(f"ws://{web}/ws/dut", additional_headers=auth("engineer"), open_timeout=5) as engineer:
        engineer.send(b"help\r")
        wait_for(lambda: written() >= 5, what="the write-scoped input written")
    assert discarded() == 7


def test_secrets_never_appear_in_the_log_api_or_metrics(tokened: tuple[Muxd, str, str]) -> None:
    m, web, strict = tokened
    # Wrong and right tokens, on every path, so that anything logging them would have.
    for who in (*SECRETS, "nobody"):
        for path in ("/api/v1/ports", "/api/v1/ports/dut/clients", "/metrics", "/ws/dut"):
            http_get(web, path, auth(who))
        http_get(web, "/api/v1/ports/dut/clients/1/disconnect", auth(who), method="POST")
    with ws_connect(f"ws://{web}/ws/dut", additional_headers=auth("ops"), open_timeout=5):
        pass
    shown = [
        m.log(),
        http_get(web, "/api/v1/ports", auth("ops"))[2].decode(),
        http_get(web, "/api/v1/ports/dut/clients", auth("ops"))[2].decode(),
        http_get(strict, "/metrics", auth("ops"))[2].decode(),
    ]
    json.loads(shown[1])
    for _, secret in SECRETS.values():
        for text in shown:
            assert secret not in text
    assert "wrong-secret" not in m.log()


def test_the_console_asks_for_a_token_and_passes_it_to_its_websocket(
    tokened: tuple[Muxd, str, str],
) -> None:
    from tests.test_web_console import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed")
    m, web, _ = tokened
    asked: list[str] = []

    def answer(dialog: Any) -> None:
        asked.append(dialog.message)
        dialog.accept(SECRETS["engineer"][1])

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("dialog", answer)
            page.goto(f"http://{web}/")
            page.wait_for_selector("[data-testid=ws-status]:has-text('connected')", timeout=TIMEOUT_MS)
            page.wait_for_selector("[data-testid=state-dut]:has-text('up')", timeout=TIMEOUT_MS)
        finally:
            browser.close()
    assert len(asked) == 1 and "token" in asked[0]
    assert SECRETS["engineer"][1] not in m.log()


def test_muxd_status_presents_muxd_token(tokened: tuple[Muxd, str, str]) -> None:
    _m, web, _ = tokened

    def status(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "muxd", "status", "--url", web, "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**{k: v for k, v in os.environ.items() if k != "MUXD_TOKEN"}, **env},
        )

    refused = status({})
    assert refused.returncode == 4 and "401" in refused.stderr  # unauthorised, not "no daemon" (3)
    done = status({"MUXD_TOKEN": SECRETS["viewer"][1]})
    assert done.returncode == 0, done.stderr
    assert [p["name"] for p in json.loads(done.stdout)["ports"]] == ["dut"]
