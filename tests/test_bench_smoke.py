"""Smoke run of the benchmark harness against muxd: the harness works end to
end and muxd loses nothing with 10 readers at 115200 baud.

The harness runs as a child process; it starts and stops muxd and its reader
processes by PID itself. If it outlives its deadline we SIGTERM it (its
cleanup stops its children), then SIGKILL it, by PID.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from muxd.systemd import SYSTEMD_VARS

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("muxd.cli") is None,
    reason="muxd is not importable yet (muxd/cli.py missing): nothing to benchmark",
)

COMMON = (
    "target",
    "scenario",
    "n",
    "duration_s",
    "frames_sent",
    "frames_rx_min",
    "frames_rx_median",
    "lost",
    "gaps",
    "duplicates",
    "latency_p50_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "server_cpu_s",
    "server_rss_peak_kib",
    "harness_cpu_s",
    "clients_alive_end",
)


def run_harness(scenario: str, seconds: float, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / f"{scenario}.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "bench.fanout",
        "--target",
        "muxd",
        "--scenario",
        scenario,
        "--n",
        "10",
        "--seconds",
        str(seconds),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()
        pytest.fail(f"harness did not finish {scenario} in 60 s")
    assert proc.returncode == 0, stderr.decode()
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    assert stdout.decode().strip() == lines[0]
    record: dict[str, Any] = json.loads(lines[0])
    assert "error" not in record, record["error"]
    for key in COMMON:
        assert key in record, key
    assert (record["target"], record["scenario"], record["n"]) == ("muxd", scenario, 10)
    assert record["server_exit"] == 0  # muxd stops cleanly on SIGTERM
    return record


def test_fanout_n10_loses_nothing(tmp_path: Path) -> None:
    r = run_harness("fanout", 3.0, tmp_path)
    assert r["clients_connected"] == r["clients_ready"] == r["clients_alive_end"] == 10
    assert r["frames_sent"] > 400  # 180 frames/s for 3 s, less scheduling slack
    assert r["frames_rx_min"] == r["frames_sent"]
    assert r["lost"] == r["gaps"] == r["duplicates"] == r["garbled"] == r["not_received"] == 0
    assert r["device_overruns"] == 0
    assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"] <= r["latency_max_ms"]


def test_stuck_record_is_well_formed(tmp_path: Path) -> None:
    r = run_harness("stuck", 3.0, tmp_path)
    assert r["clients_alive_end"] == 9
    assert r["timeline_ms"] == 250
    assert len(r["timeline"]) >= 12 and all(len(bucket) == 9 for bucket in r["timeline"])
    assert len(r["longest_gap_ms"]) == 9
    [stuck] = r["stuck"]
    assert {"bytes_received", "frames_received", "disconnected", "how"} <= stuck.keys()


def test_rack_runs_end_to_end_at_a_tiny_size(tmp_path: Path) -> None:
    """bench.rack with 2 boards x 1 reader x 2 s and a jsonl trace each:
    every byte taken from the devices reaches every reader, on muxd (and on
    ser2net where it is installed, in the same run)."""
    import shutil

    out = tmp_path / "rack.jsonl"
    cmd = [sys.executable, "-m", "bench.rack", "--ports", "2", "--readers", "1", "--seconds", "2"]
    cmd += ["--trace", "jsonl", "--out", str(out), "--target", "muxd"]
    if shutil.which("ser2net"):
        cmd += ["--target", "ser2net"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=15)
        pytest.fail("bench.rack did not finish in 90 s")
    assert proc.returncode == 0, stderr.decode()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["target"] for r in records] == (["muxd", "ser2net"] if shutil.which("ser2net") else ["muxd"])
    for r in records:
        assert "error" not in r, r["error"]
        assert r["connections_ready"] == r["connections_alive_end"] == 2
        assert r["taken_bytes"] > 2 * 11520  # 2 boards at 11,520 B/s for 2 s, less slack
        assert r["delivered_bytes"] == r["taken_bytes"] and r["lost_bytes"] == 0
        assert r["server_cpu_s"] > 0 and r["server_rss_peak_kib"] > 0 and r["trace_bytes"] > 0
    assert records[0]["server_exit"] == 0


# Parses `muxd run -c PATH`, then builds and starts (binds; never runs) a
# Daemon in a fresh interpreter, and prints the modules it holds. argv: the
# config's path.
_IMPORTS_AFTER_START = """
import json, sys
from muxd import config as configmod
from muxd.cli import build_parser
from muxd.daemon import Daemon
args = build_parser().parse_args(["run", "-c", sys.argv[1]])
daemon = Daemon(configmod.load(args.config))
daemon.start()
print(json.dumps(sorted(sys.modules)))
"""
# What a config without tls: and tokens: never uses, and costs RSS in every
# daemon (docs/benchmarks.md, rack, where the memory goes): libssl, hmac's
# libcrypto, importlib.resources' tempfile/zipfile/bz2/lzma, and wsproto with
# hashlib's libcrypto until a WebSocket is accepted; argparse's shutil with its
# bz2 and lzma; pyserial without a serial port; systemd-python outside systemd.
_UNUSED = (
    *("ssl", "_ssl", "hmac", "importlib.resources", "tempfile", "zipfile", "wsproto", "_hashlib"),
    *("shutil", "bz2", "lzma", "serial", "systemd"),
)


def _modules_after_start(config: dict[str, Any], tmp_path: Path) -> set[str]:
    path = tmp_path / "muxd.yaml"
    path.write_text(json.dumps(config))
    out = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER_START, str(path)],
        cwd=REPO,
        # Not under systemd: with one of its variables, muxd loads systemd-python (rightly).
        env={k: v for k, v in os.environ.items() if k not in SYSTEMD_VARS},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_the_demo_started_imports_no_tls_nor_token_code(tmp_path: Path) -> None:
    """The built-in demo (its listeners moved to free ports), started: ssl,
    hmac and importlib.resources stay out, with its HTTP front and console,
    and wsproto (hashlib, libcrypto) until a WebSocket is accepted."""
    import yaml

    demo = yaml.safe_load((REPO / "muxd" / "demo.yaml").read_text())
    for lst in demo["ports"][0]["listeners"]:
        if "tcp" in lst:
            lst["name"], lst["tcp"] = f"demo-{lst['mode']}", "127.0.0.1:0"
    demo["http"]["listen"] = "127.0.0.1:0"
    loaded = _modules_after_start(demo, tmp_path)
    assert "muxd.listeners.http" in loaded  # the front was built: the check is not vacuous
    assert loaded.isdisjoint(_UNUSED), sorted(loaded.intersection(_UNUSED))


def test_a_tcp_only_rack_imports_no_tls_nor_token_code(tmp_path: Path) -> None:
    """Two serial-less ports with TCP listeners and no http: section."""
    ports = [
        {"name": f"p{i}", "upstream": {"sim": True}, "listeners": [{"tcp": "127.0.0.1:0", "name": f"l{i}"}]}
        for i in range(2)
    ]
    loaded = _modules_after_start({"ports": ports}, tmp_path)
    assert "muxd.listeners.stream" in loaded
    assert loaded.isdisjoint(_UNUSED), sorted(loaded.intersection(_UNUSED))
