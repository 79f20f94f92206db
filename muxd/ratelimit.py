"""Rate-limited logging of what peers make us refuse.

A peer that is refused (max_clients reached, a malformed RFC 2217 packet, an
unknown Host) can be refused thousands of times a second, and a log line per
refusal lets one client write megabytes of journal a minute. A LogLimiter sits
between such call sites and their logger:

- Lines are keyed by (peer, kind). ``kind`` is the caller's name for the
  refusal ("max_clients", "rfc2217", "host"), so one peer's flood of one kind
  does not hide its other kinds, nor other peers' lines.
- The peer is its address without the port (a reconnecting client gets a new
  port each time), and for IPv6 its /64 network: one host owns a whole /64 and
  picks addresses from it at will (privacy addresses), so keying by address
  would give it an unlimited number of keys.
- Per key, at most one line per ``interval`` is written. The lines held back
  are counted, and the next line written for that key says how many there
  were, so the journal still tells the size of a flood.
- Memory is bounded: at most ``max_keys`` keys are remembered, the one
  written to longest ago is forgotten first. Forgetting a key only means its
  next line is written at once (and any count it held is reported in the
  ``forgotten`` total), so the bound costs at most one extra line per
  forgotten key, never an unbounded table.

The limiter never raises for a peer it cannot parse: an unparsable peer (a Unix
socket path, "") is its own key.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# One line per peer and kind per minute: a journal that an operator reads
# still shows every attacker and every kind of refusal within a minute, while
# a flood costs one line a minute instead of thousands a second.
LOG_INTERVAL = 60.0
# Keys remembered. Each is a tuple and a small record, about 300 bytes: 4096
# keys are about 1.2 MiB at most. A flood from more distinct peers than this
# within one interval is a distributed one, where every forgotten key costs one
# extra line; memory, not the journal, is what must stay bounded then.
MAX_KEYS = 4096
# IPv6 peers are grouped by this prefix: the /64 a host is given (RFC 4291's
# interface identifier is the low 64 bits).
IPV6_PREFIX = 64


def peer_key(peer: object) -> str:
    """The part of a peer address that identifies its host.

    ``peer`` is a host string ("10.0.0.5", "::1", "[::1]:80", "10.0.0.5:8000"),
    an address tuple as accept() gives it, or anything else (used as text).
    IPv4-mapped IPv6 addresses are their IPv4 address; other IPv6 addresses
    are their /64 network.
    """
    if isinstance(peer, tuple) and peer:
        peer = peer[0]
    text = peer if isinstance(peer, str) else str(peer)
    host = text
    if text.startswith("["):  # "[v6]:port"
        host = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # "v4:port" or "name:port"
        host = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # drop an IPv6 zone
    except ValueError:
        return text
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


@dataclass
class _Entry:
    written: float  # when the last line for this key was written
    suppressed: int = 0  # lines held back since


class LogLimiter:
    """At most one log line per (peer, kind) per interval; see the module docstring.

    ``log(level, peer, kind, msg, *args)`` writes ``msg % args`` to the logger
    if the key's interval has passed since its last line, with the count of
    lines held back meanwhile appended, and returns True; otherwise it counts
    the line and returns False. ``warning``/``info``/``debug`` are shorthands.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = LOG_INTERVAL,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self.suppressed_total = 0  # lines ever held back, for tests and metrics
        self.forgotten = 0  # held-back lines whose count was lost to eviction
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def log(self, level: int, peer: object, kind: str, msg: str, *args: object) -> bool:
        if not self.logger.isEnabledFor(level):
            return False  # nothing would be written: do not spend a key on it
        key = (peer_key(peer), kind)
        now = self.clock()
        entry = self._entries.get(key)
        if entry is not None and now - entry.written < self.interval:
            entry.suppressed += 1
            self.suppressed_total += 1
            return False
        suppressed, since = (entry.suppressed, entry.written) if entry is not None else (0, now)
        if entry is None:
            while len(self._entries) >= self.max_keys:
                _, old = self._entries.popitem(last=False)
                self.forgotten += old.suppressed
            self._entries[key] = _Entry(now)
        else:
            entry.written, entry.suppressed = now, 0
            self._entries.move_to_end(key)
        if suppressed:
            msg += " (%d more like it from %s in the last %.0fs)"
            args = (*args, suppressed, key[0], now - since)
        self.logger.log(level, msg, *args)
        return True

    def warning(self, peer: object, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, peer, kind, msg, *args)

    def info(self, peer: object, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.INFO, peer, kind, msg, *args)

    def debug(self, peer: object, kind: str, msg: str, *args: object) -> bool:
        return self.log(logging.DEBUG, peer, kind, msg, *args)
