"""Where a rack's memory goes, in process: tracemalloc around each phase.

Theory of operation. P ports are built from a generated config (hub,
upstream, line control; nothing opened), then a trace of the given format
is started on each, then SECONDS of device traffic at RATE bytes/s per port
go through ``Hub.publish`` in 20-ms chunks (what a serial read returns at
that rate) while the traces write every quarter second, as they do in the
daemon. Each phase's heap growth is printed per port, with the buffers of
port 0 and the files that allocated most. Nothing here touches a device or
a socket, so the figures are muxd's own, without the interpreter and its
imports (see ``python -X importtime`` for those).

`python -m bench.portmem [--ports 128] [--trace jsonl] [--seconds 10]`; one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

from bench.fanout import BAUD_RATE_BPS
from bench.rack import TRACE_FORMATS

_CHUNK_S = 0.02  # a serial read at 11,520 B/s: 230 bytes
_FLUSH_EVERY = 12  # chunks between trace writes: FLUSH_INTERVAL (0.25 s)


def measure(ports: int, trace: str | None, seconds: float, rate: int, work: Path) -> dict[str, Any]:
    tracemalloc.start()
    from muxd import config as configmod
    from muxd.port import PortRuntime
    from muxd.reactor import Reactor
    from muxd.trace import Trace

    entries: list[dict[str, Any]] = []
    for i in range(ports):
        entry: dict[str, Any] = {
            "name": f"b{i}",
            "upstream": {"serial": f"/dev/bench-b{i}"},
            "listeners": [{"tcp": f"127.0.0.1:{20000 + i}"}],
        }
        if trace is not None:
            entry["trace"] = [{"path": str(work / f"b{i}.{trace}"), "format": trace}]
        entries.append(entry)
    path = work / "portmem.yaml"
    path.write_text(json.dumps({"ports": entries}))
    config = configmod.load(str(path))
    reactor = Reactor()
    start = tracemalloc.take_snapshot()
    b0 = tracemalloc.get_traced_memory()[0]
    runtimes = [PortRuntime.build(port, reactor) for port in config.ports]
    b1 = tracemalloc.get_traced_memory()[0]
    traces = [Trace(spec, rt.hub, reactor) for rt in runtimes for spec in rt.config.trace]
    for t in traces:
        t.start()
    b2 = tracemalloc.get_traced_memory()[0]
    line = b"." * 63 + b"\n"
    size = int(rate * _CHUNK_S)
    chunk = (line * (size // len(line) + 1))[:size]
    for step in range(int(seconds / _CHUNK_S)):
        for rt in runtimes:
            rt.hub.publish(chunk)
        if step % _FLUSH_EVERY == 0:
            for t in traces:
                t.flush()
    b3 = tracemalloc.get_traced_memory()[0]
    hub = runtimes[0].hub
    top = tracemalloc.take_snapshot().compare_to(start, "filename")[:6]
    rings = {f: log.ring.allocated for f, log in hub.records.logs.items()}
    for t in traces:
        t.stop()
    tracemalloc.stop()
    kib = 1024 * ports
    return {
        "bench": "portmem",
        "ports": ports,
        "trace": trace,
        "seconds": seconds,
        "kib_per_port_built": round((b1 - b0) / kib, 1),
        "kib_per_port_trace_started": round((b2 - b1) / kib, 1),
        "kib_per_port_after_traffic": round((b3 - b0) / kib, 1),
        "port0_raw_ring_bytes": hub.ring.allocated,
        "port0_format_rings_bytes": rings,
        "top_files": [f"{s.traceback[0].filename}: {s.size_diff // 1024} KiB" for s in top],
    }


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.portmem", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ports", type=int, default=128)
    ap.add_argument("--trace", choices=TRACE_FORMATS, default="jsonl")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=int, default=BAUD_RATE_BPS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="muxd-portmem-") as tmp:
        trace = None if args.no_trace else args.trace
        print(json.dumps(measure(args.ports, trace, args.seconds, args.rate, Path(tmp))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
