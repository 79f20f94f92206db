"""/metrics: valid Prometheus text (promtool, and prometheus_client's own
parser), bounded labels, and values that follow the traffic."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect as ws_connect

from muxd.metrics import reason_label
from tests.helpers import (
    AUTO,
    ROOT,
    PtyDevice,
    StartMuxd,
    connect,
    recv_exactly,
    request,
    start_http,
    wait_clients,
    wait_for,
)

ALLOWED_LABELS = {"port", "listener", "trace", "state", "reason", "outcome", "signal"}
# Label-only facts (an _info gauge): fixed for the life of the process, or one
# series per port whose labels change only when the line settings do.
INFO_LABELS = {
    "muxd_build_info": {"version", "python"},
    "muxd_port_line_info": {"baudrate", "format"},
    "muxd_port_write_lock_holder_info": {"kind"},  # the holder's listener kind, never its peer
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(addr: str) -> tuple[str, Samples]:
    status, _, body = request(addr, "GET", "/metrics")
    assert status == 200
    text = body.decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; `make test` installs it)")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_metrics_lint_clean_and_follow_traffic(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    m, addr = start_http(
        muxd, tmp_path, pty_device, listeners=[{"tcp": AUTO, "mode": "rw"}, {"websocket": True}]
    )
    tcp = m.port()
    text, before = scrape(addr)
    promtool_check(text)
    tcp_l = {"port": "dut", "listener": m.names[0]}
    ws_l = {"port": "dut", "listener": "websocket:dut"}
    assert value(before, "muxd_upstream_up", port="dut") == 1
    assert value(before, "muxd_upstream_state", port="dut", state="up") == 1
    assert value(before, "muxd_upstream_state", port="dut", state="backing-off") == 0
    assert value(before, "muxd_clients", **tcp_l) == 0
    assert value(before, "muxd_client_delivered_bytes_total", **ws_l) == 0
    assert ("process_resident_memory_bytes", frozenset()) in before

    client = connect(tcp)
    with ws_connect(f"ws://{addr}/ws/dut", open_timeout=5) as browser:
        wait_clients(addr, 2)
        pty_device.write(b"x" * 5000)
        assert recv_exactly(client, 5000) == b"x" * 5000
        got = 0
        while got < 5000:
            got += len(browser.recv(timeout=5))
        client.sendall(b"cmd\n")
        assert pty_device.read(4) == b"cmd\n"
        wait_for(
            lambda: value(scrape(addr)[1], "muxd_device_written_bytes_total", port="dut") == 4, 5, "the write"
        )
        text, during = scrape(addr)
    client.close()
    promtool_check(text)
    assert value(during, "muxd_device_read_bytes_total", port="dut") == 5000
    assert value(during, "muxd_clients", **tcp_l) == 1
    assert value(during, "muxd_clients", **ws_l) == 1
    assert value(during, "muxd_client_connections_total", **tcp_l) == 1
    assert value(during, "muxd_client_delivered_bytes_total", **tcp_l) == 5000
    assert value(during, "muxd_client_delivered_bytes_total", **ws_l) == 5000
    assert value(during, "muxd_event_loop_busy_seconds_total") > value(
        before, "muxd_event_loop_busy_seconds_total"
    )

    # It sent input, so its FIN may be a half-close: muxd keeps it for the
    # half-close linger (5 s) unless output reveals the closed socket first.
    wait_for(lambda: value(scrape(addr)[1], "muxd_clients", **tcp_l) == 0, 10, "the TCP client gone")
    wait_for(lambda: value(scrape(addr)[1], "muxd_clients", **ws_l) == 0, 5, "the WebSocket gone")
    text, after = scrape(addr)
    assert value(after, "muxd_client_disconnects_total", **tcp_l, reason="peer closed") == 1
    assert value(after, "muxd_client_disconnects_total", **ws_l, reason="peer closed") == 1
    # Totals of closed clients stay: counters never go down.
    assert value(after, "muxd_client_delivered_bytes_total", **tcp_l) == 5000

    pty_device.unplug()
    wait_for(lambda: value(scrape(addr)[1], "muxd_upstream_up", port="dut") == 0, 10, "upstream down")
    text, down = scrape(addr)
    promtool_check(text)
    assert value(down, "muxd_upstream_state", port="dut", state="up") == 0
    assert sum(v for (name, _), v in down.items() if name == "muxd_upstream_disconnects_total") == 1
    pty_device.plug()
    wait_for(
        lambda: value(scrape(addr)[1], "muxd_upstream_connects_total", port="dut") == 2, 10, "reconnected"
    )
    assert value(scrape(addr)[1], "muxd_upstream_down_seconds_total", port="dut") > 0


def test_labels_are_bounded(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    _, addr = start_http(muxd, tmp_path, pty_device)
    with ws_connect(f"ws://{addr}/ws/dut", open_timeout=5), ws_connect(f"ws://{addr}/ws/dut", open_timeout=5):
        wait_clients(addr, 2)
        _, samples = scrape(addr)
    for name, labels in samples:
        assert {k for k, _ in labels} <= ALLOWED_LABELS | INFO_LABELS.get(name, set()), name
        assert not any("127.0.0.1:" in v for _, v in labels), f"{name}: a per-client label"


def test_reason_labels_drop_detail() -> None:
    assert reason_label("internal error: KeyError('x')") == "internal error"
    assert reason_label("Input/output error") == "Input/output error"


def test_only_the_metrics_module_uses_prometheus_client() -> None:
    """The data path must not call the metrics library: only muxd/metrics.py imports it."""
    users = [
        p.relative_to(ROOT) for p in (ROOT / "muxd").rglob("*.py") if "prometheus_client" in p.read_text()
    ]
    assert users == [Path("muxd/metrics.py")]


def test_documented_alert_rules_are_valid(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "http.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```yaml\n")[1:]]
    [rules] = [b for b in blocks if b.startswith("groups:")]
    for metric in ("muxd_upstream_up", "muxd_client_dropped_bytes_total"):
        assert metric in rules and metric in doc.split("## Metrics", 1)[1]
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; `make test` installs it)")
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_prometheus_client_is_imported_at_the_first_scrape_only() -> None:
    """About 12 MB of RSS: a daemon nobody scrapes never pays it."""
    code = (
        "import sys, muxd.daemon, muxd.metrics as m\n"
        "from muxd.reactor import Reactor\n"
        "reg = m.make_registry(lambda: [], Reactor())\n"
        "assert 'prometheus_client' not in sys.modules, 'imported at start'\n"
        "assert b'muxd_build_info' in m.render(reg)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
