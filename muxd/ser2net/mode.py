"""ser2net mode: muxd run from a ser2net.yaml, and muxd started as ``ser2net``.

Three ways in, one path: the ser2net text is read (muxd.ser2net.reader),
converted to muxd ports as plain data (muxd.ser2net.convert), then either
printed (``muxd convert ser2net FILE``) or served (``muxd run --ser2net
FILE``; ``ser2net -c FILE`` or ``-Y ...``). Every problem of the file is
printed, one ``FILE:LINE: ...`` line each, and the exit status is 2.

Joining a daemon. Before serving standalone, the ports are offered to a
muxd daemon through its control socket (``control:`` in its config; the
packaged one has /run/muxd/control.sock, mode 0660, group muxd; MUXD_CONTROL
names another, and an empty MUXD_CONTROL means never join). Where a daemon
answers there, it takes them as run-time ports held by this process's
connection (muxd.apiclient.hold_ports): this process opens no device and
serves nothing itself, and when it ends (SIGTERM, or killed outright) the
kernel closes its connection and the daemon removes the ports. Each port
gets a read-only WebSocket listener there besides ser2net's, so the exported
board shows in the daemon's web console and /metrics. Where the daemon
already owns the device (a port of its config: the board is watched, and
its history kept, before any place is acquired), ser2net's listeners join
that port instead (POST /api/v1/ports/NAME/listeners?hold=1), each giving
its new clients the port's ``history``; the daemon's line settings stay (a
warning says where ser2net's differ). A daemon that refuses (a name or
address in use) is an error, exit 2: standalone would find the device taken
all the same. No daemon there (no socket, or a stale one): standalone,
exactly as ser2net would run.

Started under the name ``ser2net`` (a symlink, as busybox does), muxd takes
ser2net(8)'s options. labgrid's exporter is the main user: it runs ``ser2net
-v`` (one line, three words, the third the version: it checks the major
version is 4), then ``ser2net -d -n -Y 'connection: &con01#  accepter: ...'
-Y ...`` per serial resource, checks the process is alive after 0.5 s, and
stops it with SIGTERM (SIGKILL 2 s later): muxd closes its listeners at once
on SIGTERM, so the port is free again well within that.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from muxd import __version__
from muxd.ser2net import convert, reader, render

EXIT_OK, EXIT_CONFIG = 0, 2
# What `ser2net -v` prints: labgrid's exporter splits on spaces and wants
# exactly three words, the third starting with the major version it supports (4).
SER2NET_VERSION = "4.3.11"
# The control socket of the packaged muxd daemon (config/muxd.yaml), which
# ser2net mode joins when a daemon answers there; MUXD_CONTROL overrides it.
DEFAULT_CONTROL = "/run/muxd/control.sock"
# ser2net's default config files: upstream's, then Debian's.
DEFAULT_CONFIGS = ("/etc/ser2net/ser2net.yaml", "/etc/ser2net.yaml")


def join_daemon(ports: list[dict[str, Any]], prog: str) -> int | None:
    """Hand the ports to a running muxd daemon, if there is one, and hold them
    there until this process is stopped; return the exit status then. None:
    no daemon, run standalone (see the module docstring)."""
    from muxd import apiclient

    path = os.environ.get("MUXD_CONTROL", DEFAULT_CONTROL)
    if not path or not os.path.exists(path) or not apiclient.daemon_reachable(path):
        return None
    names = ", ".join(str(p.get("name")) for p in ports)
    try:
        requests, joined = _join_requests(path, ports, prog)
    except apiclient.ApiError as exc:
        print(f"{prog}: the muxd daemon at {path} did not answer: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    def ready() -> None:
        print(f"{prog}: serving {joined} through the muxd daemon at {path}", file=sys.stderr)

    try:
        return apiclient.hold_requests(path, requests, on_ready=ready)
    except apiclient.ApiError as exc:
        print(f"{prog}: the muxd daemon at {path} refused {names}: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _join_requests(path: str, ports: list[dict[str, Any]], prog: str) -> tuple[list[tuple[str, Any]], str]:
    """The held POSTs for ``ports``, and what they serve, in words. A port
    whose device the daemon already has lends it its listeners (with the
    port's history for their new clients); any other is added whole, with a
    read-only WebSocket listener, so the board shows in the daemon's web
    console (and /ws/NAME) beside the exporter's client."""
    from muxd import apiclient

    requests: list[tuple[str, Any]] = []
    said: list[str] = []
    for port in ports:
        device = str(port.get("upstream", {}).get("serial", ""))
        owner = apiclient.device_owner(path, device) if device else None
        if owner is None:
            web = {"websocket": True, "name": f"{port['name']}-web"}
            requests.append((apiclient.HOLD_PORT, {**port, "listeners": [*port["listeners"], web]}))
            said.append(str(port["name"]))
            continue
        name = str(owner["name"])
        differs = _settings_differ(port["upstream"], owner.get("line", {}))
        if differs:
            # One device, one owner: the daemon's settings stay.
            print(f"{prog}: warning: {device} is port {name} of the muxd daemon, {differs}", file=sys.stderr)
        history = owner.get("history", 0)
        listeners = [{"history": history, **lst} for lst in port["listeners"]]
        requests.append((f"{apiclient.listeners_path(name)}?hold=1", listeners))
        said.append(f"{port['name']} (on its port {name})")
    return requests, ", ".join(said)


def _settings_differ(upstream: dict[str, Any], line: dict[str, Any]) -> str:
    """Why the ser2net line settings are not the port's, in words; "" if they are."""
    wanted = f"{upstream.get('baudrate')} {upstream.get('bytesize', 8)}"
    wanted += f"{str(upstream.get('parity', 'none'))[0].upper()}{upstream.get('stopbits', 1):g}"
    wanted += f" flow {upstream.get('flow', 'none')}"
    current = f"{line.get('baudrate')} {line.get('format')} flow {line.get('flow')}"
    if wanted == current:
        return ""
    return f"at {current}; ser2net's {wanted} is not applied"


def version_line() -> str:
    return f"ser2net version {SER2NET_VERSION}+muxd{__version__}"


def converted(text: str, source: str) -> convert.Conversion:
    return convert.convert(reader.read(text, source))


def report(conversion: convert.Conversion, prog: str) -> bool:
    """Print every error and warning, in line order; True if there was no error."""
    found = [(e, "") for e in conversion.errors] + [(w, "warning: ") for w in conversion.warnings]
    for problem, kind in sorted(found, key=lambda f: f[0].line):
        print(f"{prog}: {conversion.source}:{problem.line}: {kind}{problem.message}", file=sys.stderr)
    return not conversion.errors


def _read(path: str) -> str | None:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"muxd: {path}: cannot read: {exc}", file=sys.stderr)
        return None


