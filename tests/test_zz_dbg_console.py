from tests.test_web_console import *  # noqa
from tests.test_web_console import browser  # noqa
from tests.helpers import start_muxd

def test_dbg(browser, muxd, tmp_path):
    m = start_muxd(muxd, tmp_path, {"sim": {"baudrate": 115200}}, [{"websocket": True, "mode": "rw"}])
    page = open_writable_console(browser, m.http)
    logs=[]
    page.on("console", lambda msg: logs.append(msg.text))
    terminal_has(page, "Type 'help' for commands.")
    page.click("[data-testid=terminal]")
    page.keyboard.type("status")
    page.keyboard.press("Enter")
    import time; t=time.monotonic()
    while time.monotonic()-t<2: page.wait_for_timeout(200)
    print(repr(page.evaluate("window.muxdConsole.text()")[-500:]))
    print(m.port_info())
    print(page.evaluate("document.activeElement.className"))
    print(logs)
