"""A Conversion as muxd YAML text, with its comments beside what they explain.

PyYAML cannot write comments, so the file is laid out here, one key a line,
and only the scalars go through ``yaml.safe_dump`` (which quotes whatever
needs quoting, and never double-quotes a banner's backslashes: muxd reads
ser2net's escapes itself, muxd.banner). The text loads back as exactly
``{"ports": conversion.data}`` (tests/test_ser2net.py checks that).
"""

from __future__ import annotations

from typing import Any

import yaml

from muxd.ser2net.convert import Conversion


def scalar(value: Any) -> str:
    text: str = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, allow_unicode=True)
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    if isinstance(value, str) and "\\" in value and text.startswith('"'):
        # A double-quoted string would turn ser2net's \r into YAML's; keep them literal.
        text = "'" + value.replace("'", "''") + "'"
    return text


def _comments(lines: list[str], indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in lines]


def _mapping(data: dict[str, Any], indent: str, first: str) -> list[str]:
    """A block mapping, its first line prefixed with ``first`` (``- `` in a list)."""
    out = []
    for i, (key, value) in enumerate(data.items()):
        lead = first if i == 0 else indent
        if isinstance(value, dict):
            out.append(f"{lead}{key}:")
            out += _mapping(value, indent + "  ", indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            out.append(f"{lead}{key}:")
            for entry in value:
                out += _mapping(entry, indent + "    ", indent + "  - ")
        elif isinstance(value, list):  # block style: "::1/128" is not a plain scalar in a flow list
            out.append(f"{lead}{key}:")
            out += [f"{indent}  - {scalar(v)}" for v in value]
        else:
            out.append(f"{lead}{key}: {scalar(value)}")
    return out


def render(conversion: Conversion) -> str:
    out = [
        f"# muxd configuration converted from {conversion.source} (ser2net.yaml(5))",
        "# by `muxd convert ser2net`.",
        "# ser2net opens a device per connection; muxd owns each device once: one port per",
        "# device, one listener per ser2net connection (named by its anchor).",
    ]
    out += _comments(conversion.comments, "")
    out.append("ports:")
    for port in conversion.ports:
        out += _comments(port.comments, "  ")
        head = {k: v for k, v in port.data.items() if k != "listeners"}
        listeners = port.data["listeners"]
        out += _mapping(head, "    ", "  - ")
        out.append("    listeners:")
        for lst, notes in zip(listeners, port.listener_comments, strict=True):
            out += _comments(notes, "      ")
            out += _mapping(lst, "        ", "      - ")
    return "\n".join(out) + "\n"
