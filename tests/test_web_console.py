"""The web console in headless Chromium (Debian's package, driven by Playwright)
against a real muxd on a pty: live output, typed commands reaching the device,
pause, and the clients table. A screenshot is kept in the test's tmp dir."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import PtyDevice, StartMuxd, start_http, start_muxd, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 10_000

BOOT = (
    b"U-Boot 2024.01 (bench board)\r\n"
    b"DRAM:  2 GiB\r\n"
    b"Starting kernel ...\r\n"
    b"[    0.000000] Booting Linux on physical CPU 0x0\r\n"
    b"[    1.204518] \x1b[32mOK\x1b[0m  Reached target Multi-User System.\r\n"
    b"\r\ndut login: root (automatic login)\r\n# "
)


@pytest.fixture
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright not installed (the test extra: pip install -e '.[test]')"
    )
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed (Debian package chromium; `make test` installs it)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def terminal_has(page: Any, text: str) -> None:
    page.wait_for_function("t => window.muxdConsole.text().includes(t)", arg=text, timeout=TIMEOUT_MS)


def test_console_shows_live_output_and_sends_commands(
    browser: Any, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    pty_device.write(BOOT)  # before the page opens: it comes back as history
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"http://{addr}/")
    page.wait_for_selector("[data-testid=ws-status]:has-text('connected')", timeout=TIMEOUT_MS)
    terminal_has(page, "Reached target Multi-User System.")
    page.wait_for_selector("[data-testid=state-dut]:has-text('up')", timeout=TIMEOUT_MS)

    pty_device.write(b"[   42.000001] usb 1-1: new high-speed USB device\r\n")  # live, after open
    terminal_has(page, "usb 1-1: new high-speed USB device")

    page.fill("[data-testid=send-input]", "uname -a")
    page.press("[data-testid=send-input]", "Enter")  # CR, the console's default line ending
    assert pty_device.read(9) == b"uname -a\r"
    pty_device.write(b"uname -a\r\nLinux dut 6.1.0 #1 SMP armv7l GNU/Linux\r\n# ")
    terminal_has(page, "Linux dut 6.1.0")

    page.click("[data-testid=pause]")
    pty_device.write(b"held while paused\r\n")
    page.wait_for_selector("#pause-info:has-text('arrived')", timeout=TIMEOUT_MS)
    assert "held while paused" not in page.evaluate("window.muxdConsole.text()")
    page.click("[data-testid=pause]")
    terminal_has(page, "held while paused")

    page.wait_for_selector("#clients td:has-text('websocket:dut')", timeout=TIMEOUT_MS)
    page.wait_for_selector("[data-testid=port-dut]:has-text('out 9 B')", timeout=TIMEOUT_MS)  # from the API
    page.screenshot(path=str(tmp_path / "console.png"))
    assert (tmp_path / "console.png").stat().st_size > 10_000
    assert errors == []


def test_console_hides_input_for_a_read_only_port(
    browser: Any, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"websocket": True}])
    page = browser.new_page()
    page.goto(f"http://{addr}/")
    page.wait_for_selector("[data-testid=ws-status]:has-text('connected')", timeout=TIMEOUT_MS)
    pty_device.write(b"read-only console\r\n")
    terminal_has(page, "read-only console")
    page.wait_for_selector("[data-testid=state-dut]:has-text('up')", timeout=TIMEOUT_MS)
    assert page.is_hidden("#send-form")


def open_writable_console(browser: Any, addr: str) -> Any:
    """A page on the port, connected, and known to be writable (the terminal takes keys)."""
    page = browser.new_page(viewport={"width": 1200, "height": 760})
    page.goto(f"http://{addr}/")
    page.wait_for_selector("[data-testid=ws-status]:has-text('connected')", timeout=TIMEOUT_MS)
    page.wait_for_selector("[data-testid=line-input]", state="visible", timeout=TIMEOUT_MS)
    return page


def test_console_terminal_takes_keystrokes_like_a_terminal(
    browser: Any, muxd: StartMuxd, tmp_path: Path
) -> None:
    """Typing in the terminal itself (raw mode) reaches the simulated board, whose
    echo and answer come back into the terminal; the input line is an option."""
    # No periodic status lines: they would land inside the echoed command line.
    quiet = {"sim": {"baudrate": 115200, "status_interval": "1h"}}
    m = start_muxd(muxd, tmp_path, quiet, [{"websocket": True, "mode": "rw"}])
    page = open_writable_console(browser, m.http)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    terminal_has(page, "Type 'help' for commands.")  # the boot log, as history
    page.click("[data-testid=terminal]")
    page.keyboard.type("status")
    page.keyboard.press("Enter")
    terminal_has(page, "sim> status")  # the board's echo of each key
    terminal_has(page, "sim> status\nok counter=0")  # its answer to the command
    # Exactly the keys: one byte per letter and CR for Enter, nothing echoed locally.
    wait_for(lambda: m.port_info()["bytes_out"] == len(b"status\r"), what="7 bytes written to the board")

    page.click("[data-testid=line-input]")  # hide the input line: the terminal alone
    assert page.is_hidden("#send-form")
    page.click("[data-testid=terminal]")
    page.keyboard.type("echo raw")
    page.keyboard.press("Enter")
    terminal_has(page, "sim> echo raw\nraw")
    page.click("[data-testid=line-input]")
    page.wait_for_selector("[data-testid=send-input]", state="visible", timeout=TIMEOUT_MS)
    assert errors == []


def test_console_terminal_sends_control_keys_and_arrows(
    browser: Any, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """Ctrl-C, arrows, TAB and non-ASCII go out as a terminal encodes them."""
    _, addr = start_http(muxd, tmp_path, pty_device)
    page = open_writable_console(browser, addr)
    page.click("[data-testid=terminal]")
    page.keyboard.press("Control+c")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Tab")
    page.keyboard.type("é")
    page.keyboard.press("Enter")
    wire = b"\x03\x1b[A\t\xc3\xa9\r"
    assert pty_device.read(len(wire)) == wire


def test_console_terminal_takes_no_keys_on_a_read_only_port(
    browser: Any, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"websocket": True}])
    page = browser.new_page()
    # Count what the page sends on any WebSocket (xterm.js sends from inside the
    # key's event handler, so a key press has sent by the time press() returns).
    page.add_init_script(
        "window.sentFrames = 0; var send = WebSocket.prototype.send;"
        "WebSocket.prototype.send = function (d) { window.sentFrames++; return send.call(this, d); };"
    )
    page.goto(f"http://{addr}/")
    page.wait_for_selector("[data-testid=ws-status]:has-text('connected')", timeout=TIMEOUT_MS)
    page.wait_for_selector("[data-testid=state-dut]:has-text('up')", timeout=TIMEOUT_MS)
    assert page.is_hidden("[data-testid=line-input]")
    page.click("[data-testid=terminal]")
    page.keyboard.type("reboot")
    page.keyboard.press("Enter")
    page.keyboard.press("Control+c")
    assert page.evaluate("window.sentFrames") == 0
    assert m.metric("muxd_input_discarded_bytes_total") == 0


def test_console_shows_device_text_on_a_jsonl_websocket_listener(
    browser: Any, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """The listener's `format: jsonl` is for scripts: the console asks for the raw
    stream (?format=raw) and shows the device's text, never the JSON records."""
    _, addr = start_http(muxd, tmp_path, pty_device, listeners=[{"websocket": True, "format": "jsonl"}])
    pty_device.write(b"history line before the page\r\n")
    page = browser.new_page()
    page.goto(f"http://{addr}/")
    page.wait_for_selector("[data-testid=ws-status]:has-text('connected')", timeout=TIMEOUT_MS)
    terminal_has(page, "history line before the page")
    pty_device.write(b"live line after the page\r\n")
    # The device's CR LF as a line break: in a record it is the two escapes \r\n.
    terminal_has(page, "history line before the page\nlive line after the page")
    text = page.evaluate("window.muxdConsole.text()")
    assert '"data"' not in text and '"dir"' not in text, text
