"""The error taxonomy, in h11's style.

A RemoteProtocolError is the peer's fault: garbage on the wire. It closes that
peer only. A LocalProtocolError is ours: we were asked to do something the
protocol forbids. A ConfigError is the operator's: it names the file, the line
and the key path so the fix is obvious. A SettingsRefused is the device's (or
the link's): the line settings asked for cannot be put in force, and nothing
changed.
"""

from __future__ import annotations


class MuxdError(Exception):
    """Base of every error muxd raises on purpose."""


class RemoteProtocolError(MuxdError):
    """The peer sent something we cannot accept; close that peer only."""


class LocalProtocolError(MuxdError):
    """We tried to do something the protocol does not allow: a bug of ours."""


class ConfigError(MuxdError):
    """A configuration problem, located as ``FILE:LINE: key.path: message``."""

    def __init__(self, message: str, path: str = "", line: int | None = None, file: str = "") -> None:
        self.message = message
        self.path = path
        self.line = line
        self.file = file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where = f"{where}:{self.line}"
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class SettingsRefused(MuxdError, ValueError):
    """An upstream cannot put these line settings in force; nothing was changed.

    The message says why (the device rejected a value, the link cannot carry
    it, the upstream has no way to change settings). The requester is answered
    with the settings still in force. It is also a ValueError because that is
    what a value the device cannot take has always been, for callers that
    catch the broader class.
    """
