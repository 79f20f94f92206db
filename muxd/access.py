"""Who may connect, and what a connection may do: address allow-lists and scoped tokens.

Allow-lists
    A listener's (or an HTTP server's) ``allow:`` is a list of networks. It is
    checked on the accepted socket's peer address before anything else is
    done with it: before the client object exists, before a banner, a telnet
    negotiation or an HTTP byte is sent. A refused socket is simply closed. An
    IPv4-mapped IPv6 peer (``::ffff:10.0.0.5``, as a dual-stack socket reports
    IPv4 clients) is matched as the IPv4 address it is, so ``10.0.0.0/8``
    admits it; an IPv6 zone (``fe80::1%eth0``) is ignored. A peer that is not
    an IP address (a Unix socket) is never refused: ``allow:`` is not accepted
    on Unix listeners. An empty list means no list: everybody may connect.

Tokens
    An HTTP server's ``tokens:`` name files, each holding one secret, with a
    scope: ``read`` < ``write`` < ``admin``, each implying those below. The
    secrets are read by the HTTP front when it starts and on every reload
    (never by the config loader, whose result is shown in errors and logs),
    and are never logged, shown in /api or exported in /metrics. A request
    presents a secret as ``Authorization: Bearer SECRET``; a browser's
    WebSocket, which cannot set headers, presents it in
    ``Sec-WebSocket-Protocol`` as ``bearer.<base64url(SECRET)>`` next to the
    protocol ``muxd``, which the server then selects (the Kubernetes API
    server's scheme). Base64url makes any secret a valid protocol token, and
    the header, unlike a ``?token=`` query, is not part of the target that
    proxies and error messages quote.

    Matching runs hmac.compare_digest against every configured secret, with
    no early exit, so the time taken does not tell how much of a guess was
    right, nor which token matched.

    A token file is refused (at start, on reload, and by ``muxd check``) when
    it is readable by others (mode & 0o004), holds a placeholder such as the
    old example's ``change-me-...``, is shorter than MIN_TOKEN_CHARS, or holds
    anything but printable ASCII without spaces.
"""

from __future__ import annotations

import base64
import binascii
import errno
import ipaddress
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from muxd.errors import MuxdError
from muxd.files import opened, read_fd

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
_RANK = {scope: i for i, scope in enumerate(SCOPES)}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# 16 characters of a random base64 text are 96 bits: beyond guessing over a
# network; `openssl rand -base64 24` (the documented recipe) gives 32.
MIN_TOKEN_CHARS = 16
# A token file holds one line; anything much longer is not a token file, and
# the loop reads it (on every SIGHUP): a bounded read.
MAX_TOKEN_BYTES = 4096
# Texts that are never real secrets: the old example config's placeholder
# and its obvious variants (compared in lower case, as prefixes).
PLACEHOLDERS = ("change-me", "changeme", "change_me", "replace-me", "secret", "password", "xxxx")
# The WebSocket subprotocol the console asks for, and the prefix of the one
# that carries the secret.
WS_PROTOCOL = "muxd"
WS_BEARER_PREFIX = "bearer."


class AccessError(MuxdError):
    """A token file that cannot be used; the message names the file and why."""


# -- allow-lists -------------------------------------------------------------------


def parse_network(text: str) -> Network:
    """A CIDR ("10.0.0.0/8", "2001:db8::/32") or a single address; host bits
    set ("10.0.0.5/8") are an error: that is a typo more often than not."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not a network in CIDR form such as 10.0.0.0/8 or fd00::/8: {exc}") from None


def peer_address(host: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's IP address as matched against allow-lists: an IPv4-mapped
    IPv6 address is its IPv4 address. None if not an IP address."""
    if isinstance(host, tuple) and host:
        host = host[0]
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def permitted(allow: Sequence[Network], host: object) -> bool:
    """Whether a peer (an address string or accept()'s address tuple) may
    connect under this allow-list. An empty list permits everybody."""
    if not allow:
        return True
    ip = peer_address(host)
    if ip is None:
        return True  # not an IP peer (a Unix socket): allow-lists do not apply
    return any(ip.version == net.version and ip in net for net in allow)


# -- tokens -------------------------------------------------------------------------


def scope_allows(have: Scope | None, need: Scope) -> bool:
    return have is not None and _RANK[have] >= _RANK[need]


