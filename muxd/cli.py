"""The `muxd` command line: argument parsing only; the work is elsewhere.

Exit statuses (docs/man/muxd.8): 0 success; 1 a runtime failure, or for
`status` a port that is not up; 2 a bad command line or configuration
(including a demo port already in use: the fix is an option); for `ctl`, 1
is an action refused (busy, unknown sequence, the device absent or saying
no); 3 for `status`, `tail` and `ctl`, a daemon that cannot be reached (or,
for `tail`, that refuses the port); 4 for those three, a daemon that wants a
token (or one of a higher scope); 130 interrupted (Ctrl-C); 141 standard
output closed before everything was written (`muxd tail PORT | head -3`; a
`muxd status | head -1` whose output fits the pipe has written it all: 0).

Why this module is long: every subcommand's options and its one-line
outcomes (messages, exit statuses) are the command line's contract with
scripts, kept in one place; the work itself is in the modules they call."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from muxd import __version__
from muxd.errors import ConfigError, MuxdError

if TYPE_CHECKING:
    import logging

    from muxd import config as configmod
    from muxd.apiclient import Endpoint
    from muxd.config import Config
else:

    def _lazy(name: str) -> Any:
        """The module, loaded at its first use: `muxd tail` and `status`
        with --url never load the config module, nor PyYAML with it."""
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.find_spec(name)
        loader = importlib.util.LazyLoader(spec.loader)
        spec.loader = loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loader.exec_module(module)
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, module)  # as `import` would: muxd.config works too
        return module

    configmod = _lazy("muxd.config")

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
EXIT_PORT_DOWN = 1  # `status`: some port's device is not connected
# 3 (EXIT_UNREACHABLE): `status`, `tail`, `ctl`: no muxd answered;
# 4 (EXIT_UNAUTHORISED): it answered 401 or 403 (muxd.apiclient).
# What a shell reports for a command killed by SIGINT and by SIGPIPE (128 + the
# signal): scripts and `set -o pipefail` read these as for any other tool.
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141
# How far `muxd demo`'s hint moves a busy port: clear of the usual neighbours.
DEMO_PORT_HINT_STEP = 100


def _port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {port}")
    return port


def _size(text: str) -> int:
    size = configmod.parse_size(text)
    if size is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (give bytes, or e.g. 64KiB, 1MiB)")
    return size


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"not a number of lines: {text!r}")
    return int(text)


def _help_formatter(prog: str) -> argparse.HelpFormatter:
    """argparse's own formatter, with the terminal's width found without
    shutil: argparse imports shutil for it even when no help is printed, and
    shutil its compression modules (bz2, lzma), about 1 MiB a daemon never
    uses (docs/benchmarks.md)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        try:
            columns = os.get_terminal_size(sys.stdout.fileno()).columns
        except (OSError, ValueError):
            columns = 80
    return argparse.HelpFormatter(prog, width=columns - 2)  # argparse's own margin


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser (and its subcommands') with _help_formatter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _help_formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="muxd", description="Multi-reader serial multiplexer: one owner of the device, many readers."
    )
    parser.add_argument("--version", action="version", version=f"muxd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="run in the foreground")
    run.add_argument("-c", "--config", metavar="FILE", help="configuration file (YAML)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"), help="override log_level")
    run.add_argument(
        "--ready-file",
        metavar="PATH",
        help='once every listener is bound, write {"pid": N, "listeners": {name: address}} here',
    )
    run.add_argument(
        "--ser2net", metavar="FILE", help="serve a ser2net.yaml(5) as it is (see `muxd convert`)"
    )
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
    demo.add_argument(
        "--tcp",
        type=_port_number,
        metavar="PORT",
        help="first TCP port (rw); the ro one is PORT+1 (default 7000)",
    )
    demo.add_argument("--http", type=_port_number, metavar="PORT", help="web console port (default 8020)")
    demo.add_argument("--ready-file", metavar="PATH", help="as for run")

    sub.add_parser("ports", help="list serial devices")

    convert = sub.add_parser("convert", help="print another program's config as muxd's (commented YAML)")
    convert.add_argument("source", choices=("ser2net",), help="the program: ser2net (ser2net.yaml(5))")
    convert.add_argument("file", metavar="FILE", help="its configuration file")

    reach = _reach_parser()
    reach_admin = _reach_parser(control=True)
    status = sub.add_parser(
        "status", parents=[reach_admin], help="ports and clients of a running muxd, from its HTTP API"
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")

    tail = sub.add_parser(
        "tail", parents=[reach], help="follow a port's output from a running muxd, over its WebSocket"
    )
    tail.add_argument("port", metavar="PORT", help="the port's name")
    tail.add_argument(
        "--format",
        choices=("raw", "text", "jsonl"),
        help="raw bytes, text (a UTC stamp per line) or jsonl (default: the listener's format)",
    )
    tail.add_argument(
        "--history", type=_size, metavar="SIZE", help="first replay this much of the past, e.g. 64KiB"
    )
    tail.add_argument("-n", "--lines", type=_count, metavar="N", help="first replay the last N lines")

    ctl = sub.add_parser(
        "ctl",
        parents=[reach_admin],
        help="reset a board: run a port's sequence, or set DTR/RTS/BREAK, through the HTTP API; "
        "`ctl port add|remove`: ports at run time",
        epilog="Ports at run time: muxd ctl port add [--hold] FILE|-, muxd ctl port remove NAME "
        "(muxd ctl port --help).",
    )
    ctl.add_argument("port", metavar="PORT", help="the port's name")
    ctl.add_argument("sequence", metavar="SEQUENCE", nargs="?", help="a sequence of the port, e.g. reset")
    ctl.add_argument("--dtr", type=_level, metavar="0|1", help="set DTR (1 high/asserted, 0 low)")
    ctl.add_argument("--rts", type=_level, metavar="0|1", help="set RTS (1 high/asserted, 0 low)")
    ctl.add_argument(
        "--break",
        dest="brk",
        type=_seconds,
        metavar="DURATION",
        help="send a BREAK, e.g. 250ms; done is printed once it is over",
    )
    return parser


def _reach_parser(control: bool = False) -> _Parser:
    """The options by which `status`, `tail` and `ctl` reach the daemon
    (muxd.apiclient); ``control``: its control socket too (not for `tail`,
    whose WebSocket goes to an http server)."""
    reach = _Parser(add_help=False)
    group = reach.add_argument_group("reaching the daemon")
    where = group.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "-c", "--config", metavar="FILE", help="through this config's first http server (https if it has tls)"
    )
    where.add_argument(
        "--url", help="the HTTP server: http(s)://HOST:PORT, HOST:PORT or PORT, e.g. 127.0.0.1:8020"
    )
    if control:
        where.add_argument(
            "--control",
            metavar="SOCKET",
            help="the daemon's control socket (its config's control:; no token)",
        )
    group.add_argument(
        "--cacert",
        metavar="FILE",
        help="CA certificates to check an https server against (default: the system's CAs; "
        "with -c, the server's own certificate)",
    )
    group.add_argument("--token", help="a token (default: $MUXD_TOKEN); other users can see it in ps")
    group.add_argument("--token-file", metavar="FILE", help="read the token from this file")
    return reach


