"""What each import costs in RSS, and what a running daemon peaks at.

Theory of operation. ``--imports``: a fresh interpreter (one per run, so
nothing is shared) imports the given modules in order and reads VmRSS from
/proc/self/status before and after each; a module's figure is what it adds
over the ones before it, shared libraries (libssl, libcrypto) included,
which tracemalloc does not see. The modules each import brought in are
listed too (a ``sys.modules`` diff), so a surprise like libcrypto through
``importlib.resources`` has a name. ``--demo``: starts ``muxd demo`` on free
ports, waits for its ready file (it serves from then on), lets it settle,
fetches the web console's page (and with ``--websocket`` opens a WebSocket
reader, as the page does in a browser) and reads its VmHWM and VmRSS.

`python -m bench.importmem [--imports MOD ...] [--demo]`; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

# What `muxd run` imports, broken at the big libraries, then the daemon.
DEFAULT_IMPORTS = ["yaml", "ssl", "hashlib", "h11", "wsproto", "importlib.resources", "muxd.daemon"]
_READY_S = 20.0  # a loaded 2-core machine starts muxd in ~1 s; ample
_SETTLE_S = 1.0
_PORT_TRIES = 50  # the demo's simulated board ticks every second

_CHILD = r"""
import json, sys
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)
rows = [{"module": "(interpreter)", "rss_kib": kib("VmRSS"), "added_kib": 0, "new": []}]
for name in sys.argv[1:]:
    before, seen = kib("VmRSS"), set(sys.modules)
    __import__(name)
    new = sorted(m for m in sys.modules if m not in seen and "." not in m)
    rows.append({"module": name, "rss_kib": kib("VmRSS"), "added_kib": kib("VmRSS") - before, "new": new})
print(json.dumps(rows))
"""


def imports(modules: list[str]) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-c", _CHILD, *modules], check=True, capture_output=True, text=True)
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def _free_port(span: int = 1) -> int:
    """A port p with p .. p+span-1 free now (the demo's TCP listeners are two)."""
    for _ in range(_PORT_TRIES):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        try:
            for i in range(span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + i))
        except OSError:
            continue
        return port
    raise SystemExit("no free ports")


def _status(pid: int) -> dict[str, int]:
    got: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            got[key] = int(value.split()[0])
    return got


def _libraries(pid: int) -> list[str]:
    """The shared objects mapped (extension modules, libssl, libcrypto): what
    a running process imported that costs most, without asking it."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1]
        if ".so" in path:
            names.add(Path(path).name.split(".")[0])
    return sorted(names)


def demo(websocket: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        ready = Path(work) / "ready"
        tcp, http = _free_port(2), _free_port()
        cmd = [sys.executable, "-m", "muxd", "demo", "--tcp", str(tcp), "--http", str(http)]
        proc = subprocess.Popen([*cmd, "--ready-file", str(ready)], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + _READY_S
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"muxd demo did not get ready (rc {proc.returncode})")
                time.sleep(0.05)
            time.sleep(_SETTLE_S)
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/", timeout=5) as resp:
                page = len(resp.read())
            if websocket:  # as the console page does: a WebSocket reader of the demo port
                from websockets.sync.client import connect

                with connect(f"ws://127.0.0.1:{http}/ws/demo", open_timeout=5) as ws:
                    ws.recv(timeout=5)
                    time.sleep(_SETTLE_S)
                    mem = _status(proc.pid)
            time.sleep(_SETTLE_S)
            mem = _status(proc.pid)  # VmHWM: the WebSocket's peak stays in it
            libs = _libraries(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
    return {
        "demo_hwm_mib": round(mem["VmHWM"] / 1024, 1),
        "demo_rss_mib": round(mem["VmRSS"] / 1024, 1),
        "page_bytes": page,
        "websocket": websocket,
        "libraries": libs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = " ".join(DEFAULT_IMPORTS)
    ap.add_argument("--imports", nargs="*", metavar="MOD", help=f"modules in order (default {default})")
    ap.add_argument("--demo", action="store_true", help="peak RSS of `muxd demo`, serving")
    ap.add_argument("--websocket", action="store_true", help="--demo with a WebSocket reader, as the console")
    ap.add_argument("--table", action="store_true", help="--imports as a table, not JSON")
    args = ap.parse_args()
    if args.table and not args.demo:
        for row in imports(args.imports or DEFAULT_IMPORTS):
            rss, added, new = row["rss_kib"] / 1024, row["added_kib"] / 1024, " ".join(row["new"])
            print(f"{row['module']:24} {rss:6.1f} MiB  +{added:4.1f}  {new}")
        return
    result: dict[str, Any] = {"python": sys.version.split()[0], "pid": os.getpid()}
    if args.demo:
        result.update(demo(args.websocket))
    else:
        result["imports"] = imports(args.imports or DEFAULT_IMPORTS)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
