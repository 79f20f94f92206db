"""The web console's files: package data under muxd/web, served by the HTTP front.

Every file the console has is listed once, into an index of relative paths,
and read once, on its first request: package data does not change while we
run. A request's path segments are looked up in that index, so a crafted path
never reaches the file system (where a 256-byte segment raises ENAMETOOLONG,
and a traversal could escape muxd/web), and every connection sends the same
bytes without a copy.

The files are found by a plain path next to this module, not through
importlib.resources: both installs (editable, and the .deb's dist-packages)
keep package data on disk beside the code, and importlib.resources would
import tempfile, zipfile, bz2 and lzma into every daemon, with or without
an HTTP front (memory: docs/benchmarks.md).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import NamedTuple

WEB = Path(__file__).parent / "web"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    "": "text/plain; charset=utf-8",  # LICENSE, VERSIONS
}
# The console's files, read once: package data does not change while we run,
# and every connection then sends the same bytes without a copy.
_web_cache: dict[str, bytes] = {}
# Relative path -> file, of every file the console has, listed once. A request
# is looked up here, so its path never reaches the file system (where a
# 256-byte segment raises ENAMETOOLONG, and a traversal could escape).
_web_index: dict[str, Path] | None = None
# Directory depth listed: the console's tree is 3 deep.
WEB_DEPTH = 8


class WebFile(NamedTuple):
    body: bytes
    content_type: str


def _list_web(node: Path, prefix: str, depth: int, out: dict[str, Path]) -> None:
    for child in node.iterdir():
        if child.name.startswith((".", "__")):
            continue
        if child.is_dir():
            if depth < WEB_DEPTH:
                _list_web(child, f"{prefix}{child.name}/", depth + 1, out)
        elif PurePosixPath(child.name).suffix in CONTENT_TYPES:
            out[prefix + child.name] = child


def web_files() -> dict[str, Path]:
    global _web_index
    if _web_index is None:
        index: dict[str, Path] = {}
        _list_web(WEB, "", 0, index)
        _web_index = index
    return _web_index


def web_file(segments: list[str]) -> WebFile | None:
    """A file of the console, or None; never anything outside muxd/web."""
    # A segment holding "/" (from %2F) is not a path of ours: no aliases.
    if not segments or any("/" in s for s in segments):
        return None
    rel = "/".join(segments)
    node = web_files().get(rel)
    if node is None:
        return None
    body = _web_cache.get(rel)
    if body is None:
        body = _web_cache[rel] = node.read_bytes()
    return WebFile(body, CONTENT_TYPES[PurePosixPath(rel).suffix])
