"""Checks of a loaded config against the machine it is to run on.

The loader (muxd.config) checks what the text alone decides, every error of
the file in one pass. What depends on the machine is checked here, on what
the loader could read (muxd.config.load_all leaves out a port, listener or
http server with an error), and every problem is reported, each located at the line of the key it concerns
(``Config.lines``) and naming its port and listener:

errors (``muxd check`` exits 2; ``muxd run`` finds the same at start)
    - the directory of a Unix socket, pty link or trace file does not exist;
    - a ``group:`` names no group on this machine;
    - a token file cannot be read, is readable by others, or holds a
      placeholder or a too-short token (muxd.access.read_token_file).

warnings (reported, exit status unchanged)
    - a rw listener reachable from the network (a non-loopback address)
      with neither TLS nor ``allow:``; for a websocket listener, through an
      HTTP server with neither;
    - ``metrics_token: true`` on an HTTP server without tokens (no effect);
    - ``overflow: block`` on a serial device without ``flow: rtscts``: when
      muxd stops reading, the UART's FIFO overruns and the loss moves there
      (a pty is spared: its writer blocks);
    - a missing directory that systemd creates when it starts the unit
      (SYSTEMD_DIRECTORIES): ``muxd check`` run before the first start would
      otherwise cry wolf.

Two machine checks are made by the loader itself (muxd.config.schema), at the
key they concern, because without them the config cannot be used at all and a
reload must refuse it: a TLS, CA or password file that cannot be read
(``file_problem``), and an ``mqtt:`` section without paho-mqtt
(``paho_problem``). They are written here, once, with the others.

Nothing here binds, connects or writes: binding is what only a start can
try, and a busy address is reported then (muxd.startup.StartError).
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
from dataclasses import dataclass

from muxd.access import AccessError, read_token_file
from muxd.config.model import Config, HttpServer, Listener, Port, SerialUpstream
from muxd.errors import ConfigError

# Made by muxd.service (RuntimeDirectory=muxd, LogsDirectory=muxd) at each start.
SYSTEMD_DIRECTORIES = ("/run/muxd", "/var/log/muxd")


@dataclass(frozen=True)
class Problems:
    errors: list[ConfigError]
    warnings: list[ConfigError]


# The MQTT bridge drives paho through the callback API of version 2.
PAHO_MIN = (2, 1)


def paho_version() -> tuple[int, ...] | None:
    """paho-mqtt's version, or None when it is not installed."""
    try:
        import paho.mqtt  # only a config with mqtt: needs it
    except ImportError:
        return None
    return tuple(int(x) for x in re.findall(r"[0-9]+", paho.mqtt.__version__)[:2])


def paho_problem() -> str | None:
    """Why the MQTT bridge cannot run here, or None."""
    version = paho_version()
    if version is not None and version >= PAHO_MIN:
        return None
    found = "it is not installed" if version is None else f"found {'.'.join(map(str, version))}"
    return (
        f"the MQTT bridge needs paho-mqtt {'.'.join(map(str, PAHO_MIN))} or later ({found}): "
        "pip install 'paho-mqtt>=2.1', or Debian's python3-paho-mqtt from trixie on"
    )


def file_problem(path: str) -> str | None:
    """Why the file `path` cannot be read by this process, or None."""
    if not os.path.isfile(path):
        return f"no such file: {path}"
    if not os.access(path, os.R_OK):
        return f"cannot read {path}: permission denied"
    return None


def group_id(group: str | int) -> int:
    """The gid of a group as the config names it (a name or a gid); KeyError
    when this machine has no group of that name."""
    return group if isinstance(group, int) else grp.getgrnam(group).gr_gid


def group_problem(group: str | int | None) -> str | None:
    """Why a configured group cannot be used here, or None (no group, or a
    known one): for the start checks and for `muxd check`."""
    if group is None:
        return None
    try:
        group_id(group)
    except KeyError:
        return f"no group {group!r} on this machine"
    return None


