"""An HTTP answer as the front builds it and a connection sends it.

A Reply is a whole response held in memory: status, body, content type and
extra headers. HttpFront (muxd.listeners.http) makes one per request, and
HttpConnection (muxd.listeners.http_connection) frames it with h11 and adds
Content-Length, Content-Type and nosniff; both build error answers here,
JSON under /api and plain text elsewhere.
"""

from __future__ import annotations

import http
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    # Something the connection now holds (a port added with ?hold=1): the
    # connection is kept open without an idle timeout, and this runs when it ends.
    on_close: Callable[[], None] | None = None


def json_reply(status: int, obj: Any) -> Reply:
    return Reply(status, json.dumps(obj).encode() + b"\n", "application/json")


def error_reply(status: int, message: str, api_path: bool) -> Reply:
    if api_path:
        return json_reply(status, {"error": message})
    return Reply(status, f"{status} {http.HTTPStatus(status).phrase}: {message}\n".encode())