def convert_command(path: str) -> int:
    """`muxd convert ser2net FILE`: the muxd YAML on stdout, or exit 2."""
    text = _read(path)
    if text is None:
        return EXIT_CONFIG
    conversion = converted(text, path)
    if not report(conversion, "muxd"):
        return EXIT_CONFIG
    sys.stdout.write(render.render(conversion))
    return EXIT_OK


def serve(conversion: convert.Conversion, prog: str, level: str | None, ready_file: str | None) -> int:
    """Serve converted ports: through a running daemon if join_daemon takes them, else here."""
    from muxd import cli
    from muxd import config as configmod
    from muxd.errors import ConfigError

    if not report(conversion, prog):
        return EXIT_CONFIG
    joined = join_daemon(conversion.data, prog)
    if joined is not None:
        return joined
    try:
        # Loaded from the text `muxd convert ser2net` prints: a line a warning
        # names is that line of its output.
        cfg = configmod.loads(render.render(conversion), f"{conversion.source} (converted)")
    except ConfigError as exc:
        # A converted file muxd refuses (two connections on one TCP port, say).
        for error in configmod.each_error(exc):
            print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_CONFIG
    return cli._serve(cfg, level, ready_file)


def run_file(path: str, level: str | None, ready_file: str | None) -> int:
    """`muxd run --ser2net FILE`."""
    text = _read(path)
    if text is None:
        return EXIT_CONFIG
    return serve(converted(text, path), "muxd", level, ready_file)