PORT_ACTIONS = ("add", "remove", "add-listener", "remove-listener")


def port_parser() -> argparse.ArgumentParser:
    """`muxd ctl port add FILE|-` and `muxd ctl port remove NAME` (ports at run time)."""
    parser = _Parser(
        prog="muxd ctl port",
        parents=[_reach_parser(control=True)],
        description="Add a port to a running muxd, or remove one added so.",
    )
    parser.add_argument("action", choices=PORT_ACTIONS)
    parser.add_argument(
        "target",
        metavar="FILE|-|NAME",
        help="add: one port, YAML or JSON (- for stdin); remove, add-listener, remove-listener: its name",
    )
    parser.add_argument(
        "what",
        metavar="FILE|-|LISTENER",
        nargs="?",
        help="add-listener: one listener or a list, YAML or JSON (- for stdin); remove-listener: its name",
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="add, add-listener: keep it only while this command runs (until SIGTERM/SIGINT or kill)",
    )
    return parser


# The options of `ctl` that take a value: skipped when looking for `port add|remove`.
_CTL_VALUE_OPTIONS = {"-c", "--config", "--url", "--control", "--cacert", "--token", "--token-file"}
_CTL_VALUE_OPTIONS |= {"--dtr", "--rts", "--break"}


def _port_command(argv: list[str]) -> list[str] | None:
    """The arguments for port_parser when argv is `ctl ... port add|remove ...`,
    else None (`ctl PORT SEQUENCE`: a port named "port" can still run any
    sequence but add and remove)."""
    if not argv or argv[0] != "ctl":
        return None
    words: list[int] = []
    skip = False
    for i, arg in enumerate(argv[1:], 1):
        if skip:
            skip = False
        elif arg in _CTL_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-") or arg == "-":
            words.append(i)
    if not words or argv[words[0]] != "port":
        return None
    if (len(words) >= 2 and argv[words[1]] in PORT_ACTIONS) or (
        len(words) == 1 and {"-h", "--help"} & set(argv)
    ):
        return argv[1 : words[0]] + argv[words[0] + 1 :]
    return None


