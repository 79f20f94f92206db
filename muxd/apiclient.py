"""One client for a running muxd's HTTP API: where it is, how to speak to it, who asks.

`muxd status`, `muxd tail` and `muxd ctl` all reach the daemon through an
``Endpoint`` made here, so they find it, trust it and present a token alike:

Where
    ``--url`` (a URL, HOST:PORT or a bare PORT), or the first http server of
    the config given with ``-c`` (a wildcard bind is reached on loopback).
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

This module stays light: `muxd tail` imports it, and the config module (and
PyYAML with it) is imported only when ``-c`` is given; urllib.request only
by the JSON calls.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.parse
from dataclasses import dataclass
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

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} ({status})")
        self.status = status
        self.message = message


def refusal(status: int, reason: str) -> ApiError:
    """The exception for an HTTP error answer."""
    return Unauthorised(status, reason) if status in (401, 403) else Refused(status, reason)


@dataclass(frozen=True)
class Endpoint:
    """A daemon's HTTP server: its base URL, the TLS context for https, the token."""

    url: str
    context: ssl.SSLContext | None = None
    token: str | None = None

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
) -> Endpoint:
    """The daemon to ask, from --url or -c FILE (see the module docstring).

    Raises ValueError for a bad --url, token file or certificate file, and
    muxd.errors.ConfigError for a config that cannot be read or has no http server.
    """
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


def _call(ep: Endpoint, path: str, body: dict[str, Any] | None = None, method: str = "GET") -> Any:
    import urllib.error
    import urllib.request

    headers = ep.headers()
    data = None
    if method == "POST":
        data = json.dumps(body or {}).encode()
        headers["content-type"] = "application/json"
    req = urllib.request.Request(ep.url.rstrip("/") + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT, context=ep.context) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            message = str(json.load(exc).get("error", exc.reason))[:MAX_REASON]
        except (ValueError, AttributeError):  # not JSON, or not an object: not muxd's answer
            message = str(exc.reason)
        raise refusal(exc.code, message) from None
    except urllib.error.URLError as exc:
        raise Unreachable(f"cannot reach {ep.url}: {exc.reason}") from None
    except ValueError as exc:  # json.JSONDecodeError: something else answers there
        raise Unreachable(f"{ep.url} is not muxd's API: {exc}") from None
    except OSError as exc:  # a timeout or reset while reading the answer
        raise Unreachable(f"{ep.url}: {exc.strerror or exc}") from None


def get(ep: Endpoint, path: str) -> Any:
    """GET path's JSON; raises Unreachable, Unauthorised or Refused."""
    return _call(ep, path)


def post(ep: Endpoint, path: str, body: dict[str, Any] | None = None) -> Any:
    """POST JSON to path; the answer's JSON. Raises as get() does."""
    return _call(ep, path, body, "POST")


def quote(name: str) -> str:
    """A port or sequence name as one path segment."""
    return urllib.parse.quote(name, safe="")
