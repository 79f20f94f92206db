"""One client for a running muxd's HTTP API: where it is, how to speak to it, who asks.

`muxd status`, `muxd tail` and `muxd ctl` all reach the daemon through an
``Endpoint`` made here, so they find it, trust it and present a token alike:

Where
    ``--url`` (a URL, HOST:PORT or a bare PORT), or the first http server of
    the config given with ``-c`` (a wildcard bind is reached on loopback), or
    ``--control SOCKET``, the daemon's control socket (muxd.control): being
    able to open it is the admin right, so no token is sent there.
How
    ``https://`` when the URL says so or the config's server has ``tls:``.
    The certificate is checked against ``--cacert FILE`` when given. Without
    it, a server found in the config is trusted by its own certificate, the
    first one of its ``tls: cert`` file (the operator's file on this host):
    that exact certificate is pinned, so the host name it was issued for need
    not be the loopback address it is reached on. A ``--url`` without
    ``--cacert`` is checked against the system's CAs and its host name.
Who
    ``--token``, ``--token-file FILE`` or ``$MUXD_TOKEN``, in that order, sent
    as ``Authorization: Bearer``. A token file is checked as the daemon checks
    its own (muxd.access.read_token_file); the environment keeps the secret
    out of the process list, which ``--token`` does not.

Outcomes are exceptions with the exit status the command line gives them:
``Unreachable`` (3: nothing answered, or not muxd's API, or its certificate
is not trusted), ``Unauthorised`` (4: 401 or 403, with a hint on how to pass a
token) and ``Refused`` (1: muxd answered the request with another error).

Ports at run time. ``add_port`` and ``remove_port`` are POST
/api/v1/ports and DELETE /api/v1/ports/NAME (admin). ``hold`` adds ports
with ``?hold=1`` on one connection and keeps that connection open: the
daemon removes them when it closes, which is when this process ends, however
it ends (a SIGKILL closes the socket too). For the ser2net mode:

``hold_ports(control_path, ports, *, on_ready=None) -> int``
    adds each port (a dict in the config file's shape) through the control
    socket, calls ``on_ready()``, then blocks until SIGTERM or SIGINT (returns
    0: the ports go as the connection closes) or until the daemon closes the
    connection (returns 1: it stopped, or its control socket changed). A port
    refused raises ApiError (Refused: 400 with every error in ``details``,
    409 for a clash) and the ports added before it go with the connection.
``hold_requests(control_path, requests, *, on_ready=None) -> int``
    the same for any POSTs with ``?hold=1`` (path, body): ports, and
    listeners added to a port the daemon has (POST /api/v1/ports/NAME/listeners),
    all on one connection, so the process's end removes everything.
``device_owner(control_path, device) -> dict | None``
    the view of the port that owns a device (GET /api/v1/ports?device=), if any.
``daemon_reachable(control_path) -> bool``
    whether a muxd answers on that control socket.

A port removed with DELETE while held stays removed; the holder is not told.

Why this module is long: where, how and who, the errors and holding a
connection are one client, shared by every command that asks the daemon.

This module stays light: `muxd tail` imports it, and the config module (and
PyYAML with it) is imported only when ``-c`` is given. Every call, to an
http(s) server or the control socket, is one http.client exchange
(``exchange``): one way to send, and one reading of the answers and errors.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import signal
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 3
EXIT_UNAUTHORISED = 4

# The API is served from memory: a daemon slower than this to answer is stuck.
TIMEOUT = 5.0
# Characters kept of an error body for a one-line message: muxd's are a
# sentence; anything longer is not meant for a terminal.
MAX_REASON = 200

TOKEN_HINT = "pass --token, --token-file or MUXD_TOKEN"


class ApiError(Exception):
    """A failed call; ``exit_status`` is what the command line exits with."""

    exit_status = EXIT_REFUSED


class Unreachable(ApiError):
    """No muxd answered: refused, timed out, an untrusted certificate, or not muxd's API."""

    exit_status = EXIT_UNREACHABLE


class Unauthorised(ApiError):
    """muxd wants a token (401), or a token of a higher scope (403)."""

    exit_status = EXIT_UNAUTHORISED

    def __init__(self, status: int, reason: str) -> None:
        hint = TOKEN_HINT if status == 401 else f"{TOKEN_HINT} with a token of that scope"
        super().__init__(f"unauthorised ({status}: {reason}); {hint}")
        self.status = status