def _level(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"give 0 or 1, not {text!r}")
    return text == "1"


def _seconds(text: str) -> float:
    from muxd.config.values import parse_duration
    from muxd.sequences import MAX_BREAK

    seconds = parse_duration(text)
    if seconds is None or not 0.001 <= seconds <= MAX_BREAK:
        raise argparse.ArgumentTypeError(
            f"give a duration of 1ms..{MAX_BREAK:g}s such as 250ms, not {text!r}"
        )
    return seconds


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


def demo_config(tcp: int | None = None, http: int | None = None) -> Config:
    """The built-in demo, its TCP listeners at tcp and tcp+1 and its web
    console at http when given (to move them off ports already in use)."""
    import yaml

    # A plain path beside this module, not importlib.resources: that pulls in
    # tempfile and zipfile, memory a demo never uses (docs/benchmarks.md).
    text = (Path(__file__).parent / "demo.yaml").read_text(encoding="utf-8")
    if tcp is None and http is None:
        return configmod.loads(text, "<built-in demo>")
    data = yaml.safe_load(text)
    if tcp is not None:
        stream = [lst for lst in data["ports"][0]["listeners"] if "tcp" in lst]
        for i, (lst, mode) in enumerate(zip(stream, ("rw", "ro"), strict=False)):
            # Port 0 asks the kernel for each; the banner shows what it chose.
            lst["tcp"] = f"127.0.0.1:{tcp + i if tcp else 0}"
            if not tcp:  # two listeners on "port 0" need names of their own
                lst["name"] = f"demo-{mode}"
    if http is not None:
        data["http"]["listen"] = f"127.0.0.1:{http}"
    return configmod.from_data(data, "<built-in demo>")


def _split_hostport(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


def describe(config: Config, bound: Mapping[str, str] | None = None) -> str:
    """How to connect, for humans: at the bound addresses when known (a
    config's port 0 becomes a real port only once bound)."""
    bound = bound or {}
    web = [bound.get(srv.name, configmod.format_hostport(srv.host, srv.port)) for srv in config.http]
    lines = []
    for port in config.ports:
        lines.append(f"port {port.name}: {port.upstream.describe()}")
        for lst in port.listeners:
            address = bound.get(lst.name, lst.address)
            if lst.kind == "tcp":
                how = "nc {} {}".format(*_split_hostport(address))
            elif lst.kind == "rfc2217":
                how = f"rfc2217://{address}"
            elif lst.kind == "unix":
                how = f"nc -U {address}"
            elif lst.kind == "pty":
                how = f"picocom {address}"
            else:
                how = "; ".join(f"ws://{a}/ws/{port.name}" for a in web) or "(no http)"
            lines.append(f"  {lst.kind:9} {lst.mode}  {how}")
    lines += [f"web console: http://{a}/" for a in web]
    return "\n".join(lines)


def write_ready_file(path: str, listeners: Mapping[str, str]) -> None:
    """{"pid": N, "listeners": {name: address}}, atomically: whoever polls
    for the file sees it whole or not at all, never half written."""
    pid = os.getpid()
    tmp = f"{path}.{pid}.tmp"  # same directory, so the rename cannot cross filesystems
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"pid": pid, "listeners": dict(listeners)}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _demo_bind_error(config: Config, exc: OSError) -> str | None:
    """For a demo port in use: one line naming the listener, and the option
    that moves it. None for any other failure."""
    if exc.errno != errno.EADDRINUSE:
        return None
    address = exc.filename  # set by the bind (listeners.acceptor.bind_tcp)
    tcp = [lst for port in config.ports for lst in port.listeners if lst.kind == "tcp"]
    for lst in tcp:
        if lst.address == address:
            first = tcp[0].port
            option = f"--tcp {first + DEMO_PORT_HINT_STEP if first + 1 + DEMO_PORT_HINT_STEP <= 65535 else 0}"
            return f"muxd: demo listener {lst.name}: address already in use; try {option}"
    for srv in config.http:
        if configmod.format_hostport(srv.host, srv.port) == address:
            port = srv.port + DEMO_PORT_HINT_STEP if srv.port + DEMO_PORT_HINT_STEP <= 65535 else 0
            return f"muxd: demo listener {srv.name}: address already in use; try --http {port}"
    return None


