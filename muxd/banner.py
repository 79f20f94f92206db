"""A listener's banner: text sent to each client as it connects.

The template uses ser2net's escapes (ser2net.yaml(5), "SPECIAL STRING
HANDLING"), so a ser2net banner works unchanged: the C escapes ``\\r \\n \\t
\\a \\b \\f \\v \\\\ \\? \\' \\"``, ``\\nnn`` (octal) and ``\\xHH``, and the
values known only at connect time: ``\\p`` the listener's local port, ``\\d``
the device (a serial path, or HOST:PORT of a TCP upstream), ``\\B`` the line
settings in force (``9600N81``), ``\\o`` the port's name, ``\\I`` the
client's address. As in ser2net, a new line needs ``\\r\\n``: the bytes go out
raw. Write the template in single quotes (or plain), never double quotes,
where YAML would take the backslashes itself.

``check(template)`` returns the first bad escape (for the config loader);
``expand(template, context)`` gives the bytes. No I/O here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from muxd.protocol.line_settings import LineSettings

# A banner goes out before anything else, in one write: 4 KiB is a screenful
# of text, far beyond any login notice, and small against a client's backlog.
MAX_BANNER = 4096

_C_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
    "?": "?",
    "'": "'",
    '"': '"',
}
_CONTEXT_ESCAPES = "pdBoI"
_ESCAPE_RE = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|.)", re.DOTALL)


@dataclass(frozen=True)
class BannerContext:
    port: str = ""  # the listener's local port number
    device: str = ""
    settings: LineSettings | None = None
    name: str = ""  # the muxd port's name
    peer: str = ""  # the client's address


def serial_params(settings: LineSettings) -> str:
    """ser2net's ``\\B``: ``9600N81``."""
    stop = "1.5" if settings.stopbits == 1.5 else str(int(settings.stopbits))
    return f"{settings.baudrate}{settings.parity}{settings.bytesize}{stop}"


def check(template: str) -> str | None:
    """None if every escape of the template is known, else a sentence saying which is not."""
    if template.endswith("\\") and not template.endswith("\\\\"):
        return "ends with a lone backslash"
    for match in _ESCAPE_RE.finditer(template):
        esc = match.group(1)
        if esc[0] not in _C_ESCAPES and esc[0] not in _CONTEXT_ESCAPES and esc[0] not in "x01234567":
            return (
                f"unknown escape \\{esc[0]} (known: \\r \\n \\t \\xHH \\nnn, \\p port, \\d device, "
                "\\B line settings, \\o name, \\I client address)"
            )
    if len(_expand(template, BannerContext())) > MAX_BANNER:
        return f"longer than {MAX_BANNER} bytes"
    return None


def expand(template: str, context: BannerContext) -> bytes:
    """The banner's bytes for one client (UTF-8 for the text, raw for \\xHH and
    \\nnn), at most MAX_BANNER (a long device path cannot make it unbounded)."""
    return _expand(template, context)[:MAX_BANNER]


def _expand(template: str, context: BannerContext) -> bytes:
    values = {
        "p": context.port,
        "d": context.device,
        "B": serial_params(context.settings) if context.settings is not None else "",
        "o": context.name,
        "I": context.peer,
    }
    out = bytearray()
    pos = 0
    for match in _ESCAPE_RE.finditer(template):
        out += template[pos : match.start()].encode()
        pos = match.end()
        esc = match.group(1)
        if esc[0] == "x" and len(esc) > 1:
            out.append(int(esc[1:], 16))
        elif esc[0] in "01234567":
            out.append(int(esc, 8) & 0xFF)
        elif esc in _C_ESCAPES:
            out += _C_ESCAPES[esc].encode()
        elif esc in values:
            out += values[esc].encode()
        else:  # refused by check() at load time; kept as written if it ever gets here
            out += match.group(0).encode()
    out += template[pos:].encode()
    return bytes(out)