class Refused(ApiError):
    """muxd answered with an error: its ``status`` and its ``error`` text."""

    def __init__(self, status: int, message: str, details: list[str] | None = None) -> None:
        super().__init__(f"{message} ({status})")
        self.status = status
        self.message = message
        self.details = details or []  # a 400's errors, one per key path (POST /api/v1/ports)


def refusal(status: int, reason: str) -> ApiError:
    """The exception for an HTTP error answer."""
    return Unauthorised(status, reason) if status in (401, 403) else Refused(status, reason)


@dataclass(frozen=True)
class Endpoint:
    """A daemon's HTTP server: its base URL, the TLS context for https, the
    token; or its control socket (``socket_path``, with a nominal URL)."""

    url: str
    context: ssl.SSLContext | None = None
    token: str | None = None
    socket_path: str | None = field(default=None)

    @property
    def where(self) -> str:
        return self.socket_path or self.url

    @property
    def parts(self) -> urllib.parse.SplitResult:
        return urllib.parse.urlsplit(self.url)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


def normalize_url(text: str) -> str:
    """`--url` as an operator types it: a full http(s) URL, HOST:PORT,
    [V6]:PORT, or a bare PORT (on 127.0.0.1, as a bare listener port binds).

    Raises ValueError for anything else, naming what was given.
    """
    url = text.strip()
    if "://" not in url:
        # urlsplit would read "host:8020" as a scheme and a path.
        url = f"http://127.0.0.1:{url}" if url.isdigit() else f"http://{url}"
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # a port that is not a number raises here
    except ValueError as exc:
        raise ValueError(f"not a URL or HOST:PORT: {text!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL or HOST:PORT: {text!r}")
    if port is None and "://" not in text:
        raise ValueError(f"{text!r} has no port: give HOST:PORT, e.g. 127.0.0.1:8020")
    return url


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """Checks the server against ``cafile`` (or the system's CAs) and its host name."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # as the server (muxd.tls)
    return ctx


def pinned_context(cert_file: str) -> ssl.SSLContext:
    """Trusts exactly the first certificate of ``cert_file`` (a server's own
    ``tls: cert``), whatever name it was issued for: it is pinned, so the
    name check adds nothing, and a lab's server is often reached on loopback
    with a certificate for its LAN name. Raises OSError or ValueError."""
    with open(cert_file, encoding="ascii", errors="replace") as f:
        text = f.read()
    end = "-----END CERTIFICATE-----"
    start = text.find("-----BEGIN CERTIFICATE-----")
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ValueError(f"{cert_file}: no PEM certificate in it")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    # Only the leaf, never the intermediates the file may carry: trusting one
    # of those without a name check would accept any certificate it issued.
    ctx.load_verify_locations(cadata=text[start : stop + len(end)])
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a leaf is its own anchor
    return ctx


def find_token(token: str | None, token_file: str | None) -> str | None:
    """--token, else --token-file's secret, else $MUXD_TOKEN; None for none.
    Raises ValueError for a token file that is unreadable or not a token file."""
    if token:
        return token
    if token_file:
        from muxd.access import AccessError, read_token_file

        try:
            return read_token_file(token_file)
        except AccessError as exc:
            raise ValueError(str(exc)) from None
    return os.environ.get("MUXD_TOKEN") or None


def endpoint(
    url: str | None,
    config_path: str | None,
    *,
    cacert: str | None = None,
    token: str | None = None,
    token_file: str | None = None,
    control: str | None = None,
) -> Endpoint:
    """The daemon to ask, from --url, -c FILE or --control SOCKET (see the module docstring).

    Raises ValueError for a bad --url, token file or certificate file, and
    muxd.errors.ConfigError for a config that cannot be read or has no http server.
    """
    if control is not None:
        return control_endpoint(control)
    secret = find_token(token, token_file)
    context: ssl.SSLContext | None = None
    try:
        if url is not None:
            base = normalize_url(url)
            if base.startswith("https:"):
                context = client_context(cacert)
        else:
            assert config_path is not None, "give a URL or a config"
            base, server_cert = _from_config(config_path)
            if server_cert is not None:
                context = client_context(cacert) if cacert else pinned_context(server_cert)
    except (OSError, ssl.SSLError) as exc:  # a --cacert or tls: cert that cannot be read
        raise ValueError(f"cannot use the certificate: {exc}") from None
    return Endpoint(base, context, secret)


def control_endpoint(path: str) -> Endpoint:
    """The daemon's control socket: no token (the socket's mode is the right)."""
    return Endpoint("http://localhost", socket_path=path)


def _from_config(path: str) -> tuple[str, str | None]:
    """The base URL of the config's first http server as reached from this
    host, and its certificate file when it speaks TLS."""
    from muxd import config as configmod
    from muxd.errors import ConfigError

    cfg = configmod.load(path)
    if not cfg.http:
        raise ConfigError("no http server to reach the daemon through", "http", None, cfg.source)
    srv = cfg.http[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(srv.host, srv.host)  # a wildcard bind: loopback
    scheme = "https" if srv.tls is not None else "http"
    return f"{scheme}://{configmod.format_hostport(host, srv.port)}", srv.tls.cert if srv.tls else None


class _UnixConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (the control socket)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def connection(ep: Endpoint, timeout: float = TIMEOUT) -> http.client.HTTPConnection:
    """One persistent connection to the daemon (not yet connected)."""
    if ep.socket_path is not None:
        return _UnixConnection(ep.socket_path, timeout)
    parts = ep.parts
    if parts.scheme == "https":
        ctx = ep.context or client_context()
        return http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout, context=ctx)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


def exchange(conn: http.client.HTTPConnection, ep: Endpoint, method: str, path: str, body: Any = None) -> Any:
    """One request on ``conn`` and its JSON answer; raises as get() does."""
    headers = ep.headers()
    data = None
    if body is not None or method == "POST":
        data = json.dumps(body if body is not None else {}).encode()
        headers["content-type"] = "application/json"
    try:
        conn.request(method, ep.parts.path.rstrip("/") + path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(f"cannot reach {ep.where}: {exc}") from None
    try:
        answer = json.loads(raw)
    except ValueError:  # not JSON: not muxd's answer
        if resp.status >= 400:
            raise refusal(resp.status, resp.reason) from None
        raise Unreachable(f"{ep.where} is not muxd's API") from None
    if resp.status >= 400:
        if not isinstance(answer, dict):
            raise refusal(resp.status, resp.reason)
        message = str(answer.get("error", resp.reason))[:MAX_REASON]
        errors = answer.get("errors")
        if resp.status in (401, 403):
            raise Unauthorised(resp.status, message)
        details = [f"{e.get('path')}: {e.get('message')}" for e in errors] if isinstance(errors, list) else []
        raise Refused(resp.status, message, details)
    return answer


def _call(ep: Endpoint, path: str, body: dict[str, Any] | None = None, method: str = "GET") -> Any:
    """One request on a connection of its own (TCP, TLS or the control socket)."""
    conn = connection(ep)
    try:
        return exchange(conn, ep, method, path, body)
    finally:
        conn.close()


def get(ep: Endpoint, path: str) -> Any:
    """GET path's JSON; raises Unreachable, Unauthorised or Refused."""
    return _call(ep, path)