# --------------------------------------------------------------------------
# muxd as `ser2net`


def yaml_option(text: str) -> str:
    """A -Y string as ser2net takes it: each ``#`` outside quotes is a new
    line, and a new line ends the string."""
    out = []
    quote = ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#":
            out.append("\n")
            continue
        out.append(ch)
    return "".join(out) + "\n"


@dataclass
class Options:
    config: str | None = None
    yaml: list[str] = field(default_factory=list)
    foreground: bool = False
    debug: bool = False
    pidfile: str | None = None
    version: bool = False


class UsageError(Exception):
    pass


_WITH_VALUE = set("cCYPtpsb")
_IGNORED = {"-u": "no uucp lock", "-b": "Cisco baud rates"}


def parse_args(argv: Sequence[str]) -> Options:
    """ser2net(8)'s options, getopt style: ``-d -n``, ``-dn``, ``-cFILE``, ``-c FILE``."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-") or arg == "-":
            raise UsageError(f"unexpected argument {arg!r}")
        letters = arg[1:]
        while letters:
            letter, letters = letters[0], letters[1:]
            value = ""
            if letter in _WITH_VALUE and letter != "b":
                if letters:
                    value, letters = letters, ""
                elif args:
                    value = args.pop(0)
                else:
                    raise UsageError(f"-{letter} needs a value")
            if letter == "c":
                opts.config = value
            elif letter == "Y":
                opts.yaml.append(yaml_option(value))
            elif letter == "C":
                raise UsageError(
                    "-C takes old-style (ser2net 3) config lines, which muxd does not read; use -Y"
                )
            elif letter == "p":
                raise UsageError(
                    "-p: ser2net's admin interface has no muxd equivalent (muxd has an HTTP API)"
                )
            elif letter in "nd":
                opts.foreground = True
                opts.debug = opts.debug or letter == "d"
            elif letter == "P":
                opts.pidfile = value
            elif letter == "v":
                opts.version = True
            elif letter in "ubts":  # no uucp locks, Cisco baud rates, threads, signature: nothing to do
                continue
            else:
                raise UsageError(f"unknown option -{letter}")
    return opts


def _config_text(opts: Options) -> tuple[str, str] | None:
    """The YAML ser2net would read, and a name for it in messages."""
    if opts.config is not None:
        text = _read(opts.config)
        if text is None:
            return None
        return text + "\n" + "".join(opts.yaml), opts.config
    if opts.yaml:
        return "".join(opts.yaml), "<-Y>"
    for path in DEFAULT_CONFIGS:
        if os.path.exists(path):
            text = _read(path)
            return (text, path) if text is not None else None
    print(f"ser2net: no config file ({' or '.join(DEFAULT_CONFIGS)}); give -c FILE or -Y", file=sys.stderr)
    return None


def _daemonize() -> None:
    """ser2net without -n/-d detaches: the parent exits 0, the child goes on in a new session."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def ser2net_main(argv: Sequence[str]) -> int:
    """muxd started as ``ser2net``."""
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"ser2net (muxd): {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if opts.version:
        print(version_line())
        return EXIT_OK
    found = _config_text(opts)
    if found is None:
        return EXIT_CONFIG
    text, source = found
    conversion = converted(text, source)
    if not report(conversion, "ser2net"):
        return EXIT_CONFIG
    if not opts.foreground:
        _daemonize()
    if opts.pidfile is not None:
        try:
            with open(opts.pidfile, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as exc:
            print(f"ser2net: cannot write the pid file: {exc}", file=sys.stderr)
            return 1
    try:
        return serve(conversion, "ser2net", "info" if opts.debug else None, None)
    finally:
        if opts.pidfile is not None:
            with contextlib.suppress(OSError):
                os.unlink(opts.pidfile)
