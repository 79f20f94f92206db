"""The value grammars of the config file: sizes, durations, addresses, modes, groups.

Each parser takes a value as YAML gives it (a str, an int, a float, a bool or
None) and returns it converted, or raises ValueError (or returns None, for the
two that callers test) with a message for the operator; the reader
(muxd.config.yaml_reader) puts the key path and the line in front. Nothing
here imports YAML or touches the machine, so the command line, the control-line
sequences (muxd.sequences) and the HTTP code share these grammars without
loading a YAML parser.

Every parser is bounded: digit counts are capped before ``int()`` (which
refuses past 4,300 digits and is quadratic before that), and no message
quotes more than SHOW_CHARS of a value.
"""

from __future__ import annotations

import ipaddress
import math
import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEFAULT_HOST = "127.0.0.1"  # safe by default: nothing is exposed beyond this machine unless asked

PARITY_NAMES = {"none": "N", "even": "E", "odd": "O", "mark": "M", "space": "S"}
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # used with fullmatch: "$" alone lets a final newline in
# An MQTT client id: 23 characters is what every broker must accept (MQTT
# 3.1.1, 3.1.3.1); longer ones are refused, not cut, since a cut id could clash.
CLIENT_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,23}")
# A topic prefix: levels of printable characters, no wildcards, no empty level.
PREFIX_RE = re.compile(r"[^/#+\s\x00]{1,64}(/[^/#+\s\x00]{1,64}){0,7}")

# What an error message quotes of a value: enough to recognise it, one line.
SHOW_CHARS = 60

# ASCII digits only: \d would take other scripts' digits, and a bounded count keeps
# int() below its 4,300-digit limit (anything longer is out of range anyway).
_SIZE_RE = re.compile(r"\s*([0-9]{1,30})\s*([KMG]i?B?|B)?\s*", re.IGNORECASE)
# One grammar for every duration: the config's keys, a sequence's waits and
# BREAKs (muxd.sequences), `muxd ctl --break`. A number alone is seconds. The
# digits are not capped: float() has no length limit and a huge value becomes
# inf, which every range check refuses.
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_HOSTNAME_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


def show(value: object) -> str:
    """A value for an error message: its repr, cut short, always one line."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        # repr() of an int past 4,300 digits raises; no message needs the digits anyway.
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 3] + "..."


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def no_nul(text: str, what: str) -> str:
    """`text` unchanged; ValueError if it holds a NUL, which no path, group or
    name may: os.open(), bind() and getgrnam() raise on it (ValueError, not
    OSError), at start or at reload, long after the file was checked."""
    if "\x00" in text:
        raise ValueError(f"{what} cannot hold a NUL character, got {show(text)}")
    return text


def parse_size(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if not isinstance(v, str):
        return None
    m = _SIZE_RE.fullmatch(v)
    if not m:
        return None
    unit = (m.group(2) or "B").upper()[0]
    return int(m.group(1)) * {"B": 1, "K": KiB, "M": MiB, "G": GiB}[unit]


def parse_duration(v: object) -> float | None:
    """Seconds: a number (seconds), or a string such as ``500ms``, ``5s``, ``1m``,
    ``2h`` or ``30``; None when `v` is not a duration (negative, NaN, no number).

    A value too large for a float becomes inf, which every range check refuses.
    """
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return float(v) if v >= 0 and v.bit_length() <= 1023 else (math.inf if v >= 0 else None)
    if isinstance(v, float):
        return v if v >= 0 else None  # NaN fails the comparison too
    if not isinstance(v, str):
        return None
    m = _DURATION_RE.fullmatch(v)
    if not m:
        return None
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_hostport(
    v: object, default_host: str = DEFAULT_HOST, allow_any_port: bool = True
) -> tuple[str, int]:
    """'HOST:PORT', '[V6]:PORT', ':PORT' or 'PORT' (which binds the safe default host).

    Port 0 is accepted unless `allow_any_port` is False: on an address muxd
    listens on, it lets the kernel pick a free port. A port to connect to (the
    tcp upstream) must be 1..65535, so that caller says False.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        if v.bit_length() > 64:
            raise ValueError(f"port must be 1..65535, got {show(v)}")
        host, port_s = default_host, str(v)
    elif isinstance(v, str):
        text = v.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"expected [IPV6]:PORT, got {show(v)}")
            port_s = rest[1:]
        elif ":" in text:
            host, _, port_s = text.rpartition(":")
            if ":" in host:
                raise ValueError(f"IPv6 addresses need brackets: {show(f'[{host}]:{port_s}')}")
        else:
            host, port_s = "", text
        host = host or default_host
    else:
        raise ValueError(f"expected HOST:PORT, got {show(v)}")
    if not re.fullmatch(r"[0-9]{1,11}", port_s):
        raise ValueError(f"expected HOST:PORT with a numeric port, got {show(v)}")
    port = int(port_s)
    if not (0 if allow_any_port else 1) <= port <= 65535:
        # 0 stays out of the message: it is a wildcard, not a port number.
        raise ValueError(f"port must be 1..65535, got {port}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise ValueError(f"not a valid host: {show(host)}") from None
    return host, port


def parse_peer_address(v: object) -> tuple[str, int]:
    """A HOST:PORT muxd connects to (the K2, the MQTT broker): a real port, and
    a numeric IP, since the stdlib resolver blocks and a dead DNS server would
    freeze every reader."""
    host, port = parse_hostport(v, allow_any_port=False)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"give a numeric IP address, not {show(host)} (name lookups would block)") from None
    return host, port


def parse_server_name(v: object) -> str:
    """A name for Host headers: a DNS host name or an IP address (IPv6 without
    brackets), no port. Returned in lower case, as Host is compared without case."""
    if not isinstance(v, str) or not v:
        raise ValueError(f"expected a host name or IP address, got {show(v)}")
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        pass
    name = v.lower()
    if len(name) > 253 or not _HOSTNAME_RE.fullmatch(name):
        raise ValueError(f"not a valid host name (no port, no brackets, no wildcards): {show(v)}")
    return name


def parse_file_mode(v: object) -> int:
    """Permissions such as ``0660`` (a string, read as octal) or 432 (an int)."""
    shown = show(v)
    if isinstance(v, str):
        try:
            # Bounded: a mode has at most 4 digits, and int() of a long text is slow.
            v = int(v, 8) if len(v) <= 16 else None
        except ValueError:
            v = None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
        raise ValueError(f"expected an octal mode such as 0660, got {shown}")
    return v


def parse_group(v: object) -> str | int:
    """A group name or gid. Whether this machine has it is muxd.checks' question."""
    # An empty or null group is an error rather than "the default group": a
    # template that expanded to nothing should not quietly open the file wider.
    if isinstance(v, bool) or not isinstance(v, str | int) or v == "":
        raise ValueError(f"expected a group name or gid, got {show(v)}")
    if isinstance(v, int) and not 0 <= v < 2**32 - 1:
        # -1 would tell chown() to leave the group unchanged: another silent default.
        raise ValueError(f"a gid must be 0..{2**32 - 2}, got {show(v)}")
    return no_nul(v, "a group name") if isinstance(v, str) else v