def post(ep: Endpoint, path: str, body: dict[str, Any] | None = None) -> Any:
    """POST JSON to path; the answer's JSON. Raises as get() does."""
    return _call(ep, path, body, "POST")


def quote(name: str) -> str:
    """A port or sequence name as one path segment."""
    return urllib.parse.quote(name, safe="")


# -- ports at run time ---------------------------------------------------------------------------


def add_port(ep: Endpoint, port: dict[str, Any]) -> Any:
    """POST /api/v1/ports: the answer, with the port's view ("port"). Raises as get() does."""
    return _call(ep, "/api/v1/ports", port, "POST")


def remove_port(ep: Endpoint, name: str) -> Any:
    """DELETE /api/v1/ports/NAME. Raises as get() does."""
    return _call(ep, f"/api/v1/ports/{quote(name)}", method="DELETE")


def add_listeners(ep: Endpoint, port: str, listeners: Any) -> Any:
    """POST /api/v1/ports/NAME/listeners (one listener or a list). Raises as get() does."""
    return _call(ep, listeners_path(port), listeners, "POST")


def remove_listener(ep: Endpoint, port: str, name: str) -> Any:
    """DELETE /api/v1/ports/NAME/listeners/LISTENER. Raises as get() does."""
    return _call(ep, f"{listeners_path(port)}/{quote(name)}", method="DELETE")