def is_loopback_host(host: str) -> bool:
    """Whether a listen address is loopback only ("localhost" is; a name or
    a wildcard such as 0.0.0.0 or :: is not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_pty(path: str) -> bool:
    """Whether path is (a link to) a pseudo-terminal, whose writer blocks when unread."""
    return os.path.realpath(path).startswith("/dev/pts/")


def has_tls(entry: object) -> bool:
    """Whether a listener or HTTP server has a ``tls:`` section (muxd.tls)."""
    return getattr(entry, "tls", None) is not None


def _by_line(items: list[ConfigError]) -> list[ConfigError]:
    return sorted(items, key=lambda e: (e.line is None, e.line or 0))


class _Checker:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.errors: list[ConfigError] = []
        self.warnings: list[ConfigError] = []

    def at(self, path: str, message: str) -> ConfigError:
        line = self.cfg.lines.get(path)
        return ConfigError(message, path, line, self.cfg.source)

    def _directory(self, path: str, key: str, what: str) -> None:
        parent = os.path.dirname(path) or "/"
        if os.path.isdir(parent):
            return
        if parent in SYSTEMD_DIRECTORIES:
            self.warnings.append(
                self.at(key, f"{what}: {parent} does not exist here; muxd.service creates it at start")
            )
        else:
            self.errors.append(self.at(key, f"{what}: directory {parent} does not exist"))

    def _group(self, group: str | int | None, key: str, what: str) -> None:
        problem = group_problem(group)
        if problem is not None:
            self.errors.append(self.at(key, f"{what}: {problem}"))

    def listener(self, p: int, port: str, i: int, lst: Listener) -> None:
        key = f"ports[{p}].listeners[{i}]"
        what = f"port {port}, listener {lst.name}"
        if lst.kind in ("unix", "pty"):
            self._directory(lst.path, f"{key}.{lst.kind}", what)
            self._group(lst.group, f"{key}.group", what)
        exposed = lst.kind in ("tcp", "rfc2217") and not is_loopback_host(lst.host)
        if exposed and lst.writable and not has_tls(lst) and not lst.allow:
            self.warnings.append(
                self.at(
                    f"{key}.{lst.kind}",
                    f"{what}: rw on {lst.address}, reachable from the network, with neither "
                    "tls: nor allow: (anyone who can connect can type at the device)",
                )
            )
        if lst.kind == "websocket" and lst.writable and not lst.allow:
            for srv in self.cfg.http:
                if not is_loopback_host(srv.host) and not has_tls(srv) and not srv.allow:
                    self.warnings.append(
                        self.at(
                            key,
                            f"{what}: rw through http server {srv.name} on {srv.host}, reachable from "
                            "the network, with neither tls: nor allow:",
                        )
                    )

    def block(self, p: int, port: Port) -> None:
        """overflow: block holds the device; without RTS/CTS a UART cannot be held."""
        up = port.upstream
        if not isinstance(up, SerialUpstream) or up.settings.flow == "rtscts" or is_pty(up.path):
            return
        for i, lst in enumerate(port.listeners):
            if lst.overflow == "block":
                self.warnings.append(
                    self.at(
                        f"ports[{p}].listeners[{i}].overflow",
                        f"port {port.name}, listener {lst.name}: overflow: block on serial {up.path} "
                        f"without flow: rtscts: while muxd holds the device the UART overruns, "
                        "and the loss moves there",
                    )
                )

    def http(self, k: int, srv: HttpServer) -> None:
        key = f"http[{k}]" if f"http[{k}]" in self.cfg.lines else "http"
        what = f"http server {srv.name}"
        if srv.metrics_token and not srv.tokens:
            self.warnings.append(
                self.at(f"{key}.metrics_token", f"{what}: metrics_token: true has no effect without tokens:")
            )
        for t, spec in enumerate(srv.tokens):
            try:
                read_token_file(spec.file)
            except AccessError as exc:
                self.errors.append(self.at(f"{key}.tokens[{t}].file", f"{what}, token {spec.name}: {exc}"))

    def run(self) -> Problems:
        for p, port in enumerate(self.cfg.ports):
            for i, lst in enumerate(port.listeners):
                self.listener(p, port.name, i, lst)
            self.block(p, port)
            for t, trace in enumerate(port.trace):
                what = f"port {port.name}, trace {trace.path}"
                self._directory(trace.path, f"ports[{p}].trace[{t}].path", what)
                self._group(trace.group, f"ports[{p}].trace[{t}].group", what)
        for k, srv in enumerate(self.cfg.http):
            self.http(k, srv)
        return Problems(_by_line(self.errors), _by_line(self.warnings))


def check(cfg: Config) -> Problems:
    """Every problem of ``cfg`` on this machine, errors and warnings, in line order."""
    return _Checker(cfg).run()
