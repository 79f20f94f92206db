"""The `muxd` command line: argument parsing only; the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from importlib import resources
from typing import Any

from muxd import __version__
from muxd import config as configmod
from muxd.config import Config
from muxd.errors import ConfigError, MuxdError

log = logging.getLogger("muxd")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muxd", description="Multi-reader serial multiplexer: one owner of the device, many readers."
    )
    parser.add_argument("--version", action="version", version=f"muxd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run in the foreground")
    run.add_argument("-c", "--config", metavar="FILE", help="configuration file (YAML)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="override log_level")
    quick = run.add_argument_group("one-port form (instead of -c)")
    src = quick.add_mutually_exclusive_group()
    src.add_argument("--serial", metavar="PATH", help="serial device path")
    src.add_argument("--upstream-tcp", metavar="HOST:PORT", help="raw TCP serial server (e.g. a USR K2)")
    src.add_argument("--sim", action="store_true", help="the built-in simulated device")
    quick.add_argument("--baud", type=int, default=115200, help="baud rate (default 115200)")
    quick.add_argument("--tcp", action="append", default=[], metavar="HOST:PORT", help="TCP listener")
    quick.add_argument("--unix", action="append", default=[], metavar="PATH", help="Unix socket listener")
    quick.add_argument("--pty", metavar="PATH", help="pty listener: symlink to publish")
    quick.add_argument("--rfc2217", metavar="HOST:PORT", help="RFC 2217 listener")
    quick.add_argument("--http", metavar="HOST:PORT", help="HTTP server: web console, /ws, /metrics, /api")
    quick.add_argument("--mode", choices=("ro", "rw"), default="ro", help="listener mode (default ro)")
    quick.add_argument("--name", default="serial0", help="port name (default serial0)")
    quick.add_argument("--max-clients", type=int, metavar="N", help="per listener (default 256)")
    quick.add_argument("--buffer", metavar="SIZE", help="per-client backlog, e.g. 1MiB (default 256KiB)")
    quick.add_argument("--overflow", choices=("drop-oldest", "disconnect"), help="when a backlog overflows")
    quick.add_argument("--write", choices=("chunks", "lines"), help="write arbitration (default chunks)")

    check = sub.add_parser("check", help="validate a configuration file and exit")
    check.add_argument("-c", "--config", metavar="FILE", required=True)

    demo = sub.add_parser("demo", help="serve the built-in demo (a simulated device)")
    demo.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    sub.add_parser("ports", help="list serial devices")

    status = sub.add_parser("status", help="ports and clients of a running muxd, from its HTTP API")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("-c", "--config", metavar="FILE", help="ask this config's first http server")
    where.add_argument("--url", help="the HTTP server's base URL, e.g. http://127.0.0.1:8020")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def quick_config(args: argparse.Namespace) -> Config:
    """The one-port form, validated by the same code as a file."""
    upstream: dict[str, Any]
    if args.serial:
        upstream = {"serial": args.serial, "baudrate": args.baud}
    elif args.upstream_tcp:
        upstream = {"tcp": args.upstream_tcp, "baudrate": args.baud}
    elif args.sim:
        upstream = {"sim": {"baudrate": args.baud}}
    else:
        raise ConfigError(
            "give -c FILE, or one of --serial, --upstream-tcp, --sim", "", None, "<command line>"
        )
    common: dict[str, Any] = {"mode": args.mode}
    for key in ("max_clients", "buffer", "overflow", "write"):
        value = getattr(args, key)
        if value is not None:
            common[key] = value
    listeners: list[dict[str, Any]] = [{"tcp": a, **common} for a in args.tcp]
    listeners += [{"unix": p, **common} for p in args.unix]
    if args.pty:
        listeners.append({"pty": args.pty, **common})
    if args.rfc2217:
        listeners.append({"rfc2217": args.rfc2217, **common})
    data: dict[str, Any] = {"ports": [{"name": args.name, "upstream": upstream, "listeners": listeners}]}
    if args.http:
        listeners.append({"websocket": True, **common})
        data["http"] = {"listen": args.http}
    if not listeners:
        raise ConfigError("give at least one listener (--tcp, --unix, ...)", "", None, "<command line>")
    return configmod.from_data(data)


def demo_config() -> Config:
    text = resources.files("muxd").joinpath("demo.yaml").read_text(encoding="utf-8")
    return configmod.loads(text, "<built-in demo>")


def describe(config: Config) -> str:
    """How to connect, for humans."""
    lines = []
    for port in config.ports:
        lines.append(f"port {port.name}: {port.upstream.describe()}")
        for lst in port.listeners:
            if lst.kind in ("tcp", "rfc2217"):
                how = f"nc {lst.host} {lst.port}" if lst.kind == "tcp" else f"rfc2217://{lst.address}"
            elif lst.kind == "unix":
                how = f"nc -U {lst.path}"
            elif lst.kind == "pty":
                how = f"picocom {lst.path}"
            else:
                how = (
                    "; ".join(f"ws://{srv.host}:{srv.port}/ws/{port.name}" for srv in config.http)
                    or "(no http)"
                )
            lines.append(f"  {lst.kind:9} {lst.mode}  {how}")
    for srv in config.http:
        lines.append(f"web console: http://{configmod.format_hostport(srv.host, srv.port)}/")
    return "\n".join(lines)


def _raise_fd_limit() -> None:
    # Each reader is an fd; the usual soft limit of 1024 is far below what a
    # fan-out daemon may need, and the hard limit is ours to take.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:  # a sandbox may forbid it; run with what we have
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)


def _serve(config: Config, level: str | None, banner: bool = False) -> int:
    from muxd import systemd as sd
    from muxd.daemon import Daemon

    sd.setup_logging(level or config.log_level)
    _raise_fd_limit()
    try:
        daemon = Daemon(config, activated=sd.listen_fds())
        daemon.log_level_override = level
        daemon.start()
    except (OSError, MuxdError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    if banner:
        print(describe(config), flush=True)
    try:
        return daemon.run()
    finally:
        daemon.close()


def _ports() -> int:
    from serial.tools import list_ports

    found = sorted(list_ports.comports(), key=lambda p: p.device)
    if not found:
        print("no serial devices found")
    for p in found:
        extra = " ".join(x for x in (p.description, p.hwid) if x and x != "n/a")
        print(f"{p.device}\t{extra}")
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from muxd import api

    url = args.url or api.status_url(configmod.load(args.config))
    try:
        status = api.fetch_status(url)
    except (OSError, ValueError) as exc:  # unreachable, an HTTP error, or not muxd's JSON
        print(f"muxd: cannot get the status from {url}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(status, indent=2) if args.json else api.format_status(status))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            cfg = configmod.load(args.config)
            print(f"{args.config}: ok ({len(cfg.ports)} ports)")
            return EXIT_OK
        if args.command == "ports":
            return _ports()
        if args.command == "status":
            return _status(args)
        if args.command == "demo":
            return _serve(demo_config(), args.log_level, banner=True)
        if args.config and (args.serial or args.upstream_tcp or args.sim):
            raise ConfigError("give either -c FILE or a one-port form, not both", "", None, "<command line>")
        cfg = configmod.load(args.config) if args.config else quick_config(args)
    except ConfigError as exc:
        print(f"muxd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return _serve(cfg, args.log_level)