def read_token_file(path: str) -> str:
    """The secret in a token file, checked; AccessError says what is wrong."""
    # muxd.files: a FIFO or device planted there must not block the loop on
    # SIGHUP, nor a symlink redirect the read; the previous tokens then stay.
    try:
        with opened(path, MAX_TOKEN_BYTES, follow=False) as (fd, st):
            if st.st_mode & 0o004:
                raise AccessError(
                    f"token file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                    f"chmod o-r {path}"
                )
            data = read_fd(fd, MAX_TOKEN_BYTES, path)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            why = f"token file {path} is over {MAX_TOKEN_BYTES} bytes: one token expected"
            raise AccessError(why) from None
        raise AccessError(f"cannot read token file {path}: {exc.strerror}") from None
    # A trailing newline is what `echo` and editors add; it is not part of the token.
    text = data.decode("ascii", "replace").strip()
    if not text or any(not (0x21 <= ord(c) <= 0x7E) for c in text):
        raise AccessError(f"token file {path} must hold one token of printable ASCII, no spaces")
    if text.lower().startswith(PLACEHOLDERS):
        raise AccessError(
            f"token file {path} holds a placeholder, not a secret: "
            "write a random one, e.g. `openssl rand -base64 24`"
        )
    if len(text) < MIN_TOKEN_CHARS:
        raise AccessError(
            f"token file {path} holds {len(text)} characters; at least {MIN_TOKEN_CHARS} needed"
        )
    return text


@dataclass(frozen=True)
class TokenSpec:
    """A token as the config names it: a name for the log, its file, its scope."""

    name: str
    file: str
    scope: Scope


class Tokens:
    """An HTTP server's secrets, loaded from their files, and the check of a
    presented one. ``Tokens(())`` is the server without tokens."""

    def __init__(self, entries: Iterable[tuple[TokenSpec, str]] = ()) -> None:
        # (name, scope, secret as bytes): bytes, as compare_digest wants equal types.
        self._entries = [(spec.name, spec.scope, secret.encode()) for spec, secret in entries]

    @classmethod
    def load(cls, specs: Sequence[TokenSpec]) -> Tokens:
        """Read every token file; raises AccessError for the first bad one."""
        return cls((spec, read_token_file(spec.file)) for spec in specs)

    @property
    def configured(self) -> bool:
        return bool(self._entries)

    def match(self, presented: str | None) -> tuple[str, Scope] | None:
        """(name, scope) of the token presented, or None. Every secret is
        compared, so the time does not depend on which one matched."""
        if presented is None or not self._entries:
            return None
        import hmac  # memory: libcrypto only where tokens are configured (docs/benchmarks.md)

        given = presented.encode("utf-8", "surrogateescape")
        found: tuple[str, Scope] | None = None
        for name, scope, secret in self._entries:
            if hmac.compare_digest(given, secret) and found is None:
                found = (name, scope)
        return found

    def __repr__(self) -> str:  # never the secrets
        return f"Tokens({[(name, scope) for name, scope, _ in self._entries]})"


def bearer(authorization: str | None) -> str | None:
    """The secret of an ``Authorization: Bearer SECRET`` header, or None."""
    if authorization is None:
        return None
    kind, _, secret = authorization.strip().partition(" ")
    return secret.strip() if kind.lower() == "bearer" and secret.strip() else None


def ws_protocols(header_values: Iterable[str]) -> list[str]:
    """The subprotocols a WebSocket request offers, in order."""
    return [p.strip() for value in header_values for p in value.split(",") if p.strip()]


def ws_bearer(protocols: Iterable[str]) -> str | None:
    """The secret a browser put in Sec-WebSocket-Protocol as bearer.<base64url>."""
    for proto in protocols:
        if proto.startswith(WS_BEARER_PREFIX):
            encoded = proto[len(WS_BEARER_PREFIX) :]
            try:
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            except (binascii.Error, ValueError):
                return None
            return raw.decode("utf-8", "surrogateescape")
    return None


def presented(authorization: str | None, ws_offered: Iterable[str] = ()) -> str | None:
    """The secret a request presents: ``Authorization: Bearer``, else (a
    browser's WebSocket) the ``bearer.<base64url>`` subprotocol offered."""
    secret = bearer(authorization)
    return secret if secret is not None else ws_bearer(ws_offered)


def ws_offer(secret: str) -> list[str]:
    """What a browser-like client offers to present ``secret`` (tests, tools)."""
    encoded = base64.urlsafe_b64encode(secret.encode()).decode().rstrip("=")
    return [WS_PROTOCOL, WS_BEARER_PREFIX + encoded]
