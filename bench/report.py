"""Turn bench.fanout JSON lines into docs/benchmarks.md and PNG charts.

Theory of operation: the last record for each (target, scenario, n) wins, so
a re-run appended to the same file replaces the old figure. Each scenario gets
one table, metrics as rows and the servers side by side as columns; charts are
drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

Record = dict[str, Any]
TARGETS = ("muxd", "ser2net", "ser2tcp")
SCENARIO_ORDER = ("fanout", "flood", "trickle", "stuck", "writers", "unplug")

INTRO = {
    "fanout": "Device output at 11,520 B/s (115200 baud 8N1) in whole 64-byte frames, "
    "fanned out to N clients for the run's duration.",
    "flood": "The producer writes as fast as the pty accepts, i.e. as fast as the server "
    "reads the device. The readers are Python and share 2 cores with the server "
    "and producer: see *readers busy* before reading throughput as the server's limit.",
    "trickle": "Same rate, but the device delivers 16-byte pieces (UART-like). Latency includes "
    "the 4.2 ms a 64-byte frame takes to trickle in.",
    "stuck": "115,200 B/s to 10 clients, one of which never reads (receive buffer 4 KiB). "
    "*Longest gap* is the longest time a healthy client went without data.",
    "writers": "3 clients each write 20 lines of 200 bytes, interleaved in 50-byte pieces; "
    "the harness reads the device and counts lines that arrive intact.",
    "unplug": "10 clients at 11,520 B/s; at 3 s the pty is closed and the symlink removed, "
    "1 s later a new pty appears at the same path.",
}


def _f(value: Any, fmt: str = "{:g}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return fmt.format(value)
    return str(value)


def _lat(r: Record) -> str:
    return " / ".join(_f(r.get(k), "{:.1f}") for k in ("latency_p50_ms", "latency_p99_ms", "latency_max_ms"))


def _mib(r: Record) -> str:
    kib = r.get("server_rss_peak_kib")
    return _f(kib / 1024, "{:.0f}") if kib else "-"


def _rx(r: Record) -> str:
    return f"{_f(r.get('frames_rx_min'))} / {_f(r.get('frames_sent'))}"


def _stuck(r: Record) -> str:
    s = (r.get("stuck") or [{}])[0]
    if not s:
        return "-"
    how = f"disconnected ({s['how']})" if s.get("disconnected") else "kept"
    # Frames are made at a fixed pace, so the last one it got dates when the
    # server stopped sending to it.
    last = (s.get("last_seq", -1) + 1) * 64 / r["rate_Bps"]
    return (
        f"{how}; {s.get('bytes_received', 0) / 1e6:.2f} MB sent to it, last frame from t = {last:.1f} s, "
        f"{s.get('lost', 0)} frames skipped"
    )


Metric = tuple[str, Callable[[Record], str]]

COMMON: list[Metric] = [
    ("latency p50 / p99 / max, ms", _lat),
    ("frames received (min client) / sent", _rx),
    ("lost (sequence gaps, all clients)", lambda r: _f(r.get("lost"))),
    ("device overruns (frames the server did not read in time)", lambda r: _f(r.get("device_overruns"))),
    (
        "clients alive at end / connected",
        lambda r: f"{_f(r.get('clients_alive_end'))} / {_f(r.get('clients_connected'))}",
    ),
    ("server CPU, s", lambda r: _f(r.get("server_cpu_s"), "{:.2f}")),
    ("server peak RSS, MiB", _mib),
    (
        "machine idle before / during the run, %",
        lambda r: f"{_f(r.get('machine_idle_before_pct'))} / {_f(r.get('machine_idle_pct'))}",
    ),
    (
        "harness CPU, s (readers busy)",
        lambda r: f"{_f(r.get('harness_cpu_s'), '{:.1f}')} ({_f(r.get('readers_busy'), '{:.2f}')})",
    ),
]

METRICS: dict[str, list[Metric]] = {
    "fanout": COMMON,
    "flood": [
        ("device throughput, MB/s", lambda r: _f((r.get("rate_Bps") or 0) / 1e6, "{:.2f}")),
        *COMMON,
        ("not received by the drain deadline", lambda r: _f(r.get("not_received"))),
        ("stopped by the 2 GiB RSS guard", lambda r: _f(r.get("stopped_by_rss_guard"))),
    ],
    "trickle": COMMON,
    "stuck": [
        ("healthy: longest gap without data, ms (max)", lambda r: _f(r.get("longest_gap_ms_max"))),
        ("healthy: frames received (min client) / sent", _rx),
        ("healthy: latency p50 / p99 / max, ms", _lat),
        ("device overruns", lambda r: _f(r.get("device_overruns"))),
        ("the stuck client", _stuck),
        ("server CPU, s", lambda r: _f(r.get("server_cpu_s"), "{:.2f}")),
        ("server peak RSS, MiB", _mib),
    ],
    "writers": [
        ("lines intact / sent", lambda r: f"{_f(r.get('lines_intact'))} / {_f(r.get('lines_sent'))}"),
        (
            "bytes at the device / sent",
            lambda r: f"{_f(r.get('bytes_received'))} / {_f(r.get('bytes_sent'))}",
        ),
        ("clients alive at end", lambda r: _f(r.get("clients_alive_end"))),
    ],
    "unplug": [
        (
            "clients that kept their connection",
            lambda r: f"{_f(r.get('kept_connections'))} / {_f(r.get('clients_connected'))}",
        ),
        ("frames received (min client) / sent", _rx),
        (
            "how the others ended",
            lambda r: ", ".join(f"{k}: {v}" for k, v in (r.get("close_reasons") or {}).items()) or "-",
        ),
        ("lost (sequence gaps, all clients)", lambda r: _f(r.get("lost"))),
        ("device overruns (incl. the 1 s unplugged)", lambda r: _f(r.get("device_overruns"))),
        ("longest gap without data, ms (max)", lambda r: _f(r.get("longest_gap_ms_max"))),
        ("latency p50 / p99 / max, ms", _lat),
    ],
}


def load(paths: Iterable[Path]) -> dict[tuple[str, str, int], Record]:
    latest: dict[tuple[str, str, int], Record] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                latest[(r["target"], r["scenario"], r["n"])] = r
    return latest


def _table(scenario: str, runs: dict[tuple[str, str, int], Record], targets: list[str]) -> list[str]:
    ns = sorted({n for (_, s, n) in runs if s == scenario})
    out = ["| N | metric | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    for n in ns:
        for label, fn in METRICS[scenario]:
            cells = []
            for t in targets:
                r = runs.get((t, scenario, n))
                if r is None:
                    cells.append("not run")
                else:
                    cells.append(f"error: {r['error'][:80]}" if "error" in r else fn(r))
            out.append(f"| {n} | {label} | " + " | ".join(cells) + " |")
    return out


def _plot_vs_n(
    runs: dict[tuple[str, str, int], Record],
    targets: list[str],
    path: Path,
    *,
    ylabel: str,
    value: Callable[[Record], float | None],
    log_y: bool,
) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for t in targets:
        pts: list[tuple[int, float]] = []
        for (tt, s, n), r in runs.items():
            v = value(r) if tt == t and s == "fanout" and "error" not in r else None
            if v is not None:
                pts.append((n, v))
        pts.sort()
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("clients (N), fanout at 11,520 B/s")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_stuck(runs: dict[tuple[str, str, int], Record], targets: list[str], path: Path) -> None:
    stuck = [
        (t, r)
        for t in targets
        for (tt, s, _), r in runs.items()
        if tt == t and s == "stuck" and "timeline" in r
    ]
    if not stuck:
        return
    fig, axes = plt.subplots(len(stuck), 1, figsize=(7, 2.2 * len(stuck)), sharex=True, squeeze=False)
    for ax, (t, r) in zip(axes[:, 0], stuck, strict=True):
        step = r["timeline_ms"] / 1000
        xs = [i * step for i in range(len(r["timeline"]))]
        ax.plot(xs, [min(b) for b in r["timeline"]], label="min of 9 healthy clients")
        ax.plot(xs, [statistics.median(b) for b in r["timeline"]], label="median", linestyle="--")
        ax.set_ylabel("frames / 250 ms")
        # Zero-based, so jitter does not look like a stall.
        ax.set_ylim(0, 1.1 * max((max(b) for b in r["timeline"]), default=1))
        ax.set_title(f"{t}: one stuck reader among 10 at 115,200 B/s", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


HAND_WRITTEN = "<!-- Below: written by hand from bench.rack and bench.memory; bench.report keeps it. -->"


def write(runs: dict[tuple[str, str, int], Record], md: Path, img: Path) -> None:
    targets = [t for t in TARGETS if any(k[0] == t for k in runs)]
    img.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(img, md.parent))  # image links relative to the page
    _plot_vs_n(
        runs,
        targets,
        img / "latency_p99_vs_n.png",
        ylabel="latency p99, ms",
        value=lambda r: r.get("latency_p99_ms"),
        log_y=True,
    )
    _plot_vs_n(
        runs,
        targets,
        img / "cpu_vs_n.png",
        ylabel="server CPU, % of one core",
        value=lambda r: 100 * r["server_cpu_s"] / r["duration_s"] if r.get("duration_s") else None,
        log_y=False,
    )
    _plot_stuck(runs, targets, img / "stuck_timeline.png")
    any_r = next(iter(runs.values()))
    m = any_r["machine"]
    versions = sorted({f"{r['target']}: {r.get('version') or '?'}" for r in runs.values()})
    commands = sorted({r["command"] for r in runs.values()})
    lines = [
        "# Benchmarks: muxd, ser2net and ser2tcp",
        "",
        "Generated by `python -m bench.report` from the JSON lines of `bench/fanout.py`; "
        "do not edit by hand.",
        "See `bench/README.md` for the workload, the frame layout and every field.",
        "",
        f"- Machine: {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, run on {m['date']}",
        f"- Versions: {'; '.join(versions)}",
        *[f"- Command: `{c}`" for c in commands],
        "- The harness (producer and reader processes) shares the cores with the server; "
        "*readers busy* is the busiest reader's CPU share (near 1.0: the harness was the limit).",
        "- The machine may be shared: each run first waits (at most 15 s) for a second with the cores "
        "at least 70 % idle; the *machine idle* rows show what each run saw before and during.",
        "",
        f"![latency p99 vs N]({rel / 'latency_p99_vs_n.png'})",
        f"![server CPU vs N]({rel / 'cpu_vs_n.png'})",
        "",
    ]
    for scenario in SCENARIO_ORDER:
        if not any(s == scenario for (_, s, _) in runs):
            continue
        lines += [f"## {scenario}", "", INTRO[scenario], "", *_table(scenario, runs, targets), ""]
        if scenario == "stuck":
            lines += [f"![stuck-reader timeline]({rel / 'stuck_timeline.png'})", ""]
    # Sections written by hand from other benches (the rack, memory) follow
    # the marker and are kept as they are.
    kept = md.read_text().partition(HAND_WRITTEN)[1:] if md.exists() else ("", "")
    md.write_text("\n".join(lines) + ("\n" + "".join(kept) if kept[0] else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="+", help="JSON-lines files from bench.fanout")
    ap.add_argument("--md", type=Path, default=Path("docs/benchmarks.md"))
    ap.add_argument("--img", type=Path, default=Path("docs/img"))
    args = ap.parse_args(argv)
    runs = load(args.results)
    if not runs:
        ap.error("no records")
    write(runs, args.md, args.img)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