def _log() -> logging.Logger:
    import logging  # not at the top: `muxd tail` has no use for it

    return logging.getLogger("muxd")


def _raise_fd_limit() -> None:
    import resource

    # Each reader is an fd; the usual soft limit of 1024 is far below what a
    # fan-out daemon may need, and the hard limit is ours to take.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:  # a sandbox may forbid it; run with what we have
            _log().warning("cannot raise the open-file limit from %d: %s", soft, exc)


def _serve(config: Config, level: str | None, ready_file: str | None = None, demo: bool = False) -> int:
    from muxd import checks
    from muxd import systemd as sd
    from muxd.daemon import Daemon
    from muxd.startup import StartError

    sd.setup_logging(level or config.log_level)
    log = _log()
    for warning in checks.check(config).warnings:
        log.warning("%s", warning)
    _raise_fd_limit()
    if ready_file is not None:
        # One left by a killed instance must not announce this one before it is ready.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ready_file)
    try:
        daemon = Daemon(config, activated=sd.listen_fds())
        daemon.log_level_override = level
        daemon.start()
    except (OSError, MuxdError) as exc:
        cause = exc.__cause__ if isinstance(exc, StartError) else exc
        hint = _demo_bind_error(config, cause) if demo and isinstance(cause, OSError) else None
        if hint is not None:
            print(hint, file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(exc, StartError):
            # One line naming the port, the listener and the cause; exit 2:
            # the operator must fix the config or the machine, a restart cannot.
            print(f"muxd: cannot start: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    try:
        # start() has bound every listener and sent READY=1: the same moment.
        if ready_file is not None:
            try:
                write_ready_file(ready_file, daemon.bound_addresses())
            except OSError as exc:
                log.error("cannot write the ready file: %s", exc)
                return EXIT_FAILURE
        if demo:
            print(describe(config, daemon.bound_addresses()), flush=True)
        return daemon.run()
    finally:
        daemon.close()
        if ready_file is not None:
            # A ready file outliving its process would say "ready" for a dead PID.
            with contextlib.suppress(OSError):
                os.unlink(ready_file)


def _check(path: str) -> int:
    """`muxd check`: every error of the file (each port, listener and http
    entry is read on its own: muxd.config.load_all) and every problem of what
    could be read on this machine (muxd.checks), errors and warnings, in line
    order; exit 2 if there is any error."""
    from muxd import checks

    cfg, errors = configmod.load_all(path)
    warnings: list[ConfigError] = []
    if cfg is not None:  # what could be read is checked against this machine too
        problems = checks.check(cfg)
        errors += problems.errors
        warnings = problems.warnings
    found = [(e, "") for e in errors] + [(w, "warning: ") for w in warnings]
    for problem, kind in sorted(found, key=lambda f: (f[0].line is None, f[0].line or 0)):
        print(f"muxd: {kind}{problem}", file=sys.stderr)
    if errors or cfg is None:
        return EXIT_CONFIG
    print(f"{path}: ok ({len(cfg.ports)} ports)")
    return EXIT_OK


def _ports() -> int:
    from serial.tools import list_ports

    found = sorted(list_ports.comports(), key=lambda p: p.device)
    if not found:
        print("no serial devices found")
    for p in found:
        extra = " ".join(x for x in (p.description, p.hwid) if x and x != "n/a")
        print(f"{p.device}\t{extra}")
    return EXIT_OK


def _endpoint(args: argparse.Namespace) -> Endpoint | None:
    """The daemon to ask (muxd.apiclient.endpoint); None, said on stderr, for a
    bad --url, certificate or token file. A bad config raises ConfigError."""
    from muxd import apiclient

    try:
        return apiclient.endpoint(
            args.url,
            args.config,
            cacert=args.cacert,
            token=args.token,
            token_file=args.token_file,
            control=getattr(args, "control", None),
        )
    except ValueError as exc:
        print(f"muxd: {args.command}: {exc}", file=sys.stderr)
        return None


def _failed(args: argparse.Namespace, exc: Exception) -> int:
    """One line on stderr for a failed call; its exit status (muxd.apiclient)."""
    from muxd import apiclient

    where = f" {args.port}:" if getattr(args, "port", None) else ""
    print(f"muxd: {args.command}:{where} {exc}", file=sys.stderr)
    return exc.exit_status if isinstance(exc, apiclient.ApiError) else EXIT_FAILURE


def _status(args: argparse.Namespace) -> int:
    from muxd import apiclient, client

    ep = _endpoint(args)
    if ep is None:
        return EXIT_CONFIG
    try:
        status = client.fetch_status(ep)
    except apiclient.ApiError as exc:
        return _failed(args, exc)
    # One write, newline included (print() makes two): what fits in the pipe is
    # then written before a reader such as `head -1` can go, so the exit
    # status says what the daemon said, never a race with the reader (141).
    sys.stdout.write((json.dumps(status, indent=2) if args.json else client.format_status(status)) + "\n")
    # A health check or cron job reads the answer from the status alone.
    return EXIT_PORT_DOWN if client.ports_not_up(status) else EXIT_OK


def _ctl(args: argparse.Namespace) -> int:
    """`muxd ctl PORT SEQUENCE` or `muxd ctl PORT --dtr 0 ...`: one admin POST.
    Exit 0 done (a sequence started; a BREAK over), 1 refused (busy, no such
    sequence, the device absent or saying no), 2 usage, 3 unreachable, 4 unauthorised."""
    import time

    from muxd import apiclient, client

    signals: dict[str, Any] = {
        k: v for k, v in (("dtr", args.dtr), ("rts", args.rts), ("break", args.brk)) if v is not None
    }
    if (args.sequence is None) == (not signals):
        print("muxd: ctl: give a SEQUENCE, or --dtr/--rts/--break (not both)", file=sys.stderr)
        return EXIT_CONFIG
    ep = _endpoint(args)
    if ep is None:
        return EXIT_CONFIG
    try:
        answer = client.control(ep, args.port, args.sequence, signals or None)
        if not isinstance(answer, dict):
            raise apiclient.Unreachable(f"{ep.url} is not muxd's API (its answer is not an object)")
        line = answer.get("line")
        if args.sequence:
            done = f"sequence {answer.get('sequence')} started"
        elif "break" in signals:
            # The daemon answers when the BREAK starts: "done" waits for its end.
            line = client.wait_done(ep, args.port, float(signals["break"]))
            done = "done"
        else:
            same = answer.get("unchanged") or []
            done = "done" + (f" ({', '.join(s.upper() for s in same)} already in force)" if same else "")
    except apiclient.ApiError as exc:
        return _failed(args, exc)
    print(f"{args.port}: {done}" + (f"; {client.describe_line(line, time.time())}" if line else ""))
    return EXIT_OK


def _read_port(target: str) -> dict[str, Any]:
    """One port from a file or stdin, YAML or JSON (JSON is YAML)."""
    data = _read_yaml(target, "one port, a mapping as an entry of the config file's ports:")
    if not isinstance(data, dict):
        raise ValueError(f"{target}: give one port, a mapping as an entry of the config file's ports:")
    return data


def _read_yaml(target: str, what: str) -> Any:
    """A mapping, or a list of mappings, from a file or stdin, YAML or JSON."""
    import yaml

    try:
        text = sys.stdin.read() if target == "-" else Path(target).read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {target}: {exc}") from None
    if not isinstance(data, (dict, list)):
        raise ValueError(f"{target}: give {what}")
    return data


def _port_listeners(port: Any) -> str:
    listeners = port.get("listeners", []) if isinstance(port, dict) else []
    return ", ".join(f"{lst.get('name')} {lst.get('address')}" for lst in listeners if isinstance(lst, dict))


def _ctl_port(argv: list[str]) -> int:
    """`muxd ctl port add [--hold] FILE|-`, `muxd ctl port remove NAME`. Exit 0
    done (with --hold: stopped by SIGTERM/SIGINT), 1 refused (400 with each
    error on a line, 409 a clash; --hold: the daemon went away), 2 usage,
    3 unreachable, 4 unauthorised."""
    from muxd import apiclient

    args = port_parser().parse_args(argv)
    args.command = "ctl port"
    ep = _endpoint(args)
    if ep is None:
        return EXIT_CONFIG
    if (args.what is None) != (args.action in ("add", "remove")):
        print(f"muxd: ctl port: {args.action} takes {_PORT_USAGE[args.action]}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.action.endswith("-listener"):
            return _ctl_listener(ep, args)
        if args.action == "remove":
            if args.hold:
                print("muxd: ctl port: --hold is for add", file=sys.stderr)
                return EXIT_CONFIG
            apiclient.remove_port(ep, args.target)
            print(f"{args.target}: removed")
            return EXIT_OK
        port = _read_port(args.target)
        if not args.hold:
            answer = apiclient.add_port(ep, port)
            view = answer.get("port") if isinstance(answer, dict) else None
            name = view.get("name") if isinstance(view, dict) else port.get("name")
            print(f"{name}: added; {_port_listeners(view)}")
            return EXIT_OK

        def ready(answers: list[Any]) -> None:
            for answer in answers:
                view = answer.get("port") if isinstance(answer, dict) else None
                name = view.get("name") if isinstance(view, dict) else port.get("name")
                print(f"{name}: added, held until this command ends; {_port_listeners(view)}", flush=True)

        if apiclient.hold(ep, [port], ready) != EXIT_OK:
            print("muxd: ctl port: the daemon closed the connection; the port is gone", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    except ValueError as exc:
        print(f"muxd: ctl port: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except apiclient.ApiError as exc:
        details = getattr(exc, "details", [])
        if details:  # a 400: every error of the port, as `muxd check` says them
            print(f"muxd: ctl port: refused ({getattr(exc, 'status', 400)}):", file=sys.stderr)
        for line in details or [str(exc)]:
            print(f"muxd: ctl port: {line}", file=sys.stderr)
        return exc.exit_status


_PORT_USAGE = {
    "add": "FILE|-",
    "remove": "NAME",
    "add-listener": "NAME FILE|-",
    "remove-listener": "NAME LISTENER",
}


def _ctl_listener(ep: Any, args: argparse.Namespace) -> int:
    """`ctl port add-listener NAME FILE|- [--hold]`, `ctl port remove-listener NAME LISTENER`."""
    from muxd import apiclient

    if args.action == "remove-listener":
        if args.hold:
            print("muxd: ctl port: --hold is for add and add-listener", file=sys.stderr)
            return EXIT_CONFIG
        apiclient.remove_listener(ep, args.target, args.what)
        print(f"{args.target}: listener {args.what} removed")
        return EXIT_OK
    listeners = _read_yaml(args.what, "a listener, a mapping as an entry of a port's listeners:, or a list")
    if not args.hold:
        answer = apiclient.add_listeners(ep, args.target, listeners)
        print(f"{args.target}: added; {_port_listeners(answer)}")
        return EXIT_OK

    def ready(answers: list[Any]) -> None:
        for answer in answers:
            print(
                f"{args.target}: added, held until this command ends; {_port_listeners(answer)}", flush=True
            )

    path = f"{apiclient.listeners_path(args.target)}?hold=1"
    if apiclient.hold_all(ep, [(path, listeners)], ready) != EXIT_OK:
        print("muxd: ctl port: the daemon closed the connection; the listeners are gone", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _tail(args: argparse.Namespace) -> int:
    from muxd import apiclient, tail

    ep = _endpoint(args)
    if ep is None:
        return EXIT_CONFIG
    try:
        where = tail.target(ep, args.port, args.format, args.history, args.lines)
    except ValueError as exc:
        print(f"muxd: tail: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # Bytes as they come, never re-encoded: the device's output is not always text.
    out = sys.stdout.buffer
    try:
        out_fd: int | None = out.fileno()
    except (OSError, ValueError):  # not a file descriptor (a test's capture): nothing to watch
        out_fd = None
    try:
        ending = tail.follow(where, out, out_fd)
    except tail.Lost as exc:
        print(f"muxd: tail: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except apiclient.ApiError as exc:  # Unreachable (3), Unauthorised (4)
        print(f"muxd: tail: {exc}", file=sys.stderr)
        return exc.exit_status
    if ending is not None:  # an overflow or admin disconnect, say: worth a line
        why = " ".join(str(x) for x in (int(ending.code), ending.reason) if x)
        print(f"muxd: tail: closed by the server ({why})", file=sys.stderr)
    return EXIT_OK


def _discard_stdout() -> None:
    # Python flushes stdout again at exit; pointing the fd at /dev/null keeps
    # that flush from printing "Exception ignored ... BrokenPipeError".
    # (The recipe of the signal module's docs, "Note on SIGPIPE".)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Every subcommand: quiet on a closed pipe and on Ctrl-C, with the shell's
    statuses for them (141, 130) rather than a traceback. Started under the
    name ``ser2net`` (a symlink), it takes ser2net's options (muxd.ser2net.mode)."""
    if argv is None and os.path.basename(sys.argv[0]) == "ser2net":
        from muxd.ser2net import mode

        return mode.ser2net_main(sys.argv[1:])
    try:
        try:
            code = _main(argv)
        except SystemExit as exc:  # argparse's --help, --version and usage errors
            if exc.code is not None and not isinstance(exc.code, int):
                raise
            code = exc.code or EXIT_OK
        # Output still buffered must meet a closed pipe here, where it is
        # caught, and not in the interpreter's last flush.
        sys.stdout.flush()
    except BrokenPipeError:
        _discard_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        # Once the daemon runs, SIGINT is its graceful stop (status 0); this
        # is Ctrl-C anywhere else, such as a `status` waiting on a slow daemon.
        return EXIT_INTERRUPTED
    return code


def _main(argv: list[str] | None) -> int:
    port_argv = _port_command(sys.argv[1:] if argv is None else argv)
    if port_argv is not None:
        return _ctl_port(port_argv)
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args.config)
        if args.command == "ports":
            return _ports()
        if args.command == "convert":
            from muxd.ser2net import mode

            return mode.convert_command(args.file)
        if args.command == "status":
            return _status(args)
        if args.command == "tail":
            return _tail(args)
        if args.command == "ctl":
            return _ctl(args)
        if args.command == "demo":
            return _serve(demo_config(args.tcp, args.http), args.log_level, args.ready_file, demo=True)
        if args.ser2net:
            if args.config or args.serial or args.upstream_tcp or args.sim:
                raise ConfigError(
                    "give --ser2net FILE alone, not with -c or a one-port form", "", None, "<command line>"
                )
            from muxd.ser2net import mode

            return mode.run_file(args.ser2net, args.log_level, args.ready_file)
        if args.config and (args.serial or args.upstream_tcp or args.sim):
            raise ConfigError("give either -c FILE or a one-port form, not both", "", None, "<command line>")
        cfg = configmod.load(args.config) if args.config else quick_config(args)
    except ConfigError as exc:
        for error in configmod.each_error(exc):  # every error of the file, in line order
            print(f"muxd: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return _serve(cfg, args.log_level, args.ready_file)