def listeners_path(port: str) -> str:
    return f"/api/v1/ports/{quote(port)}/listeners"


HOLD_PORT = "/api/v1/ports?hold=1"


def hold(
    ep: Endpoint,
    ports: list[dict[str, Any]],
    on_ready: Callable[[list[Any]], None] | None = None,
) -> int:
    """Add ``ports`` with ?hold=1 on one connection and keep it open until
    SIGTERM/SIGINT (0) or the daemon closes it (1); see the module docstring.
    ``on_ready`` gets the daemon's answers, one per port."""
    return hold_all(ep, [(HOLD_PORT, port) for port in ports], on_ready)


def hold_all(
    ep: Endpoint,
    requests: list[tuple[str, Any]],
    on_ready: Callable[[list[Any]], None] | None = None,
) -> int:
    """POST each (path, body) on one connection, then hold it as hold() does;
    each path ends in ``?hold=1``."""
    conn = connection(ep)
    # The handlers are in place before anyone is told the ports are there: a
    # SIGTERM right after on_ready is a clean stop, never the default death.
    with _stop_signals() as (stopped, wakeup):
        try:
            answers = [exchange(conn, ep, "POST", path, body) for path, body in requests]
            if on_ready is not None:
                on_ready(answers)
            assert conn.sock is not None  # connected by the requests above
            return _wait(conn.sock, stopped, wakeup)
        finally:
            conn.close()  # the daemon removes the ports


@contextlib.contextmanager
def _stop_signals() -> Iterator[tuple[list[int], int]]:
    """SIGTERM and SIGINT noted in a list instead of ending the process, and
    a pipe that wakes select() when one comes (signal.set_wakeup_fd)."""
    stopped: list[int] = []
    rd, wr = os.pipe()
    os.set_blocking(rd, False)
    os.set_blocking(wr, False)
    old_fd = signal.set_wakeup_fd(wr)  # the main thread only: ValueError elsewhere
    old = {s: signal.signal(s, lambda n, _f: stopped.append(n)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stopped, rd
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_fd)
        os.close(rd)
        os.close(wr)


def _wait(sock: socket.socket, stopped: list[int], wakeup: int) -> int:
    """Block until a stop signal (0) or the peer's close (1)."""
    sock.setblocking(False)
    fd = sock.fileno()
    while not stopped:
        ready, _, _ = select.select([fd, wakeup], [], [])
        if wakeup in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(wakeup, 64)
        if fd in ready and not stopped:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                return 1
            if not data:
                return 1  # the daemon closed the connection: it stopped
    return 0


def hold_ports(
    control_path: str, ports: list[dict[str, Any]], *, on_ready: Callable[[], None] | None = None
) -> int:
    """The ser2net mode's call: hold ``ports`` through the control socket
    until SIGTERM/SIGINT (0) or the daemon goes away (1); see the module docstring."""
    ready = None if on_ready is None else (lambda _answers: on_ready())
    return hold(control_endpoint(control_path), ports, ready)


def hold_requests(
    control_path: str, requests: list[tuple[str, Any]], *, on_ready: Callable[[], None] | None = None
) -> int:
    """hold_ports for any held POSTs: (path, body) each; see the module docstring."""
    ready = None if on_ready is None else (lambda _answers: on_ready())
    return hold_all(control_endpoint(control_path), requests, ready)


def device_owner(control_path: str, device: str) -> dict[str, Any] | None:
    """The view of the daemon's port that owns ``device`` (a serial device's
    path, or HOST:PORT), or None. Raises as get() does."""
    answer = get(
        control_endpoint(control_path), f"/api/v1/ports?device={urllib.parse.quote(device, safe='')}"
    )
    ports = answer.get("ports") if isinstance(answer, dict) else None
    return ports[0] if isinstance(ports, list) and ports and isinstance(ports[0], dict) else None


def daemon_reachable(control_path: str) -> bool:
    """Whether a muxd answers its API on this control socket."""
    try:
        get(control_endpoint(control_path), "/api/v1/ports")
    except ApiError:
        return False
    return True
